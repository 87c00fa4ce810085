"""The policy: LoRA-only gradients, on-policy ratio of exactly 1, adapter sync,
checkpoint round trip and source-conditioning widening."""
import numpy as np
import pytest
import torch
from conftest import CORPUS, sample_group, structured_clip

from editrl.learner.config import LearnerConfig
from editrl.learner.learner import Learner
from editrl.policy.adapter import AdapterMismatchError, PackedAdapter, adapter_checksum
from editrl.policy.model import build_tiny_components, load_components, save_components, widen_for_source_conditioning
from editrl.policy.policy import EditPolicy
from editrl.policy.sampling import policy_step
from editrl.protocol.rollout import Group


def _sample_group(policy: EditPolicy, seed: int, rewards: torch.Tensor) -> Group:
    return sample_group(policy, seed, rewards, instruction=CORPUS[0])


def test_lora_attaches_to_self_and_cross_attention(tiny_config):
    policy = EditPolicy.from_config(tiny_config, CORPUS)
    names = [n for n, _ in policy.transformer.named_modules() if n.endswith("lora_A")]
    # 2 blocks x 2 attentions (attn1 self, attn2 cross) x 4 projections
    assert policy.num_lora_modules == len(names) == 16
    assert any(".attn1.to_q" in n for n in names) and any(".attn2.to_out.0" in n for n in names)


