"""The real ALFWorld games (optional extra) and their expert; parity with the built-in household world.

Tests that play games skip when the extra is not installed (scripts/install_alfworld.sh); tests
that read the games need the data (``require_data``).
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

from retroact.agent.loop import LoopConfig, run_trials
from retroact.envs import get_spec, list_tasks
from retroact.envs.alfworld import (
    SPEC,
    AlfworldEnv,
    MissingExtraError,
    alfworld_data,
    load_engine,
    tasks,
)
from retroact.envs.alfworld_expert import AlfworldExpert, experts
from retroact.envs.alfworld_text import Goal, listed_items, parse_action
from retroact.envs.base import StepResult, Task
from retroact.envs.household import HouseholdEnv, World
from retroact.models.base import PlannerView
from tests.helpers import require_data

# A kitchen game of valid_unseen: "put a clean pan in countertop".
PAN_GAME = ("json_2.1.1/valid_unseen/pick_clean_then_place_in_recep-Pan-None-CounterTop-10/"
            "trial_T20190908_032543_712058/game.tw-pddl")
PAN_TASK = Task("alfworld-pan", "test", {"game": PAN_GAME})


@pytest.fixture
def data(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The ALFWorld data folder under the test data root, also as $ALFWORLD_DATA."""
    root = require_data("alfworld/json_2.1.1").parent
    monkeypatch.setenv("ALFWORLD_DATA", str(root))
    return root


@pytest.fixture
def engine(data: Path) -> None:
    try:
        load_engine()
    except MissingExtraError as err:
        pytest.skip(str(err))


def test_spec_needs_neither_extra_nor_data() -> None:
    spec = get_spec("alfworld")
    assert spec is SPEC and spec.max_steps == 50 and spec.memory_size == 3 and spec.reflector_sees_memory
    assert tuple(spec.splits) == ("train", "valid_seen", "test")
    assert spec.prompts.step_prefix == "> " and "think:" in spec.prompts.planner_instruction


def test_missing_data_and_extra_have_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="ALFWORLD_DATA"):
        alfworld_data(tmp_path)
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "json_2.1.1"))):
        tasks("test")

    def version(name: str) -> str:
        if name == "alfworld":
            raise importlib.metadata.PackageNotFoundError(name)
        return "0"

    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(MissingExtraError, match="install_alfworld.sh"):
        load_engine.__wrapped__()  # bypasses the cache of an earlier successful load
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.4.2")
    with pytest.raises(MissingExtraError, match=r"0\.4\.2 is installed, but these games need alfworld 0\.3"):
        load_engine.__wrapped__()


def test_splits_and_tasks(data: Path) -> None:
    sizes = {"train": 200, "valid_seen": 140, "test": 134}
    for split, size in sizes.items():
        all_tasks = list_tasks("alfworld", split)
        assert len(all_tasks) == size and len({t.id for t in all_tasks}) == size
        assert all((data / t.payload["game"]).is_file() for t in all_tasks)
    test = tasks("test")
    assert {t.payload["task_type"] for t in test} == {
        "pick_and_place_simple", "look_at_obj_in_light", "pick_clean_then_place_in_recep",
        "pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep", "pick_two_obj_and_place"}
    assert all("/valid_unseen/" in t.payload["game"] for t in test)
    assert tasks("test", 5, seed=3) == tasks("test", 5, seed=3) != tasks("test", 5, seed=4)
    assert tasks("test", 5, seed=3) == tasks("test", None, seed=3)[:5]
    with pytest.raises(ValueError, match="splits: train, valid_seen, test"):
        tasks("valid_unseen")
    # LLM experts get two of ReAct's exemplars, read from the data folder
    assert SPEC.prompts.fewshot.count("Example of a solved task:") == 2
    assert "Your task is to: put some spraybottle on toilet.\n> think: " in SPEC.prompts.fewshot


# -- the same text in both worlds ------------------------------------------------------------------

