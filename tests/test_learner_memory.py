"""The learner's memory bounds change how a gradient is computed, never what it is:
micro-batches of a group's samples and per-block activation checkpointing give the
plain full-batch gradient, keep on-policy ratios at 1, and checkpointing keeps far
fewer activations for the backward."""
import pytest
import torch
from conftest import CORPUS, perturb_lora, sample_group, tiny_policy_config

from editrl.learner.config import LearnerConfig
from editrl.learner.learner import ONPOLICY_RATIO_TOLERANCE, Learner
from editrl.learner.loss import ObjectiveStats
from editrl.policy.config import TinyModelConfig
from editrl.policy.policy import EditPolicy

ADVANTAGES = torch.tensor([[-1.5, -0.5, 0.5, 1.5], [1.0, -1.0, 0.25, -0.25]])
"""Fixed advantages of 2 groups x 4 samples: every sample's term carries a gradient."""


def _policy(**overrides) -> EditPolicy:
    return EditPolicy.from_config(tiny_policy_config(**overrides), CORPUS)


def _gradients(policy, groups, **learner_fields) -> tuple[dict[str, float], list[torch.Tensor]]:
    learner = Learner(policy, LearnerConfig(kl_coef=0.1, **learner_fields))
    learner.optimizer.zero_grad(set_to_none=True)
    stats = learner.accumulate_gradients(groups, ADVANTAGES)
    grads = [p.grad.detach().clone() for p in learner.params]
    learner.optimizer.zero_grad(set_to_none=True)
    return dict(stats.sums), grads


@pytest.mark.parametrize("fields", [
    {"micro_batch_samples": 1},                                   # one sample's CFG pair per backward
    {"micro_batch_samples": 3},                                   # 3 + 1: an uneven split
    {"activation_checkpointing": "on"},
    {"activation_checkpointing": "on", "micro_batch_samples": 2},
    {"micro_batch_samples": 2, "timesteps_per_forward": 3},       # both ways of cutting the batch at once
], ids=lambda fields: ",".join(f"{k}={v}" for k, v in fields.items()))
def test_micro_batches_and_checkpointing_give_the_full_batch_gradient(fields):
    policy = _policy()
    groups = [sample_group(policy, seed, torch.tensor([0.0, 1.0, 2.0, 4.0])) for seed in range(2)]
    perturb_lora(policy)  # off-policy: ratios off 1, a non-zero KL, every LoRA entry has a gradient
    plain_sums, plain = _gradients(policy, groups, activation_checkpointing="off")
    sums, grads = _gradients(policy, groups, **fields)
    scale = max(float(g.abs().max()) for g in plain)
    assert scale > 0
    # fp32: the micro-batches add the same terms in another order
    assert max(float((a - b).abs().max()) for a, b in zip(grads, plain)) <= 1e-5 * scale
    # the statistics are sums of per-step means; pg_loss is a mean of -A rho over advantages of
    # either sign (terms of size ~1 that cancel), so its rounding is absolute, ~1e-7 per term
    for key in ("loss", "pg_loss", "kl_ref", "ratio_mean", "clip_frac", "approx_kl"):
        assert sums[key] == pytest.approx(plain_sums[key], rel=1e-5, abs=1e-6), key


def test_pooled_statistics_are_the_whole_steps_statistics():
    # 3 samples in parts of 2 and 1: means weighted 2/3 and 1/3, extremes over both parts
    a = ObjectiveStats(loss=3.0, pg_loss=1.0, kl_ref=0.5, ratio_mean=1.1, ratio_min=1.0, ratio_max=1.2, clip_frac=0.5,
                       approx_kl=0.02, log_ratio=torch.tensor([0.0, 0.2]))
    b = ObjectiveStats(loss=0.0, pg_loss=-2.0, kl_ref=2.0, ratio_mean=0.8, ratio_min=0.8, ratio_max=0.8, clip_frac=1.0,
                       approx_kl=0.05, log_ratio=torch.tensor([-0.2]))
    pooled = ObjectiveStats.pooled([a, b])
    assert pooled.loss == pytest.approx((2 * 3.0 + 0.0) / 3)        # 2.0
    assert pooled.pg_loss == pytest.approx((2 * 1.0 - 2.0) / 3)     # 0.0
    assert pooled.kl_ref == pytest.approx((2 * 0.5 + 2.0) / 3)      # 1.0
    assert pooled.ratio_mean == pytest.approx((2 * 1.1 + 0.8) / 3)  # 1.0
    assert pooled.clip_frac == pytest.approx((2 * 0.5 + 1.0) / 3)   # 2/3
    assert (pooled.ratio_min, pooled.ratio_max) == (0.8, 1.2)
    assert torch.equal(pooled.log_ratio, torch.tensor([0.0, 0.2, -0.2]))
    with pytest.raises(ValueError):
        ObjectiveStats.pooled([])


