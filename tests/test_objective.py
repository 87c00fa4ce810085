"""Group advantages and the clipped-ratio loss against hand-worked numbers."""
import math

import pytest
import torch

from learner.advantages import group_advantages
from learner.loss import clipped_policy_loss


def test_group_advantages_by_hand():
    # rewards 1, 2, 3, 4: mean 2.5; population std = sqrt((2.25 + 0.25 + 0.25 + 2.25) / 4) = sqrt(1.25)
    adv = group_advantages(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), eps=0.0)
    std = math.sqrt(1.25)
    torch.testing.assert_close(adv, torch.tensor([[-1.5, -0.5, 0.5, 1.5]]) / std)


def test_groups_are_normalised_separately_and_zero_spread_gives_zero():
    # group 2 is group 1 scaled by 10 and shifted: same advantages; group 3 has no spread.
    rewards = torch.tensor([[1.0, 3.0], [20.0, 40.0], [5.0, 5.0]])
    adv = group_advantages(rewards, eps=0.0 + 1e-12)
    torch.testing.assert_close(adv[0], torch.tensor([-1.0, 1.0]))
    torch.testing.assert_close(adv[1], torch.tensor([-1.0, 1.0]))
    assert torch.all(adv[2] == 0)


def test_global_std_scope_by_hand():
    # centred per group: [-1, 1] and [-10, 10]; global population std of all rewards
    # [1, 3, 20, 40]: mean 16, deviations -15, -13, 4, 24 -> var = (225 + 169 + 16 + 576) / 4 = 246.5
    rewards = torch.tensor([[1.0, 3.0], [20.0, 40.0]])
    adv = group_advantages(rewards, eps=0.0, std_scope="global")
    std = math.sqrt(246.5)
    torch.testing.assert_close(adv, torch.tensor([[-1.0, 1.0], [-10.0, 10.0]]) / std)


def test_advantage_clipping_by_hand():
    # 99 zeros and one 1: mean 0.01, var = (99 * 0.01^2 + 0.99^2) / 100 = 0.0099, std = 0.099499
    # the outlier's advantage 0.99 / 0.099499 = 9.95 is clipped to 5; the others are -0.1005.
    rewards = torch.zeros(1, 100)
    rewards[0, -1] = 1.0
    adv = group_advantages(rewards, eps=0.0, clip=5.0)
    assert adv[0, -1].item() == 5.0
    assert adv[0, 0].item() == pytest.approx(-0.01 / math.sqrt(0.0099), rel=1e-5)
    assert group_advantages(rewards, eps=0.0, clip=None)[0, -1].item() == pytest.approx(0.99 / math.sqrt(0.0099), rel=1e-5)


def test_advantages_reject_nan_rewards():
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([[1.0, float("nan")]]))


def test_clipped_loss_above_the_clip_range():
    # ratio = 1.1 for both samples, clip range 0.05 -> clipped ratio 1.05.
    # A = +1: max(-1.1, -1.05) = -1.05 (clipped branch, no gradient)
    # A = -1: max(+1.1, +1.05) = +1.10 (unclipped branch)
    # loss = (-1.05 + 1.10) / 2 = 0.025
    old = torch.zeros(2)
    log_prob = torch.full((2,), math.log(1.1), requires_grad=True)
    loss, stats = clipped_policy_loss(log_prob, old, torch.tensor([1.0, -1.0]), 0.05)
    assert loss.item() == pytest.approx(0.025, abs=1e-6)
    loss.backward()
    # d/dlogp of +A * ratio / 2 for the unclipped sample: 1.1 / 2 = 0.55; 0 for the clipped one
    torch.testing.assert_close(log_prob.grad, torch.tensor([0.0, 0.55]))
    assert stats["clip_frac"].item() == 1.0
    assert stats["ratio_mean"].item() == pytest.approx(1.1)
    # approx_kl = 0.5 * mean(log(1.1)^2) = 0.5 * 0.0090840
    assert stats["approx_kl"].item() == pytest.approx(0.5 * math.log(1.1) ** 2, rel=1e-5)


def test_clipped_loss_below_the_clip_range():
    # ratio = 0.9, clip range 0.05 -> clipped ratio 0.95.
    # A = +1: max(-0.90, -0.95) = -0.90 (unclipped: gradient -A * r / 2 = -0.45)
    # A = -1: max(+0.90, +0.95) = +0.95 (clipped: no gradient)
    # loss = (-0.90 + 0.95) / 2 = 0.025
    log_prob = torch.full((2,), math.log(0.9), requires_grad=True)
    loss, _ = clipped_policy_loss(log_prob, torch.zeros(2), torch.tensor([1.0, -1.0]), 0.05)
    assert loss.item() == pytest.approx(0.025, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(log_prob.grad, torch.tensor([-0.45, 0.0]))


def test_inside_the_clip_range_is_the_plain_policy_gradient():
    # ratio = 1 (on-policy): loss = mean(-A) = -(2 - 1) / 2 = -0.5, gradient -A / N
    log_prob = torch.zeros(2, requires_grad=True)
    loss, stats = clipped_policy_loss(log_prob, torch.zeros(2), torch.tensor([2.0, -1.0]), 0.2)
    assert loss.item() == pytest.approx(-0.5)
    loss.backward()
    torch.testing.assert_close(log_prob.grad, torch.tensor([-1.0, 0.5]))
    assert stats["clip_frac"].item() == 0.0 and stats["ratio_mean"].item() == 1.0
