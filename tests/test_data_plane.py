"""What a group carries to the learner: 16-bit latents with the on-policy ratio still exactly 1,
micro-batched sampling equal to the full batch, and the tensors apart from the metadata
(numpy buffers for the object store) with nothing lost on the way."""
import dataclasses

import numpy as np
import pytest
import torch
from conftest import CORPUS, perturb_lora, structured_clip, tiny_policy_config

from editrl.learner.config import LearnerConfig
from editrl.learner.learner import Learner
from editrl.policy.policy import EditPolicy
from editrl.policy.sampling import sample_trajectories
from editrl.protocol.rollout import Group, GroupTask, join_bulk, split_bulk, tensor_bytes, trained_positions


def _policy(**overrides) -> EditPolicy:
    torch.manual_seed(0)
    policy = EditPolicy.from_config(tiny_policy_config(**overrides), CORPUS, seed=0)
    perturb_lora(policy, seed=1)  # the adapter moves the policy: ratios would show any mismatch
    return policy


def _conditioning(policy: EditPolicy, instruction: str = CORPUS[0]):
    c = policy.config
    source = policy.encode_video(structured_clip(c.num_frames, c.height)[None])
    return source, policy.encode_text([instruction]), policy.encode_text([""])


def _group(policy: EditPolicy, seed: int, dtype: torch.dtype, rounded_before_log_prob: bool = True) -> Group:
    """A group stored as a rollout worker stores it: the trained positions in ``dtype``."""
    source, text, null = _conditioning(policy)
    traj = sample_trajectories(policy, source, text, null, 4, policy.sampler_spec(seed=seed), torch.Generator().manual_seed(seed),
                               trajectory_dtype=dtype if rounded_before_log_prob else torch.float32)
    positions = trained_positions(traj.spec.stochastic)
    task = GroupTask(f"g{seed}", "p0", CORPUS[0], "unused.mp4", seed, 4)
    return Group(task, 0, 0, traj.latents[:, list(positions)].to(dtype), traj.log_probs, traj.spec, source, text, null,
                 torch.tensor([0.0, 1.0, 3.0, 2.0]), {}, "test", latent_steps=positions)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_16bit_storage_keeps_the_onpolicy_ratio_exactly_one(dtype):
    policy = _policy()
    groups = [_group(policy, seed, dtype) for seed in range(2)]
    assert groups[0].latents.dtype == dtype
    # half the bytes of fp32 storage
    assert groups[0].latents.nbytes * 2 == groups[0].latents.float().nbytes
    metrics = Learner(policy, LearnerConfig(torch_threads=1), seed=0).train_step(groups)
    assert metrics["onpolicy_ratio_error"] == 0.0


def test_rounding_after_the_log_prob_would_break_the_ratio():
    # the control of the test above: the same 16-bit latents, but log-probs of the unrounded
    # samples (rounding as a cast after sampling) make the first, on-policy update's ratios differ
    # from 1 by more than the learner tolerates for fp32 weights (1e-4; measured 3.6e-4)
    policy = _policy()
    groups = [_group(policy, seed, torch.bfloat16, rounded_before_log_prob=False) for seed in range(2)]
    metrics = Learner(policy, LearnerConfig(torch_threads=1), seed=0).train_step(groups)
    assert metrics["onpolicy_ratio_error"] > 1e-4


def test_float32_storage_is_the_sampling_chain_bit_for_bit():
    policy = _policy()
    source, text, null = _conditioning(policy)
    spec = policy.sampler_spec(seed=3)
    default = sample_trajectories(policy, source, text, null, 2, spec, torch.Generator().manual_seed(3))
    explicit = sample_trajectories(policy, source, text, null, 2, spec, torch.Generator().manual_seed(3), trajectory_dtype=torch.float32)
    assert torch.equal(default.latents, explicit.latents) and torch.equal(default.log_probs.nan_to_num(), explicit.log_probs.nan_to_num())
    rounded = sample_trajectories(policy, source, text, null, 2, spec, torch.Generator().manual_seed(3), trajectory_dtype=torch.bfloat16)
    # every trained position holds a bf16 value; the chain differs from fp32 only by that rounding
    for t in trained_positions(rounded.spec.stochastic):
        assert torch.equal(rounded.latents[:, t], rounded.latents[:, t].bfloat16().float())
    assert 0 < (rounded.latents - default.latents).abs().max() < 0.05


