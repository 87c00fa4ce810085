"""The Flow-SDE step, its log-probability and the same-std Gaussian KL."""
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from editrl.policy.sde import (
    flow_sde_mean,
    flow_sde_noise_level,
    flow_sde_step,
    gaussian_kl_same_std,
    gaussian_log_prob,
)


def test_noise_level_by_hand():
    # s = eta * sqrt(sigma / (1 - sigma)) = 0.7 * sqrt(0.5 / 0.5) = 0.7
    assert flow_sde_noise_level(0.5, 0.4, 0.7) == pytest.approx(0.7)
    # sigma = 0.2: 0.7 * sqrt(0.2 / 0.8) = 0.7 * 0.5 = 0.35
    assert flow_sde_noise_level(0.2, 0.1, 0.7) == pytest.approx(0.35)
    # at sigma = 1 the next sigma replaces sigma in the denominator: 0.7 * sqrt(1 / (1 - 0.75)) = 1.4
    assert flow_sde_noise_level(1.0, 0.75, 0.7) == pytest.approx(1.4)


def test_noise_level_rejects_bad_sigmas():
    with pytest.raises(ValueError, match="sigma_next"):
        flow_sde_noise_level(0.5, 0.6, 0.7)
    with pytest.raises(ValueError, match="eta"):
        flow_sde_noise_level(0.5, 0.4, -1.0)


def test_mean_by_hand():
    # x = 1, v = 2, sigma = 0.5, sigma_next = 0.4 -> dt = -0.1, s = 0.7 (s^2 = 0.49)
    # x term: 1 * (1 + 0.49 * (-0.1) / (2 * 0.5)) = 1 - 0.049 = 0.951
    # v term: 2 * (1 + 0.49 * 0.5 / (2 * 0.5)) * (-0.1) = 2 * 1.245 * (-0.1) = -0.249
    mean = flow_sde_mean(torch.tensor([1.0]), torch.tensor([2.0]), 0.5, 0.4, 0.7)
    assert mean.item() == pytest.approx(0.951 - 0.249)


def test_step_log_prob_matches_torch_normal():
    torch.manual_seed(0)
    x, v, noise = torch.randn(3, 4, 2, 5, 5), torch.randn(3, 4, 2, 5, 5), torch.randn(3, 4, 2, 5, 5)
    out = flow_sde_step(x, v, 0.8, 0.6, 0.7, noise=noise)
    s = 0.7 * math.sqrt(0.8 / 0.2)
    std = s * math.sqrt(0.2)
    assert out.std == pytest.approx(std)
    expected_mean = flow_sde_mean(x, v, 0.8, 0.6, s)
    torch.testing.assert_close(out.mean, expected_mean)
    torch.testing.assert_close(out.x_next, expected_mean + std * noise)
    reference = Normal(expected_mean, std).log_prob(out.x_next).flatten(1).mean(1)
    torch.testing.assert_close(out.log_prob, reference, rtol=1e-5, atol=1e-5)


def test_recorded_transition_scores_the_same_as_sampling():
    torch.manual_seed(1)
    x, v, noise = torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 8)
    sampled = flow_sde_step(x, v, 1.0, 0.9, 0.7, noise=noise)
    rescored = flow_sde_step(x, v, 1.0, 0.9, 0.7, x_next=sampled.x_next)
    assert torch.equal(sampled.log_prob, rescored.log_prob)


def test_eta_zero_is_the_euler_step():
    x, v = torch.randn(2, 6), torch.randn(2, 6)
    out = flow_sde_step(x, v, 0.7, 0.5, 0.0)
    torch.testing.assert_close(out.x_next, x + v * (0.5 - 0.7))
    assert out.std == 0.0 and out.log_prob is None


def test_step_math_runs_in_fp32():
    x, v = torch.randn(2, 6, dtype=torch.bfloat16), torch.randn(2, 6, dtype=torch.bfloat16)
    out = flow_sde_step(x, v, 0.7, 0.5, 0.7, noise=torch.randn(2, 6))
    assert out.x_next.dtype == out.mean.dtype == out.log_prob.dtype == torch.float32


def test_log_prob_by_hand():
    # one element: x = 1, mean = 0, std = 2 -> -(1)^2 / 8 - log 2 - log sqrt(2 pi)
    value = gaussian_log_prob(torch.tensor([[1.0]]), torch.tensor([[0.0]]), 2.0).item()
    assert value == pytest.approx(-0.125 - math.log(2.0) - 0.5 * math.log(2 * math.pi))


def test_kl_matches_torch_and_is_zero_for_equal_means():
    torch.manual_seed(2)
    mean_p, mean_q = torch.randn(3, 10), torch.randn(3, 10)
    expected = kl_divergence(Normal(mean_p, 0.3), Normal(mean_q, 0.3)).mean(1)
    torch.testing.assert_close(gaussian_kl_same_std(mean_p, mean_q, 0.3), expected)
    assert torch.all(gaussian_kl_same_std(mean_p, mean_p, 0.3) == 0)
