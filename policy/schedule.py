"""Which denoising steps are stochastic (and trained): a timestep fraction and an
optional SDE window; pure functions of integers and floats.

A step that is not stochastic is a deterministic Euler (ODE) step and carries no
log-prob, so it is never trained.
"""
from __future__ import annotations

from typing import Literal

import torch

from editrl.policy.sampler_names import num_fraction_steps  # noqa: F401 (re-exported)

WindowPosition = Literal["fixed", "random", "scheduled"]


def fraction_steps(num_steps: int, fraction: float) -> list[bool]:
    """The first :func:`num_fraction_steps` of ``num_steps`` steps.

    Source: Flow-GRPO's ``timestep_fraction`` (0.99 with 20 steps trains 19 and
    skips the last, whose tiny std makes log-probs explode).

    Example: ``fraction_steps(10, 0.9)`` is nine True then one False.

    Raises:
        ValueError: ``num_steps < 1`` or fraction outside (0, 1].
    """
    if num_steps < 1 or not 0.0 < fraction <= 1.0:
        raise ValueError(f"need num_steps >= 1 and 0 < fraction <= 1, got {num_steps}, {fraction}")
    num = num_fraction_steps(num_steps, fraction)
    return [i < num for i in range(num_steps)]


def window_start(
    position: str,
    num_eligible: int,
    size: int,
    start: int = 0,
    stride: int = 1,
    every: int = 1,
    policy_version: int = 0,
    seed: int = 0,
) -> int:
    """First step of an SDE window of ``size`` consecutive steps among the first
    ``num_eligible`` steps.

    - ``fixed``: ``start``.
    - ``random``: uniform in ``[0, num_eligible - size]``, drawn from ``seed`` (the
      group's seed, so every sample of a group shares the window; Flow-GRPO-Fast).
    - ``scheduled``: ``min(start + stride * (policy_version // every), num_eligible - size)``:
      the window slides one ``stride`` later every ``every`` policy versions and
      stays at the last admissible position (a MixGRPO-style sliding window, Li et
      al. 2025, arXiv 2507.21802).

    Raises:
        ValueError: unknown position, ``size`` outside [1, num_eligible], ``start``
            past the last admissible position, ``stride < 0`` or ``every < 1``.
    """
    if not 1 <= size <= num_eligible:
        raise ValueError(f"window size {size} must be in [1, {num_eligible}] (the eligible steps)")
    last = num_eligible - size
    if not 0 <= start <= last:
        raise ValueError(f"window start {start} must be in [0, {last}]")
    if stride < 0 or every < 1:
        raise ValueError(f"need stride >= 0 and every >= 1, got {stride}, {every}")
    if position == "fixed":
        return start
    if position == "random":
        generator = torch.Generator().manual_seed(seed)
        return int(torch.randint(0, last + 1, (1,), generator=generator).item())
    if position == "scheduled":
        return min(start + stride * (policy_version // every), last)
    raise ValueError(f"unknown window position {position!r}; expected fixed, random or scheduled")


def stochastic_steps(
    num_steps: int,
    fraction: float,
    window_size: int | None = None,
    position: str = "fixed",
    start: int = 0,
    stride: int = 1,
    every: int = 1,
    policy_version: int = 0,
    seed: int = 0,
) -> list[bool]:
    """For each of ``num_steps`` steps, whether it is stochastic and trained.

    Without a window, the first ``int(fraction * num_steps)`` steps
    (:func:`fraction_steps`). With ``window_size = k``, exactly k consecutive steps
    inside those, placed by :func:`window_start`; all others are ODE steps (the
    fast variants of Flow-GRPO and MixGRPO).

    Example: 10 steps, fraction 0.9, window 2 at fixed start 3 -> steps 3 and 4.

    Raises:
        ValueError: see :func:`fraction_steps` and :func:`window_start`.
    """
    eligible = fraction_steps(num_steps, fraction)
    if window_size is None:
        return eligible
    first = window_start(position, sum(eligible), window_size, start, stride, every, policy_version, seed)
    return [first <= i < first + window_size for i in range(num_steps)]
