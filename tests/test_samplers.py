"""CPS, the Wan noise level, the Euler step and the sampler dispatch, against
hand-worked numbers and torch.distributions.Normal."""
import math

import pytest
import torch
from torch.distributions import Normal

from editrl.policy.cps import cps_mean, cps_noise_level, cps_step
from editrl.policy.samplers import SAMPLERS, sampler_step, wan_noise_range
from editrl.policy.sde import flow_sde_mean, flow_sde_step, ode_step, wan_noise_level


def test_cps_mean_by_hand():
    # x = 1, v = 2, sigma = 0.5, sigma_next = 0.4, eta = 0.5
    # s = 0.4 sin(pi / 4) = 0.28284271; x0_hat = 1 - 0.5 * 2 = 0; x1_hat = 1 + 0.5 * 2 = 2
    # coefficient of x1_hat: sqrt(0.16 - 0.08) = 0.28284271
    # mean = 0.6 * 0 + 0.28284271 * 2 = 0.56568542
    s = cps_noise_level(0.4, 0.5)
    assert s == pytest.approx(0.28284271)
    mean = cps_mean(torch.tensor([1.0]), torch.tensor([2.0]), 0.5, 0.4, s)
    assert mean.item() == pytest.approx(0.56568542, abs=1e-6)


@pytest.mark.parametrize("eta", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("sigma_next", [0.9, 0.5, 0.05])
def test_cps_mean_keeps_the_noise_on_the_schedule(eta, sigma_next):
    # On the exact flow path x = (1 - sigma) x0 + sigma eps with the true velocity v = eps - x0,
    # x0_hat = x0 and x1_hat = eps, so cps_mean = (1 - sigma_next) x0 + c eps with
    # c = sqrt(sigma_next^2 - s^2): the predicted noise and the fresh noise s add up to sigma_next.
    sigma = min(sigma_next + 0.1, 1.0)
    x0, eps = torch.tensor([[0.3, -1.2, 0.8]], dtype=torch.float64), torch.tensor([[1.1, 0.4, -0.7]], dtype=torch.float64)
    x, v = (1 - sigma) * x0 + sigma * eps, eps - x0
    s = cps_noise_level(sigma_next, eta)
    mean = cps_mean(x, v, sigma, sigma_next, s)
    coefficient = (mean - (1 - sigma_next) * x0) / eps  # the same for every element
    torch.testing.assert_close(coefficient, torch.full_like(coefficient, math.sqrt(sigma_next**2 - s**2)), rtol=1e-9, atol=1e-12)
    assert coefficient[0, 0].item() ** 2 + s**2 == pytest.approx(sigma_next**2, rel=1e-9)


def test_cps_sample_has_the_schedule_noise_level_and_flow_sde_has_more():
    # On the exact flow path x = (1 - sigma) x0 + sigma eps with the true velocity eps - x0,
    # CPS gives x_next = (1 - sigma_next) x0 + noise whose std is sigma_next (0.5 here);
    # the Flow-SDE step at eta = 0.7 overshoots it.
    torch.manual_seed(0)
    n, sigma, sigma_next = 200_000, 0.8, 0.5
    x0, eps, fresh = torch.randn(1, n), torch.randn(1, n), torch.randn(1, n)
    x, v = (1 - sigma) * x0 + sigma * eps, eps - x0
    cps = cps_step(x, v, sigma, sigma_next, 0.7, noise=fresh).x_next
    assert (cps - (1 - sigma_next) * x0).std().item() == pytest.approx(sigma_next, rel=0.01)
    sde = flow_sde_step(x, v, sigma, sigma_next, 0.7, noise=fresh).x_next
    assert (sde - (1 - sigma_next) * x0).std().item() > 1.05 * sigma_next


def test_cps_with_eta_zero_is_exactly_the_euler_step():
    torch.manual_seed(1)
    x, v = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    out = cps_step(x, v, 0.7, 0.45, 0.0)
    assert torch.equal(out.x_next, x + v * (0.45 - 0.7))
    assert torch.equal(out.x_next, ode_step(x, v, 0.7, 0.45).x_next)
    assert out.std == 0.0 and out.log_prob is None


def test_cps_last_step_is_deterministic_and_lands_on_the_clean_estimate():
    # sigma_next = 0: s = 0, the step returns x0_hat = x - sigma v
    x, v = torch.randn(2, 5), torch.randn(2, 5)
    out = cps_step(x, v, 0.1, 0.0, 0.7)
    assert out.std == 0.0 and out.log_prob is None
    torch.testing.assert_close(out.x_next, x - 0.1 * v)


def test_cps_log_prob_matches_torch_normal():
    torch.manual_seed(2)
    x, v, noise = torch.randn(3, 4, 2, 5, 5), torch.randn(3, 4, 2, 5, 5), torch.randn(3, 4, 2, 5, 5)
    out = cps_step(x, v, 0.8, 0.6, 0.7, noise=noise)
    s = 0.6 * math.sin(0.7 * math.pi / 2)
    assert out.std == pytest.approx(s)
    torch.testing.assert_close(out.x_next, out.mean + s * noise)
    reference = Normal(out.mean, s).log_prob(out.x_next).flatten(1).mean(1)
    torch.testing.assert_close(out.log_prob, reference, rtol=1e-5, atol=1e-5)


def test_cps_rejects_eta_above_one():
    with pytest.raises(ValueError, match="eta"):
        cps_step(torch.zeros(1, 2), torch.zeros(1, 2), 0.5, 0.4, 1.5, noise=torch.zeros(1, 2))


def test_flow_sde_with_eta_zero_is_exactly_the_ode_step():
    torch.manual_seed(3)
    x, v = torch.randn(2, 6), torch.randn(2, 6)
    for sigma, sigma_next in [(1.0, 0.9), (0.6, 0.3), (0.2, 0.0)]:
        assert torch.equal(flow_sde_step(x, v, sigma, sigma_next, 0.0).x_next, ode_step(x, v, sigma, sigma_next).x_next)


def test_ode_step_by_hand():
    # x = 1, v = 2, dt = 0.4 - 0.5 = -0.1: x_next = 1 - 0.2 = 0.8
    out = ode_step(torch.tensor([[1.0]]), torch.tensor([[2.0]]), 0.5, 0.4)
    assert out.x_next.item() == pytest.approx(0.8) and out.std == 0.0 and out.log_prob is None


def test_wan_noise_level_by_hand():
    # s = s_min + (s_max - s_min) sigma: 0 + 0.9 * 0.5 = 0.45; 0.1 + 0.8 * 0.5 = 0.5; eta scales it
    assert wan_noise_level(0.5, 0.9, 0.0) == pytest.approx(0.45)
    assert wan_noise_level(0.5, 0.9, 0.1) == pytest.approx(0.5)
    assert wan_noise_level(0.5, 0.9, 0.1, eta=0.5) == pytest.approx(0.25)
    # sigma = 1 needs no special case: s = s_max
    assert wan_noise_level(1.0, 0.9, 0.0) == pytest.approx(0.9)
    assert wan_noise_range([1.0, 0.9, 0.4, 0.0]) == (0.9, 0.0)
    with pytest.raises(ValueError):
        wan_noise_level(0.5, 0.1, 0.9)


def test_wan_step_mean_and_log_prob_by_the_sde_formula():
    torch.manual_seed(4)
    x, v, noise = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    # schedule 1 > 0.9 > 0.4 > 0: s_max = 0.9, s_min = 0; at sigma = 0.4: s = 0.36, std = 0.36 * sqrt(0.4)
    out = sampler_step("flow_sde_wan", x, v, 0.4, 0.0, 1.0, noise=noise, noise_range=(0.9, 0.0))
    s = 0.9 * 0.4
    assert out.std == pytest.approx(s * math.sqrt(0.4))
    torch.testing.assert_close(out.mean, flow_sde_mean(x, v, 0.4, 0.0, s))
    reference = Normal(out.mean, out.std).log_prob(out.x_next).flatten(1).mean(1)
    torch.testing.assert_close(out.log_prob, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_scores_a_recorded_transition_as_sampled_in_fp32(sampler):
    torch.manual_seed(5)
    x, v = torch.randn(2, 4, 3, dtype=torch.bfloat16), torch.randn(2, 4, 3, dtype=torch.bfloat16)
    noise = torch.randn(2, 4, 3)
    kwargs = dict(noise_range=(0.95, 0.0))
    for sigma, sigma_next in [(1.0, 0.95), (0.5, 0.3)]:
        sampled = sampler_step(sampler, x, v, sigma, sigma_next, 0.7, noise=noise, **kwargs)
        rescored = sampler_step(sampler, x, v, sigma, sigma_next, 0.7, x_next=sampled.x_next, **kwargs)
        assert sampled.x_next.dtype == sampled.mean.dtype == torch.float32
        assert torch.isfinite(sampled.x_next).all()
        if sampler == "ode":
            assert sampled.log_prob is None and rescored.log_prob is None
        else:
            assert sampled.log_prob.dtype == torch.float32 and torch.isfinite(sampled.log_prob).all()
            assert torch.equal(sampled.log_prob, rescored.log_prob)
            reference = Normal(sampled.mean, sampled.std).log_prob(sampled.x_next).flatten(1).mean(1)
            torch.testing.assert_close(sampled.log_prob, reference, rtol=1e-5, atol=1e-5)


def test_sampler_dispatch_rejects_unknown_names_and_missing_wan_range():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="unknown sampler"):
        sampler_step("ddim", x, x, 0.5, 0.4, 0.7)
    with pytest.raises(ValueError, match="noise_range"):
        sampler_step("flow_sde_wan", x, x, 0.5, 0.4, 0.7, noise=x)
    with pytest.raises(ValueError, match="sigma_next"):
        sampler_step("cps", x, x, 0.4, 0.5, 0.7, noise=x)
