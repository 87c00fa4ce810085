"""Checkable colour edits: exact pixel transforms for the colour instructions.

Each checkable instruction in the bundled dataset (``checkable == True``) has an
``edit_type`` from :data:`CHECKABLE_EDIT_TYPES`. :func:`apply_edit` turns a
source clip into the edited clip that such an instruction asks for, which is
used to synthesise supervised warm-up targets and to check edits by pixels.

Conventions: frames are ``float32`` arrays ``(F, H, W, 3)``, RGB, with values in
``[0, 1]`` (linear in the stored 8-bit code values; no gamma handling). Luma is
``Y = 0.299 R + 0.587 G + 0.114 B`` (ITU-R BT.601 weights). ``strength`` ``s``
is a dimensionless number in ``[0, 1]``; ``s = 0`` is always the identity.
"""
from __future__ import annotations

import math

import numpy as np

CHECKABLE_EDIT_TYPES: tuple[str, ...] = ("brighten", "darken", "grayscale", "saturate", "warm", "cool")

LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)
"""BT.601 luma weights for (R, G, B)."""

WARM_SHIFT = np.array([0.12, 0.03, -0.12], dtype=np.float32)
"""Per-channel offset added by ``warm`` at strength 1 (fraction of full scale)."""

COOL_SHIFT = np.array([-0.12, 0.0, 0.12], dtype=np.float32)
"""Per-channel offset added by ``cool`` at strength 1 (fraction of full scale)."""


def luma(frames: np.ndarray) -> np.ndarray:
    """BT.601 luma of RGB frames.

    Args:
        frames: ``float32`` array ``(..., 3)``, RGB in ``[0, 1]``.

    Returns:
        ``float32`` array ``(..., 1)``: ``0.299 R + 0.587 G + 0.114 B``, kept
        with a trailing axis so that it broadcasts against the 3 channels.
    """
    return np.asarray(frames, dtype=np.float32) @ LUMA_WEIGHTS[:, None]


def apply_edit(frames: np.ndarray, edit_type: str, strength: float) -> np.ndarray:
    """Apply one checkable colour edit to a clip.

    Definitions (``x`` the frames, ``s`` the strength, ``Y`` the luma broadcast
    to the 3 channels):

    - ``brighten``: ``clip(x + 0.2 s, 0, 1)``
    - ``darken``: ``x (1 - 0.5 s)``
    - ``grayscale``: ``(1 - s) x + s Y``
    - ``saturate``: ``clip(Y + (1 + s)(x - Y), 0, 1)``
    - ``warm``: ``clip(x + s [0.12, 0.03, -0.12], 0, 1)``
    - ``cool``: ``clip(x + s [-0.12, 0.0, 0.12], 0, 1)``

    ``darken`` and ``grayscale`` need no clipping: they map ``[0, 1]`` into
    itself.

    Args:
        frames: ``float32`` array ``(F, H, W, 3)`` (any leading shape works),
            RGB in ``[0, 1]``. Not modified.
        edit_type: one of :data:`CHECKABLE_EDIT_TYPES`.
        strength: edit strength in ``[0, 1]``; ``0`` returns an exact copy of the
            input values.

    Returns:
        A new ``float32`` array with the same shape, values in ``[0, 1]``.

    Raises:
        ValueError: unknown ``edit_type``, ``strength`` outside ``[0, 1]`` (or
            not finite), or frames whose last axis is not 3 channels.
    """
    if edit_type not in CHECKABLE_EDIT_TYPES:
        raise ValueError(f"unknown edit type {edit_type!r}; expected one of {CHECKABLE_EDIT_TYPES}")
    s = float(strength)
    if not math.isfinite(s) or not 0.0 <= s <= 1.0:
        raise ValueError(f"edit strength must be in [0, 1], got {strength!r} for edit type {edit_type!r}")
    x = np.asarray(frames, dtype=np.float32)
    if x.ndim < 1 or x.shape[-1] != 3:
        raise ValueError(f"frames must have 3 RGB channels on the last axis, got shape {x.shape}")
    if s == 0.0:
        return x.copy()  # exact identity (saturate's Y + (x - Y) would round)
    s32 = np.float32(s)

    if edit_type == "brighten":
        out = np.clip(x + np.float32(0.2) * s32, 0.0, 1.0)
    elif edit_type == "darken":
        out = x * (np.float32(1.0) - np.float32(0.5) * s32)
    elif edit_type == "grayscale":
        out = (np.float32(1.0) - s32) * x + s32 * luma(x)
    elif edit_type == "saturate":
        y = luma(x)
        out = np.clip(y + (np.float32(1.0) + s32) * (x - y), 0.0, 1.0)
    elif edit_type == "warm":
        out = np.clip(x + s32 * WARM_SHIFT, 0.0, 1.0)
    else:  # "cool"
        out = np.clip(x + s32 * COOL_SHIFT, 0.0, 1.0)
    return np.asarray(out, dtype=np.float32)