KINDS = [
    ("nothing", r"Nothing happens\.$"),
    ("ok", r"OK\.$"),
    ("carrying", r"You are carrying: a [a-z]+ \d+\.$"),
    ("empty-handed", r"You are not carrying anything\.$"),
    ("overview", r"You are in the middle of a room\. Looking quickly around you, you see "),
    ("facing", r"You are facing the .+\. Next to it, you see "),
    ("closed", r"The [a-z]+ \d+ is closed\.$"),
    ("opened", r"You open the ([a-z]+ \d+)\. The \1 is open\. In it, you see "),
    ("shut", r"You close the [a-z]+ \d+\.$"),
    ("shows", r"On the [a-z]+ \d+, you see "),
    ("took", r"You pick up the [a-z]+ \d+ from the [a-z]+ \d+\.$"),
    ("put", r"You put the [a-z]+ \d+ in/on the [a-z]+ \d+\.$"),
    ("treated", r"You (clean|heat|cool) the [a-z]+ \d+ using the [a-z]+ \d+\.$"),
]


def kind(observation: str) -> str:
    """What an observation says, independent of the world's details."""
    return next((name for name, pattern in KINDS if re.match(pattern, observation)), f"other: {observation}")


def mirror_world() -> World:
    """The built-in world holding the part of the pan game's kitchen that the table visits."""
    contents = {
        "countertop 2": [], "countertop 1": ["mug 2", "pan 1"], "microwave 1": ["cup 2"], "sinkbasin 1": [],
        "fridge 1": ["apple 1", "apple 2", "apple 3", "mug 1", "potato 1", "potato 2", "potato 3"],
    }
    states: dict[str, set[str]] = {o: set() for items in contents.values() for o in items}
    return World(Goal("clean", "pan", "countertop"), list(contents), contents, states=states)


# (model line, kind of answer): model spellings that parse_action normalises, refused and accepted
# commands, and the winning move.
TABLE = [
    ("jump around", "nothing"),
    ("look", "overview"),
    ("inventory", "empty-handed"),
    ("take pan 1 from countertop 1", "nothing"),
    ("Go to Countertop 1.", "shows"),
    ("examine countertop 1", "shows"),
    ("take the pan 1 from countertop 1", "took"),
    ("take mug 2 from countertop 1", "nothing"),
    ("inventory", "carrying"),
    ("look", "facing"),
    ("go to fridge 1", "closed"),
    ("take apple 1 from fridge 1", "nothing"),
    ("open the fridge 1", "opened"),
    ("open fridge 1", "nothing"),
    ("close fridge 1", "shut"),
    ("clean pan 1 with sinkbasin 1", "nothing"),
    ("> go to sinkbasin 1", "shows"),
    ("heat pan 1 with sinkbasin 1", "nothing"),
    ("clean pan 1 using sinkbasin 1", "treated"),
    ("think: now the pan goes back to the counter", "ok"),
    ("go to microwave 1", "closed"),
    ("put pan 1 in/on microwave 1", "nothing"),
    ("use pan 1", "nothing"),
    ("go to countertop 1", "shows"),
    ("put pan 1 on countertop 1", "put"),
    ("look", "nothing"),  # the game is over
]


def test_household_world_and_alfworld_answer_alike(engine: None) -> None:
    real = AlfworldEnv()
    assert real.reset(PAN_TASK).endswith("Your task is to: put a clean pan in countertop.")
    built_in = HouseholdEnv()
    built_in.world = mirror_world()
    for line, expected in TABLE:
        ours, theirs = built_in.step(line), real.step(line)
        assert (kind(ours.observation), kind(theirs.observation)) == (expected, expected), line
        if expected in ("shows", "opened"):  # the same things in the same place
            assert sorted(listed_items(ours.observation)) == sorted(listed_items(theirs.observation)), line
        assert ours.info["valid"] == theirs.info["valid"] == (expected != "nothing"), line
        assert (ours.reward, ours.done) == (theirs.reward, theirs.done), line
        assert ours.info.get("success") == theirs.info.get("success") == (True if expected == "put" else None)
    assert theirs.done and theirs.reward == 0.0  # after the win nothing more happens


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="known gap: the built-in world answers these; the real engine does not")
@pytest.mark.parametrize("lines", [
    ("go to countertop 1", "go to countertop 1"),  # going where one already is
    ("go to countertop 1", "examine pan 1"),  # examining an object one does not hold
])
def test_household_world_and_alfworld_known_differences(engine: None, lines: tuple[str, ...]) -> None:
    real = AlfworldEnv()
    real.reset(PAN_TASK)
    built_in = HouseholdEnv()
    built_in.world = mirror_world()
    answers = [(kind(built_in.step(line).observation), kind(real.step(line).observation)) for line in lines]
    assert answers[-1][0] == answers[-1][1]


