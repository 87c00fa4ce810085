"""Group-relative advantages (GRPO)."""
from __future__ import annotations

from typing import Literal

import torch


def group_advantages(
    rewards: torch.Tensor,
    eps: float = 1e-4,
    std_scope: Literal["group", "global"] = "group",
    clip: float | None = 5.0,
) -> torch.Tensor:
    """``A_i = (R_i - mean(R_group)) / (std + eps)``, then clipped to ``[-clip, clip]``.

    Source: VIVA eq. 4 (GRPO, Shao et al. 2024); clipping at 5 as in the
    Flow-GRPO reference. The std is the population std (``unbiased=False``) of
    each group, or of all rewards with ``std_scope="global"``. A group whose
    rewards are all equal gets zero advantages (no signal).

    Args:
        rewards: ``(B, G)`` fp32, B groups of G samples.
        eps: added to the std.
        std_scope: "group" (per prompt) or "global" (over the whole batch).
        clip: bound on |A|; None disables clipping.

    Returns:
        ``(B, G)`` fp32.

    Raises:
        ValueError: rewards not 2-D, or containing NaN/inf.
    """
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be (B, G), got shape {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf")
    rewards = rewards.float()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if std_scope == "group":
        std = rewards.std(dim=1, unbiased=False, keepdim=True)
    elif std_scope == "global":
        std = rewards.std(unbiased=False)
    else:
        raise ValueError(f"std_scope must be 'group' or 'global', got {std_scope!r}")
    advantages = centred / (std + eps)
    if clip is not None:
        advantages = advantages.clamp(-clip, clip)
    return advantages
