"""Reward construction from a recorded multi-trial episode: both reflector forms and the filters."""

from __future__ import annotations

import pytest

from retroact.agent.records import OutputSegment, TrajectoryRecord
from retroact.train.rewards import RewardConfig, build_samples, reflector_reward


def _rec(
    role: str,
    trial: int,
    reward: float,
    next_reward: float | None = None,
    *,
    mask: list[int] | None = None,
    error: str | None = None,
    tokens: bool = True,
) -> TrajectoryRecord:
    mask = [1, 0, 1] if mask is None else mask
    tok = (
        dict(
            prompt_ids=[1, 2],
            output_ids=[5, 6, 7][: len(mask)],
            loss_mask=mask,
            behaviour_logprobs=[-0.1] * len(mask),
        )
        if tokens
        else {}
    )
    return TrajectoryRecord(
        env="household",
        split="train",
        task_id="t",
        role=role,
        trial=trial,  # type: ignore[arg-type]
        source="hf",
        prompt="p",
        segments=[OutputSegment(kind="model", text="x")],
        reward=reward,
        next_reward=next_reward,
        error=error,
        **tok,
    )  # type: ignore[arg-type]


# One task over three trials: F1 0.0, then 0.5, then 1.0; reflections after trials 1 and 2.
EPISODE = [
    _rec("planner", 0, 0.0),
    _rec("reflector", 0, 0.0, 0.5),
    _rec("planner", 1, 0.5),
    _rec("reflector", 1, 0.5, 1.0),
    _rec("planner", 2, 1.0),
]


def test_both_reflector_reward_forms() -> None:
    assert reflector_reward(0.5, 1.0, RewardConfig(reflector_reward="paper")) == 0.5
    assert reflector_reward(0.5, 1.0, RewardConfig()) == pytest.approx(0.5 * 1.5)
    assert reflector_reward(0.5, 0.0, RewardConfig(alpha=2.0)) == pytest.approx(-0.5 * 1.25)
    samples, dropped = build_samples(EPISODE, RewardConfig())
    assert [(s.role, s.reward) for s in samples] == [
        ("reflector", 0.5),
        ("planner", 0.5),
        ("reflector", 0.75),
        ("planner", 1.0),
    ]
    assert dropped == {"planner: R = 0": 1}
    paper, _ = build_samples(EPISODE, RewardConfig(reflector_reward="paper"))
    assert [s.reward for s in paper if s.role == "reflector"] == [0.5, 0.5]


def test_filters_are_switchable() -> None:
    recs = [
        _rec("planner", 0, 0.0),
        _rec("reflector", 0, 0.0, 0.0),
        _rec("planner", 1, 1.0, mask=[0, 0]),
        _rec("reflector", 1, 0.0, None),
        _rec("planner", 2, 1.0, error="env step failed"),
        _rec("planner", 3, 1.0, tokens=False),
    ]
    samples, dropped = build_samples(recs, RewardConfig())
    assert samples == []
    assert dropped == {
        "planner: R = 0": 1,
        "reflector: ΔR = 0": 1,
        "planner: empty output": 1,
        "reflector: no next trial": 1,
        "planner: failed episode": 1,
        "planner: no token ids (text-only source)": 1,
    }
    samples, _ = build_samples(
        recs, RewardConfig(drop_zero_planner=False, drop_zero_delta=False, drop_empty=False)
    )
    assert [(s.role, s.reward) for s in samples] == [("planner", 0.0), ("reflector", 0.0), ("planner", 1.0)]
