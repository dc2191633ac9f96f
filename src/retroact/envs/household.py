"""A procedurally generated household world with ALFWorld's grammar and six task types.

A task's payload is plain data (a world seed, the room type, the goal and its phrasing); the env
rebuilds the same world from it on every reset. The options of :class:`HouseholdEnv` set the
world's size. Closed receptacles hide their contents until opened; the agent holds one object.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field
from functools import cache

from retroact.envs.alfworld_text import (
    LAMP,
    LIKELY_PLACES,
    NOTHING,
    TASK_KINDS,
    TOOLS,
    Action,
    Goal,
    item_list,
    kind_of,
    number_of,
    parse_action,
)
from retroact.envs.base import EnvSpec, PromptStyle, StepResult, Task, clean_action, seeded_sample
from retroact.envs.household_expert import experts, plan, reflect
from retroact.models.base import PlannerView, ReflectorView

# Receptacle type -> most copies a room can have.
ROOMS: dict[str, dict[str, int]] = {
    "kitchen": {"cabinet": 6, "countertop": 3, "drawer": 3, "diningtable": 1, "fridge": 1, "microwave": 1,
                "sinkbasin": 1, "stoveburner": 4, "garbagecan": 1, "coffeemachine": 1, "shelf": 2},
    "bathroom": {"cabinet": 4, "countertop": 1, "drawer": 2, "sinkbasin": 2, "bathtubbasin": 1, "toilet": 1,
                 "garbagecan": 1, "towelholder": 1, "handtowelholder": 1, "toiletpaperhanger": 1, "shelf": 2},
    "bedroom": {"bed": 1, "desk": 1, "drawer": 4, "dresser": 1, "shelf": 3, "sidetable": 2, "garbagecan": 1,
                "safe": 1, "armchair": 1},
    "livingroom": {"sofa": 1, "coffeetable": 1, "sidetable": 2, "armchair": 2, "shelf": 3, "drawer": 3,
                   "cabinet": 3, "garbagecan": 1, "tvstand": 1, "dresser": 1},
}
ROOM_OBJECTS: dict[str, tuple[str, ...]] = {
    "kitchen": ("apple", "bread", "egg", "lettuce", "potato", "tomato", "mug", "cup", "plate", "bowl", "pan",
                "pot", "kettle", "knife", "butterknife", "fork", "spoon", "spatula", "ladle", "saltshaker",
                "peppershaker", "winebottle", "dishsponge"),
    "bathroom": ("soapbar", "soapbottle", "spraybottle", "toiletpaper", "cloth", "handtowel", "candle",
                 "tissuebox", "scrubbrush", "dishsponge"),
    "bedroom": ("book", "cellphone", "keychain", "creditcard", "pen", "pencil", "cd", "alarmclock", "laptop",
                "pillow", "watch", "box"),
    "livingroom": ("remotecontrol", "statue", "vase", "newspaper", "keychain", "creditcard", "laptop",
                   "pillow", "watch", "box", "book", "cellphone"),
}
OPENABLE = frozenset({"cabinet", "drawer", "fridge", "microwave", "safe"})
NOT_TARGETS = frozenset({"coffeemachine", "towelholder", "handtowelholder", "toiletpaperhanger"})
FOOD = ("apple", "bread", "egg", "potato", "tomato")
CAN = {  # which objects each transforming task accepts
    "clean": frozenset({"apple", "egg", "lettuce", "potato", "tomato", "mug", "cup", "plate", "bowl", "pan",
                        "pot", "kettle", "knife", "butterknife", "fork", "spoon", "spatula", "ladle",
                        "dishsponge", "soapbar", "cloth"}),
    "heat": frozenset({*FOOD, "mug", "cup", "plate"}),
    "cool": frozenset({*FOOD, "lettuce", "mug", "cup", "plate", "bowl", "pan", "pot", "winebottle"}),
}
STATE = {"clean": "clean", "heat": "hot", "cool": "cool"}
N_TRAIN, N_TEST = 6000, 300
MAX_STEPS = 20


def is_unseen(obj: str, target: str) -> bool:
    """Goal combinations held out of ``train`` (about one in five): the out-of-distribution test tasks."""
    return zlib.crc32(f"{obj}>{target}".encode()) % 5 == 0


@cache
def _combos(kind: str, unseen: bool) -> tuple[tuple[str, str, str], ...]:
    """Every (room, object, target type) a task of this kind can have, held out of train or not."""
    out = []
    for room, catalogue in ROOMS.items():
        if kind in TOOLS and TOOLS[kind] not in catalogue:
            continue
        if kind == "examine" and not any(t in catalogue for t in LIKELY_PLACES[LAMP]):
            continue
        for obj in ROOM_OBJECTS[room]:
            if kind in CAN and obj not in CAN[kind]:
                continue
            targets = [LAMP] if kind == "examine" else [
                t for t in catalogue if t not in NOT_TARGETS and t != TOOLS.get(kind)]
            out += [(room, obj, t) for t in targets if is_unseen(obj, t) == unseen]
    return tuple(out)


def _make_task(split: str, index: int) -> Task:
    """Task ``index`` of a split; even test indices take a held-out goal combination."""
    rng = random.Random(f"household/{split}/{index}")
    kind = TASK_KINDS[index // 2 % len(TASK_KINDS)]
    unseen = split == "test" and index % 2 == 0
    room, obj, target = rng.choice(_combos(kind, unseen))
    payload = {"seed": index if split == "train" else 10**6 + index, "room": room, "kind": kind,
               "object": obj, "target": target, "phrasing": rng.randrange(2), "unseen": unseen}
    return Task(id=f"household-{split}-{index:05d}", split=split, payload=payload)


@cache
def _pool(split: str) -> tuple[Task, ...]:
    sizes = {"train": N_TRAIN, "test": N_TEST}
    if split not in sizes:
        raise ValueError(f"household has no split {split!r}; splits: train, test")
    return tuple(_make_task(split, i) for i in range(sizes[split]))


def tasks(split: str, n: int | None = None, seed: int = 0) -> list[Task]:
    """``n`` tasks of ``split`` (all if None) in a seed-dependent, deterministic order."""
    return seeded_sample(_pool(split), n, seed)


# -- the world --------------------------------------------------------------------------------


@dataclass
class World:
    goal: Goal
    receptacles: list[str]
    """Listed as the engine does: types alphabetically, higher numbers first."""
    contents: dict[str, list[str]]
    opened: set[str] = field(default_factory=set)
    states: dict[str, set[str]] = field(default_factory=dict)
    """Object -> {"clean", "hot", "cool", "on"}."""
    phrasing: int = 0
    """Which of ALFWorld's two wordings of the goal the task uses."""
    at: str = ""
    holding: str = ""

    def overview(self) -> str:
        return ("You are in the middle of a room. Looking quickly around you, you see "
                f"{item_list(self.receptacles)}.")

    def describe(self, place: str) -> str:
        if kind_of(place) not in OPENABLE:
            return f"On the {place}, you see {item_list(self.contents[place])}."
        if place not in self.opened:
            return f"The {place} is closed."
        return f"The {place} is open. In it, you see {item_list(self.contents[place])}."

    def reachable(self, place: str) -> bool:
        """At the place, and it is open if it can be."""
        return self.at == place and (kind_of(place) not in OPENABLE or place in self.opened)

    def solved(self) -> bool:
        g = self.goal
        if g.kind == "examine":
            here = self.contents.get(self.at, [])
            return kind_of(self.holding) == g.obj and any("on" in self.states[o] for o in here
                                                          if kind_of(o) == LAMP)
        need = STATE.get(g.kind)
        count = 2 if g.kind == "puttwo" else 1
        return any(
            sum(kind_of(o) == g.obj and (need is None or need in self.states[o]) for o in items) >= count
            for r, items in self.contents.items() if kind_of(r) == g.target
        )

    def act(self, a: Action) -> str | None:
        """The observation after ``a``, or None when nothing happens."""
        if a.verb == "think":
            return "OK."
        if a.verb == "look":
            if self.at:
                return f"You are facing the {self.at}. Next to it, you see nothing."
            return self.overview()
        if a.verb == "inventory":
            if self.holding:
                return f"You are carrying: a {self.holding}."
            return "You are not carrying anything."
        if a.verb == "go" and a.place in self.contents:
            self.at = a.place
            return self.describe(a.place)
        if a.verb in ("open", "close") and self.at == a.place and kind_of(a.place) in OPENABLE:
            if a.verb == "open" and a.place not in self.opened:
                self.opened.add(a.place)
                return f"You open the {a.place}. {self.describe(a.place)}"
            if a.verb == "close" and a.place in self.opened:
                self.opened.discard(a.place)
                return f"You close the {a.place}."
            return None
        if (a.verb == "take" and not self.holding and self.reachable(a.place)
                and a.obj in self.contents[a.place] and kind_of(a.obj) != LAMP):
            self.contents[a.place].remove(a.obj)
            self.holding = a.obj
            return f"You pick up the {a.obj} from the {a.place}."
        if a.verb == "put" and a.obj and a.obj == self.holding and self.reachable(a.place):
            self.contents[a.place].append(a.obj)
            self.holding = ""
            return f"You put the {a.obj} in/on the {a.place}."
        if (a.verb in TOOLS and a.obj and a.obj == self.holding and self.at == a.place
                and kind_of(a.place) == TOOLS[a.verb] and kind_of(a.obj) in CAN[a.verb]):
            state = self.states[a.obj]
            state.discard({"heat": "cool", "cool": "hot"}.get(a.verb, ""))  # heating undoes cooling
            state.add(STATE[a.verb])
            return f"You {a.verb} the {a.obj} using the {a.place}."
        if a.verb == "use" and a.obj in self.contents.get(self.at, []) and kind_of(a.obj) == LAMP:
            on = "on" not in self.states[a.obj]
            self.states[a.obj].symmetric_difference_update({"on"})
            return f"You turn {'on' if on else 'off'} the {a.obj}."
        if a.verb == "examine":
            if a.obj == self.at:
                return self.describe(a.obj)
            if a.obj and (a.obj == self.holding or a.obj in self.contents.get(self.at, [])):
                return self._examine_object(a.obj)
        return None

    def _examine_object(self, obj: str) -> str:
        state = self.states[obj]
        if kind_of(obj) == LAMP:
            return f"This {obj} is {'on' if 'on' in state else 'off'}."
        temperature = next((w for w in ("hot", "cool") if w in state), "")
        if temperature and "clean" in state:
            return f"This is a {temperature} and clean {obj}."
        if temperature or "clean" in state:
            return f"This is a {'cold' if temperature == 'cool' else temperature or 'clean'} {obj}."
        return f"There's nothing special about {obj}."


