"""The built-in household world, its ALFWorld text grammar and its scripted expert."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retroact.agent.loop import LoopConfig, run_trials
from retroact.envs import get_spec, list_tasks
from retroact.envs.alfworld_text import (
    LAMP,
    LIKELY_PLACES,
    TASK_KINDS,
    TOOLS,
    Goal,
    clean_observation,
    item_list,
    kind_of,
    listed_items,
    parse_action,
    parse_goal,
    room_receptacles,
)
from retroact.envs.base import Task
from retroact.envs.household import OPENABLE, PROMPTS, ROOMS, SPEC, HouseholdEnv, World, is_unseen, tasks
from retroact.envs.household_expert import plan, reflect
from retroact.models.base import PlannerView
from retroact.models.scripted import ScriptedPolicy

# -- the text grammar -------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "canonical"), [
    ("go to cabinet 1", "go to cabinet 1"),
    ("> Go To  Cabinet1.", "go to cabinet 1"),
    ("open the fridge 1", "open fridge 1"),
    ("take apple 1 from fridge 1", "take apple 1 from fridge 1"),
    ("pick up the apple 1 from the fridge 1", "take apple 1 from fridge 1"),
    ("put apple 1 in/on fridge 1", "put apple 1 in/on fridge 1"),
    ("put apple 1 in fridge 1", "put apple 1 in/on fridge 1"),
    ("Put Apple 1 on countertop 2.", "put apple 1 in/on countertop 2"),
    ("put apple 1 in / on fridge 1", "put apple 1 in/on fridge 1"),
    ("move apple 1 to fridge 1", "put apple 1 in/on fridge 1"),
    ("heat egg 2 with microwave 1", "heat egg 2 with microwave 1"),
    ("cool pan 1 using fridge 1", "cool pan 1 with fridge 1"),
    ("clean mug 1 with sinkbasin 1", "clean mug 1 with sinkbasin 1"),
    ("use desklamp 1", "use desklamp 1"),
    ("examine the bowl 1", "examine bowl 1"),
    ("inventory", "inventory"),
    ("look", "look"),
    ("Think: I should check the fridge.", "think: i should check the fridge"),
])
def test_parse_action_canonical(line: str, canonical: str) -> None:
    action = parse_action(line)
    assert action is not None and str(action) == canonical


@pytest.mark.parametrize("line", ["", "  ", "fly to the moon", "go", "take apple 1", "put apple 1", "heat"])
def test_parse_action_rejects_junk(line: str) -> None:
    assert parse_action(line) is None


def test_observation_helpers() -> None:
    raw = ("-= Welcome to TextWorld, ALFRED! =-\n\nYou are in the middle of a room. Looking quickly around "
           "you, you see a cabinet 2, a cabinet 1, and a fridge 1.\n\n"
           "Your task is to: heat some egg and put it in cabinet.")
    first = clean_observation(raw)
    assert first.startswith("You are in the middle") and "\n\n" not in first
    assert room_receptacles(first) == ["cabinet 2", "cabinet 1", "fridge 1"]
    assert parse_goal(first) == Goal("heat", "egg", "cabinet")
    arrived = clean_observation("You arrive at loc 7. On the desk 1, you see a pen 1.")
    assert arrived == "On the desk 1, you see a pen 1."
    assert [item_list(x) for x in ([], ["a 1"], ["a 1", "b 2"], ["a 1", "b 2", "c 3"])] == [
        "nothing", "a a 1", "a a 1, and a b 2", "a a 1, a b 2, and a c 3"]
    opened = "You open the drawer 1. The drawer 1 is open. In it, you see a cd 1, and a pen 3."
    assert listed_items(opened) == ["cd 1", "pen 3"]
    assert listed_items("The drawer 1 is closed.") == []


@pytest.mark.parametrize("kind", TASK_KINDS)
@pytest.mark.parametrize("phrasing", [0, 1])
def test_goal_text_round_trip(kind: str, phrasing: int) -> None:
    goal = Goal(kind, "apple", LAMP if kind == "examine" else "countertop")
    assert parse_goal(f"Your task is to: {goal.text(phrasing)}") == goal
    assert parse_goal("Your task is to: juggle three apples.") is None


# -- the world --------------------------------------------------------------------------------


def _world(env: HouseholdEnv) -> World:
    assert env.world is not None
    return env.world


def _where(world: World, obj: str) -> str:
    return next(r for r, items in world.contents.items() if obj in items)


def _oracle(world: World) -> list[str]:
    """A solving action sequence built from the hidden layout."""
    g, actions, opened = world.goal, list[str](), set[str]()

    def visit(place: str) -> None:
        actions.append(f"go to {place}")
        if kind_of(place) in OPENABLE and place not in opened:
            actions.append(f"open {place}")
            opened.add(place)

    where = {o: r for r, items in world.contents.items() for o in items}
    objects = sorted(o for o in where if kind_of(o) == g.obj)[: 2 if g.kind == "puttwo" else 1]
    for obj in objects:
        visit(where[obj])
        actions.append(f"take {obj} from {where[obj]}")
        if g.kind in TOOLS:
            tool = next(r for r in world.receptacles if kind_of(r) == TOOLS[g.kind])
            actions += [f"go to {tool}", f"{g.kind} {obj} with {tool}"]
        if g.kind == "examine":
            actions += [f"go to {where[f'{LAMP} 1']}", f"use {LAMP} 1"]
        else:
            target = next(r for r in world.receptacles if kind_of(r) == g.target)
            visit(target)
            actions.append(f"put {obj} in/on {target}")
    return actions


@pytest.mark.parametrize("kind", TASK_KINDS)
def test_every_task_kind_is_solvable(kind: str) -> None:
    env = HouseholdEnv()
    chosen = [t for t in tasks("train", 300) + tasks("test") if t.payload["kind"] == kind][:25]
    assert len(chosen) == 25
    for task in chosen:
        env.reset(task)
        actions = _oracle(_world(env))
        results = [env.step(a) for a in actions]
        assert all(r.info["valid"] for r in results), (task.id, actions, [r.observation for r in results])
        assert [r.done for r in results] == [False] * (len(actions) - 1) + [True], task.id
        assert results[-1].reward == 1.0 and results[-1].info["success"] is True


def test_first_observation_and_messages_follow_alfworld() -> None:
    env = HouseholdEnv()
    task = next(t for t in tasks("test") if t.payload["kind"] == "heat")
    first = env.reset(task)
    world = _world(env)
    assert first.startswith("You are in the middle of a room. Looking quickly around you, you see a ")
    assert first.split("\n")[1] == f"Your task is to: {world.goal.text(task.payload['phrasing'])}"
    assert room_receptacles(first) == world.receptacles
    egg = sorted(o for items in world.contents.values() for o in items if kind_of(o) == world.goal.obj)[0]
    actions = _oracle(world)
    observations = [env.step(a).observation for a in actions]
    assert f"You pick up the {egg} from the " in " ".join(observations)
    assert f"You heat the {egg} using the microwave 1." in observations
    assert observations[-1].startswith(f"You put the {egg} in/on the ")


def test_closed_receptacles_hide_contents_until_opened() -> None:
    env = HouseholdEnv()
    for task in tasks("train", 50):
        env.reset(task)
        world = _world(env)
        box = next((r for r, items in world.contents.items() if kind_of(r) in OPENABLE and items), None)
        if box is not None:
            break
    assert box is not None
    item = world.contents[box][0]
    assert env.step(f"open {box}").observation == "Nothing happens."  # not there yet
    assert env.step(f"go to {box}").observation == f"The {box} is closed."
    assert env.step(f"take {item} from {box}").observation == "Nothing happens."
    opened = env.step(f"open {box}").observation
    assert opened.startswith(f"You open the {box}. The {box} is open. In it, you see ") and item in opened
    assert env.step(f"open {box}").observation == "Nothing happens."
    assert env.step(f"close {box}").observation == f"You close the {box}."
    assert env.step(f"close {box}").observation == "Nothing happens."
    env.step(f"open {box}")
    assert env.step(f"take {item} from {box}").observation == f"You pick up the {item} from the {box}."
    assert env.step("inventory").observation == f"You are carrying: a {item}."
    other = next(o for r, items in world.contents.items() for o in items if r != box)
    assert env.step(f"take {other} from {_where(world, other)}").observation == "Nothing happens."


def test_think_invalid_and_junk_actions() -> None:
    env = HouseholdEnv()
    env.reset(tasks("test", 1)[0])
    assert env.step("think: the apple may be in the fridge").observation == "OK."
    for junk in ["", "\n\n", "dance", "go to moon 1", "take apple 9 from fridge 1", "use cabinet 1",
                 "heat egg 1 with fridge 1", "x" * 100_000, "go to " + "cabinet " * 5000,
                 "\x00\x1b[31m\u202e", "put nothing in/on nowhere"]:
        result = env.step(junk)
        assert result.observation == "Nothing happens." and not result.done and result.info["valid"] is False
    assert env.step("look").observation.startswith("You are in the middle of a room.")
    assert env.step("inventory").observation == "You are not carrying anything."


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_step_never_raises_on_any_text(text: str) -> None:
    env = HouseholdEnv()
    env.reset(tasks("test", 1)[0])
    result = env.step(text)
    assert isinstance(result.observation, str) and result.observation and not result.done


def test_examine_needs_object_in_hand_under_a_lit_lamp() -> None:
    env = HouseholdEnv()
    task = next(t for t in tasks("test") if t.payload["kind"] == "examine")
    env.reset(task)
    world = _world(env)
    lamp_place = _where(world, f"{LAMP} 1")
    env.step(f"go to {lamp_place}")
    lit = env.step(f"use {LAMP} 1")
    assert lit.observation == f"You turn on the {LAMP} 1." and not lit.done
    assert env.step(f"use {LAMP} 1").observation == f"You turn off the {LAMP} 1."
    assert env.step(f"take {LAMP} 1 from {lamp_place}").observation == "Nothing happens."
    actions = _oracle(world)
    results = [env.step(a) for a in actions]
    assert results[-1].done and results[-1].reward == 1.0
    assert env.step("look").observation == "Nothing happens."  # the trial is over


def test_transform_messages_and_states() -> None:
    env = HouseholdEnv()
    for task in (t for t in tasks("train") if t.payload["kind"] == "cool"):
        env.reset(task)
        world = _world(env)
        actions = _oracle(world)
        # an apple that is not in the fridge, in a room where it can be cleaned too
        in_fridge = "go to fridge 1" in actions[:2]
        if world.goal.obj == "apple" and not in_fridge and "sinkbasin 1" in world.receptacles:
            break
    take = next(i for i, a in enumerate(actions) if a.startswith("take "))
    for a in actions[: take + 1]:
        env.step(a)
    obj = world.holding
    assert env.step(f"examine {obj}").observation == f"There's nothing special about {obj}."
    assert env.step(f"cool {obj} with fridge 1").observation == "Nothing happens."  # not at the fridge
    env.step("go to fridge 1")
    assert env.step(f"cool {obj} with fridge 1").observation == f"You cool the {obj} using the fridge 1."
    assert env.step(f"examine {obj}").observation == f"This is a cold {obj}."
    env.step("go to sinkbasin 1")
    cleaned = env.step(f"clean {obj} with sinkbasin 1").observation
    assert cleaned == f"You clean the {obj} using the sinkbasin 1."
    assert env.step(f"examine {obj}").observation == f"This is a cool and clean {obj}."


def test_options_set_world_size_and_are_validated() -> None:
    task = tasks("train", 1)[0]
    for size in (6, 10, 18):
        env = HouseholdEnv(receptacles=size, distractors=3)
        env.reset(task)
        assert len(_world(env).receptacles) == min(size, sum(ROOMS[task.payload["room"]].values()))
        goal_objects = {"puttwo": 2, "examine": 2}.get(task.payload["kind"], 1)  # examine: object and lamp
        assert sum(len(v) for v in _world(env).contents.values()) == 3 + goal_objects
    with pytest.raises(ValueError, match="receptacles"):
        HouseholdEnv(receptacles=2)
    with pytest.raises(ValueError, match="likely"):
        HouseholdEnv(likely=1.5)
    with pytest.raises(ValueError, match="'seed'"):
        HouseholdEnv().reset(Task("bad", "test", {"room": "kitchen"}))
    with pytest.raises(ValueError, match="unknown room"):
        HouseholdEnv().reset(Task("bad", "test", {**task.payload, "room": "garage"}))
    with pytest.raises(RuntimeError, match="reset"):
        HouseholdEnv().step("look")


# -- tasks and splits -------------------------------------------------------------------------


def _digest(task_list: list[Task]) -> str:
    """A hash of the tasks, their worlds and the expert's first trial on each."""
    env, h = HouseholdEnv(), hashlib.sha256()
    for task in task_list:
        first = env.reset(task)
        world = _world(env)
        h.update(json.dumps([task.id, task.payload, first, world.contents], sort_keys=True).encode())
        history: list[tuple[str, str]] = []
        for _ in range(SPEC.max_steps):
            action = plan(PlannerView(task, first, (), tuple(history), 0))
            history.append((action, env.step(action).observation))
        h.update(json.dumps(history).encode())
    return h.hexdigest()


