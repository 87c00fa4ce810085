"""Group advantages, the Edit-GRPO objective (clipped ratio, KL to the reference)
and GRPO-Guard's ratio normalisation against hand-worked numbers."""
import math

import pytest
import torch

from editrl.learner.advantages import group_advantages
from editrl.learner.loss import edit_grpo_objective, grpo_guard_log_ratio
from editrl.policy.sde import gaussian_log_prob


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


def _objective(log_prob, advantages, clip_range, old_log_prob=None, **kwargs):
    """The objective of N samples without KL or ratio normalisation (means unused)."""
    n = log_prob.shape[0]
    args = dict(mean=torch.zeros(n, 2), old_mean=None, ref_mean=None, std=1.0, dt=-0.1, kl_coef=0.0)
    args.update(kwargs)
    old = torch.zeros(n) if old_log_prob is None else old_log_prob
    return edit_grpo_objective(log_prob, old, advantages, clip_range=clip_range, **args)


def test_clipped_loss_above_the_clip_range():
    # ratio = 1.1 for both samples, clip range 0.05 -> clipped ratio 1.05.
    # A = +1: max(-1.1, -1.05) = -1.05 (clipped branch, no gradient)
    # A = -1: max(+1.1, +1.05) = +1.10 (unclipped branch)
    # loss = (-1.05 + 1.10) / 2 = 0.025
    log_prob = torch.full((2,), math.log(1.1), requires_grad=True)
    loss, stats = _objective(log_prob, torch.tensor([1.0, -1.0]), 0.05)
    assert loss.item() == pytest.approx(0.025, abs=1e-6)
    loss.backward()
    # d/dlogp of +A * ratio / 2 for the unclipped sample: 1.1 / 2 = 0.55; 0 for the clipped one
    torch.testing.assert_close(log_prob.grad, torch.tensor([0.0, 0.55]))
    assert stats.clip_frac == 1.0
    assert stats.ratio_mean == pytest.approx(1.1) and stats.ratio_min == pytest.approx(1.1) and stats.ratio_max == pytest.approx(1.1)
    # approx_kl (k2) = 0.5 * mean(log(1.1)^2) = 0.5 * 0.0090840
    assert stats.approx_kl == pytest.approx(0.5 * math.log(1.1) ** 2, rel=1e-5)
    assert stats.kl_ref == 0.0 and stats.loss == pytest.approx(stats.pg_loss)


def test_clipped_loss_below_the_clip_range():
    # ratio = 0.9, clip range 0.05 -> clipped ratio 0.95.
    # A = +1: max(-0.90, -0.95) = -0.90 (unclipped: gradient -A * r / 2 = -0.45)
    # A = -1: max(+0.90, +0.95) = +0.95 (clipped: no gradient)
    # loss = (-0.90 + 0.95) / 2 = 0.025
    log_prob = torch.full((2,), math.log(0.9), requires_grad=True)
    loss, _ = _objective(log_prob, torch.tensor([1.0, -1.0]), 0.05)
    assert loss.item() == pytest.approx(0.025, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(log_prob.grad, torch.tensor([-0.45, 0.0]))


def test_inside_the_clip_range_is_the_plain_policy_gradient():
    # ratio = 1 (on-policy): loss = mean(-A) = -(2 - 1) / 2 = -0.5, gradient -A / N
    log_prob = torch.zeros(2, requires_grad=True)
    loss, stats = _objective(log_prob, torch.tensor([2.0, -1.0]), 0.2)
    assert loss.item() == pytest.approx(-0.5)
    loss.backward()
    torch.testing.assert_close(log_prob.grad, torch.tensor([-1.0, 0.5]))
    assert stats.clip_frac == 0.0 and stats.ratio_mean == 1.0 and stats.approx_kl == 0.0


def test_kl_to_the_reference_by_hand():
    # one sample of two elements, std 0.2: (mean - ref)^2 / (2 std^2) = (0.04 / 0.08, 0) = (0.5, 0),
    # element mean 0.25 = kl_ref; on-policy with A = 0 the surrogate is 0, so loss = 0.1 * 0.25 = 0.025.
    # d loss / d mean = 0.1 * (mean - ref) / std^2 / 2 elements = 0.1 * (0.2, 0) / 0.04 / 2 = (0.25, 0)
    mean = torch.tensor([[0.3, 0.1]], requires_grad=True)
    loss, stats = edit_grpo_objective(
        torch.zeros(1), torch.zeros(1), torch.zeros(1), mean, None, torch.tensor([[0.1, 0.1]]), std=0.2, dt=-0.1,
        clip_range=1e-3, kl_coef=0.1,
    )
    assert stats.kl_ref == pytest.approx(0.25) and loss.item() == pytest.approx(0.025)
    loss.backward()
    torch.testing.assert_close(mean.grad, torch.tensor([[0.25, 0.0]]))


def test_ratio_statistics_are_those_of_the_normalised_ratio_under_grpo_guard():
    # the GRPO-Guard numbers of test_grpo_guard_log_ratio_by_hand: raw log r = -0.2, normalised log rho = 0.01.
    # The surrogate clips rho = exp(0.01) = 1.01005: outside eps = 0.005 -> clip_frac 1, ratio_mean 1.01005,
    # approx_kl = 0.5 * 0.01^2 = 5e-5; the raw log-ratio is kept apart. A = -1: loss = max(1.01005, 1.005) = 1.01005,
    # reweighted by -dt = 0.5: 2.0201.
    args = (torch.tensor([-1.0]), torch.tensor([-0.8]), torch.tensor([-1.0]), torch.tensor([[0.3, 0.1]]), torch.tensor([[0.1, 0.1]]), None)
    loss, stats = edit_grpo_objective(*args, std=0.2, dt=-0.5, clip_range=0.005, kl_coef=0.0, ratio_norm=True)
    assert stats.ratio_mean == pytest.approx(math.exp(0.01), rel=1e-6) and stats.clip_frac == 1.0
    assert stats.approx_kl == pytest.approx(5e-5, rel=1e-4)
    assert stats.log_ratio.tolist() == pytest.approx([-0.2], abs=1e-6)
    assert loss.item() == pytest.approx(math.exp(0.01), rel=1e-6)
    reweighted, _ = edit_grpo_objective(*args, std=0.2, dt=-0.5, clip_range=0.005, kl_coef=0.0, ratio_norm=True, reweight=True)
    assert reweighted.item() == pytest.approx(math.exp(0.01) / 0.5, rel=1e-6)


def test_objective_refuses_what_it_cannot_compute():
    one = torch.zeros(1)
    mean = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="old_mean"):
        edit_grpo_objective(one, one, one, mean, None, None, std=1.0, dt=-0.1, clip_range=0.1, kl_coef=0.0, ratio_norm=True)
    with pytest.raises(ValueError, match="ref_mean"):
        edit_grpo_objective(one, one, one, mean, None, None, std=1.0, dt=-0.1, clip_range=0.1, kl_coef=0.1)
    with pytest.raises(ValueError, match="dt < 0"):
        edit_grpo_objective(one, one, one, mean, None, None, std=1.0, dt=0.1, clip_range=0.1, kl_coef=0.0)
    with pytest.raises(ValueError, match="needs ratio_norm"):
        edit_grpo_objective(one, one, one, mean, None, None, std=1.0, dt=-0.1, clip_range=0.1, kl_coef=0.0, reweight=True)


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