def build_world(payload: dict[str, object], *, receptacles: int, distractors: int, likely: float) -> World:
    """The world of a task payload; raises ValueError naming a missing or bad field."""
    try:
        seed, room, kind = int(payload["seed"]), str(payload["room"]), str(payload["kind"])  # type: ignore[call-overload]
        goal = Goal(kind, str(payload["object"]), str(payload["target"]))
        phrasing = int(payload.get("phrasing", 0)) % 2  # type: ignore[call-overload]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"household task payload needs int 'seed' and 'phrasing', and str 'room', 'kind', "
                         f"'object', 'target': {err!r} in {payload!r}") from None
    if (room not in ROOMS or kind not in TASK_KINDS or goal.obj not in ROOM_OBJECTS[room]
            or goal.target not in ([LAMP] if kind == "examine" else ROOMS[room])):
        raise ValueError(f"household task payload: unknown room, kind, object or target in {payload!r}")
    rng = random.Random(f"household-world/{seed}/{room}/{kind}/{goal.obj}/{goal.target}")
    catalogue = ROOMS[room]
    homes = [t for t in LIKELY_PLACES[goal.obj] if t in catalogue and t != goal.target]
    lamp_homes = [t for t in LIKELY_PLACES[LAMP] if t in catalogue]
    # Types the goal needs, then random extra copies up to the requested size.
    counts = dict.fromkeys([goal.target, TOOLS.get(kind, ""), *homes[:1], "garbagecan"], 1)
    if kind == "examine":
        counts = dict.fromkeys([*homes[:1], rng.choice(lamp_homes), "garbagecan"], 1)
    counts.pop("", None)
    counts.pop(LAMP, None)
    while sum(counts.values()) < receptacles:
        room_left = [t for t, most in catalogue.items() if counts.get(t, 0) < most]
        if not room_left:
            break
        t = rng.choice(room_left)
        counts[t] = counts.get(t, 0) + 1
    names = [f"{t} {i}" for t in sorted(counts) for i in range(counts[t], 0, -1)]
    contents: dict[str, list[str]] = {r: [] for r in names}

    def place(obj: str, p_likely: float, allowed: list[str]) -> None:
        likely_spots = [r for r in allowed if kind_of(r) in LIKELY_PLACES[kind_of(obj)]]
        other_spots = [r for r in allowed if r not in likely_spots]
        spots = likely_spots if likely_spots and (not other_spots or rng.random() < p_likely) else other_spots
        contents[rng.choice(spots)].append(obj)

    free = [r for r in names if kind_of(r) != goal.target]
    for number in sorted(rng.sample(range(1, 4), 2 if kind == "puttwo" else 1)):
        place(f"{goal.obj} {number}", likely, free)
    if kind == "examine":
        place(f"{LAMP} 1", 1.0, [r for r in names if kind_of(r) in lamp_homes])
    others = [o for o in ROOM_OBJECTS[room] if o != goal.obj]
    made: dict[str, int] = {}
    for obj in sorted(rng.choice(others) for _ in range(distractors)):
        made[obj] = made.get(obj, 0) + 1
        place(f"{obj} {made[obj]}", 0.8, names)
    for items in contents.values():
        items.sort(key=lambda o: (kind_of(o), number_of(o)))
    states: dict[str, set[str]] = {o: set() for items in contents.values() for o in items}
    return World(goal, names, contents, states=states, phrasing=phrasing)


