"""ALFWorld's real games on the TextWorld engine, offline (optional extra: ``scripts/install_alfworld.sh``).

The game files are ALFWorld's own release (``json_2.1.1/<split>/<task>/<trial>/game.tw-pddl``) in
the folder given by ``data_dir=``, else ``$ALFWORLD_DATA``, else ``data_root()/"alfworld"``. Splits:
``train`` (valid_train, 200 games), ``valid_seen`` (140) and ``test`` (valid_unseen, the paper's 134
out-of-distribution games). Model text goes through the same action parser as the built-in
household world, and engine text through the same clean-up, so both speak one grammar.

Only ALFWorld's text modules are loaded (:func:`load_engine`): its package ``__init__`` files would
import the 3D simulator (ai2thor, cv2, torchvision), which the text games never use.
"""

from __future__ import annotations

import copy
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from retroact.envs import household
from retroact.envs.alfworld_text import NOTHING, clean_observation, parse_action
from retroact.envs.base import EnvSpec, PromptStyle, StepResult, Task, clean_action, seeded_sample
from retroact.paths import data_root

if TYPE_CHECKING:
    from retroact.models.base import Policy

MAX_STEPS = 50
SPLITS = {"train": "valid_train", "valid_seen": "valid_seen", "test": "valid_unseen"}
"""Our split name -> ALFWorld's folder under ``json_2.1.1``."""
INSTALL_HINT = ("install it with scripts/install_alfworld.sh (alfworld 0.3.5 and textworld 1.7.0 without "
                "the 3D simulator's dependencies; see docs/alfworld.md)")


class MissingExtraError(ImportError):
    """The ``alfworld`` extra (textworld + alfworld 0.3.x) is not installed."""


def alfworld_data(path: str | Path | None = None) -> Path:
    """The ALFWorld data folder: ``path``, else ``$ALFWORLD_DATA``, else ``data_root()/"alfworld"``."""
    chosen = Path(path or os.environ.get("ALFWORLD_DATA") or data_root() / "alfworld").expanduser()
    if not (chosen / "json_2.1.1").is_dir():
        raise FileNotFoundError(
            f"ALFWorld data not found: {chosen / 'json_2.1.1'} does not exist. Point ALFWORLD_DATA (or the "
            f"env option data_dir, or RETROACT_DATA) at the folder holding json_2.1.1/ and logic/.")
    return chosen


# -- loading ALFWorld's text modules ---------------------------------------------------------------


@dataclass(frozen=True)
class Engine:
    """The parts of textworld and alfworld this env uses."""

    textworld: ModuleType
    demangler: type
    """``AlfredDemangler``: gives entities their readable names ("apple 1")."""
    expert: type
    """``AlfredExpert``: a wrapper that writes the handcoded expert's next command into the game state."""
    handcoded: ModuleType
    """``alfworld.agents.expert.handcoded_expert``; each expert game swaps in its own ``random``."""


def _bare_package(name: str) -> ModuleType:
    """Register package ``name`` in ``sys.modules`` without running its ``__init__.py``."""
    if name in sys.modules:
        return sys.modules[name]
    parent_name, _, child = name.rpartition(".")
    parent = importlib.import_module(parent_name)
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(Path(str(parent.__file__)).parent / child)]
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    setattr(parent, child, module)
    return module


def _translation_cache(translate: Callable[..., Any]) -> Callable[..., Any]:
    """fast_downward's PDDL translation, once per game, leaving ``sys.argv`` as it was.

    TextWorld translates a game's PDDL problem (about a second) on every load and every reset. The
    result is a pure function of the text and only read afterwards, so one translation serves all
    trials and both the env and the expert's copy (about 2 MB kept per game). The translator
    overwrites ``sys.argv`` for its option parser; the caller's is put back.
    """

    @cache
    def translated(*args: Any, **kwargs: Any) -> Any:
        argv = sys.argv
        try:
            return translate(*args, **kwargs)
        finally:
            sys.argv = argv

    return translated


def _parse_cache(parse: Callable[..., Any]) -> Callable[..., Any]:
    """TextWorld's text-grammar parser with memory: every step it re-parses the same few templates
    (about half of a step's time); callers get a fresh copy because they attach state to the result."""
    parsed = cache(parse)

    def parse_copy(*args: Any, **kwargs: Any) -> Any:
        return copy.deepcopy(parsed(*args, **kwargs))

    return parse_copy


