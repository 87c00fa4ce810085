"""The model kinds a checkpoint can be: a text-to-video DiT used for editing (``concat``, the
source read through a LoRA on the widened patch embedding), a source-conditioned one that
loads as it is, and checkpoints editrl refuses before loading (a transformer class the kind cannot load, a widened model whose adapter would never see the
source). Each on a tiny model saved in the diffusers layout; two experts: test_two_experts.py."""
import json

import pytest
import torch
from conftest import CORPUS, tiny_policy_config

from editrl.cluster.checkpoint_kind import CheckpointKindError, checkpoint_widened
from editrl.policy.config import LoraSettings
from editrl.policy.model import build_tiny_components, load_components, save_components
from editrl.policy.policy import EditPolicy


def _save(tmp_path, kind: str, name: str = "ckpt"):
    config = tiny_policy_config()
    save_components(build_tiny_components(config.tiny, CORPUS, shift=config.shift, seed=1, kind=kind), tmp_path / name)
    return tmp_path / name


def _velocity(policy, x, source, text, null):
    return policy.velocity(x, 0.6, source, text, null, 2.0)


def test_concat_from_a_text_to_video_checkpoint_trains_its_source_channels(tmp_path):
    path = _save(tmp_path, "t2v")
    config = tiny_policy_config(kind="concat", checkpoint=str(path))
    assert checkpoint_widened(config, path) is True
    policy = EditPolicy.from_config(config, CORPUS)
    assert policy.adapts_patch_embedding
    # 2 blocks x (attn1 + attn2) x 4 projections, and the patch embedding
    assert policy.num_lora_modules == 17
    lora_b = policy.transformer.patch_embedding.lora_B["default"].weight
    assert lora_b.requires_grad and lora_b.dtype == torch.float32
    torch.manual_seed(0)
    x, source = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 4, 3, 8, 8)
    text, null = policy.encode_text(CORPUS[:1]), policy.encode_text([""])
    with torch.no_grad():  # B = 0: the widened model ignores the source at the start
        torch.testing.assert_close(_velocity(policy, x, source, text, null), _velocity(policy, x, -source, text, null))
    # one gradient step on a loss that wants the output to follow the source
    params = [p for p in policy.transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    loss = -(_velocity(policy, x, source, text, null) * source).mean()
    loss.backward()
    assert lora_b.grad is not None and lora_b.grad.abs().max() > 0
    optimizer.step()
    with torch.no_grad():
        moved = _velocity(policy, x, source, text, null) - _velocity(policy, x, -source, text, null)
    assert moved.abs().max() > 1e-4  # the output now depends on the source video


def test_the_patch_embedding_adapter_travels_with_the_rest(tmp_path):
    path = _save(tmp_path, "t2v")
    config = tiny_policy_config(kind="concat", checkpoint=str(path))
    learner, worker = EditPolicy.from_config(config, CORPUS, seed=0), EditPolicy.from_config(config, CORPUS, seed=3)
    with torch.no_grad():
        for p in learner.transformer.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    packed = learner.adapter.pack()
    assert any("patch_embedding" in key for key in packed.keys)
    worker.adapter.load(packed)
    torch.testing.assert_close(worker.transformer.patch_embedding.lora_B["default"].weight,
                               learner.transformer.patch_embedding.lora_B["default"].weight)


def test_a_widened_model_without_the_patch_embedding_adapter_is_refused(tmp_path):
    path = _save(tmp_path, "t2v")
    config = tiny_policy_config(kind="concat", checkpoint=str(path), lora=LoraSettings(rank=4, alpha=8, patch_embedding=False))
    with pytest.raises(CheckpointKindError, match="source video would be ignored"):
        checkpoint_widened(config, path)
    with pytest.raises(ValueError, match="policy.lora.patch_embedding=false"):
        EditPolicy.from_config(config, CORPUS)
    # asked for explicitly on a source-conditioned model, it is simply there
    conditioned = _save(tmp_path, "concat", "conditioned")
    on = tiny_policy_config(kind="concat", checkpoint=str(conditioned), lora=LoraSettings(rank=4, alpha=8, patch_embedding=True))
    assert EditPolicy.from_config(on, CORPUS).num_lora_modules == 17


def test_a_source_conditioned_checkpoint_loads_as_it_is(tmp_path):
    path = _save(tmp_path, "concat")
    config = tiny_policy_config(kind="concat", checkpoint=str(path))
    assert checkpoint_widened(config, path) is False
    components = load_components(path, kind="concat")
    assert components.widened is False and components.transformer.config.in_channels == 8
    saved = load_components(path, kind="concat").transformer.patch_embedding.weight
    policy = EditPolicy(components, config)
    assert not policy.adapts_patch_embedding and policy.num_lora_modules == 16
    torch.testing.assert_close(policy.transformer.patch_embedding.weight, saved)  # no zeroed or added channels


def test_a_transformer_class_or_width_the_kind_cannot_load_is_refused(tmp_path):
    vace = _save(tmp_path, "vace", "vace")
    with pytest.raises(CheckpointKindError, match="loads a WanTransformer3DModel, the checkpoint's transformer is a WanVACE"):
        checkpoint_widened(tiny_policy_config(kind="concat", checkpoint=str(vace)), vace)
    assert checkpoint_widened(tiny_policy_config(kind="vace", checkpoint=str(vace)), vace) is False
    conditioned = _save(tmp_path, "concat", "conditioned")
    with pytest.raises(CheckpointKindError, match="kind='t2v' needs transformer in_channels equal to the VAE's z_dim 4, "
                                                  "the checkpoint has 8"):
        checkpoint_widened(tiny_policy_config(kind="t2v", checkpoint=str(conditioned)), conditioned)


def test_max_text_tokens_follows_the_checkpoint(tmp_path):
    from editrl.policy.config import PolicyConfig

    path = _save(tmp_path, "concat")
    tokenizer_config = path / "tokenizer" / "tokenizer_config.json"
    saved = json.loads(tokenizer_config.read_text())
    # a tokenizer without a real limit stores 1e30 (UMT5's, Wan's): Wan's pipelines' 512
    tokenizer_config.write_text(json.dumps({**saved, "model_max_length": 1000000000000000019884624838656}))
    assert PolicyConfig(checkpoint=str(path)).max_text_tokens == 512
    tokenizer_config.write_text(json.dumps({**saved, "model_max_length": 77}))
    assert PolicyConfig(checkpoint=str(path)).max_text_tokens == 77
    assert PolicyConfig(checkpoint=str(path), max_text_tokens=16).max_text_tokens == 16  # an explicit value wins
    assert PolicyConfig(checkpoint=None).max_text_tokens == 32  # the tiny model built in code
    assert PolicyConfig(checkpoint="assets/warm_checkpoint").max_text_tokens == 32  # the bundled model's tokenizer says 32
    # the resolved number is what a saved config records
    assert PolicyConfig.model_validate(PolicyConfig(checkpoint=str(path)).model_dump()).max_text_tokens == 77


def test_a_wan22_ti2v_style_checkpoint_with_a_patchifying_vae_runs_at_its_geometry(tmp_path):
    """Wan2.2 TI2V-5B's layout in small: a VAE that patchifies 2x2 before its downsamplings
    (``scale_factor_spatial`` 8 here: 2 downsamplings x patch 2) and a text-to-video DiT of its
    latent width, saved and loaded as ``concat``."""
    from diffusers import AutoencoderKLWan

    from editrl.cluster.preflight import PreflightError, check_geometry, model_factors

    config = tiny_policy_config()
    components = build_tiny_components(config.tiny, CORPUS, shift=config.shift, seed=1, kind="t2v")
    torch.manual_seed(0)
    components.vae = AutoencoderKLWan(base_dim=16, decoder_base_dim=16, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                                      temperal_downsample=[False, True], is_residual=True, patch_size=2, in_channels=12,
                                      out_channels=12, scale_factor_spatial=8, scale_factor_temporal=2,
                                      latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    components.vae_config = components.vae.config
    save_components(components, tmp_path / "ti2v")
    policy_config = tiny_policy_config(kind="concat", checkpoint=str(tmp_path / "ti2v"), height=32, width=48)
    factors = model_factors(policy_config)
    assert (factors.spatial, factors.temporal) == (8, 2)  # 2 ** len(temperal_downsample) alone would say 4
    check_geometry(policy_config)
    with pytest.raises(PreflightError, match="policy.height=40: must be a multiple of 16 .VAE factor 8 x patch 2"):
        check_geometry(policy_config.model_copy(update={"height": 40}))
    policy = EditPolicy.from_config(policy_config, CORPUS)
    frames = (torch.rand(1, 5, 32, 48, 3) * 255).to(torch.uint8).numpy()
    latents = policy.encode_video(frames)
    assert tuple(latents.shape) == (1, 4, 3, 4, 6)  # f = 1 + 4 / 2, h = 32 / 8, w = 48 / 8
    text, null = policy.encode_text(CORPUS[:1]), policy.encode_text([""])
    with torch.no_grad():
        velocity = policy.velocity(torch.randn_like(latents), 0.7, latents, text, null, 2.0)
    assert velocity.shape == latents.shape and torch.isfinite(velocity).all()
    assert policy.decode(latents).shape == (1, 5, 32, 48, 3)
