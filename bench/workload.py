"""Workloads shared by the benchmarks: model sizes per profile, the default run's
configuration, and groups of trajectories sampled by the real policy code.

The default run (``configs/default.yaml``) starts from ``assets/warm_checkpoint``,
which is built by ``make warm-checkpoint`` and not part of the repository; the
benchmarks build the same architecture in code (``TinyModelConfig()`` defaults
are the sizes the warm checkpoint has) with random weights, which changes no
timing.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from editrl.cluster.config import TrainConfig, load_train_config
from editrl.policy.config import LoraSettings, PolicyConfig, TinyModelConfig
from editrl.policy.geometry import vae_scale_factors
from editrl.policy.policy import EditPolicy
from editrl.policy.sampling import sample_trajectories
from editrl.protocol.dataset import load_prompts
from editrl.protocol.rollout import Group, GroupTask

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "default.yaml"

SMOKE_MODEL = TinyModelConfig(latent_channels=4, vae_base_dim=8, dit_heads=2, dit_head_dim=8, dit_ffn_dim=32, text_dim=16, text_layers=1)
"""The tests' tiny model (``tests/conftest.py``): milliseconds per forward."""

WIDE_MODEL = TinyModelConfig(dit_heads=8, dit_head_dim=32, dit_layers=4, dit_ffn_dim=512)
"""4x the default width and 2x its depth: 16x the DiT's attention weights, so a
rank-8 adapter on it has exactly as many values as a rank-64 adapter on the default."""

MEDIUM_MODEL = TinyModelConfig(
    latent_channels=16, vae_base_dim=8, vae_dim_mult=[1, 2, 4, 4], vae_temporal_downsample=[False, True, True],
    dit_heads=12, dit_head_dim=128, dit_layers=8, dit_ffn_dim=8960, text_dim=4096, text_layers=2,
)
"""GPU profile: Wan2.1-1.3B's width (12 heads x 128, FFN 8960, UMT5 width 4096) at 8 of
its 30 layers, with Wan's VAE factors (8x spatial, 4x temporal, 16 channels), so a
240x416, 33-frame video has Flow-GRPO's (16, 9, 30, 52) latent."""


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[str, ...]:
    """Instructions of the bundled prompt tables (what the default run's tokenizer sees)."""
    rows = []
    for split in ("train", "heldout"):
        rows += load_prompts(PROJECT_ROOT / "assets" / "clips" / f"prompts_{split}.parquet")
    return tuple(row.instruction for row in rows)


def default_train_config(**overrides) -> TrainConfig:
    """``configs/default.yaml`` with the model built in code (see the module docstring) and
    dotted-key ``overrides`` (e.g. ``{"policy.lora.rank": 8}``)."""
    return load_train_config(DEFAULT_CONFIG, {"policy.checkpoint": None, **overrides})


def policy_config(profile: str, **overrides) -> PolicyConfig:
    """The policy of a profile: ``cpu`` the default run's, ``smoke`` the tests' tiny one,
    ``gpu`` the medium model at (16, 9, 30, 52) latents, bf16."""
    if profile == "cpu":
        base = default_train_config().policy.model_dump()
    elif profile == "smoke":
        base = dict(checkpoint=None, tiny=SMOKE_MODEL.model_dump(), height=32, width=32, num_frames=5, num_steps=4,
                    sde_fraction=0.75, max_text_tokens=8, lora=LoraSettings(rank=4, alpha=8).model_dump())
    elif profile == "gpu":
        base = dict(checkpoint=None, tiny=MEDIUM_MODEL.model_dump(), height=240, width=416, num_frames=33, num_steps=10,
                    max_text_tokens=512, dtype="bfloat16", lora=LoraSettings(rank=64, alpha=128).model_dump())
    else:
        raise ValueError(f"unknown profile {profile!r}")
    base.update(overrides)
    return PolicyConfig.model_validate(base)


def latent_shape(config: PolicyConfig) -> tuple[int, int, int, int]:
    """``(C, f, h, w)`` of a video of the configured size under the configured VAE
    (causal in time: ``f = 1 + (F - 1) / t``)."""
    tiny = config.tiny
    temporal = 2 ** sum(tiny.vae_temporal_downsample)
    spatial = 2 ** (len(tiny.vae_dim_mult) - 1)
    return tiny.latent_channels, 1 + (config.num_frames - 1) // temporal, config.height // spatial, config.width // spatial


def conditioning(policy: EditPolicy, index: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source latents ``(1, C, f, h, w)`` (standard normal: timings do not depend on the
    values, and the VAE is not what is measured), the embeddings of the bundled
    instruction number ``index`` and of the empty instruction, on the policy's device."""
    vae, c = policy.vae_config, policy.config  # the loaded model's factors (a checkpoint's too)
    spatial, temporal = vae_scale_factors(vae)
    shape = (1, vae["z_dim"], 1 + (c.num_frames - 1) // temporal, c.height // spatial, c.width // spatial)
    source = torch.randn(shape, generator=torch.Generator().manual_seed(seed + index)).to(policy.device)
    texts = corpus()
    return source, policy.encode_text([texts[index % len(texts)]]), policy.encode_text([""])


def sample_groups(policy: EditPolicy, num_groups: int, group_size: int, seed: int = 0) -> list[Group]:
    """Groups as rollout workers return them (CPU tensors), sampled with the policy's
    configured sampler; rewards are a fixed spread ``0, 1, ..., G - 1``."""
    groups = []
    for index in range(num_groups):
        source, text, null = conditioning(policy, index, seed)
        trajectories = sample_trajectories(
            policy, source, text, null, group_size, policy.sampler_spec(seed=seed + index), torch.Generator().manual_seed(seed + index),
        )
        task = GroupTask(f"bench-g{index}", f"p{index}", corpus()[index % len(corpus())], "unused.mp4", seed + index, group_size)
        groups.append(Group(
            task=task, policy_version=0, worker_id=0, latents=trajectories.latents, log_probs=trajectories.log_probs,
            sampler=trajectories.spec, source_latents=source.cpu(),
            text_embeds=text.cpu(), null_embeds=null.cpu(), rewards=torch.arange(group_size, dtype=torch.float32),
            reward_dimensions={}, reward_config_version="bench",
        ))
    return groups


def perturb_adapter(policy: EditPolicy, seed: int = 0, scale: float = 0.02) -> None:
    """Give every LoRA B matrix small random values, so that the adapter changes the
    output and every LoRA parameter gets a gradient (B = 0 at initialisation)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in policy.transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(scale * torch.randn(param.shape, generator=generator).to(param))


def count_parameters(module: torch.nn.Module, lora: bool | None = None) -> int:
    """Parameters of ``module``: all (None), only LoRA ones (True), only the others (False)."""
    return sum(p.numel() for n, p in module.named_parameters() if lora is None or (("lora_" in n) == lora))


def structured_frames(num_frames: int, height: int, width: int, seed: int = 0) -> "np.ndarray":
    """A smooth colourful pattern panning one pixel per frame, ``uint8 (F, height, width, 3)``:
    a source clip whose mp4 costs what a real one does to encode and decode."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0 : width + num_frames].astype(np.float32)
    phases = rng.uniform(0, 2 * np.pi, size=3)
    canvas = np.stack([0.5 + 0.4 * np.sin(xx / 5.0 + yy / 7.0 + p) for p in phases], axis=-1)
    frames = np.stack([canvas[:, t : t + width] for t in range(num_frames)])
    return (frames * 255).round().astype(np.uint8)
