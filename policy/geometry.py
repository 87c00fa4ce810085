"""Video geometry a latent video model can take: the VAE's scale factors and the rules on
height, width and frame count. Plain Python (no torch), so configs are checked before any
heavy import.

A Wan-style causal VAE maps ``F = 1 + k * temporal`` frames of ``H x W`` pixels to
``1 + k`` latent frames of ``H / spatial x W / spatial`` cells, and the DiT cuts the latent
into patches of ``(pt, ph, pw)`` cells, so ``H`` must be a multiple of ``spatial * ph``,
``W`` of ``spatial * pw`` and ``(F - 1)`` of ``temporal * pt``.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

WAN_TEXT_TOKENS = 512
"""Instruction tokens Wan's pipelines encode (diffusers ``WanPipeline(max_sequence_length=512)``)."""
TINY_TEXT_TOKENS = 32
"""Instruction tokens of the tiny model built in code (its word tokenizer's instructions are short)."""
LENGTH_LIMIT = 8192
"""A tokenizer's ``model_max_length`` above this is the "no limit" placeholder (1e30), not a length."""


def checkpoint_text_tokens(checkpoint_dir: str | Path | None) -> int:
    """The instruction length (tokens, padded and truncated to) a checkpoint is used with.

    The tiny model built in code (``checkpoint_dir`` None): :data:`TINY_TEXT_TOKENS`. A
    checkpoint: its ``tokenizer/tokenizer_config.json``'s ``model_max_length`` when that is a
    real limit (at most :data:`LENGTH_LIMIT`), else :data:`WAN_TEXT_TOKENS` - Wan2.1 / 2.2's
    UMT5 tokenizer stores the placeholder, and their pipelines use 512. A checkpoint that is
    not on disk (a published name being planned) gets :data:`WAN_TEXT_TOKENS` too.

    Returns:
        A positive int.
    """
    if checkpoint_dir is None:
        return TINY_TEXT_TOKENS
    try:
        length = json.loads((Path(checkpoint_dir) / "tokenizer" / "tokenizer_config.json").read_text()).get("model_max_length")
    except (OSError, ValueError):
        return WAN_TEXT_TOKENS
    if isinstance(length, (int, float)) and not isinstance(length, bool) and 1 <= length <= LENGTH_LIMIT:
        return int(length)
    return WAN_TEXT_TOKENS


def vae_scale_factors(vae_config: Mapping[str, Any]) -> tuple[int, int]:
    """Pixels per latent cell along height/width (``spatial``) and frames per latent frame
    after the first (``temporal``) of a diffusers Wan VAE, from its ``config.json``.

    ``scale_factor_spatial`` / ``scale_factor_temporal`` are used when the config has them
    (Wan2.2 TI2V-5B's VAE: ``z_dim`` 48, ``scale_factor_spatial`` 16 with ``patch_size`` 2 -
    its ``temperal_downsample`` alone would give 8). Otherwise, as diffusers' Wan pipelines
    compute them: ``spatial = 2 ** len(temperal_downsample)`` and
    ``temporal = 2 ** sum(temperal_downsample)`` (Wan2.1, ``[False, True, True]``: 8 and 4).

    Args:
        vae_config: the VAE's config mapping.

    Returns:
        ``(spatial, temporal)``, positive ints.

    Raises:
        ValueError: neither the scale factors nor ``temperal_downsample`` are there, or a
            factor is not a positive integer (the message names the key).
    """
    downsample = vae_config.get("temperal_downsample")
    factors: dict[str, int] = {}
    for name, key in (("spatial", "scale_factor_spatial"), ("temporal", "scale_factor_temporal")):
        value = vae_config.get(key)
        if value is None:
            if downsample is None:
                raise ValueError(f"VAE config has neither {key!r} nor 'temperal_downsample' (keys: {sorted(vae_config)})")
            try:
                flags = [bool(d) for d in downsample]
            except TypeError:
                raise ValueError(f"VAE config 'temperal_downsample' is not a list: {downsample!r}") from None
            value = 2 ** len(flags) if name == "spatial" else 2 ** sum(flags)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"VAE config {key!r} must be a positive integer, got {value!r}")
        factors[name] = value
    return factors["spatial"], factors["temporal"]