def test_tasks_and_worlds_are_deterministic_across_processes() -> None:
    assert tasks("test", 20, 3) == tasks("test", 20, 3) == list_tasks("household", "test", 20, 3)
    assert tasks("test", 20, 3) != tasks("test", 20, 4)
    assert sorted(t.id for t in tasks("test", None, 5)) == sorted(t.id for t in tasks("test", None, 6))
    env = HouseholdEnv()
    task = tasks("train", 1, 9)[0]
    assert env.reset(task) == env.reset(task) == HouseholdEnv().reset(task)
    code = ("from retroact.envs.household import tasks; from tests.test_household import _digest; "
            "print(_digest(tasks('test', 12, 1)))")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for hash_seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": hash_seed}, cwd=repo)
        assert out.stdout.strip() == _digest(tasks("test", 12, 1))


def test_splits_are_disjoint_and_test_holds_unseen_combinations() -> None:
    train, test = tasks("train"), tasks("test")
    assert len(train) >= 5000 and len(test) >= 300
    assert len({t.id for t in train + test}) == len(train) + len(test)
    train_payloads = {json.dumps(t.payload, sort_keys=True) for t in train}
    assert not any(json.dumps(t.payload, sort_keys=True) in train_payloads for t in test)
    assert not {t.payload["seed"] for t in train} & {t.payload["seed"] for t in test}
    train_pairs = {(t.payload["object"], t.payload["target"]) for t in train}
    unseen = [t for t in test if t.payload["unseen"]]
    assert not any(is_unseen(o, r) for o, r in train_pairs)
    assert len(unseen) == len(test) // 2
    assert all((t.payload["object"], t.payload["target"]) not in train_pairs for t in unseen)
    for split in (train, test, unseen):
        assert {t.payload["kind"] for t in split} == set(TASK_KINDS)
    with pytest.raises(ValueError, match="no split"):
        tasks("valid")