def test_on_policy_ratio_stays_one_with_one_sample_per_micro_batch():
    policy = _policy()
    groups = [sample_group(policy, seed, torch.tensor([0.0, 1.0, 3.0])) for seed in range(2)]
    metrics = Learner(policy, LearnerConfig(micro_batch_samples=1, activation_checkpointing="on")).train_step(groups)
    # sampling ran the 3 samples in one batch, the learner one at a time: equal up to the
    # kernels' rounding for another batch size
    assert metrics["onpolicy_ratio_error"] <= ONPOLICY_RATIO_TOLERANCE["float32"]
    assert metrics["train_terms"] == 6.0


def _saved_bytes(policy, groups, **fields) -> int:
    """Bytes of the tensors autograd keeps for the backward during one accumulation (all
    forwards of it, so both settings are compared over the same forwards)."""
    learner = Learner(policy, LearnerConfig(kl_coef=0.0, **fields))
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        learner.accumulate_gradients(groups, ADVANTAGES[:1, :2])
    return total


def test_checkpointing_keeps_at_least_three_times_fewer_activations_for_the_backward():
    tiny = TinyModelConfig(latent_channels=4, vae_base_dim=8, dit_heads=2, dit_head_dim=16, dit_ffn_dim=64, text_dim=16,
                           text_layers=1, dit_layers=4)
    policy = _policy(tiny=tiny, height=64, width=64)
    groups = [sample_group(policy, 0, torch.tensor([0.0, 1.0]))]
    kept = _saved_bytes(policy, groups, activation_checkpointing="off")
    checkpointed = _saved_bytes(policy, groups, activation_checkpointing="on")
    # a block keeps only its inputs; the 4 blocks' attention and FFN activations are recomputed
    assert kept >= 3 * checkpointed, (kept, checkpointed)


def test_auto_checkpointing_follows_the_token_threshold():
    policy = _policy()
    groups = [sample_group(policy, 0, torch.tensor([0.0, 1.0]))]
    tokens = policy.tokens_per_sequence(groups[0].latents.shape[-3:])
    assert tokens == 3 * 4 * 4  # latents (3, 8, 8) over the patch (1, 2, 2)
    for threshold, expected in [(tokens + 1, False), (tokens, True)]:
        learner = Learner(policy, LearnerConfig(activation_checkpointing="auto", checkpointing_min_tokens=threshold))
        learner.accumulate_gradients(groups, ADVANTAGES[:1, :2])
        assert policy.transformer.gradient_checkpointing is expected


def _direction_gradient(policy, velocity) -> list[torch.Tensor]:
    """LoRA gradients of ``<velocity(), u>`` for a fixed random direction u."""
    v = velocity()
    u = torch.randn(v.shape, generator=torch.Generator().manual_seed(7))
    params = policy.lora_parameters()
    return list(torch.autograd.grad((v * u).sum(), params))


def test_without_the_null_branch_gradient_the_gradient_is_w_times_the_text_branchs():
    policy = _policy()
    perturb_lora(policy)
    generator = torch.Generator().manual_seed(3)
    x, source = torch.randn(2, 4, 3, 8, 8, generator=generator), torch.randn(2, 4, 3, 8, 8, generator=generator)
    text, null = policy.encode_text(CORPUS[:2]), policy.encode_text(["", ""])
    w = 4.5
    # each branch alone (guidance 1 runs only the embeddings it is given)
    a = _direction_gradient(policy, lambda: policy.velocity(x, 0.6, source, text, text, 1.0))
    b = _direction_gradient(policy, lambda: policy.velocity(x, 0.6, source, null, null, 1.0))
    full = _direction_gradient(policy, lambda: policy.velocity(x, 0.6, source, text, null, w))
    text_only = _direction_gradient(policy, lambda: policy.velocity(x, 0.6, source, text, null, w, null_grad=False))
    scale = max(float(g.abs().max()) for g in full)
    for g_a, g_b, g_full, g_text in zip(a, b, full, text_only):
        # fp32: batched and separate forwards round differently, by ~1e-7 of the largest entry
        torch.testing.assert_close(g_full, w * g_a - (w - 1) * g_b, rtol=1e-4, atol=1e-5 * scale)  # d(v_null + w (v_text - v_null))
        torch.testing.assert_close(g_text, w * g_a, rtol=1e-4, atol=1e-5 * scale)                 # v_null held constant
    assert max(float((f - t).abs().max()) for f, t in zip(full, text_only)) > 1e-4  # the two really differ
    with torch.no_grad():  # the guided velocity itself is the same
        torch.testing.assert_close(policy.velocity(x, 0.6, source, text, null, w, null_grad=False),
                                   policy.velocity(x, 0.6, source, text, null, w))


def test_without_the_null_branch_gradient_half_the_activations_are_kept():
    policy = _policy()
    groups = [sample_group(policy, 0, torch.tensor([0.0, 1.0]))]
    both = _saved_bytes(policy, groups, activation_checkpointing="off")
    text_only = _saved_bytes(policy, groups, activation_checkpointing="off", cfg_null_grad=False)
    assert text_only <= 0.6 * both, (both, text_only)  # 2G sequences kept -> G