class HouseholdEnv:
    """The household text env. ``step`` takes a raw model line and never raises."""

    def __init__(self, *, receptacles: int = 14, distractors: int = 6, likely: float = 0.5) -> None:
        """``receptacles``: room size (4-30); ``distractors``: extra objects; ``likely``: chance that a goal
        object lies in one of its usual places (:data:`LIKELY_PLACES`) rather than anywhere else."""
        if not 4 <= receptacles <= 30 or not 0 <= distractors <= 60 or not 0.0 <= likely <= 1.0:
            raise ValueError(f"household options out of range: receptacles={receptacles} (4-30), "
                             f"distractors={distractors} (0-60), likely={likely} (0-1)")
        self.options = {"receptacles": receptacles, "distractors": distractors, "likely": likely}
        self.world: World | None = None
        self.done = False

    def reset(self, task: Task) -> str:
        self.world = build_world(task.payload, **self.options)  # type: ignore[arg-type]
        self.done = False
        return f"{self.world.overview()}\nYour task is to: {self.world.goal.text(self.world.phrasing)}"

    def step(self, action: str) -> StepResult:
        if self.world is None:
            raise RuntimeError("call reset(task) before step()")
        parsed = parse_action(clean_action(action))
        obs = None if self.done or parsed is None else self.world.act(parsed)
        if obs is None:
            return StepResult(NOTHING, done=self.done, info={"valid": False})
        if self.world.solved():
            self.done = True
            return StepResult(obs, reward=1.0, done=True, info={"valid": True, "success": True})
        return StepResult(obs, info={"valid": True})


