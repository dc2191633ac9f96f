"""Loop semantics (SPEC §1) on a toy env: memory, solved tasks, repeated-action stop, max steps, failures."""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest

from retroact.agent.loop import LoopConfig, run_trials
from retroact.agent.records import read_records, write_records
from retroact.envs import EnvSpec, PromptStyle, StepResult, Task
from retroact.models.base import (
    Generation,
    GenRequest,
    PlannerView,
    PolicyInfo,
    SamplingParams,
    SegmentKind,
    checked_context,
)
from retroact.models.scripted import ScriptedPolicy


class GuessEnv:
    """Guess a secret digit; ``boom`` raises, ``sleep`` hangs."""

    def reset(self, task: Task) -> str:
        self.secret = task.payload["secret"]
        return f"Guess the digit. Task {task.id}."

    def step(self, action: str) -> StepResult:
        if action == "boom":
            raise RuntimeError("env exploded")
        if action == "sleep":
            time.sleep(2)
        if not action.startswith("guess "):
            return StepResult("Say: guess N.", info={"valid": False})
        n = int(action.split()[1])
        if n == self.secret:
            return StepResult("Correct.", reward=1.0, done=True, info={"success": True})
        return StepResult("Wrong.")


def _tasks(secrets: Sequence[int]) -> list[Task]:
    return [Task(f"t{i}", "test", {"secret": s}) for i, s in enumerate(secrets)]


SPEC = EnvSpec(
    name="guess",
    make=GuessEnv,
    tasks=lambda split, n, seed: _tasks(range(10))[:n],
    experts=lambda: (None, None),  # type: ignore[arg-type,return-value]
    prompts=PromptStyle("Guess.", "Reflect."),
    max_steps=3,
    memory_size=3,
)


def _tried(view: PlannerView) -> set[int]:
    tried = {int(a.split()[1]) for a, _ in view.history if a.startswith("guess ")}
    for m in view.memory:
        tried |= {int(x) for x in m.split(":")[1].split(",") if x}
    return tried


def _next_guess(view: PlannerView) -> str:
    return f"guess {min(set(range(10)) - _tried(view))}"


def _reflect(view) -> str:  # type: ignore[no-untyped-def]
    return "tried:" + ",".join(str(int(a.split()[1])) for a, _ in view.history if a.startswith("guess "))


def test_solved_tasks_not_rerun_and_reward_carried() -> None:
    planner, reflector = ScriptedPolicy("p", _next_guess), ScriptedPolicy("r", _reflect)
    res = run_trials(SPEC, _tasks([1, 4, 8]), planner, reflector, LoopConfig(trials=4))
    # 3 guesses per trial: digit 1 in trial 1, 4 in trial 2 (memory skips 0-2), 8 in trial 3.
    assert res.successes == [[True] * 4, [False, True, True, True], [False, False, True, True]]
    assert res.per_trial_reward == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    planner_trials = {(r.task_id, r.trial) for r in res.records if r.role == "planner"}
    assert planner_trials == {("t0", 0), ("t1", 0), ("t1", 1), ("t2", 0), ("t2", 1), ("t2", 2)}
    refl = sorted(
        (r.task_id, r.trial, r.next_reward, r.success) for r in res.records if r.role == "reflector"
    )
    assert refl == [("t1", 0, 1.0, True), ("t2", 0, 0.0, False), ("t2", 1, 1.0, True)]


def test_memory_keeps_last_three_and_planner_sees_it() -> None:
    seen: list[tuple[str, ...]] = []

    def planner(view: PlannerView) -> str:
        seen.append(view.memory)
        return "guess 0" if not view.history else "guess 1"

    reflector = ScriptedPolicy("r", lambda v: f"r{v.trial}")
    res = run_trials(SPEC, _tasks([9]), ScriptedPolicy("p", planner), reflector, LoopConfig(trials=6))
    assert res.successes == [[False] * 6]
    memories = sorted(set(seen), key=len)
    assert seen[-1] == ("r2", "r3", "r4")
    assert memories[0] == ()
    prompts = [r.prompt for r in res.records if r.role == "planner"]
    assert "- r4\n" in prompts[-1] and "- r1\n" not in prompts[-1]


def test_repeated_action_and_max_steps_end_a_trial() -> None:
    res = run_trials(SPEC, _tasks([9]), ScriptedPolicy("p", lambda v: "guess 0"), None, LoopConfig(trials=1))
    (rec,) = res.records
    assert rec.n_steps == 1 and res.n_repeat_stops == 1  # the repeat is not executed
    res = run_trials(
        SPEC, _tasks([9]), ScriptedPolicy("p", _next_guess), None, LoopConfig(trials=1, max_steps=5)
    )
    assert res.records[0].n_steps == 5


def test_reflect_false_runs_react_without_memory() -> None:
    res = run_trials(
        SPEC,
        _tasks([9]),
        ScriptedPolicy("p", _next_guess),
        ScriptedPolicy("r", _reflect),
        LoopConfig(trials=2, reflect=False),
    )
    assert [r.role for r in res.records] == ["planner", "planner"]
    assert all(r.info["memory"] == [] for r in res.records)


