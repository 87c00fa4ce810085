"""Shared fixtures: a tiny policy configuration that builds in milliseconds."""
import numpy as np
import pytest
import torch

from policy.config import LoraSettings, PolicyConfig, TinyModelConfig

CORPUS = ["make the video brighter", "make it darker", "turn it black and white", "give it a warm look"]


def tiny_policy_config(**overrides) -> PolicyConfig:
    """A 32x32, 5-frame, 4-step policy with a rank-4 adapter."""
    fields = dict(
        checkpoint=None,
        tiny=TinyModelConfig(latent_channels=4, vae_base_dim=8, dit_heads=2, dit_head_dim=8, dit_ffn_dim=32, text_dim=16, text_layers=1),
        height=32, width=32, num_frames=5, num_steps=4, sde_fraction=0.75, max_text_tokens=8,
        lora=LoraSettings(rank=4, alpha=8),
    )
    fields.update(overrides)
    return PolicyConfig(**fields)


@pytest.fixture
def tiny_config() -> PolicyConfig:
    return tiny_policy_config()


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def structured_clip(num_frames: int = 5, size: int = 32, seed: int = 0) -> np.ndarray:
    """A smooth colourful pattern panning one pixel per frame, ``uint8 (F, size, size, 3)``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0 : size + num_frames].astype(np.float32)
    phases = rng.uniform(0, 2 * np.pi, size=3)
    canvas = np.stack([0.5 + 0.4 * np.sin(xx / 5.0 + yy / 7.0 + p) for p in phases], axis=-1)
    frames = np.stack([canvas[:, t : t + size] for t in range(num_frames)])
    return (frames * 255).round().astype(np.uint8)