def _play(task: Task) -> tuple[str, list[tuple[str, str]], bool]:
    """One expert trial without memory: (first observation, history, solved)."""
    env = HouseholdEnv()
    first, history = env.reset(task), []
    for _ in range(MAX_STEPS):
        action = plan(PlannerView(task, first, (), tuple(history), 0))
        result = env.step(action)
        history.append((action, result.observation))
        if result.done:
            return first, history, True
    return first, history, False


def _exemplars() -> tuple[str, str]:
    """A solved trial for the planner and a failed one with its reflection, both played by the expert."""
    def text(first: str, history: list[tuple[str, str]]) -> str:
        return first + "\n" + "".join(f"> {a}\n{o}\n" for a, o in history)

    heat_tasks = (t for t in (_make_task("train", i) for i in range(N_TRAIN)) if t.payload["kind"] == "heat")
    played = map(_play, heat_tasks)
    solved = next(p for p in played if p[2])
    failed = next(p for p in played if not p[2])
    reflection = reflect(ReflectorView(Task("example", "train"), failed[0], (), tuple(failed[1]), 0.0, 0))
    return (f"Example of a solved task:\n{text(*solved[:2])}",
            f"Example:\nFailed trial:\n{text(*failed[:2])}Reflection: {reflection}")


_FEWSHOT, _REFLECTOR_FEWSHOT = _exemplars()
PROMPTS = PromptStyle(
    planner_instruction=(
        "Interact with a household to solve the task below. Write one action per line, or a thought "
        "that starts with \"think:\". Actions: go to X, open X, close X, take O from X, put O in/on X, "
        "clean O with X, heat O with X, cool O with X, use X, examine X, inventory, look."
    ),
    reflector_instruction=(
        "You failed the household task below. Write a short reflection: what went wrong, and a concrete "
        "plan for the next trial (for example, which places you already searched and where to look next)."
    ),
    step_prefix="> ",
    max_action_tokens=160,  # a plan thought names every place of the room (up to ~400 characters)
    max_reflection_tokens=128,  # a reflection lists every place checked in a trial
    fewshot=_FEWSHOT,
    reflector_fewshot=_REFLECTOR_FEWSHOT,
)

SPEC = EnvSpec(
    name="household", make=HouseholdEnv, tasks=tasks, experts=experts,  # type: ignore[arg-type]
    prompts=PROMPTS, max_steps=MAX_STEPS, memory_size=3, reflector_sees_memory=True,
)
