"""ALFWorld's handcoded expert as a scripted ReAct planner, with noise, reflections and memory.

The planner replays the visible history in a private copy of the game that ALFWorld's handcoded
expert follows, and writes the expert's next command, with ``think:`` lines at the start, after
taking an object and after the first of two objects is placed. It walks on its own only when it
knows better where to go:

- to a needed object it has already seen this trial (the expert forgets the other objects of a type
  once it has taken one, which costs it whole sweeps in two-object tasks);
- with memory (reflections from earlier trials) it searches like the household expert: remembered
  places first, places its memory calls empty last, so it starts exactly where its reflection said;
- noise: with probability ``noise`` a trial without memory searches badly, the least likely places
  first (:data:`LIKELY_PLACES` reversed, ties in a seeded random order), and stops to think after
  each place that lacks the object. Such a trial often runs out of steps.

The reflector is the household expert's (:func:`~retroact.envs.household_expert.reflect`): the
games speak the same grammar, so it reads a real trajectory just as well and names the places
where it found things, the places it checked in vain, and where to start next time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from retroact.envs.alfworld import Game, alfworld_data, game_path
from retroact.envs.alfworld_text import LIKELY_PLACES, NOTHING, TOOLS, Goal, kind_of, parse_action
from retroact.envs.household_expert import Notes, next_action, read, reflect
from retroact.models.base import PlannerView, Policy
from retroact.models.scripted import ScriptedPolicy

NOISE = 0.3
History = tuple[tuple[str, str], ...]


@dataclass
class _Shadow:
    """The expert's private copy of one task's game, and the history replayed into it."""

    game: Game
    trial: int = -1
    replayed: History = ()
    in_step: bool = True
    """Every replayed command gave the observation the real env gave."""


def _as_visits(history: History) -> History:
    """The history with each examined place that showed its contents written as a visit to it, the
    only way :func:`~retroact.envs.household_expert.read` learns what a place holds."""
    out = []
    for line, obs in history:
        action = parse_action(line)
        if action is not None and action.verb == "examine" and obs.startswith(
                (f"On the {action.obj},", f"The {action.obj} is")):
            line = f"go to {action.obj}"
        out.append((line, obs))
    return tuple(out)


def _searching(n: Notes) -> str | None:
    """The object type the agent is looking for and has not seen yet this trial, if any."""
    g = n.goal
    if n.holding and g.kind != "examine":
        return None
    kind = g.target if n.holding else g.obj
    return kind if n.locate(kind) is None else None


def _todo(g: Goal) -> str:
    if g.kind == "puttwo":
        return f"find one {g.obj}, put it in/on the {g.target}, then do the same with a second {g.obj}"
    if g.kind == "examine":
        return f"find the {g.obj}, then look at it under the {g.target}"
    if g.kind in TOOLS:
        return f"find the {g.obj}, {g.kind} it with the {TOOLS[g.kind]}, then put it in/on the {g.target}"
    return f"find the {g.obj}, then put it in/on the {g.target}"


def _next_stop(command: str, lead: str) -> str:
    """`` <lead> <place>.`` when the command walks somewhere, else nothing."""
    action = parse_action(command)
    return f" {lead} {action.place}." if action is not None and action.verb == "go" else ""


class AlfworldExpert:
    """Scripted planner (:meth:`plan`) over ALFWorld's handcoded expert; one private game per task."""

    def __init__(self, noise: float = NOISE, seed: int = 0, data_dir: str | None = None) -> None:
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {noise}")
        self.noise, self.seed, self.root = noise, seed, alfworld_data(data_dir)
        self._shadows: dict[str, _Shadow] = {}

    def noisy(self, view: PlannerView) -> bool:
        """Whether this trial searches badly (never with memory: a reflection steers the search)."""
        rng = random.Random(f"{self.seed}/{view.task.id}/{view.trial}/noise")
        return not view.memory and rng.random() < self.noise

    def plan(self, view: PlannerView) -> str:
        """One action line (or thought) for the view."""
        n = read(view.first_observation, _as_visits(view.history), view.memory)
        command = self._command(view, n, self._sync(view))
        g = n.goal
        if not view.history:
            task = view.first_observation.rsplit("Your task is to: ", 1)[-1].strip().rstrip(".")
            return f"think: To {task}, I need to {_todo(g)}.{_next_stop(command, 'First I will check')}"
        line, obs = view.history[-1]
        last = parse_action(line)
        if last is None:
            return command
        if last.verb == "take" and obs.startswith("You pick up"):
            step = (f"{g.kind} it with the {TOOLS[g.kind]}" if g.kind in TOOLS
                    else f"look at it under the {g.target}" if g.kind == "examine"
                    else f"put it in/on the {g.target}")
            return f"think: I have the {last.obj} now. Next I will {step}."
        if last.verb == "put" and obs.startswith("You put") and g.kind == "puttwo":
            return f"think: One {g.obj} is in/on the {g.target}. Now I need a second one." + _next_stop(
                command, "I will look in")
        sought = _searching(n)
        if (sought and last.verb in ("go", "open") and last.place in n.seen and command.startswith("go to ")
                and self.noisy(view)):
            return f"think: There is no {sought} in {last.place}.{_next_stop(command, 'Next I will check')}"
        return command

    def _command(self, view: PlannerView, n: Notes, shadow: _Shadow) -> str:
        """The expert's next command, unless the agent walks on its own (see :meth:`_own_walk`)."""
        if view.history:
            line, obs = view.history[-1]
            last = parse_action(line)
            if last is not None and last.verb == "go" and obs == NOTHING and last.place in n.places:
                # Places side by side share one spot: going from one to the other does nothing,
                # examining it shows what is there.
                return f"examine {last.place}"
        expert = shadow.game.expert_command if shadow.in_step else None
        if expert is None or expert.startswith("go to "):
            own = self._own_walk(view, n)
            if own is not None:
                return own
        # Without a command from the game copy (it lost step, or the expert has none the game
        # accepts) the household expert's policy, which reads only the visible text, carries on.
        return expert if expert is not None else str(next_action(n))

    def _own_walk(self, view: PlannerView, n: Notes) -> str | None:
        """Where to go instead of where the expert would (module docstring); None follows the expert."""
        if n.holding and n.goal.kind != "examine":
            return None
        sought = _searching(n)
        if sought is None:
            return None if n.holding else str(next_action(n))  # walk to the object already seen
        if view.memory:
            return str(next_action(n))
        if not self.noisy(view):
            return None
        if n.closed:
            return f"open {n.at}"
        order = list(n.places)
        random.Random(f"{self.seed}/{view.task.id}/{view.trial}/order").shuffle(order)
        prior = LIKELY_PLACES.get(sought, ())
        order.sort(key=lambda p: -prior.index(kind_of(p)) if kind_of(p) in prior else -len(prior))
        return next((f"go to {p}" for p in order if p not in n.seen), None)

    def _sync(self, view: PlannerView) -> _Shadow:
        """The task's game copy, restarted for a new trial and advanced through the new history."""
        shadow = self._shadows.get(view.task.id)
        if shadow is None:
            game = Game(game_path(view.task, self.root), expert=True, seed=self.seed)
            shadow = self._shadows[view.task.id] = _Shadow(game)
        done = len(shadow.replayed)
        if shadow.trial != view.trial or view.history[:done] != shadow.replayed:
            shadow.game.reset()
            shadow.trial, shadow.replayed, shadow.in_step, done = view.trial, (), True, 0
        for line, obs in view.history[done:]:
            action = parse_action(line)
            if action is not None and action.verb != "think":
                text, _ = shadow.game.send(str(action))
                shadow.in_step = shadow.in_step and text == obs
        shadow.replayed = view.history
        return shadow


def experts(noise: float = NOISE, seed: int = 0, data_dir: str | None = None) -> tuple[Policy, Policy]:
    """``EnvSpec.experts`` of the alfworld env: (planner, reflector)."""
    expert = AlfworldExpert(noise=noise, seed=seed, data_dir=data_dir)
    planner = ScriptedPolicy("expert:alfworld", expert.plan)  # type: ignore[arg-type]
    return planner, ScriptedPolicy("expert:alfworld", reflect)  # type: ignore[arg-type]