def test_sampling_records_fp32_latents_and_log_probs_on_sde_steps(tiny_config):
    policy = EditPolicy.from_config(tiny_config, CORPUS)
    group = _sample_group(policy, 0, torch.tensor([1.0, 2.0, 3.0]))
    t = tiny_config.num_steps
    assert group.latents.shape[:2] == (3, t + 1) and group.latents.dtype == torch.float32
    assert group.sde_mask.tolist() == [True, True, True, False]
    assert torch.isfinite(group.log_probs[:, :3]).all() and torch.isnan(group.log_probs[:, 3]).all()
    # the sampled edit is a function of the group's seed
    again = _sample_group(policy, 0, torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(group.latents, again.latents)


def test_gradients_reach_lora_parameters_and_nothing_else(tiny_config):
    policy = EditPolicy.from_config(tiny_config, CORPUS)
    group = _sample_group(policy, 0, torch.tensor([0.0, 1.0]))
    lora_params = policy.lora_parameters()
    with torch.no_grad():  # make B non-zero so that gradients reach A as well
        for name, p in policy.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    out = policy_step(policy, group.sampler, 0, group.latents[:, 0], group.source_latents.expand(2, -1, -1, -1, -1),
                      group.text_embeds.expand(2, -1, -1), group.null_embeds.expand(2, -1, -1), x_next=group.latents[:, 1])
    out.log_prob.sum().backward()
    lora_ids = {id(p) for p in lora_params}
    for module in (policy.transformer, policy.vae, policy.text_encoder):
        for name, p in module.named_parameters():
            if id(p) in lora_ids:
                assert p.grad is not None and p.grad.abs().sum() > 0, name
            else:
                assert not p.requires_grad and p.grad is None, name


def test_ratio_is_exactly_one_on_policy_and_kl_zero_before_the_first_update(tiny_config):
    policy = EditPolicy.from_config(tiny_config, CORPUS)
    groups = [_sample_group(policy, s, torch.tensor([0.0, 1.0, 3.0])) for s in range(2)]
    learner = Learner(policy, LearnerConfig(updates_per_step=1, kl_coef=0.1, learning_rate=1e-2))
    before = {k: v.clone() for k, v in policy.adapter_state().items()}
    metrics = learner.train_step(groups)
    assert metrics["ratio_min"] == 1.0 and metrics["ratio_max"] == 1.0
    assert metrics["clip_frac"] == 0.0 and metrics["approx_kl"] == 0.0
    assert metrics["kl_ref"] == 0.0  # the adapter's B starts at zero: policy == reference
    assert metrics["policy_version"] == 1.0
    assert learner.last_reward_config_versions == ["test"]  # the reward config of the groups, logged with the step
    after = policy.adapter_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # after the update the same data is off-policy: ratios move and KL is positive
    metrics = learner.train_step(groups)
    assert metrics["ratio_max"] != 1.0 or metrics["ratio_min"] != 1.0
    assert metrics["kl_ref"] > 0.0


def test_adapter_sync_between_two_policies(tiny_config):
    learner_policy = EditPolicy.from_config(tiny_config, CORPUS, seed=0)
    worker_policy = EditPolicy.from_config(tiny_config, CORPUS, seed=0)
    with torch.no_grad():
        for name, p in learner_policy.transformer.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
    state = learner_policy.adapter_state()
    worker_policy.load_adapter_state(state, checksum=adapter_checksum(state))
    x = torch.randn(1, 4, 3, 8, 8)
    src = torch.randn(1, 4, 3, 8, 8)
    text = learner_policy.encode_text([CORPUS[1]])
    with torch.no_grad():
        a = learner_policy.velocity(x, 0.5, src, text, learner_policy.encode_text([""]), 2.0)
        b = worker_policy.velocity(x, 0.5, src, text, worker_policy.encode_text([""]), 2.0)
    assert torch.equal(a, b)
    with pytest.raises(AdapterMismatchError, match="checksum"):
        worker_policy.load_adapter_state(state, checksum="0" * 64)
    with pytest.raises(AdapterMismatchError, match="keys differ"):
        worker_policy.load_adapter_state(dict(list(state.items())[:-2]))


def test_packed_adapter_round_trip_and_every_mismatch_is_an_error(tiny_config):
    learner_policy = EditPolicy.from_config(tiny_config, CORPUS, seed=0)
    worker_policy = EditPolicy.from_config(tiny_config, CORPUS, seed=0)
    with torch.no_grad():
        for p in learner_policy.lora_parameters():
            p.normal_(0, 0.05)
    packed = learner_policy.pack_adapter()
    state = learner_policy.adapter_state()
    # one layout: the packed buffer is the dict's tensors one after the other, and both checksum alike
    assert packed.values.dtype == np.float32 and packed.values.shape == (sum(v.numel() for v in state.values()),)
    assert list(packed.keys) == list(state) and packed.shapes == tuple(tuple(v.shape) for v in state.values())
    assert np.array_equal(packed.values, torch.cat([v.flatten() for v in state.values()]).numpy())
    checksum = adapter_checksum(packed)
    assert checksum == adapter_checksum(state) and checksum.startswith("crc32:")
    # a read-only buffer (as Ray's object store hands it out) loads without a copy warning
    packed.values.flags.writeable = False
    worker_policy.load_adapter_state(packed, checksum=checksum)
    assert all(torch.equal(a, b) for a, b in zip(learner_policy.lora_parameters(), worker_policy.lora_parameters()))

    loaded = worker_policy.adapter_state()
    flipped = packed.values.copy()
    flipped[7] = np.nextafter(flipped[7], np.float32(1.0))  # one bit of one value
    with pytest.raises(AdapterMismatchError, match="checksum"):
        worker_policy.load_adapter_state(PackedAdapter(packed.keys, packed.shapes, flipped), checksum=checksum)
    with pytest.raises(AdapterMismatchError, match="keys differ"):
        worker_policy.load_adapter_state(PackedAdapter(packed.keys[:-1], packed.shapes[:-1], packed.values))
    shapes = ((int(np.prod(packed.shapes[0])),),) + packed.shapes[1:]
    with pytest.raises(AdapterMismatchError, match="shapes differ"):
        worker_policy.load_adapter_state(PackedAdapter(packed.keys, shapes, packed.values))
    with pytest.raises(AdapterMismatchError, match="values"):
        worker_policy.load_adapter_state(PackedAdapter(packed.keys, packed.shapes, packed.values[:-1]))
    bad_state = dict(state)
    first = next(iter(bad_state))
    bad_state[first] = bad_state[first].reshape(-1)
    with pytest.raises(AdapterMismatchError, match="shapes differ"):
        worker_policy.load_adapter_state(bad_state)
    # a rejected adapter leaves the loaded one intact
    assert all(torch.equal(loaded[k], v) for k, v in worker_policy.adapter_state().items())


def test_adapter_of_another_rank_or_model_is_rejected(tiny_config):
    policy = EditPolicy.from_config(tiny_config, CORPUS)
    other_rank = EditPolicy.from_config(tiny_config.model_copy(update={"lora": tiny_config.lora.model_copy(update={"rank": 2, "alpha": 4})}), CORPUS)
    with pytest.raises(AdapterMismatchError, match="shapes differ"):
        policy.load_adapter_state(other_rank.pack_adapter())
    cross_only = EditPolicy.from_config(tiny_config.model_copy(update={"lora": tiny_config.lora.model_copy(update={"attention": ["cross"]})}), CORPUS)
    with pytest.raises(AdapterMismatchError, match="keys differ"):
        policy.load_adapter_state(cross_only.adapter_state())


def test_checkpoint_round_trip(tiny_config, tmp_path):
    components = build_tiny_components(tiny_config.tiny, CORPUS, seed=3)
    save_components(components, tmp_path / "ckpt")
    loaded = load_components(tmp_path / "ckpt")
    assert loaded.tokenizer(CORPUS[2]).input_ids == components.tokenizer(CORPUS[2]).input_ids
    x = torch.randn(1, 8, 3, 8, 8)
    text = torch.randn(1, 8, 16)
    with torch.no_grad():
        a = components.transformer(x, torch.tensor([500.0]), text, return_dict=False)[0]
        b = loaded.transformer(x, torch.tensor([500.0]), text, return_dict=False)[0]
    torch.testing.assert_close(a, b)
    loaded.scheduler.set_timesteps(4)
    components.scheduler.set_timesteps(4)
    torch.testing.assert_close(loaded.scheduler.sigmas, components.scheduler.sigmas)


def test_missing_checkpoint_folder_is_named(tmp_path):
    (tmp_path / "transformer").mkdir()
    with pytest.raises(FileNotFoundError, match="vae"):
        load_components(tmp_path)


def test_widening_a_text_to_video_transformer_keeps_its_output(tiny_config):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    t2v = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                text_dim=16, freq_dim=64, ffn_dim=32, num_layers=1, rope_max_seq_len=64)
    x, text = torch.randn(1, 4, 2, 8, 8), torch.randn(1, 6, 16)
    with torch.no_grad():
        before = t2v(x, torch.tensor([300.0]), text, return_dict=False)[0]
        widened = widen_for_source_conditioning(t2v, 4)
        assert widened.config.in_channels == 8
        after = widened(torch.cat([x, torch.randn_like(x)], dim=1), torch.tensor([300.0]), text, return_dict=False)[0]
    torch.testing.assert_close(before, after)


def test_decode_returns_uint8_frames(tiny_config):
    policy = EditPolicy.from_config(tiny_config, CORPUS)
    latents = policy.encode_video(structured_clip(5, 32)[None])
    frames = policy.decode(latents)
    assert frames.dtype == np.uint8 and frames.shape == (1, 5, 32, 32, 3)


def test_lora_on_cross_attention_only():
    from conftest import tiny_policy_config

    from editrl.policy.config import LoraSettings

    policy = EditPolicy.from_config(tiny_policy_config(lora=LoraSettings(rank=4, alpha=8, attention=["cross"])), CORPUS)
    names = [n for n, _ in policy.transformer.named_modules() if n.endswith("lora_A")]
    # 2 blocks x 1 attention (attn2) x 4 projections
    assert policy.num_lora_modules == len(names) == 8
    assert all(".attn2." in n for n in names)
