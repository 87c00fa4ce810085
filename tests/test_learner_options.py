"""Objective options of the learner on the tiny policy: on-policy ratios and KL for
every sampler and precision, the skipped reference forward, batched timesteps,
CFG gradients through both branches, and GRPO-Guard's ratio normalisation."""
import pytest
import torch
from conftest import CORPUS, perturb_lora, sample_group, tiny_policy_config

from editrl.learner.config import LearnerConfig
from editrl.learner.learner import ONPOLICY_RATIO_TOLERANCE, Learner
from editrl.policy.policy import EditPolicy
from editrl.protocol.rollout import Group


def _groups(policy: EditPolicy, record_means: bool = False) -> list[Group]:
    return [sample_group(policy, s, torch.tensor([0.0, 1.0, 3.0]), record_means) for s in range(2)]


@pytest.mark.parametrize("sampler", ["flow_sde_wan", "cps"])
def test_on_policy_ratio_is_exactly_one_and_kl_zero_then_positive(sampler):
    policy = EditPolicy.from_config(tiny_policy_config(sampler=sampler), CORPUS)
    groups = _groups(policy)
    learner = Learner(policy, LearnerConfig(kl_coef=0.1, learning_rate=1e-2))
    metrics = learner.train_step(groups)
    assert metrics["ratio_min"] == metrics["ratio_max"] == 1.0 and metrics["onpolicy_ratio_error"] == 0.0
    assert metrics["kl_ref"] == 0.0 and metrics["train_terms"] == 6.0
    metrics = learner.train_step(groups)  # stale data now: the adapter moved off the reference
    assert metrics["kl_ref"] > 0.0 and metrics["log_ratio_std"] > 0.0
    assert metrics["onpolicy_ratio_error"] != metrics["onpolicy_ratio_error"]  # NaN: no on-policy group left


def test_kl_coefficient_zero_skips_the_reference_forward():
    policy = EditPolicy.from_config(tiny_policy_config(), CORPUS)
    groups = _groups(policy)
    calls = []
    handle = policy.transformer.register_forward_hook(lambda *args: calls.append(1))
    try:
        for kl_coef, expected in [(0.0, 6), (0.1, 12)]:  # 2 groups x 3 trained steps, + 6 reference forwards
            calls.clear()
            Learner(policy, LearnerConfig(kl_coef=kl_coef)).accumulate_gradients(groups, torch.zeros(2, 3))
            assert len(calls) == expected
    finally:
        handle.remove()


@pytest.mark.parametrize("ratio_norm", ["none", "grpo_guard"])
def test_batched_timesteps_give_the_per_step_loss_and_gradients(ratio_norm):
    policy = EditPolicy.from_config(tiny_policy_config(), CORPUS)
    groups = _groups(policy, record_means=True)
    perturb_lora(policy)  # off-policy data and a non-zero KL, so every term has a gradient
    advantages = torch.tensor([[-1.0, 0.2, 0.8], [0.5, -1.5, 1.0]])
    results = []
    for k in (1, 2):  # 3 trained steps per group: chunks [0, 1] and [2] with k = 2
        learner = Learner(policy, LearnerConfig(kl_coef=0.05, clip_range=0.02, ratio_norm=ratio_norm, timesteps_per_forward=k))
        learner.optimizer.zero_grad(set_to_none=True)
        stats = learner.accumulate_gradients(groups, advantages)
        results.append((stats, [p.grad.clone() for p in learner.params]))
    (per_step, grads_1), (batched, grads_k) = results
    assert per_step.terms == batched.terms == 6
    for key in ("pg_loss", "kl_ref", "clip_frac", "approx_kl"):
        assert batched.sums[key] == pytest.approx(per_step.sums[key], rel=1e-4, abs=1e-8), key
    assert per_step.sums["kl_ref"] > 0 and any(g.abs().sum() > 0 for g in grads_1)
    for a, b in zip(grads_1, grads_k):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-8)


