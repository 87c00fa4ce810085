"""One Edit-GRPO update moves the policy the way the advantages say, for every
sampler and with GRPO-Guard's ratio normalisation: with advantages (+1, -1) the
first sample's recorded steps become more likely relative to the second's."""
import pytest
import torch
from conftest import CORPUS, sample_group, tiny_policy_config

from editrl.learner.config import LearnerConfig
from editrl.learner.learner import Learner
from editrl.policy.policy import EditPolicy
from editrl.policy.sampling import policy_steps
from editrl.protocol.rollout import Group


@torch.no_grad()
def _trained_log_probs(policy: EditPolicy, group: Group) -> torch.Tensor:
    """``(G, k)`` log-probs of the recorded x_{t+1} at the group's k trained steps under the policy now."""
    steps = [t for t, s in enumerate(group.sampler.stochastic) if s]
    g = group.latents.shape[0]
    cond = [t.expand(g, *t.shape[1:]) for t in (group.source_latents, group.text_embeds, group.null_embeds)]
    outs = [policy_steps(policy, group.sampler, [t], [group.latents[:, t]], *cond, x_nexts=[group.latents[:, t + 1]])[0]
            for t in steps]
    return torch.stack([out.log_prob for out in outs], dim=1)


@pytest.mark.parametrize(("sampler", "ratio_norm"), [
    ("flow_sde", "none"), ("flow_sde_wan", "none"), ("cps", "none"), ("flow_sde", "grpo_guard"),
])
def test_one_update_raises_the_log_prob_of_the_positive_sample_relative_to_the_negative(sampler, ratio_norm):
    policy = EditPolicy.from_config(tiny_policy_config(sampler=sampler), CORPUS)
    # rewards (1, 0): advantages (+1, -1) up to the 1e-4 in the denominator
    group = sample_group(policy, 0, torch.tensor([1.0, 0.0]), record_means=ratio_norm == "grpo_guard")
    steps = [t for t, s in enumerate(group.sampler.stochastic) if s]
    before = _trained_log_probs(policy, group)
    torch.testing.assert_close(before, group.log_probs[:, steps], rtol=0, atol=0)  # on-policy: the recorded ones
    learner = Learner(policy, LearnerConfig(kl_coef=0.0, learning_rate=1e-3, clip_range=0.2 if ratio_norm == "none" else 1.0,
                                            ratio_norm=ratio_norm))
    metrics = learner.train_step([group])
    assert metrics["adv_mean"] == pytest.approx(0.0, abs=1e-6) and metrics["adv_abs_max"] == pytest.approx(1.0, abs=1e-3)
    gain = (_trained_log_probs(policy, group) - before).sum(dim=1)  # summed over the trained steps
    assert gain[0] - gain[1] > 0, gain