def _nearest(value: int, step: int, offset: int = 0) -> str:
    """The valid values ``offset + k * step`` (positive ones) on both sides of ``value``, e.g. ``56 or 64``."""
    below = offset + ((value - offset) // step) * step
    return " or ".join(str(v) for v in (below, below + step) if v > 0)


def check_geometry(height: int, width: int, num_frames: int, spatial: int, temporal: int,
                   patch_hw: int | Sequence[int], *, temporal_patch: int = 1, source: str = "the model",
                   field_prefix: str = "") -> None:
    """Refuse a clip size the model cannot take.

    Rules (see the module docstring): ``height % (spatial * ph) == 0``,
    ``width % (spatial * pw) == 0`` and ``(num_frames - 1) % (temporal * temporal_patch) == 0``.
    Wan2.1 (spatial 8, temporal 4, patch 2): multiples of 16 pixels and ``4k+1`` frames.

    Args:
        height, width: frame size in pixels.
        num_frames: frames per clip.
        spatial, temporal: the VAE's factors (:func:`vae_scale_factors`).
        patch_hw: the DiT's patch size in latent cells, one int for both or ``(ph, pw)``.
        temporal_patch: the DiT's patch size along latent frames.
        source: what the factors come from, for the message (e.g. ``checkpoint wan``).
        field_prefix: put before the field names in the message (e.g. ``policy.``).

    Raises:
        ValueError: the first rule broken, as one line naming the field and value, the rule,
            its factors and the nearest valid values, e.g. ``height=60: must be a multiple of
            16 (VAE factor 8 x patch 2 of checkpoint wan); nearest 48 or 64``.
    """
    ph, pw = (patch_hw, patch_hw) if isinstance(patch_hw, int) else (int(patch_hw[0]), int(patch_hw[1]))
    if num_frames < 1:
        raise ValueError(f"{field_prefix}num_frames={num_frames}: must be at least 1")
    for name, value, patch in (("height", height, ph), ("width", width, pw)):
        step = spatial * patch
        if value < 1 or value % step:
            raise ValueError(f"{field_prefix}{name}={value}: must be a multiple of {step} (VAE factor {spatial} x patch "
                             f"{patch} of {source}); nearest {_nearest(value, step)}")
    step = temporal * temporal_patch
    if (num_frames - 1) % step:
        factors = f"VAE temporal factor {temporal}" + (f" x patch {temporal_patch}" if temporal_patch > 1 else "")
        raise ValueError(f"{field_prefix}num_frames={num_frames}: must be {step}k+1 ({factors}) for {source}; "
                         f"nearest {_nearest(num_frames, step, offset=1)}")


def two_expert_boundary(path: str | Path) -> float | None:
    """``boundary_ratio`` of a two-expert checkpoint (Wan2.2 A14B: ``transformer_2/`` and the
    ratio in ``model_index.json``), or None for a single-expert one.

    Raises:
        ValueError: ``transformer_2/`` without a ``boundary_ratio`` in (0, 1), or the reverse.
    """
    path = Path(path)
    index_file = path / "model_index.json"
    ratio = json.loads(index_file.read_text()).get("boundary_ratio") if index_file.is_file() else None
    has_second = (path / "transformer_2").is_dir()
    if not has_second and ratio is None:
        return None
    if not has_second or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise ValueError(f"checkpoint {path}: a two-expert model needs transformer_2/ and a boundary_ratio in (0, 1) in "
                         f"model_index.json; found transformer_2/: {has_second}, boundary_ratio: {ratio!r}")
    return float(ratio)
