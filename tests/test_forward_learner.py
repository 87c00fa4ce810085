"""The forward-process algorithms in the learner: one update moves the flow-matching error of
the better sample down relative to the worse one, equal rewards give no gradient, and the
options of the other algorithms are refused."""
import pydantic
import pytest
import torch
import yaml
from conftest import CORPUS, sample_group, tiny_policy_config

from editrl.cluster.config import TrainConfig, load_train_config, save_config
from editrl.learner.config import LearnerConfig
from editrl.learner.forward_process import acting_steps
from editrl.learner.learner import Learner
from editrl.policy.policy import EditPolicy
from editrl.protocol.rollout import Group


@torch.no_grad()
def _fm_error(policy: EditPolicy, group: Group, draws: int = 4) -> torch.Tensor:
    """``(G,)`` flow-matching error of each sample's final latent, averaged over the steps the
    adapter acts on and ``draws`` fixed noises (the same every call)."""
    generator = torch.Generator().manual_seed(123)
    x0 = group.latent(group.sampler.num_steps)
    g = x0.shape[0]
    cond = [t.expand(g, *t.shape[1:]) for t in (group.source_latents, group.text_embeds, group.null_embeds)]
    errors = []
    for step in acting_steps(policy):
        sigma = group.sampler.sigmas[step]
        for _ in range(draws):
            noise = torch.randn(x0.shape, generator=generator)
            v = policy.velocity((1 - sigma) * x0 + sigma * noise, sigma, *cond, group.sampler.guidance_scale)
            errors.append(((v - (noise - x0)) ** 2).flatten(1).mean(dim=1))
    return torch.stack(errors).mean(dim=0)


@pytest.mark.parametrize("sampler", ["ode", "flow_sde"])
@pytest.mark.parametrize("algorithm", ["diffusion_nft", "awm"])
def test_one_update_lowers_the_flow_matching_error_of_the_better_sample_relative_to_the_worse(algorithm, sampler):
    policy = EditPolicy.from_config(tiny_policy_config(sampler=sampler), CORPUS)
    group = sample_group(policy, 0, torch.tensor([1.0, 0.0]))  # advantages (+1, -1)
    before = _fm_error(policy, group)
    learner = Learner(policy, LearnerConfig(algorithm=algorithm, kl_coef=0.0, learning_rate=1e-3))
    metrics = learner.train_step([group])
    assert metrics["policy_version"] == 1.0 and metrics["grad_norm"] > 0
    # every sample trained at all of the 4 steps the adapter acts on
    assert metrics["train_terms"] == 2 * 4
    gain = before - _fm_error(policy, group)  # how much each sample's error fell
    assert gain[0] - gain[1] > 0, gain


@pytest.mark.parametrize("algorithm", ["diffusion_nft", "awm"])
def test_a_group_with_equal_rewards_gives_no_gradient_and_is_counted(algorithm):
    policy = EditPolicy.from_config(tiny_policy_config(sampler="ode"), CORPUS)
    group = sample_group(policy, 1, torch.tensor([3.0, 3.0]))
    metrics = Learner(policy, LearnerConfig(algorithm=algorithm, kl_coef=0.0)).train_step([group])
    # AWM: A = 0 makes the loss 0; DiffusionNFT: r = 1/2 and v_old = v_theta give 2 (2r - 1)(...) = 0
    assert metrics["grad_norm"] == 0.0 and metrics["groups_zero_spread"] == 1.0


def test_several_minibatches_keep_the_velocity_before_the_first_step_as_the_old_policy():
    policy = EditPolicy.from_config(tiny_policy_config(sampler="ode"), CORPUS)
    groups = [sample_group(policy, seed, torch.tensor([1.0, 0.0])) for seed in (0, 1)]
    metrics = Learner(policy, LearnerConfig(algorithm="diffusion_nft", kl_coef=1e-4, updates_per_step=2,
                                            forward_steps=2)).train_step(groups)
    assert metrics["train_terms"] == 2 * 2 * 2 and metrics["kl_ref"] >= 0.0


def test_options_of_another_algorithm_are_refused_with_the_reason():
    with pytest.raises(pydantic.ValidationError, match="learner.clip_range belongs to edit_grpo, not to learner.algorithm=awm"):
        LearnerConfig(algorithm="awm", clip_range=0.1)
    with pytest.raises(pydantic.ValidationError, match="learner.nft_beta belongs to diffusion_nft"):
        LearnerConfig(algorithm="awm", nft_beta=0.5)
    with pytest.raises(pydantic.ValidationError, match="learner.forward_steps belongs to diffusion_nft and awm"):
        LearnerConfig(forward_steps=2)
    with pytest.raises(pydantic.ValidationError, match="algorithm"):
        LearnerConfig(algorithm="ppo")
    # a whole dump (every field set, the others' at their defaults) reads back
    config = LearnerConfig(algorithm="awm", awm_weighting="uniform")
    assert LearnerConfig.model_validate_json(config.model_dump_json()) == config


def test_kl_coefficient_defaults_follow_the_algorithm():
    assert [LearnerConfig(algorithm=a).kl_coef for a in ("edit_grpo", "diffusion_nft", "awm")] == [0.004, 1e-4, 1e-3]
    assert LearnerConfig(algorithm="awm", kl_coef=0.0).kl_coef == 0.0


def test_a_sampler_or_step_count_the_algorithm_cannot_use_is_refused():
    base = {"policy": {"checkpoint": None, "sampler": "ode"}}
    with pytest.raises(pydantic.ValidationError, match="edit_grpo trains the log-probs of stochastic steps"):
        TrainConfig.model_validate(base)
    assert TrainConfig.model_validate({**base, "learner": {"algorithm": "diffusion_nft"}}).learner.forward_process
    with pytest.raises(pydantic.ValidationError, match="forward_steps=9 exceeds the 3 denoising steps"):
        TrainConfig.model_validate({"policy": {"checkpoint": None, "sampler": "ode", "lora": {"active_steps": 3}},
                                    "learner": {"algorithm": "awm", "forward_steps": 9}})


def test_a_saved_forward_process_config_reads_back(tmp_path):
    preset = yaml.safe_load(open("configs/default.yaml"))  # the default run with DiffusionNFT in place of Edit-GRPO
    config = TrainConfig.model_validate({**preset, "learner": {"algorithm": "diffusion_nft", "nft_beta": 0.5}})
    save_config(config, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())["learner"]
    assert "clip_range" not in saved and "awm_weighting" not in saved and saved["nft_beta"] == 0.5
    assert load_train_config(tmp_path / "config.yaml").learner == config.learner


def test_the_plan_counts_the_final_latent_a_forward_process_group_carries():
    from editrl.cluster.plan import stored_positions

    preset = yaml.safe_load(open("configs/default.yaml"))  # window of 3 stochastic steps: positions 0..3
    assert stored_positions(TrainConfig.model_validate(preset)) == 4
    preset["learner"] = {"algorithm": "awm"}
    assert stored_positions(TrainConfig.model_validate(preset)) == 5  # and the edit's, at T = 10
    preset["policy"]["sampler"] = "ode"
    assert stored_positions(TrainConfig.model_validate(preset)) == 1
