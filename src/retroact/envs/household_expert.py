"""The scripted household expert: an honest ReAct planner and its reflector.

Both read only what a model reads: the first observation, the (action, observation) history and
the memory of reflections, never the task payload. The planner searches places in a fixed prior
order (:data:`LIKELY_PLACES` first, then the rest of the room), puts places its memory names first
and places its memory calls empty last, and writes templated ``think:`` lines at key points. With
the step limit it fails when an object lies somewhere unlikely; its reflection then lists the
places it checked and where to start next time. All of it is a plain function of the visible text,
so a small model can learn to imitate it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from retroact.envs.alfworld_text import (
    LAMP,
    LIKELY_PLACES,
    NOTHING,
    TOOLS,
    Action,
    Goal,
    kind_of,
    listed_items,
    number_of,
    parse_action,
    parse_goal,
    room_receptacles,
)
from retroact.models.base import PlannerView, ReflectorView
from retroact.models.scripted import ScriptedPolicy

# Reflection sentences the planner reads back from its memory.
_PLACE = re.compile(r"[a-z]+ \d+")
_PLACES = r"(?P<places>[a-z]+ \d+(?:(?:, | and )[a-z]+ \d+)*)"
_FOUND = re.compile(rf"I found an? (?P<kind>\w+) in {_PLACES}\.")
_CHECKED = re.compile(rf"I checked {_PLACES} but found no (?:other )?(?P<kind>\w+)\.")


@dataclass
class Notes:
    """What the agent knows: its memory, and the trial so far replayed from the visible text."""

    goal: Goal
    places: list[str]
    found: dict[str, list[str]] = field(default_factory=dict)
    """From memory: object type -> places it was seen in."""
    checked: dict[str, list[str]] = field(default_factory=dict)
    """From memory: object type -> places searched without finding it."""
    at: str = ""
    closed: bool = False
    """The place the agent stands at showed up closed."""
    holding: str = ""
    treated: bool = False
    """The held object was cleaned, heated or cooled."""
    seen: dict[str, list[str]] = field(default_factory=dict)
    """Place -> objects in it, for the places whose contents were shown this trial (in visit order)."""
    spotted: dict[str, str] = field(default_factory=dict)
    """Object -> place where it was first seen this trial."""
    placed: list[str] = field(default_factory=list)

    def see(self, place: str, items: list[str]) -> None:
        self.seen[place] = items
        for item in items:
            self.spotted.setdefault(item, place)

    def first(self, kind: str) -> str:
        """The lowest-numbered place of a type ("sidetable 1"), or the bare type if the room has none."""
        return min((p for p in self.places if kind_of(p) == kind), key=number_of, default=kind)

    def locate(self, kind: str) -> tuple[str, str] | None:
        """(place, object) of a seen object of this type that was not already put at the target."""
        for place, items in self.seen.items():
            for item in items:
                if kind_of(item) == kind and item not in self.placed:
                    return place, item
        return None

    def search_order(self, kind: str) -> list[str]:
        """Unvisited places to look for a type: remembered, then likely, then the rest, then checked."""
        prior = LIKELY_PLACES.get(kind, ())
        # A stable sort: within a rank, places keep the room's listing order, so the plan a thought
        # writes out is a copy of the first observation with the likely types moved to the front.
        rank = {kind: i for i, kind in enumerate(prior)}
        ranked = sorted(self.places, key=lambda p: rank.get(kind_of(p), len(prior)))
        # The goal's own target type cannot already hold the object (the task would be done).
        unlikely = {*self.checked.get(kind, []), *(p for p in self.places if kind_of(p) == self.goal.target)}
        order = [p for p in self.found.get(kind, []) if p in self.places]
        order += [p for p in ranked if p not in unlikely] + [p for p in ranked if p in unlikely]
        return [p for p in dict.fromkeys(order) if p not in self.seen]


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _join(places: Sequence[str]) -> str:
    return places[0] if len(places) == 1 else ", ".join(places[:-1]) + " and " + places[-1]


def read(first_observation: str, history: Sequence[tuple[str, str]], memory: Sequence[str]) -> Notes:
    """Replay the visible text into :class:`Notes`; raises ValueError if the task cannot be read."""
    goal = parse_goal(first_observation)
    if goal is None:
        raise ValueError(f"no household task in the first observation: {first_observation[-120:]!r}")
    n = Notes(goal, room_receptacles(first_observation))
    for text in memory:
        for m in _FOUND.finditer(text):
            n.found.setdefault(m["kind"], []).extend(_PLACE.findall(m["places"]))
        for m in _CHECKED.finditer(text):
            n.checked.setdefault(m["kind"], []).extend(_PLACE.findall(m["places"]))
    for line, obs in history:
        a = parse_action(line)
        if a is None or obs == NOTHING:
            continue
        if a.verb in ("go", "open"):
            n.at = a.place
            n.closed = obs.startswith(f"The {a.place} is closed")
            if not n.closed:
                n.see(a.place, listed_items(obs))
        elif a.verb == "take":
            n.holding, n.treated = a.obj, False
            if a.obj in n.seen.get(a.place, []):
                n.seen[a.place].remove(a.obj)
        elif a.verb == "put":
            n.holding = ""
            n.placed.append(a.obj)
            n.seen.setdefault(a.place, []).append(a.obj)
        elif a.verb in TOOLS:
            n.treated = True
    return n


def next_action(n: Notes) -> Action:
    """The next command (never a thought) given what the agent knows."""
    g = n.goal
    if n.holding:
        if g.kind in TOOLS and not n.treated:
            tool = n.first(TOOLS[g.kind])
            return Action("go", place=tool) if n.at != tool else Action(g.kind, n.holding, tool)
        if g.kind == "examine":
            lamp = n.locate(LAMP)
            if lamp is None:
                return _explore(n, LAMP)
            return Action("go", place=lamp[0]) if n.at != lamp[0] else Action("use", lamp[1])
        target = n.first(g.target)
        if n.at != target:
            return Action("go", place=target)
        return Action("open", place=target) if n.closed else Action("put", n.holding, target)
    hit = n.locate(g.obj)
    if hit is None:
        return _explore(n, g.obj)
    return Action("go", place=hit[0]) if n.at != hit[0] else Action("take", hit[1], hit[0])


def _explore(n: Notes, kind: str) -> Action:
    if n.closed:
        return Action("open", place=n.at)
    order = n.search_order(kind)
    return Action("go", place=order[0]) if order else Action("look")


def _where_next(n: Notes) -> str:
    return next_action(n).place or "the room"


def _search_plan(n: Notes, kind: str) -> str:
    """Where the agent will look for ``kind``, spelled out: the place it was seen, or the whole search order.

    Naming every place once, in order, turns each later ``go to`` into copying the next name of this line.
    The order opens with the places of the likely types, so the thought first names those types (as
    ReAct's ALFWorld thoughts do): each place of the plan is then a copy from this line or the room's list.
    """
    hit = n.locate(kind)
    places = [hit[0]] if hit else n.search_order(kind)
    if len(places) < 2:
        return f"I will go to {places[0] if places else 'the room'}"
    in_room = {kind_of(p) for p in places} - {n.goal.target}
    likely = [t for t in LIKELY_PLACES.get(kind, ()) if t in in_room]
    prior = f"{_a(kind).capitalize()} is more likely to appear in {_join(likely)}. " if likely else ""
    return f"{prior}I will check {_join(places)}, in this order"


def _start_thought(n: Notes) -> str:
    g, target = n.goal, n.first(n.goal.target)
    if g.kind == "examine":
        todo = f"find {_a(g.obj)} and look at it under the {LAMP}"
    elif g.kind == "puttwo":
        todo = f"find two {g.obj} and put them in/on {target} one by one"
    elif g.kind in TOOLS:
        todo = f"find {_a(g.obj)}, {g.kind} it with {n.first(TOOLS[g.kind])}, then put it in/on {target}"
    else:
        todo = f"find {_a(g.obj)} and put it in/on {target}"
    return f"think: To solve the task, I need to {todo}. {_search_plan(n, g.obj)}."


def _took_thought(n: Notes) -> str:
    g = n.goal
    if g.kind in TOOLS:
        step = f"I will {g.kind} it with {n.first(TOOLS[g.kind])}"
    elif g.kind == "examine":
        lamp = n.locate(LAMP)
        if lamp:
            step = f"I will use the {lamp[1]} in {lamp[0]}"
        else:
            step = f"I need {_a(LAMP)}. {_search_plan(n, LAMP)}"
    else:
        step = f"I will put it in/on {n.first(g.target)}"
    return f"think: Now I have the {n.holding}. Next, {step}."


def plan(view: PlannerView) -> str:
    """The planner: one action line (or a thought) from the visible text only."""
    n = read(view.first_observation, view.history, view.memory)
    if not view.history:
        return _start_thought(n)
    line, obs = view.history[-1]
    last = parse_action(line)
    if last is not None and last.verb == "take" and obs.startswith("You pick up"):
        return _took_thought(n)
    if last is not None and last.verb == "put" and obs.startswith("You put") and n.goal.kind == "puttwo":
        return (f"think: Now one {n.goal.obj} is in/on {n.first(n.goal.target)}. I need another "
                f"{n.goal.obj}. {_search_plan(n, n.goal.obj)}.")
    return str(next_action(n))


def reflect(view: ReflectorView) -> str:
    """The reflector: what was found and checked in the failed trial, and where to start next time."""
    n = read(view.first_observation, view.history, view.memory)
    g = n.goal
    if view.reward > 0:
        return "I solved the task. Next time I will do the same."
    needed = {g.obj: 2 if g.kind == "puttwo" else 1, **({LAMP: 1} if g.kind == "examine" else {})}
    facts, missing = [], []
    for kind, count in needed.items():
        items = [item for item in n.spotted if kind_of(item) == kind]
        if items:
            facts.append(f"I found {_a(kind)} in {_join(list(dict.fromkeys(n.spotted[i] for i in items)))}.")
        if len(items) < count:
            missing.append(f"another {kind}" if items else _a(kind))
            if n.seen:
                other = "other " if items else ""
                facts.append(f"I checked {_join(list(n.seen))} but found no {other}{kind}.")
    head = "I found all I needed but ran out of steps."
    if missing:
        head = f"I did not find {missing[0]} in time."
    text = " ".join([head, *facts])
    start = _where_next(read(view.first_observation, (), (*view.memory, text)))
    return f"{text} Next time I will start with {start}."


def mistake(view: PlannerView, rng: random.Random) -> str | None:
    """A wrong line a small student tends to write here, or None.

    The two commonest first deviations of the demo's IL agent from the expert (docs/il.md): taking
    the sought object from a place that showed none, and going to a place the room does not have.
    Only while searching, empty-handed, at an open place without the object, and never twice in a
    row. Both get "Nothing happens.", and the expert's next line is the recovery a student learns.
    """
    n = read(view.first_observation, view.history, view.memory)
    if n.holding or not n.at or n.closed or view.history[-1][1] == NOTHING:
        return None
    if any(kind_of(item) == n.goal.obj for item in n.seen.get(n.at, [])):
        return None
    if rng.random() < 0.5:
        return f"take {n.goal.obj} {rng.randint(1, 3)} from {n.at}"
    kind = kind_of(rng.choice(n.places))
    return f"go to {kind} {max(number_of(p) for p in n.places if kind_of(p) == kind) + 1}"


def experts(mistakes: float = 0.0, seed: int = 0) -> tuple[ScriptedPolicy, ScriptedPolicy]:
    """(planner, reflector) scripted experts for the household env.

    ``mistakes``: the probability that the planner writes a :func:`mistake` at a step that has one
    (see :class:`~retroact.models.scripted.ScriptedPolicy`); 0 for the plain expert.
    """
    planner = ScriptedPolicy("expert:household", plan, mistake=mistake, mistake_rate=mistakes, seed=seed)  # type: ignore[arg-type]
    return planner, ScriptedPolicy("expert:household", reflect)  # type: ignore[arg-type]
