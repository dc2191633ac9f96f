"""IR / FR / AR (SPEC §5): reward at trial 1, at the last trial, and averaged over trials."""

from __future__ import annotations

from collections.abc import Sequence


def trial_summary(per_trial_reward: Sequence[float]) -> dict[str, float]:
    if not per_trial_reward:
        raise ValueError("no trials to summarise")
    return {
        "IR": per_trial_reward[0],
        "FR": per_trial_reward[-1],
        "AR": sum(per_trial_reward) / len(per_trial_reward),
    }