@pytest.mark.parametrize("micro_batch", [1, 2, 4])
def test_micro_batched_sampling_gives_the_trajectories_and_log_probs_of_the_full_batch(micro_batch):
    policy = _policy()
    source, text, null = _conditioning(policy)
    spec = policy.sampler_spec(seed=7)
    forwards = []
    hook = policy.transformer.register_forward_hook(lambda module, args, out: forwards.append(args[0].shape[0]))
    try:
        full = sample_trajectories(policy, source, text, null, 4, spec, torch.Generator().manual_seed(7))
        rows_full, forwards[:] = list(forwards), []
        micro = sample_trajectories(policy, source, text, null, 4, spec, torch.Generator().manual_seed(7), micro_batch=micro_batch)
    finally:
        hook.remove()
    # 4 steps of 4 samples x 2 CFG branches: one forward of 8 rows per step, or 8 / m of m rows
    assert rows_full == [8] * 4 and forwards == [micro_batch] * (4 * 8 // micro_batch)
    torch.testing.assert_close(micro.latents, full.latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(micro.log_probs, full.log_probs, rtol=0, atol=1e-5, equal_nan=True)
    assert micro.spec == full.spec


def test_bulk_split_and_join_give_the_group_back_bit_for_bit():
    policy = _policy()
    group = _group(policy, 0, torch.bfloat16)
    group = dataclasses.replace(group, means=torch.randn(4, 1, *group.latents.shape[2:]), mean_steps=(1,))
    light, arrays = split_bulk(group)
    # the driver's copy holds no tensor but the rewards; the arrays are plain numpy buffers
    assert tensor_bytes(light) == 0 and light.latents is None and light.rewards is group.rewards
    assert all(isinstance(a, np.ndarray) for _, a in arrays.values())
    assert light.bulk_bytes == tensor_bytes(group) == sum(a.nbytes for _, a in arrays.values())
    for _, array in arrays.values():
        array.setflags(write=False)  # as the object store hands them out
    back = join_bulk(light, arrays)
    assert back.latents.dtype == torch.bfloat16
    assert light.log_probs is group.log_probs  # metadata: the rollout log records them
    for name in ("latents", "source_latents", "text_embeds", "null_embeds", "means"):
        assert torch.equal(getattr(back, name).nan_to_num(), getattr(group, name).nan_to_num()), name
    with pytest.raises(KeyError, match="g0 does not hold its tensors"):
        light.latent(1)


def test_vae_slices_decode_each_video_as_the_batch_does():
    from editrl.rollout_workers.engine import RolloutEngine

    policy = _policy()
    source, text, null = _conditioning(policy)
    latents = sample_trajectories(policy, source, text, null, 3, policy.sampler_spec(seed=2), torch.Generator().manual_seed(2)).latents[:, -1]
    batch = policy.decode(latents)
    RolloutEngine(vae_decode="slices").apply(policy)
    assert policy.vae.use_slicing and not policy.vae.use_tiling
    sliced = policy.decode(latents)
    # one video at a time: the same frames up to one level of rounding
    assert sliced.shape == batch.shape and np.abs(sliced.astype(int) - batch.astype(int)).max() <= 1
    RolloutEngine(vae_decode="tiles").apply(policy)
    assert policy.vae.use_tiling


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_offloaded_text_encoder_lives_in_host_memory_between_encodings():
    from editrl.rollout_workers.engine import RolloutEngine

    torch.manual_seed(0)
    resident = EditPolicy.from_config(tiny_policy_config(), CORPUS, seed=0, device="cuda")
    policy = EditPolicy.from_config(tiny_policy_config(), CORPUS, seed=0, device="cuda")
    engine = RolloutEngine(text_encoder="offload")
    engine.apply(policy)
    assert {p.device.type for p in policy.text_encoder.parameters()} == {"cpu"}
    with engine.text_encoder_on_device(policy):
        embeds = policy.encode_text([CORPUS[0]])
    assert {p.device.type for p in policy.text_encoder.parameters()} == {"cpu"} and embeds.device.type == "cuda"
    torch.testing.assert_close(embeds, resident.encode_text([CORPUS[0]]))


def test_auto_trajectory_dtype_is_float32_on_a_cpu_worker_and_explicit_ones_stay():
    from editrl.rollout_workers.engine import RolloutEngine

    assert RolloutEngine().resolved("cpu").trajectory_dtype == "float32"
    assert RolloutEngine(trajectory_dtype="float16").resolved("cpu").trajectory_dtype == "float16"
    with pytest.raises(KeyError):
        RolloutEngine().torch_trajectory_dtype  # auto must be resolved first
    with pytest.raises(ValueError, match="rollout.forward_micro_batch=0"):
        RolloutEngine(trajectory_dtype="float32", forward_micro_batch=0).check("cpu")


def test_a_worker_with_an_attention_backend_samples_what_the_default_does(tmp_path):
    # diffusers' "native" backend is PyTorch's SDPA, the default: the same trajectories, set through the engine
    from editrl.rollout_workers.engine import RolloutEngine

    policy, default = _policy(), _policy()
    RolloutEngine(attention_backend="native").apply(policy)
    source, text, null = _conditioning(policy)
    spec = policy.sampler_spec(seed=4)
    a = sample_trajectories(policy, source, text, null, 2, spec, torch.Generator().manual_seed(4))
    b = sample_trajectories(default, source, text, null, 2, spec, torch.Generator().manual_seed(4))
    assert torch.equal(a.latents, b.latents)
    with pytest.raises(ValueError):
        RolloutEngine(attention_backend="no-such-backend").apply(_policy())


def test_sampling_keeps_only_the_asked_positions_and_the_same_values():
    policy = _policy()
    source, text, null = _conditioning(policy)
    spec = policy.sampler_spec(seed=5)
    full = sample_trajectories(policy, source, text, null, 2, spec, torch.Generator().manual_seed(5))
    kept = sample_trajectories(policy, source, text, null, 2, spec, torch.Generator().manual_seed(5), keep=(1, 2, 4))
    assert kept.positions == (1, 2, 4) and kept.latents.shape[1] == 3
    assert all(torch.equal(kept.latent(p), full.latent(p)) for p in (1, 2, 4))
    with pytest.raises(ValueError):
        kept.latent(0)
