"""The joint policy-gradient objective against a hand computation (SPEC §3)."""

from __future__ import annotations

import math

import pytest
import torch

from retroact.train.jpg import il_loss, joint_loss, rl_loss


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # Sample A: ratios 2.0 (clipped to 1.3) and 1.0; R = 1.  Sample B: ratio 0.2 (clipped to 0.7); R = -0.5.
    logp = torch.tensor([[math.log(0.5), math.log(0.2)], [math.log(0.1), 0.0]], requires_grad=True)
    beh = torch.tensor([[math.log(0.25), math.log(0.2)], [math.log(0.5), 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    reward = torch.tensor([1.0, -0.5])
    return logp, beh, mask, reward


def test_clipped_is_loss_and_gradient_match_hand_computation() -> None:
    logp, beh, mask, reward = _batch()
    terms = rl_loss(logp, beh, mask, reward, epsilon=0.3)
    a = (-(1.3 * 1.0 * math.log(0.5)) - (1.0 * 1.0 * math.log(0.2))) / 2
    b = -(0.7 * -0.5 * math.log(0.1))
    assert terms.loss.item() == pytest.approx((a + b) / 2, rel=1e-6)
    assert terms.mean_ratio == pytest.approx((2.0 + 1.0 + 0.2) / 3, rel=1e-6)
    assert terms.clipped_fraction == pytest.approx(2 / 3)
    terms.loss.backward()
    # The weight is a constant: dL/dlogp_t = -w_t R / (tokens in sample) / (samples).
    expected = torch.tensor([[-1.3 / 2 / 2, -1.0 / 2 / 2], [0.7 * 0.5 / 2, 0.0]])
    assert torch.allclose(logp.grad, expected, atol=1e-6)


def test_token_normalisation_and_clip_boundaries() -> None:
    logp, beh, mask, reward = _batch()
    terms = rl_loss(logp, beh, mask, reward, epsilon=0.3, normalisation="token")
    total = -(1.3 * math.log(0.5)) - math.log(0.2) - (0.7 * -0.5 * math.log(0.1))
    assert terms.loss.item() == pytest.approx(total / 3, rel=1e-6)
    # Ratios exactly on the boundary are not clipped and not counted as clipped.
    edge = torch.log(torch.tensor([[1.3, 0.7]]))
    t = rl_loss(torch.zeros(1, 2), -edge, torch.ones(1, 2), torch.tensor([1.0]), epsilon=0.3)
    assert t.clipped_fraction == 0.0 and t.mean_ratio == pytest.approx(1.0, rel=1e-6)


def test_ppo_clip_objective() -> None:
    logp, beh, mask, reward = _batch()
    terms = rl_loss(logp, beh, mask, reward, epsilon=0.3, objective="ppo_clip")
    a = (-min(2.0 * 1, 1.3 * 1) - min(1.0, 1.0)) / 2
    b = -min(0.2 * -0.5, 0.7 * -0.5)
    assert terms.loss.item() == pytest.approx((a + b) / 2, rel=1e-6)
    terms.loss.backward()
    # Where the clipped branch is taken (sample A token 1, sample B) the gradient is zero.
    assert logp.grad[0, 0].item() == 0.0 and logp.grad[1, 0].item() == 0.0
    assert logp.grad[0, 1].item() == pytest.approx(-1.0 / 2 / 2, rel=1e-6)


def test_il_term_and_joint_loss() -> None:
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.9]]))
    l_il = il_loss(logp, torch.tensor([[1, 1, 0]]))
    assert l_il.item() == pytest.approx((math.log(2) + math.log(4)) / 2, rel=1e-6)
    l_rl = torch.tensor(0.75)
    assert joint_loss(l_rl, l_il, 2.0).item() == pytest.approx(0.75 + 2 * l_il.item())
    assert joint_loss(l_rl, l_il, 0.0).item() == 0.75
    assert joint_loss(l_rl, None, 1.0).item() == 0.75
