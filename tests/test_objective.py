"""Group advantages, the clipped-ratio loss and GRPO-Guard's ratio normalisation
against hand-worked numbers."""
import math

import pytest
import torch

from learner.advantages import group_advantages
from learner.loss import clipped_policy_loss, clipped_ratio_loss, grpo_guard_log_ratio
from policy.sde import gaussian_log_prob


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


def test_grpo_guard_log_ratio_by_hand():
    # one sample of two elements: mean - old_mean = (0.2, 0) -> mean square 0.02;
    # std = 0.2 -> b = 0.02 / (2 * 0.04) = 0.25; log r = -1.0 - (-0.8) = -0.2
    # normalised: (-0.2 + 0.25) * 0.2 = 0.01
    value = grpo_guard_log_ratio(
        torch.tensor([-1.0]), torch.tensor([-0.8]), torch.tensor([[0.3, 0.1]]), torch.tensor([[0.1, 0.1]]), 0.2
    )
    assert value.item() == pytest.approx(0.01, abs=1e-7)


def test_grpo_guard_removes_the_bias_and_the_1_over_std_scale_of_gaussian_log_ratios():
    # x = old_mean + std * eps: per element log r = (mean - old_mean) eps / std - (mean - old_mean)^2 / (2 std^2),
    # so the normalised log-ratio is exactly mean((mean - old_mean) * eps),
    # the same for a large and a tiny std, while the raw log-ratio grows as 1 / std and sits below 0
    torch.manual_seed(0)
    old_mean, delta, eps = torch.randn(3, 500), 0.01 * torch.randn(3, 500), torch.randn(3, 500)
    expected = (delta * eps).mean(dim=1)
    raw_sizes = []
    for std in (0.5, 0.005):
        x = old_mean + std * eps
        log_prob, old_log_prob = gaussian_log_prob(x, old_mean + delta, std), gaussian_log_prob(x, old_mean, std)
        normalised = grpo_guard_log_ratio(log_prob, old_log_prob, old_mean + delta, old_mean, std)
        torch.testing.assert_close(normalised, expected, rtol=1e-3, atol=1e-6)
        raw_sizes.append((log_prob - old_log_prob).abs().mean().item())
    assert raw_sizes[1] > 50 * raw_sizes[0]


def test_clipped_policy_loss_is_the_ratio_loss_of_the_log_prob_difference():
    log_prob, old, adv = torch.tensor([0.01, -0.02, 0.0]), torch.tensor([0.0, 0.0, 0.001]), torch.tensor([1.0, -1.0, 2.0])
    a, stats_a = clipped_policy_loss(log_prob, old, adv, 0.005)
    b, stats_b = clipped_ratio_loss(log_prob - old, adv, 0.005)
    assert torch.equal(a, b) and all(torch.equal(stats_a[k], stats_b[k]) for k in stats_a)