@cache
def load_engine() -> Engine:
    """Import the TextWorld engine and ALFWorld's text-game modules (once); a clear error if absent.

    ``alfworld.agents.environment`` and ``alfworld.agents.expert`` are registered as bare packages,
    then the three text modules are imported and the expert package gets the names that
    ``alfred_tw_env`` imports from it (the real ``__init__`` would also import the THOR expert).
    """
    try:
        version = importlib.metadata.version("alfworld")
    except importlib.metadata.PackageNotFoundError:
        raise MissingExtraError(f"the alfworld env needs the 'alfworld' extra: {INSTALL_HINT}") from None
    if not version.startswith("0.3."):
        raise MissingExtraError(f"alfworld {version} is installed, but these games need alfworld 0.3.x "
                                f"(0.4 changed the command grammar): {INSTALL_HINT}")
    default_data = data_root() / "alfworld"
    if "ALFWORLD_DATA" not in os.environ and default_data.is_dir():
        # alfworld's top-level __init__ creates $ALFWORLD_DATA (else ~/.cache/alfworld) on import.
        os.environ["ALFWORLD_DATA"] = str(default_data)
    try:
        textworld = importlib.import_module("textworld")
        expert_package = _bare_package("alfworld.agents.expert")
        handcoded = importlib.import_module("alfworld.agents.expert.handcoded_expert")
        handcoded_tw = importlib.import_module("alfworld.agents.expert.handcoded_expert_tw")
        expert_package.HandCodedTWAgent = handcoded_tw.HandCodedTWAgent  # type: ignore[attr-defined]
        expert_package.HandCodedAgentTimeout = handcoded.HandCodedAgentTimeout  # type: ignore[attr-defined]
        expert_package.HandCodedAgentFailed = handcoded.HandCodedAgentFailed  # type: ignore[attr-defined]
        _bare_package("alfworld.agents.environment")
        tw_env = importlib.import_module("alfworld.agents.environment.alfred_tw_env")
        fast_downward = importlib.import_module("fast_downward")
        textgen = importlib.import_module("textworld.envs.pddl.textgen")
    except ImportError as err:
        missing = err.name or err
        raise MissingExtraError(f"the alfworld env could not import {missing}: {INSTALL_HINT}") from err
    fast_downward.pddl2sas = _translation_cache(fast_downward.pddl2sas)
    textgen._parse_and_convert = _parse_cache(textgen._parse_and_convert)
    return Engine(textworld, tw_env.AlfredDemangler, tw_env.AlfredExpert, handcoded)


class Game:
    """One game file on the TextWorld engine: loaded once, restarted by :meth:`reset`.

    With ``expert=True`` ALFWorld's handcoded expert follows the game and :attr:`expert_command` is
    its next command. The expert draws from a generator seeded per game, so its plans do not depend
    on other games played alongside.
    """

    def __init__(self, path: Path, *, expert: bool = False, seed: int = 0) -> None:
        self.engine = load_engine()
        self.path, self.expert, self.seed = path, expert, seed
        tw = self.engine.textworld
        infos = tw.EnvInfos(won=True, admissible_commands=expert, facts=expert)
        wrappers: list[Any] = [self.engine.demangler()]
        if expert:
            wrappers.append(self.engine.expert(expert_type="handcoded"))
        self._env = tw.start(str(path), request_infos=infos, wrappers=wrappers)
        self._rng = random.Random()
        self._state: Any = None

    def reset(self) -> str:
        """Restart the game; returns its first text, cleaned."""
        self._rng.seed(f"{self.seed}/{self.path.parent.parent.name}/{self.path.parent.name}")
        self._use_rng()
        self._state = self._env.reset()
        feedback = str(self._state.feedback)
        if self.expert:
            # The expert's first command is always "look"; take it here so that its next command is
            # a real plan (looking changes nothing in the world, so the game stays in step).
            self._state, _, _ = self._env.step("look")
        return clean_observation(feedback)

    def send(self, command: str) -> tuple[str, bool]:
        """(cleaned feedback, won) after one engine command."""
        self._use_rng()
        self._state, _, _ = self._env.step(command)
        return clean_observation(str(self._state.feedback)), bool(self._state["won"])

    @property
    def expert_command(self) -> str | None:
        """The handcoded expert's next command (expert games only), None when it has none.

        ALFWorld's wrapper writes "look" when the expert's command is not one the game accepts
        (mostly a place beside the one the agent stands at); that counts as none.
        """
        plan = self._state.get("extra.expert_plan") if self.expert and self._state is not None else None
        return str(plan[0]) if plan and plan[0] != "look" else None

    def _use_rng(self) -> None:
        if self.expert:
            self.engine.handcoded.random = self._rng  # type: ignore[attr-defined]

    def close(self) -> None:
        self._env.close()


# -- the env -----------------------------------------------------------------------------------


