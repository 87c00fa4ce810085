"""What travels between the driver, rollout workers and the learner (through
Ray's object store, never over HTTP)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class GroupTask:
    """A request to sample one group of G trajectories for one prompt."""

    group_id: str
    """Unique id, e.g. ``s0003-p012``: a group is trained at most once."""
    prompt_id: str
    instruction: str
    video_path: str
    """Absolute path of the source clip (the workers share the file system)."""
    seed: int
    """Seeds the group's generator: its initial noise and every SDE step's noise."""
    group_size: int
    """G, the number of trajectories."""
    eta: float
    """Flow-SDE noise scale; 0.0 samples deterministic (ODE) trajectories for evaluation."""
    keep_frames: bool = False
    """Return the decoded edited frames (for evaluation samples)."""
    record_means: bool = False
    """Also return each step's transition mean (GRPO-Guard's ratio normalisation needs
    the sampling policy's means)."""


@dataclass
class Group:
    """A complete group: G trajectories with their rewards; tensors are fp32 CPU."""

    task: GroupTask
    policy_version: int
    """Adapter version the trajectories were sampled with."""
    worker_id: int
    latents: torch.Tensor
    """``(G, T + 1, C, f, h, w)`` every latent, sigma_0 = 1 first."""
    log_probs: torch.Tensor
    """``(G, T)`` per-step log-prob at sampling time; NaN on deterministic steps."""
    sigmas: torch.Tensor
    """``(T + 1,)``."""
    sde_mask: torch.Tensor
    """``(T,)`` bool: stochastic (trained) steps."""
    source_latents: torch.Tensor
    """``(1, C, f, h, w)``."""
    text_embeds: torch.Tensor
    """``(1, L, D)`` instruction embeddings."""
    null_embeds: torch.Tensor
    """``(1, L, D)`` empty-instruction embeddings (CFG)."""
    rewards: torch.Tensor
    """``(G,)`` scalar rewards, 0-10."""
    reward_dimensions: dict[str, list[float | None]]
    """Dimension -> G scores (0-10, None where not applicable)."""
    reward_config_version: str
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds spent per phase: encode, sample, decode, reward."""
    frames: object | None = None
    """``uint8 (G, F, H, W, 3)`` numpy edited frames when the task asked for them."""
    means: torch.Tensor | None = None
    """``(G, T, C, f, h, w)`` transition means at sampling time when the task asked for
    them (``record_means``); None otherwise."""


@dataclass
class GroupFailure:
    """A group that could not be completed; it is reported and never trained."""

    task: GroupTask
    worker_id: int
    reason: str