def test_step_never_raises_and_think_answers_ok(engine: None) -> None:
    env = AlfworldEnv()
    with pytest.raises(RuntimeError, match="reset"):
        env.step("look")
    env.reset(PAN_TASK)
    assert env.step("think: the pan may be on a counter").observation == "OK."
    for junk in ["", "\n\n", "dance", "go to moon 1", "go to", "take apple 9 from fridge 1", "x" * 100_000,
                 "go to " + "cabinet " * 5000, "\x00\x1b[31m\u202e", "put nothing in/on nowhere", "🙂 " * 50]:
        result = env.step(junk)
        assert isinstance(result, StepResult)
        assert result.observation == "Nothing happens." and not result.done and result.info["valid"] is False
    assert env.step("go to fridge 1").observation == "The fridge 1 is closed."
    with pytest.raises(ValueError, match="alfworld task bad: game file"):
        env.reset(Task("bad", "test", {"game": "json_2.1.1/nowhere/game.tw-pddl"}))


# -- the expert --------------------------------------------------------------------------------


def _lines(record: object) -> list[str]:
    return [s.text.strip() for s in record.segments if s.kind == "model"]  # type: ignore[attr-defined]


@pytest.mark.slow
def test_clean_expert_solves_games_with_thoughts(engine: None) -> None:
    planner, reflector = experts(noise=0.0)
    # look at a mug under the lamp; cool a potato; put two pillows on the sofa
    ids = ("alfworld-test-013", "alfworld-test-090", "alfworld-test-126")
    games = [t for t in tasks("test") if t.id in ids]
    result = run_trials("alfworld", games, planner, reflector, LoopConfig(trials=1))
    assert result.per_trial_success == [1.0] and result.n_errors == 0 and result.n_repeat_stops == 0
    for rec in result.records:
        lines = _lines(rec)
        assert lines[0].startswith("think: To ") and "I need to find" in lines[0]
        first_stop = lines[0].rsplit("First I will check ", 1)[1].rstrip(".")
        assert lines[1] == f"go to {first_stop}"
        assert any(line.startswith("think: I have the ") for line in lines)
        assert all(parse_action(line) is not None for line in lines)
        assert all(a != b for a, b in zip(lines, lines[1:], strict=False))
    puttwo = _lines(next(r for r in result.records if r.task_id == "alfworld-test-126"))
    assert "think: One pillow is in/on the sofa. Now I need a second one." in " ".join(puttwo)


def test_expert_plan_survives_junk_and_a_history_out_of_step(engine: None) -> None:
    expert = AlfworldExpert(noise=0.0)
    env = AlfworldEnv()
    first = env.reset(PAN_TASK)
    history = [(line, env.step(line).observation) for line in ("dance", "go to fridge 1", "open fridge 1")]
    view = PlannerView(PAN_TASK, first, (), tuple(history), 0)
    assert parse_action(expert.plan(view)) is not None
    # A made-up observation: the game copy no longer matches, so the household policy takes over.
    made_up = (("go to countertop 1", "On the countertop 1, you see a pan 1."),)
    wrong = PlannerView(PAN_TASK, first, (), made_up, 0)
    assert expert.plan(wrong) == "take pan 1 from countertop 1"


@pytest.mark.slow
def test_noisy_trial_fails_and_its_reflection_leads_the_next(engine: None) -> None:
    planner, reflector = experts(noise=1.0)
    game = next(t for t in tasks("test") if t.id == "alfworld-test-113")  # put a hot potato in garbagecan
    result = run_trials("alfworld", [game], planner, reflector, LoopConfig(trials=2))
    assert result.successes == [[False, True]] and result.n_errors == 0
    failed, reflection, retry = result.records
    assert failed.n_steps == 50 and "think: There is no potato in " in " ".join(_lines(failed))
    text = reflection.output.strip()
    assert text.startswith("I did not find a potato in time. I checked ") and "but found no potato" in text
    start = text.rsplit("Next time I will start with ", 1)[1].rstrip(".")
    assert retry.info["memory"] == [text]
    assert _lines(retry)[:2] == [_lines(retry)[0], f"go to {start}"]
    assert _lines(retry)[0].endswith(f"First I will check {start}.")
