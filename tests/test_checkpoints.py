"""Real checkpoint layouts and the three policy kinds: a tiny model saved in the
Wan2.1 diffusers layout and loaded back, source conditioning that leaves the
unedited model unchanged at step 0, and the VACE context as diffusers builds it."""
import json
from pathlib import Path

import pytest
import torch
from conftest import CORPUS, structured_clip, tiny_policy_config
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanVACEPipeline

from editrl.policy.model import build_tiny_components, load_components, save_components
from editrl.policy.policy import EditPolicy


def _save_wan_layout(tmp_path, kind: str, seed: int = 1):
    """A tiny model saved as Wan2.1's diffusers checkpoints are: UniPC flow scheduler included."""
    config = tiny_policy_config()
    components = build_tiny_components(config.tiny, CORPUS, shift=config.shift, seed=seed, kind=kind)
    components.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    save_components(components, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_wan_layout_round_trip_with_its_unipc_scheduler(tmp_path):
    path = _save_wan_layout(tmp_path, "t2v")
    assert json.loads((path / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "UniPCMultistepScheduler"
    loaded = load_components(path, kind="t2v")
    # the flow shift of Wan's UniPC config gives the policy's flow-matching schedule
    assert isinstance(loaded.scheduler, FlowMatchEulerDiscreteScheduler) and loaded.scheduler.config.shift == 3.0
    loaded.scheduler.set_timesteps(4)
    expected = FlowMatchEulerDiscreteScheduler(shift=3.0)
    expected.set_timesteps(4)
    torch.testing.assert_close(loaded.scheduler.sigmas, expected.sigmas)
    policy = EditPolicy(loaded, tiny_policy_config(kind="t2v"))
    assert policy.num_lora_modules == 16


def test_concat_kind_widens_a_text_to_video_checkpoint_without_changing_it_at_step_0(tmp_path):
    path = _save_wan_layout(tmp_path, "t2v")
    t2v = EditPolicy.from_config(tiny_policy_config(kind="t2v", checkpoint=str(path)), CORPUS)
    concat = EditPolicy.from_config(tiny_policy_config(kind="concat", checkpoint=str(path)), CORPUS)
    assert concat.transformer.config.in_channels == 8 and t2v.transformer.config.in_channels == 4
    torch.manual_seed(0)
    x, source = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 4, 3, 8, 8)
    text, null = t2v.encode_text(CORPUS[:2]), t2v.encode_text(["", ""])
    with torch.no_grad():
        expected = t2v.velocity(x, 0.6, source, text, null, 2.0)
        torch.testing.assert_close(concat.velocity(x, 0.6, source, text, null, 2.0), expected)
        torch.testing.assert_close(concat.velocity(x, 0.6, -3 * source, text, null, 2.0), expected)


def test_a_checkpoint_of_the_wrong_kind_is_refused(tmp_path):
    path = _save_wan_layout(tmp_path, "vace")
    with pytest.raises(ValueError, match="WanTransformer3DModel"):
        load_components(path, kind="concat")
    components = build_tiny_components(tiny_policy_config().tiny, CORPUS, kind="concat")
    with pytest.raises(ValueError, match="in_channels"):
        EditPolicy(components, tiny_policy_config(kind="t2v"))


def test_vace_kind_round_trip_and_its_context_matches_the_diffusers_pipeline(tmp_path):
    path = _save_wan_layout(tmp_path, "vace")
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == "WanVACEPipeline"
    config = tiny_policy_config(kind="vace", checkpoint=str(path))
    policy = EditPolicy.from_config(config, CORPUS)
    # 2 blocks + 1 VACE block, x 2 attentions x 4 projections
    assert policy.num_lora_modules == 24

    frames = structured_clip(5, 32)
    source = policy.encode_video(frames[None])
    pipe = WanVACEPipeline(policy.tokenizer, policy.text_encoder, policy.vae, FlowMatchEulerDiscreteScheduler(shift=3.0), policy.transformer)
    video = torch.from_numpy(frames).float().div(127.5).sub(1.0).permute(3, 0, 1, 2)[None]
    with torch.no_grad():
        latents = pipe.prepare_video_latents(video, torch.ones_like(video), [[]])
        masks = pipe.prepare_masks(torch.ones_like(video), [[]])
    torch.testing.assert_close(policy.vace_context(source), torch.cat([latents, masks], dim=1), rtol=1e-5, atol=1e-5)

    # the source video conditions the output
    x = torch.randn_like(source)
    text, null = policy.encode_text([CORPUS[0]]), policy.encode_text([""])
    with torch.no_grad():
        v = policy.velocity(x, 0.5, source, text, null, 2.0)
        assert not torch.allclose(v, policy.velocity(x, 0.5, torch.zeros_like(source), text, null, 2.0))
    again = EditPolicy.from_config(config, CORPUS)
    with torch.no_grad():
        torch.testing.assert_close(again.velocity(x, 0.5, source, text, null, 2.0), v)


class _RunsCode:
    """Unpickling this calls a function of the attacker's choosing (here: one that leaves a mark)."""

    def __init__(self, mark: str):
        self.mark = mark

    def __reduce__(self):
        return (exec, (f"open({self.mark!r}, 'w').write('ran')",))


def _learner_after_one_update():
    from conftest import sample_group

    from editrl.learner.config import LearnerConfig
    from editrl.learner.learner import Learner

    policy = EditPolicy.from_config(tiny_policy_config(), CORPUS, seed=0)
    learner = Learner(policy, LearnerConfig(learning_rate=1e-2))
    learner.train_step([sample_group(policy, seed, torch.tensor([0.0, 1.0])) for seed in range(2)])
    return learner


def test_a_checkpoint_round_trips_through_a_weights_only_load(tmp_path):
    from editrl.learner.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    learner = _learner_after_one_update()
    save_checkpoint(tmp_path, 1, learner, {"cursor": 3})
    fresh = _fresh_learner()
    assert load_checkpoint(latest_checkpoint(tmp_path), fresh) == {"step": 1, "cursor": 3}
    assert fresh.policy_version == 1
    saved, loaded = learner.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for key, state in saved["state"].items():
        assert all(torch.equal(state[name], loaded["state"][key][name]) for name in state)


def _fresh_learner():
    from editrl.learner.config import LearnerConfig
    from editrl.learner.learner import Learner

    return Learner(EditPolicy.from_config(tiny_policy_config(), CORPUS, seed=0), LearnerConfig(learning_rate=1e-2))


def test_a_tampered_learner_state_is_refused_without_running_its_code(tmp_path):
    from editrl.learner.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint

    learner = _learner_after_one_update()
    path = save_checkpoint(tmp_path, 1, learner, {})
    mark = tmp_path / "code-ran"
    state = torch.load(path / "learner.pt", weights_only=True)
    state["optimizer"]["param_groups"][0]["lr"] = _RunsCode(str(mark))
    torch.save(state, path / "learner.pt")
    with pytest.raises(CheckpointError, match=f"refusing to load {path / 'learner.pt'}: .*Unsupported global"):
        load_checkpoint(latest_checkpoint(tmp_path), _fresh_learner())
    assert not mark.exists()


LOAD_PROBE = """
import json, sys, torch
from editrl.policy.model import load_components
def rss():
    return {k: int(v.split()[0]) * 1024 for k, v in (l.split(':', 1) for l in open('/proc/self/status')) if k in ('VmRSS', 'RssFile')}
def checkpoint_pages():
    # resident pages of mappings of the checkpoint's own files (not of libraries the load imports)
    total, mapped = 0, False
    for line in open('/proc/self/smaps'):
        fields = line.split()
        if len(fields) >= 6 and '-' in fields[0]:
            mapped = fields[5].startswith(sys.argv[1])
        elif mapped and fields[0] == 'Rss:':
            total += int(fields[1]) * 1024
    return total
before = rss()
parts = load_components(sys.argv[1], kind='concat', dtype=torch.bfloat16, encoders=False)
after = rss()
weights = sum(t.numel() * t.element_size() for t in [*parts.transformer.parameters(), *parts.transformer.buffers()])
print(json.dumps({'added': after['VmRSS'] - before['VmRSS'], 'file': checkpoint_pages(), 'weights': weights,
                  'dtypes': sorted({str(p.dtype) for p in parts.transformer.parameters()})}))
"""


def test_a_bf16_load_of_an_fp32_checkpoint_holds_the_bf16_weights_not_the_file(tmp_path):
    # a medium DiT (width 1024, FFN 4096, 4 blocks: 70 M parameters) stored in fp32 in 6 shards, as Wan's are
    import os
    import subprocess
    import sys

    from editrl.policy.config import TinyModelConfig

    tiny = TinyModelConfig(latent_channels=16, vae_base_dim=8, vae_dim_mult=[1, 2, 4, 4],
                           vae_temporal_downsample=[False, True, True], dit_heads=8, dit_head_dim=128, dit_layers=4,
                           dit_ffn_dim=4096, text_dim=64, text_layers=1)
    components = build_tiny_components(tiny, CORPUS, kind="concat")
    save_components(components, tmp_path / "ckpt")
    components.transformer.save_pretrained(tmp_path / "ckpt" / "transformer", max_shard_size="50MB")
    del components
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", LOAD_PROBE, str(tmp_path / "ckpt")], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(root), "MALLOC_MMAP_THRESHOLD_": "65536"}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded["dtypes"] == ["torch.bfloat16", "torch.float32"]  # fp32: the modules Wan keeps in fp32
    # measured: 1.07x the weights; without release_file_mappings the fp32 file stays mapped: 2.98x (2x of it file pages)
    assert loaded["added"] <= 1.2 * loaded["weights"], loaded
    assert loaded["file"] <= 0.1 * loaded["weights"], loaded


def test_a_bf16_load_reads_the_text_encoder_in_bf16(tmp_path):
    path = _save_wan_layout(tmp_path, "t2v")
    loaded = load_components(path, kind="t2v", dtype=torch.bfloat16)
    # transformers keeps UMT5's `wo` in fp32 only under fp16: under bf16 every weight is bf16
    assert {p.dtype for p in loaded.text_encoder.parameters()} == {torch.bfloat16}
    # the same embeddings as loading in fp32 and casting in the policy
    full = EditPolicy(load_components(path, kind="t2v"), tiny_policy_config(kind="t2v", dtype="bfloat16"))
    direct = EditPolicy(loaded, tiny_policy_config(kind="t2v", dtype="bfloat16"))
    assert {p.dtype for p in full.text_encoder.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(direct.encode_text([CORPUS[0]]), full.encode_text([CORPUS[0]]), rtol=0, atol=0)


def test_the_spatial_factor_of_a_patchifying_vae_counts_its_patch():
    """Wan2.2 TI2V-5B's VAE patchifies 2x2 before its downsamplings (``patch_size: 2``,
    ``scale_factor_spatial: 16`` in its config). Here a small one of that kind: 2 downsamplings
    x patch 2 = 8 pixels per latent cell, where ``2 ** len(temperal_downsample)`` says 4."""
    from diffusers import AutoencoderKLWan

    from editrl.policy.model import vae_spatial_factor

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=16, decoder_base_dim=16, z_dim=8, dim_mult=[1, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True], is_residual=True, patch_size=2, in_channels=12,
                           out_channels=12, scale_factor_spatial=8, scale_factor_temporal=2,
                           latents_mean=[0.0] * 8, latents_std=[1.0] * 8)
    with torch.no_grad():
        latent = vae.encode(torch.randn(1, 3, 5, 32, 48)).latent_dist.mode()
    factor = vae_spatial_factor(vae.config)
    assert latent.shape[-2:] == (32 // factor, 48 // factor) == (4, 6)
    # a Wan2.1 VAE config, which has no scale_factor_spatial, keeps the old rule: 2^3 = 8
    assert vae_spatial_factor({"temperal_downsample": [False, True, True]}) == 8