# -- the scripted expert ----------------------------------------------------------------------


def _blind(fn: Callable[[Any], str]) -> Callable[[Any], str]:
    """The same expert, shown a task without payload: an honest expert cannot tell the difference."""
    return lambda view: fn(dataclasses.replace(view, task=Task("hidden", view.task.split)))


def test_expert_success_rises_with_reflection_and_never_peeks() -> None:
    test = tasks("test", 100, 0)
    planner, reflector = SPEC.experts()
    result = run_trials("household", test, planner, reflector, LoopConfig(trials=3))
    first, _, last = result.per_trial_success
    assert 0.5 <= first <= 0.8, result.per_trial_success
    assert last >= 0.9 and last - first >= 0.15, result.per_trial_success
    assert result.n_errors == 0 and result.n_repeat_stops == 0
    assert result.n_valid_actions == result.n_actions  # the expert never writes an invalid action
    blind = run_trials("household", test, ScriptedPolicy("blind", _blind(plan)),
                       ScriptedPolicy("blind", _blind(reflect)), LoopConfig(trials=3))
    assert [r.output for r in blind.records] == [r.output for r in result.records]
    ablated = run_trials("household", test, planner, None, LoopConfig(trials=3, reflect=False))
    assert ablated.per_trial_success == [first] * 3  # the same failures again without reflections