class AlfworldEnv:
    """The real ALFWorld games as a :class:`~retroact.envs.base.TextEnv`; ``step`` never raises on model text.

    ``think: ...`` answers ``OK.``; text that is no command, or a command the game rejects, answers
    ``Nothing happens.`` (``valid`` False). A game stays loaded while its task is reset again.
    """

    def __init__(self, *, data_dir: str | None = None) -> None:
        load_engine()  # fail at construction, with the install hint, when the extra is missing
        self.root = alfworld_data(data_dir)
        self.game: Game | None = None
        self.done = False

    def reset(self, task: Task) -> str:
        path = game_path(task, self.root)
        if self.game is None or self.game.path != path:
            if self.game is not None:
                self.game.close()
            self.game = Game(path)
        self.done = False
        return self.game.reset()

    def step(self, action: str) -> StepResult:
        if self.game is None:
            raise RuntimeError("call reset(task) before step()")
        parsed = parse_action(clean_action(action))
        if self.done or parsed is None:
            return StepResult(NOTHING, done=self.done, info={"valid": False})
        if parsed.verb == "think":
            return StepResult("OK.", info={"valid": True})
        try:
            text, won = self.game.send(str(parsed))
        except Exception as err:  # noqa: BLE001 - an engine hiccup on odd input ends nothing
            return StepResult(NOTHING, info={"valid": False, "error": f"{type(err).__name__}: {err}"})
        if won:
            self.done = True
            return StepResult(text, reward=1.0, done=True, info={"valid": True, "success": True})
        return StepResult(text, info={"valid": text != NOTHING})

    def close(self) -> None:
        if self.game is not None:
            self.game.close()
            self.game = None


# -- tasks -------------------------------------------------------------------------------------


def game_path(task: Task, root: Path) -> Path:
    """The game file of a task; ValueError naming the task when its payload or file is wrong."""
    game = task.payload.get("game")
    if not isinstance(game, str) or not game:
        raise ValueError(f"alfworld task {task.id}: payload needs a 'game' path, got {task.payload!r}")
    path = root / game
    if not path.is_file():
        raise ValueError(f"alfworld task {task.id}: game file {path} does not exist")
    return path


@cache
def _games(split: str, root: Path) -> tuple[Task, ...]:
    folder = root / "json_2.1.1" / SPLITS[split]
    files = sorted(folder.glob("*/*/game.tw-pddl"))
    if not files:
        raise FileNotFoundError(f"no ALFWorld games (*/*/game.tw-pddl) under {folder}")
    # Task folders are named "<task_type>-<object>-...-<scene>".
    return tuple(
        Task(id=f"alfworld-{split}-{i:03d}", split=split, payload={
            "game": path.relative_to(root).as_posix(), "task_type": path.parent.parent.name.split("-")[0]})
        for i, path in enumerate(files))


def tasks(split: str, n: int | None = None, seed: int = 0) -> list[Task]:
    """``n`` games of ``split`` (all if None) in a seed-dependent, deterministic order."""
    if split not in SPLITS:
        raise ValueError(f"alfworld has no split {split!r}; splits: {', '.join(SPLITS)}")
    return seeded_sample(_games(split, alfworld_data()), n, seed)


def _experts(**options: object) -> tuple[Policy, Policy]:
    # The expert module plays games through this one, so it is imported on use.
    from retroact.envs.alfworld_expert import experts

    return experts(**options)  # type: ignore[arg-type]


def _react_exemplars() -> str:
    """Two of ReAct's ALFWorld exemplars from the data folder for LLM experts; empty without the data."""
    try:
        prompts = json.loads((alfworld_data() / "prompts" / "react_alfworld.json").read_text())
        return "".join(f"Example of a solved task:\n{prompts[k]}\n" for k in ("react_put_0", "react_heat_1"))
    except (OSError, ValueError, KeyError):
        return ""


PROMPTS: PromptStyle = replace(
    household.PROMPTS,  # the same instructions as the built-in world: one grammar, one task family
    fewshot=_react_exemplars() or household.PROMPTS.fewshot,
    # Measured on the expert's test run: thoughts up to ~200 characters (two-object tasks name the
    # object four times), reflections up to ~370 (real rooms hold up to ~40 places, and a
    # reflection lists those checked).
    max_action_tokens=96,
    max_reflection_tokens=256,
)

SPEC = EnvSpec(
    name="alfworld", make=AlfworldEnv, tasks=tasks, experts=_experts,  # type: ignore[arg-type]
    prompts=PROMPTS, max_steps=MAX_STEPS, memory_size=3, reflector_sees_memory=True,
    splits=tuple(SPLITS),
)