def test_cfg_training_forward_has_gradients_through_both_branches():
    policy = EditPolicy.from_config(tiny_policy_config(), CORPUS)
    perturb_lora(policy)
    params = policy.lora_parameters()
    torch.manual_seed(0)
    x, source, direction = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 4, 3, 8, 8), torch.randn(2, 4, 3, 8, 8)
    text, null = policy.encode_text(CORPUS[:2]), policy.encode_text(["", ""])

    def grads(loss):
        return torch.autograd.grad(loss, params)

    guided = grads((policy.velocity(x, 0.7, source, text, null, 3.0) * direction).sum())
    v_text = policy.velocity(x, 0.7, source, text, null, 1.0)
    v_null = policy.velocity(x, 0.7, source, null, null, 1.0)
    both = grads(((v_null + 3.0 * (v_text - v_null)) * direction).sum())
    for a, b in zip(guided, both):  # one batched forward vs two: equal up to fp32 rounding
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
    v_text = policy.velocity(x, 0.7, source, text, null, 1.0)
    v_null = policy.velocity(x, 0.7, source, null, null, 1.0).detach()
    text_only = grads(((v_null + 3.0 * (v_text - v_null)) * direction).sum())
    difference = sum((a - b).abs().sum() for a, b in zip(guided, text_only))
    assert difference > 1e-3 * sum(a.abs().sum() for a in guided)


def test_grpo_guard_trains_from_the_recorded_means_and_refuses_without_them():
    policy = EditPolicy.from_config(tiny_policy_config(), CORPUS)
    learner = Learner(policy, LearnerConfig(ratio_norm="grpo_guard", kl_coef=0.0, learning_rate=1e-2))
    groups = _groups(policy, record_means=True)
    metrics = learner.train_step(groups)
    assert metrics["ratio_min"] == metrics["ratio_max"] == 1.0 and metrics["clip_frac"] == 0.0
    metrics = learner.train_step(groups)
    assert metrics["ratio_min"] != 1.0 or metrics["ratio_max"] != 1.0
    with pytest.raises(ValueError, match="means"):
        learner.train_step(_groups(policy, record_means=False))


@pytest.mark.parametrize("timesteps_per_forward", [1, 3])
def test_bf16_weights_keep_fp32_norms_and_adapter_and_ratio_stays_within_tolerance(timesteps_per_forward):
    policy = EditPolicy.from_config(tiny_policy_config(dtype="bfloat16"), CORPUS)
    dtypes = {name: p.dtype for name, p in policy.transformer.named_parameters()}
    assert dtypes["blocks.0.ffn.net.0.proj.weight"] == torch.bfloat16
    assert dtypes["blocks.0.norm2.weight"] == dtypes["scale_shift_table"] == torch.float32
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)
    groups = _groups(policy)
    assert groups[0].latents.dtype == groups[0].log_probs.dtype == torch.float32
    config = LearnerConfig(kl_coef=0.1, timesteps_per_forward=timesteps_per_forward)
    metrics = Learner(policy, config).train_step(groups)
    assert metrics["onpolicy_ratio_error"] <= ONPOLICY_RATIO_TOLERANCE["bfloat16"]
    assert metrics["kl_ref"] == 0.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("timesteps_per_forward", [1, 3])
def test_on_policy_ratio_within_tolerance_on_cuda(dtype, timesteps_per_forward):
    policy = EditPolicy.from_config(tiny_policy_config(dtype=dtype), CORPUS, device="cuda")
    groups = _groups(policy)
    config = LearnerConfig(kl_coef=0.1, timesteps_per_forward=timesteps_per_forward)
    metrics = Learner(policy, config).train_step(groups)
    assert metrics["onpolicy_ratio_error"] <= ONPOLICY_RATIO_TOLERANCE[dtype]
    if timesteps_per_forward == 1:
        assert metrics["kl_ref"] == 0.0
