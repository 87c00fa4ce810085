"""The forward-process objectives (DiffusionNFT, AWM) against numbers worked out by hand."""
import pytest
import torch

from editrl.learner.forward_loss import ForwardStats, awm_objective, diffusion_nft_objective, nft_optimality


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_optimality_maps_the_advantage_over_z_to_a_probability_and_clips_it():
    # r = 1/2 + 1/2 clip(A / 5, -1, 1): -10 -> 0, -2.5 -> 0.25, 0 -> 0.5, 2.5 -> 0.75, 10 -> 1
    r = nft_optimality(torch.tensor([-10.0, -2.5, 0.0, 2.5, 10.0]), reward_scale=5.0)
    torch.testing.assert_close(r, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    with pytest.raises(ValueError, match="reward_scale"):
        nft_optimality(torch.zeros(1), 0.0)


def test_nft_with_r_one_and_beta_one_is_z_times_flow_matching_on_the_sample():
    # beta = 1: v+ = v_theta whatever v_old; r = 1 drops the negative term.
    # v - v* = (1, 2): mean square (1 + 4) / 2 = 2.5; times Z / beta = 5 -> 12.5
    v = t([1.0, 2.0]).requires_grad_()
    loss, stats = diffusion_nft_objective(v, t([3.0, -7.0]), None, t([0.0, 0.0]), torch.tensor([0.5]), torch.tensor([1.0]),
                                          beta=1.0, reward_scale=5.0, kl_coef=0.0, adaptive_weighting=False)
    assert loss.item() == pytest.approx(12.5)
    assert stats.policy_loss == pytest.approx(12.5) and stats.fm_error == pytest.approx(2.5) and stats.kl_ref == 0.0
    loss.backward()
    # d/dv 5 * mean((v - v*)^2) = 5 * 2 (v - v*) / 2 = (5, 10)
    torch.testing.assert_close(v.grad, t([5.0, 10.0]))


def test_nft_mixes_the_implicit_positive_and_negative_policies_by_r():
    # beta 0.5, r 0.75, v_theta (1, 0), v_old (0, 0), v* (1, 1):
    # v+ = 0.5 * 0 + 0.5 * (1, 0) = (0.5, 0)  -> L+ = ((-0.5)^2 + (-1)^2) / 2 = 0.625
    # v- = 1.5 * 0 - 0.5 * (1, 0) = (-0.5, 0) -> L- = ((-1.5)^2 + (-1)^2) / 2 = 1.625
    # (Z / beta)(r L+ + (1 - r) L-) = 10 * (0.46875 + 0.40625) = 8.75
    loss, _ = diffusion_nft_objective(t([1.0, 0.0]), t([0.0, 0.0]), None, t([1.0, 1.0]), torch.tensor([0.5]),
                                      torch.tensor([0.75]), beta=0.5, reward_scale=5.0, kl_coef=0.0, adaptive_weighting=False)
    assert loss.item() == pytest.approx(8.75)


def test_nft_gradient_at_the_old_policy_is_the_clipped_advantage_times_the_flow_matching_gradient():
    # at v_theta = v_old: dL/dv = 2 clip(A, -Z, Z) (v_old - v*) / D for any beta; A = 2 (r = 0.7), D = 3
    v_old, target = t([0.5, -1.0, 2.0]), t([1.0, 1.0, 1.0])
    for beta in (0.1, 1.0, 3.0):
        v = v_old.clone().requires_grad_()
        loss, _ = diffusion_nft_objective(v, v_old, None, target, torch.tensor([0.3]), nft_optimality(torch.tensor([2.0]), 5.0),
                                          beta=beta, reward_scale=5.0, kl_coef=0.0, adaptive_weighting=False)
        loss.backward()
        torch.testing.assert_close(v.grad, 2 * 2.0 * (v_old - target) / 3)


def test_nft_adaptive_weighting_self_normalises_the_clean_latent_error():
    # sigma 0.5, v - v* = (4, 0): d = sigma (v - v*) = (2, 0); mean d^2 = 2, mean |d| = 1 -> L+ = 2; Z / beta = 5 -> 10
    loss, _ = diffusion_nft_objective(t([4.0, 0.0]), t([4.0, 0.0]), None, t([0.0, 0.0]), torch.tensor([0.5]), torch.tensor([1.0]),
                                      beta=1.0, reward_scale=5.0, kl_coef=0.0, adaptive_weighting=True)
    assert loss.item() == pytest.approx(10.0)


def test_the_regulariser_is_the_velocity_mse_to_the_reference():
    # v (1, 2), v_ref (0, 0): kl = (1 + 4) / 2 = 2.5; policy term 12.5 (as above); loss = 12.5 + 0.1 * 2.5
    loss, stats = diffusion_nft_objective(t([1.0, 2.0]), t([1.0, 2.0]), t([0.0, 0.0]), t([0.0, 0.0]), torch.tensor([0.5]),
                                          torch.tensor([1.0]), beta=1.0, reward_scale=5.0, kl_coef=0.1, adaptive_weighting=False)
    assert stats.kl_ref == pytest.approx(2.5) and loss.item() == pytest.approx(12.75)
    with pytest.raises(ValueError, match="ref_velocity"):
        diffusion_nft_objective(t([1.0]), t([1.0]), None, t([0.0]), torch.tensor([0.5]), torch.tensor([1.0]), 1.0, 5.0, 0.1)


def test_awm_weights_each_samples_flow_matching_error_by_its_advantage():
    # errors: (1, 1) -> l = 1 and (2, 0) -> l = 2; advantages (1, -1): mean(1 * 1 - 1 * 2) = -0.5
    v = t([1.0, 1.0], [2.0, 0.0]).requires_grad_()
    loss, stats = awm_objective(v, None, torch.zeros(2, 2), torch.tensor([0.5, 0.5]), torch.tensor([1.0, -1.0]),
                                kl_coef=0.0, weighting="uniform")
    assert loss.item() == pytest.approx(-0.5) and stats.fm_error == pytest.approx(1.5)
    loss.backward()
    # d/dv (1/2) A_i mean((v_i - v*)^2) = A_i (v_i - v*) / 2: (0.5, 0.5) and (-1, 0)
    torch.testing.assert_close(v.grad, t([0.5, 0.5], [-1.0, 0.0]))


def test_awm_ghuber_weighting():
    # l = 1, sigma 0.5, p 0.25: (0.5 / 0.25) * ((1 + 1e-10)^0.25 - (1e-10)^0.25) = 2 * (1 - 10^-2.5) = 1.993675
    loss, _ = awm_objective(t([1.0, 1.0]), None, t([0.0, 0.0]), torch.tensor([0.5]), torch.tensor([1.0]), kl_coef=0.0,
                            weighting="ghuber", ghuber_power=0.25)
    assert loss.item() == pytest.approx(2 * (1 - 10**-2.5), rel=1e-6)


def test_awm_with_equal_rewards_has_exactly_zero_gradient():
    v = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)).requires_grad_()
    loss, _ = awm_objective(v, None, torch.zeros(4, 3), torch.full((4,), 0.7), torch.zeros(4), kl_coef=0.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(v.grad, torch.zeros(4, 3))


def test_awm_refuses_unknown_weightings_and_powers():
    with pytest.raises(ValueError, match="weighting"):
        awm_objective(t([1.0]), None, t([0.0]), torch.tensor([0.5]), torch.tensor([1.0]), 0.0, weighting="t**2")
    with pytest.raises(ValueError, match="ghuber_power"):
        awm_objective(t([1.0]), None, t([0.0]), torch.tensor([0.5]), torch.tensor([1.0]), 0.0, ghuber_power=1.5)


def test_pooled_statistics_weigh_parts_by_their_samples():
    # loss means 1 over 1 sample and 4 over 3 samples: (1 + 12) / 4 = 3.25
    a = ForwardStats(loss=1.0, policy_loss=1.0, kl_ref=0.0, fm_error=2.0, samples=1)
    b = ForwardStats(loss=4.0, policy_loss=4.0, kl_ref=1.0, fm_error=2.0, samples=3)
    pooled = ForwardStats.pooled([a, b])
    assert pooled.loss == pytest.approx(3.25) and pooled.kl_ref == pytest.approx(0.75) and pooled.samples == 4
