"""The stage-2 objective: off-policy joint policy gradient with an IL regulariser (SPEC §3).

For each role and each model-written token t of a sample with reward R:

    w_t   = clip(exp(log π_θ(y_t) − log π_beh(y_t)), 1 − ε, 1 + ε)     detached: a constant weight
    L_RL  = − mean_t [ w_t · R · log π_θ(y_t) ]                          gradient through log π_θ only
    L_IL  = − mean_t [ log π_θ(y_t) ]  on samples drawn from the role's IL data
    L     = L_RL + λ · L_IL

No critic, no baseline, no KL. Unlike PPO, tokens outside the trust region keep a (clipped)
weight. The ``ppo_clip`` ablation replaces the RL term with − mean_t [ min(r_t·R, clip(r_t)·R) ]
where r_t = exp(log π_θ − log π_beh) carries the gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Objective = Literal["clipped_is", "ppo_clip"]
Normalisation = Literal["sequence", "token"]


def masked_mean(x: torch.Tensor, mask: torch.Tensor, normalisation: Normalisation) -> torch.Tensor:
    """``sequence``: mean over each sample's tokens, then over samples (batch-size independent);
    ``token``: one mean over all tokens of the batch (long outputs weigh more)."""
    mask = mask.to(x.dtype)
    if normalisation == "token":
        return (x * mask).sum() / mask.sum().clamp(min=1)
    per_sample = (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_sample.mean()


@dataclass
class RLTerms:
    loss: torch.Tensor
    mean_ratio: float
    clipped_fraction: float


def rl_loss(
    logp: torch.Tensor,
    behaviour_logp: torch.Tensor,
    mask: torch.Tensor,
    reward: torch.Tensor,
    *,
    epsilon: float = 0.3,
    objective: Objective = "clipped_is",
    normalisation: Normalisation = "sequence",
) -> RLTerms:
    """L_RL for a batch: ``logp``/``behaviour_logp``/``mask`` are [B, T], ``reward`` is [B]."""
    ratio = torch.exp(logp - behaviour_logp)
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon)
    R = reward.unsqueeze(-1)
    if objective == "clipped_is":
        w = clipped.detach()
        per_token = -(w * R * logp)
    else:
        per_token = -torch.minimum(ratio * R, clipped * R)
    m = mask.bool()
    with torch.no_grad():
        r = ratio[m]
        mean_ratio = r.mean().item() if r.numel() else 1.0
        clipped_fraction = ((r < 1 - epsilon) | (r > 1 + epsilon)).float().mean().item() if r.numel() else 0.0
    return RLTerms(masked_mean(per_token, mask, normalisation), mean_ratio, clipped_fraction)


def il_loss(
    logp: torch.Tensor, mask: torch.Tensor, normalisation: Normalisation = "sequence"
) -> torch.Tensor:
    """L_IL: token NLL of the IL targets (prompt and env tokens are masked out)."""
    return masked_mean(-logp, mask, normalisation)


def joint_loss(l_rl: torch.Tensor, l_il: torch.Tensor | None, lam: float) -> torch.Tensor:
    """L = L_RL + λ · L_IL (λ = 0 or no IL batch: the RL term alone)."""
    if l_il is None or lam == 0:
        return l_rl
    return l_rl + lam * l_il
