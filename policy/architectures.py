"""The published architectures of the Wan checkpoints editrl trains, as their diffusers
``config.json`` files give them, so that a run can be sized (``editrl plan``) on a
machine that does not hold the weights.

A checkpoint directory that exists is always read from disk; these are used only when
``policy.checkpoint`` names a directory that is not there and its last path component
is one of :data:`PUBLISHED` (case-insensitive), e.g. ``/data/models/Wan2.1-T2V-14B-Diffusers``.
"""
from __future__ import annotations

from typing import Any

WAN21_VAE: dict[str, Any] = {
    "_class_name": "AutoencoderKLWan", "base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
    "attn_scales": [], "temperal_downsample": [False, True, True], "dropout": 0.0,
}
"""Wan2.1's causal video VAE (``vae/config.json`` of every Wan2.1 checkpoint): 8x spatial, 4x temporal."""

UMT5_XXL: dict[str, Any] = {
    "_class_name": "UMT5EncoderModel", "vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240,
    "num_layers": 24, "num_heads": 64, "relative_attention_num_buckets": 32, "feed_forward_proj": "gated-gelu",
}
"""The text encoder of every Wan2.1 checkpoint (umt5-xxl's encoder)."""

_WAN_COMMON: dict[str, Any] = {
    "patch_size": [1, 2, 2], "attention_head_dim": 128, "in_channels": 16, "out_channels": 16, "text_dim": 4096,
    "freq_dim": 256, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None,
    "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
}
_SIZES = {
    "1.3B": {"num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
    "14B": {"num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
}
_VACE_LAYERS = {"1.3B": list(range(0, 30, 2)), "14B": list(range(0, 40, 5))}

PUBLISHED: dict[str, dict[str, dict[str, Any]]] = {
    **{f"wan2.1-t2v-{size.lower()}-diffusers": {
        "transformer": {"_class_name": "WanTransformer3DModel", **_WAN_COMMON, **dims},
        "vae": WAN21_VAE, "text_encoder": UMT5_XXL} for size, dims in _SIZES.items()},
    **{f"wan2.1-vace-{size.lower()}-diffusers": {
        "transformer": {"_class_name": "WanVACETransformer3DModel", **_WAN_COMMON, **dims,
                        "vace_layers": _VACE_LAYERS[size], "vace_in_channels": 96},
        "vae": WAN21_VAE, "text_encoder": UMT5_XXL} for size, dims in _SIZES.items()},
    "wan2.2-t2v-a14b-diffusers": {
        "transformer": {"_class_name": "WanTransformer3DModel", **_WAN_COMMON, **_SIZES["14B"]},
        "vae": WAN21_VAE, "text_encoder": UMT5_XXL, "model_index": {"boundary_ratio": 0.875}},
}
"""Directory name (lower case) -> the ``config.json`` of its ``transformer/``, ``vae/`` and
``text_encoder/`` folders. VACE: 15 VACE blocks every second layer (1.3B) or 8 every
fifth (14B), context channels ``2 x 16 + 8^2 = 96``. Wan2.2 T2V-A14B: two 14B experts of the
same config (``transformer/``, ``transformer_2/``) with Wan2.1's VAE, switched at
``boundary_ratio`` 0.875 of ``model_index.json``."""


def published_architecture(checkpoint: str) -> dict[str, dict[str, Any]] | None:
    """The published configs of the checkpoint a path names (by its last component), or None."""
    name = checkpoint.rstrip("/").rsplit("/", 1)[-1].lower()
    return PUBLISHED.get(name)