def test_expert_reflection_names_places_and_the_planner_follows_it() -> None:
    planner, reflector = SPEC.experts()
    test = tasks("test", 40, 0)
    result = run_trials("household", test, planner, reflector, LoopConfig(trials=2))
    failed = [r for r in result.records if r.role == "reflector"]
    assert failed
    for rec in failed:
        text = rec.output
        assert text.startswith(("I did not find ", "I found all I needed"))
        assert "Next time I will start with " in text
        assert "I checked " in text or "I found " in text
        start = text.rsplit("Next time I will start with ", 1)[1].rstrip(".\n")
        retry = next(r for r in result.records
                     if r.task_id == rec.task_id and r.role == "planner" and r.trial == 1)
        assert text.strip() in retry.info["memory"]
        lines = [s.text.strip() for s in retry.segments if s.kind == "model"]
        assert f"I will check {start}, " in lines[0] or lines[0].endswith(f"I will go to {start}.")
        assert lines[1] == f"go to {start}"


def test_expert_plan_names_every_place_once_and_the_search_follows_it() -> None:
    planner, _ = SPEC.experts()
    result = run_trials("household", tasks("train", 60, 0), planner, None, LoopConfig(trials=1))
    for rec in result.records:
        lines = [s.text.strip() for s in rec.segments if s.kind == "model"]
        goal = parse_goal(rec.prompt)
        assert goal is not None
        head, listed = lines[0].split(" I will check ")
        plan_places = re.split(r", | and ", listed.removesuffix(", in this order."))
        room = room_receptacles(rec.prompt)
        assert sorted(plan_places) == sorted(room)
        prior = LIKELY_PLACES[goal.obj]
        likely = [p for p in room if kind_of(p) in prior and kind_of(p) != goal.target]
        assert plan_places[: len(likely)] == sorted(likely, key=lambda p: prior.index(kind_of(p)))
        # The thought names the likely types first, in the order their places open the plan.
        types = list(dict.fromkeys(kind_of(p) for p in plan_places[: len(likely)]))
        if types:
            named = types[0] if len(types) == 1 else ", ".join(types[:-1]) + " and " + types[-1]
            assert head.endswith(f" is more likely to appear in {named}.")
        # Until the object is taken, the agent visits the plan's places in its order.
        visits = []
        for line in lines[1:]:
            if line.startswith("take "):
                break
            if line.startswith("go to "):
                visits.append(line.removeprefix("go to "))
        assert visits == plan_places[: len(visits)]


