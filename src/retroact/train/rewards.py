"""RL samples from recorded multi-trial episodes (SPEC §3, rewards and reference filters).

Planner sample of trial k:   R_π = R(τ_k)
Reflector sample f_k:        R_μ = R(τ_{k+1}) − R(τ_k)                      (``paper``, Eq. 6)
                             R_μ = (R(τ_{k+1}) − R(τ_k)) · (R(τ_k) + α) / α  (``scaled``, reference code)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from retroact.agent.records import TrajectoryRecord


class RewardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reflector_reward: Literal["scaled", "paper"] = Field(
        "scaled", description="`paper`: R(τ_{k+1}) − R(τ_k); `scaled`: that times (R(τ_k) + α) / α."
    )
    alpha: float = Field(1.0, gt=0, description="α of the scaled reflector reward.")
    drop_zero_planner: bool = Field(True, description="Drop planner samples with R = 0 (reference filter).")
    drop_zero_delta: bool = Field(True, description="Drop reflector samples with R(τ_{k+1}) = R(τ_k).")
    drop_empty: bool = Field(True, description="Drop samples without any model-written token.")


@dataclass(frozen=True)
class RLSample:
    role: Literal["planner", "reflector"]
    prompt_ids: list[int]
    output_ids: list[int]
    loss_mask: list[int]
    behaviour_logprobs: list[float]
    reward: float
    version: int
    uid: str


def reflector_reward(r_k: float, r_next: float, cfg: RewardConfig) -> float:
    delta = r_next - r_k
    return delta if cfg.reflector_reward == "paper" else delta * (r_k + cfg.alpha) / cfg.alpha


def build_samples(
    records: Iterable[TrajectoryRecord], cfg: RewardConfig
) -> tuple[list[RLSample], Counter[str]]:
    """RL samples of both roles from tokenised records, and counts of what was dropped and why."""
    samples: list[RLSample] = []
    dropped: Counter[str] = Counter()
    for rec in records:
        reason, reward = _judge(rec, cfg)
        if reason:
            dropped[f"{rec.role}: {reason}"] += 1
            continue
        assert rec.prompt_ids is not None and rec.output_ids is not None
        assert rec.loss_mask is not None and rec.behaviour_logprobs is not None
        samples.append(
            RLSample(
                rec.role,
                rec.prompt_ids,
                rec.output_ids,
                rec.loss_mask,
                rec.behaviour_logprobs,
                reward,
                rec.adapter_version,
                rec.uid,
            )
        )
    return samples, dropped


def _judge(rec: TrajectoryRecord, cfg: RewardConfig) -> tuple[str | None, float]:
    if rec.error:
        return "failed episode", 0.0
    if not rec.tokenized:
        return "no token ids (text-only source)", 0.0
    if cfg.drop_empty and not any(rec.loss_mask or []):
        return "empty output", 0.0
    if rec.role == "planner":
        if cfg.drop_zero_planner and rec.reward == 0:
            return "R = 0", 0.0
        return None, rec.reward
    if rec.next_reward is None:
        return "no next trial", 0.0
    if cfg.drop_zero_delta and rec.next_reward == rec.reward:
        return "ΔR = 0", 0.0
    return None, reflector_reward(rec.reward, rec.next_reward, cfg)
