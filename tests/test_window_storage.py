"""A group carries only the latents the learner reads (the positions around its trained
steps, :func:`editrl.protocol.rollout.trained_positions`), and the learner computes exactly
the same loss and gradients from them as from the whole trajectories."""
import dataclasses

import pytest
import torch
from conftest import CORPUS, sample_group, tiny_policy_config

from editrl.learner.advantages import group_advantages
from editrl.learner.config import LearnerConfig
from editrl.learner.learner import Learner
from editrl.policy.config import SdeWindowSettings
from editrl.policy.policy import EditPolicy
from editrl.protocol.rollout import trained_positions


def test_trained_positions_are_each_trained_step_and_the_next():
    assert trained_positions([False, True, True, False]) == (1, 2, 3)  # a window of 2: 3 latents
    assert trained_positions([True, False, True, False]) == (0, 1, 2, 3)
    assert trained_positions([False, False, False, True]) == (3, 4)
    assert trained_positions([False, False]) == ()


def _windowed(group):
    positions = trained_positions(group.sampler.stochastic)
    return dataclasses.replace(group, latents=group.latents[:, list(positions)].clone(), latent_steps=positions)


@pytest.mark.parametrize("window", [None, SdeWindowSettings(size=2, position="fixed", start=1)], ids=["steps_0_to_2", "window_1_2"])
def test_window_storage_gives_exactly_the_loss_and_gradients_of_full_storage(window):
    torch.manual_seed(0)
    policy = EditPolicy.from_config(tiny_policy_config(sde_window=window), CORPUS, seed=0)
    groups = [sample_group(policy, seed, torch.tensor([0.0, 1.0, 3.0, 2.0])) for seed in range(2)]
    windowed = [_windowed(g) for g in groups]
    # 4 steps: steps 0-2 trained keep positions 0-3 of 0-4; a window at steps 1-2 keeps 1-3
    assert windowed[0].latents.shape[1] == (4 if window is None else 3) and groups[0].latents.shape[1] == 5
    learner = Learner(policy, LearnerConfig(kl_coef=0.1, torch_threads=1), seed=0)
    advantages = group_advantages(torch.stack([g.rewards for g in groups]), learner.config.adv_eps)
    results = []
    for batch in (groups, windowed):
        learner.optimizer.zero_grad(set_to_none=True)
        stats = learner.accumulate_gradients(batch, advantages)
        results.append((stats, {n: p.grad.clone() for n, p in policy.transformer.named_parameters() if p.grad is not None}))
    (full_stats, full_grads), (window_stats, window_grads) = results
    assert full_grads and set(window_grads) == set(full_grads)
    assert all(torch.equal(window_grads[n], full_grads[n]) for n in full_grads)
    assert window_stats.sums == full_stats.sums and window_stats.terms == full_stats.terms > 0


def test_a_position_the_group_does_not_hold_is_refused_naming_the_group():
    policy = EditPolicy.from_config(tiny_policy_config(), CORPUS, seed=0)
    group = _windowed(sample_group(policy, 0, torch.tensor([0.0, 1.0])))
    with pytest.raises(KeyError, match=r"group g0 holds the latents at positions \[0, 1, 2, 3\], not 4"):
        group.latent(4)