def test_expert_thoughts_and_lines_are_short_and_never_repeat() -> None:
    planner, _ = SPEC.experts()
    result = run_trials("household", tasks("train", 60, 0), planner, None, LoopConfig(trials=1))
    for rec in result.records:
        lines = [s.text.strip() for s in rec.segments if s.kind == "model"]
        assert lines[0].startswith("think: To solve the task")
        assert all(len(line) <= (450 if line.startswith("think:") else 80) for line in lines)
        assert all(a != b for a, b in zip(lines, lines[1:], strict=False))
        assert all(parse_action(line) is not None for line in lines)
    assert result.n_repeat_stops == 0


def test_expert_mistakes_are_marked_answered_nothing_and_recovered_from() -> None:
    train = tasks("train", 80, 0)
    plain = run_trials("household", train, *SPEC.experts(), LoopConfig(trials=2))
    noisy = run_trials("household", train, *SPEC.experts(mistakes=0.3, seed=1), LoopConfig(trials=2))
    again = run_trials("household", train, *SPEC.experts(mistakes=0.3, seed=1), LoopConfig(trials=2))
    assert [r.output for r in again.records] == [r.output for r in noisy.records]  # seeded, repeatable
    assert [r.output for r in run_trials("household", train, *SPEC.experts(mistakes=0.0, seed=1),
                                         LoopConfig(trials=2)).records] == [r.output for r in plain.records]
    n_mistakes = 0
    for rec in noisy.records:
        segs = rec.segments
        for i, seg in enumerate(segs):
            if seg.kind != "mistake":
                continue
            n_mistakes += 1
            a = parse_action(seg.text)
            assert a is not None and a.verb in ("take", "go"), seg.text
            room = room_receptacles(rec.prompt)
            assert (a.place not in room) if a.verb == "go" else (a.place in room)
            assert segs[i + 1].kind == "env" and segs[i + 1].text.startswith("Nothing happens.")
            if i + 2 < len(segs):  # the step limit may end a trial on a mistake
                # Never twice in a row: the expert's own line follows.
                assert segs[i + 2].kind == "model" and parse_action(segs[i + 2].text) is not None
    assert n_mistakes >= 40
    assert noisy.n_errors == 0 and noisy.n_repeat_stops == 0
    # Mistakes cost steps, so fewer trials succeed, but most still do.
    first = noisy.per_trial_success[0]
    assert 0.4 <= first < plain.per_trial_success[0]


def test_spec_registration_and_prompts() -> None:
    spec = get_spec("household")
    assert spec is SPEC and spec.memory_size == 3 and 20 <= spec.max_steps <= 30
    assert spec.prompts.step_prefix == "> " and "think:" in spec.prompts.planner_instruction
    assert "Your task is to:" in PROMPTS.fewshot and "> think:" in PROMPTS.fewshot
    assert "Reflection: I " in PROMPTS.reflector_fewshot
    assert "Next time I will start with" in PROMPTS.reflector_fewshot
    planner, reflector = spec.experts()
    assert not planner.tokenized and not reflector.tokenized