def test_failures_are_recorded_and_do_not_stop_the_run() -> None:
    def planner(view: PlannerView) -> str:
        if view.task.id == "t0":
            return "boom"
        if view.task.id == "t1":
            return "sleep"
        if view.task.id == "t2":
            raise ValueError("expert bug")
        return _next_guess(view)

    res = run_trials(
        SPEC, _tasks([0, 0, 0, 0]), ScriptedPolicy("p", planner), None, LoopConfig(trials=1, step_timeout=0.5)
    )
    errors = {r.task_id: r.error for r in res.records}
    assert "env exploded" in (errors["t0"] or "")
    assert "longer than 0.5s" in (errors["t1"] or "")
    assert "expert bug" in (errors["t2"] or "")
    assert errors["t3"] is None and res.successes[3] == [True]
    assert res.n_errors == 3


class CharPolicy:
    """A tokenised fake: one id per character, log-prob -0.5 per sampled token."""

    info = PolicyInfo("chars")
    tokenized = True

    def encode(self, text: str, kind: SegmentKind) -> list[int]:
        return ([1] if kind == "prompt" else []) + [ord(c) for c in text]

    def generate(self, requests: Sequence[GenRequest], sampling: SamplingParams) -> list[Generation]:
        out = []
        for req in requests:
            assert req.token_ids[0] == 1  # contexts are built from ids, BOS first
            text = "guess 5\n" if req.role == "planner" else "try 5\n"
            ids = [ord(c) for c in text]
            out.append(Generation(text, ids, [-0.5] * len(ids)))
        return out


def test_tokenised_records_have_exact_masks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    policy = CharPolicy()
    res = run_trials(SPEC, _tasks([5, 6]), policy, policy, LoopConfig(trials=2))
    for rec in res.records:
        assert rec.prompt_ids == policy.encode(rec.prompt, "prompt")
        assert rec.output_ids is not None and rec.loss_mask is not None and rec.behaviour_logprobs is not None
        expected_ids, expected_mask = [], []
        for seg in rec.segments:
            expected_ids += policy.encode(seg.text, seg.kind)
            expected_mask += [int(seg.kind == "model")] * len(seg.text)
        assert rec.output_ids == expected_ids and rec.loss_mask == expected_mask
        assert all(
            (lp == -0.5) == bool(m) for lp, m in zip(rec.behaviour_logprobs, rec.loss_mask, strict=True)
        )
    write_records(tmp_path / "r.jsonl", res.records)
    assert read_records(tmp_path / "r.jsonl") == res.records


class ShortContextPolicy(CharPolicy):
    """CharPolicy whose ``roles`` have ``limit`` positions (the others unbounded); the planner guesses 1."""

    def __init__(self, limit: int, roles: tuple[str, ...] = ("planner", "reflector")) -> None:
        self.limit, self.roles = limit, roles

    def generate(self, requests: Sequence[GenRequest], sampling: SamplingParams) -> list[Generation]:
        out = []
        for req in requests:
            try:
                limit = self.limit if req.role in self.roles else None
                checked_context(req.token_ids, sampling.max_new_tokens, limit, "model")
            except ValueError as err:
                out.append(Generation.failed(err))
                continue
            text = "guess 1\n" if req.role == "planner" else "not 1\n"
            out.append(Generation(text, [ord(c) for c in text], [-0.5] * len(text)))
        return out


def test_a_trial_that_outgrows_the_context_is_a_failed_trial_not_an_error() -> None:
    unbounded = ShortContextPolicy(10**6)
    free = run_trials(SPEC, _tasks([5]), unbounded, None, LoopConfig(trials=1)).records[0]
    first = len(free.prompt_ids or [])
    step = sum(len(unbounded.encode(s.text, s.kind)) for s in free.segments[:2])
    # The planner's first request fits, its second (one step longer) does not.
    policy = ShortContextPolicy(first + SPEC.prompts.max_action_tokens + step - 1, roles=("planner",))
    res = run_trials(SPEC, _tasks([5]), policy, policy, LoopConfig(trials=2))
    planners = [r for r in res.records if r.role == "planner"]
    assert [r.trial for r in planners] == [0, 1] and res.n_errors == 0
    assert planners[0].error is None and planners[0].info["context_full"] and not planners[0].success
    assert planners[0].output.count("guess 1") == 1
    reflection = next(r for r in res.records if r.role == "reflector")
    assert reflection.error is None and planners[1].info["memory"] == ["not 1"]
    # A reflector whose prompt does not fit gets an error record; the next trial runs without it.
    tight = ShortContextPolicy(first + SPEC.prompts.max_action_tokens)
    res = run_trials(SPEC, _tasks([5]), tight, tight, LoopConfig(trials=2))
    planners = [r for r in res.records if r.role == "planner"]
    assert [r.error for r in planners] == [None, None] and planners[1].info["memory"] == []
    assert "positions" in (next(r for r in res.records if r.role == "reflector").error or "")
