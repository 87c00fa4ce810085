"""What travels between the driver, rollout workers and the learner (through
Ray's object store, never over HTTP)."""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

SAMPLER_NAMES = ("flow_sde", "flow_sde_wan", "cps", "ode")


@dataclass(frozen=True)
class SamplerSpec:
    """The behaviour policy's sampler, exactly as a group was sampled: the learner
    recomputes every log-prob with this spec and never with its own settings.

    Time convention: ``sigmas[0] = 1`` is noise, ``sigmas[-1] = 0`` is data; step
    ``t`` goes from ``sigmas[t]`` to ``sigmas[t + 1]``.
    """

    sampler: str
    """Rule of the stochastic steps: ``flow_sde``, ``flow_sde_wan``, ``cps`` or ``ode``
    (see :mod:`editrl.policy.samplers`); deterministic steps are Euler steps."""
    eta: float
    """The sampler's noise scale (dimensionless)."""
    guidance_scale: float
    """Classifier-free guidance scale on the instruction (1.0: no guidance)."""
    sigmas: tuple[float, ...]
    """``T + 1`` decreasing noise levels from 1 to 0."""
    stochastic: tuple[bool, ...]
    """``T`` flags: which steps are stochastic (and trained)."""
    noise_range: tuple[float, float] | None = None
    """``(s_max, s_min)`` of ``flow_sde_wan`` (``(sigmas[1], sigmas[-1])``); None for the others."""

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLER_NAMES:
            raise ValueError(f"unknown sampler {self.sampler!r}; expected one of {SAMPLER_NAMES}")
        if len(self.sigmas) < 2 or len(self.stochastic) != len(self.sigmas) - 1:
            raise ValueError(f"{len(self.sigmas)} sigmas need {len(self.sigmas) - 1} stochastic flags, got {len(self.stochastic)}")
        if not (self.eta >= 0 and math.isfinite(self.eta)):
            raise ValueError(f"eta must be finite and >= 0, got {self.eta}")
        if self.sampler == "flow_sde_wan" and self.noise_range is None:
            raise ValueError("flow_sde_wan needs noise_range = (sigma_1, sigma_T) of the schedule")
        if any(self.stochastic) and (self.sampler == "ode" or self.eta == 0):
            raise ValueError(f"sampler {self.sampler!r} with eta {self.eta} has no stochastic step")

    @classmethod
    def build(cls, sampler: str, eta: float, guidance_scale: float, sigmas: list[float], stochastic: list[bool]) -> "SamplerSpec":
        """A spec with the noise range derived from ``sigmas``; with ``eta = 0`` or the
        ``ode`` sampler no step is stochastic, whatever ``stochastic`` says."""
        sigmas = tuple(float(s) for s in sigmas)
        deterministic = sampler == "ode" or eta == 0
        return cls(
            sampler=sampler, eta=float(eta), guidance_scale=float(guidance_scale), sigmas=sigmas,
            stochastic=tuple(bool(m) and not deterministic for m in stochastic),
            noise_range=(sigmas[1], sigmas[-1]) if sampler == "flow_sde_wan" else None,
        )

    @property
    def num_steps(self) -> int:
        """T, the number of denoising steps."""
        return len(self.stochastic)

    def rule(self, t: int) -> tuple[str, float]:
        """``(sampler, eta)`` of step ``t``: the spec's own when the step is stochastic,
        ``("ode", 0.0)`` (the Euler step) otherwise."""
        return (self.sampler, self.eta) if self.stochastic[t] else ("ode", 0.0)

    def with_stochastic(self, stochastic: list[bool]) -> "SamplerSpec":
        """The same spec with other stochastic flags (e.g. the steps actually taken stochastically)."""
        return SamplerSpec(self.sampler, self.eta, self.guidance_scale, self.sigmas, tuple(bool(m) for m in stochastic), self.noise_range)


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
    deterministic: bool = False
    """Sample every step with the Euler (ODE) step, for evaluation; otherwise the
    worker's configured sampler on its stochastic steps. What was actually done is
    the group's :class:`SamplerSpec`."""
    keep_frames: bool = False
    """Return the source clip and the first edit as frames (for evaluation samples)."""
    record_means: bool = False
    """Also return each step's transition mean (GRPO-Guard's ratio normalisation needs
    the sampling policy's means)."""
    final_latent: bool = False
    """Also return the edit's latent (position T): the forward-process algorithms train on it."""
    start_s: float | None = None
    """Start of the part of the source clip to use, seconds from its first frame (None: its start)."""
    end_s: float | None = None
    """End (exclusive) of the part of the source clip to use, seconds (None: its end)."""


@dataclass
class Group:
    """A complete group: G trajectories with their rewards; CPU tensors, fp32 unless said.

    Between processes the tensors of :data:`BULK_FIELDS` travel apart from the rest
    (:func:`split_bulk`): the driver holds a group without them, ``bulk`` naming where they are.
    """

    task: GroupTask
    policy_version: int
    """Policy version (of the LoRA adapter) the trajectories were sampled with."""
    worker_id: int
    latents: torch.Tensor | None
    """``(G, K, C, f, h, w)`` in the trajectory dtype (``rollout.trajectory_dtype``): the latents at
    the positions ``latent_steps`` (position t is the latent before step t, 0 the initial noise
    at sigma_0 = 1, T the final one); all T + 1 when ``latent_steps`` is None."""
    log_probs: torch.Tensor
    """``(G, T)`` per-step log-prob at sampling time; NaN on deterministic steps."""
    sampler: SamplerSpec
    """How the trajectories were sampled (the behaviour policy's sampler)."""
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
    """``uint8 (2, F, H, W, 3)`` numpy frames when the task asked for them (``keep_frames``): the
    source clip and the first sample's edit (the driver never decodes clips)."""
    means: torch.Tensor | None = None
    """``(G, S, C, f, h, w)`` transition means at sampling time at the S steps ``mean_steps``,
    when the task asked for them (``record_means``); None otherwise."""
    latent_steps: tuple[int, ...] | None = None
    """The positions ``latents`` holds, increasing (rollout workers keep every trained step t
    and t + 1: :func:`trained_positions`); None: all T + 1."""
    mean_steps: tuple[int, ...] | None = None
    """The steps ``means`` holds, increasing (workers keep the trained ones); None: all T."""
    bulk: object | None = None
    """Where the tensors of :data:`BULK_FIELDS` are while they are elsewhere (a Ray object
    reference to :func:`split_bulk`'s arrays); None when the group holds them."""
    bulk_bytes: int = 0
    """Bytes of those tensors (set by :func:`split_bulk`)."""

    def latent(self, position: int) -> torch.Tensor:
        """``(G, C, f, h, w)``: the latents at ``position`` (0..T).

        Raises:
            KeyError: the group does not hold that position (naming the group and what it holds).
        """
        if self.latents is None:
            raise KeyError(f"group {self.task.group_id} does not hold its tensors (they are at {self.bulk!r})")
        if self.latent_steps is None:
            return self.latents[:, position].float()
        try:
            return self.latents[:, self.latent_steps.index(position)].float()
        except ValueError:
            raise KeyError(f"group {self.task.group_id} holds the latents at positions {list(self.latent_steps)}, "
                           f"not {position}") from None

    def mean(self, step: int) -> torch.Tensor:
        """``(G, C, f, h, w)`` fp32: the recorded transition means of step ``step``.

        Raises:
            KeyError: the group has no recorded means, or not at that step (naming the group).
        """
        if self.means is None:
            raise KeyError(f"group {self.task.group_id} has no recorded transition means")
        if self.mean_steps is None:
            return self.means[:, step]
        try:
            return self.means[:, self.mean_steps.index(step)]
        except ValueError:
            raise KeyError(f"group {self.task.group_id} holds the means of steps {list(self.mean_steps)}, not {step}") from None

    @property
    def sigmas(self) -> torch.Tensor:
        """``(T + 1,)`` fp32: the sampler's schedule."""
        return torch.tensor(self.sampler.sigmas, dtype=torch.float32)

    @property
    def sde_mask(self) -> torch.Tensor:
        """``(T,)`` bool: the stochastic (trained) steps."""
        return torch.tensor(self.sampler.stochastic, dtype=torch.bool)


BULK_FIELDS = ("latents", "source_latents", "text_embeds", "null_embeds", "means")
"""A group's tensors that travel from the rollout worker to the learner without passing the driver
(its ``(G, T)`` log-probs and ``(G,)`` rewards stay with the metadata: the rollout log records them)."""


def tensor_bytes(group: Group) -> int:
    """Bytes of the :data:`BULK_FIELDS` tensors ``group`` holds itself (0 for a group split by
    :func:`split_bulk`): what a process receiving it holds of its trajectories."""
    return sum(t.numel() * t.element_size() for name in BULK_FIELDS if isinstance(t := getattr(group, name), torch.Tensor))


def _array(tensor: torch.Tensor) -> np.ndarray:
    # numpy has no bfloat16: its bits travel as int16 and are viewed back on arrival
    tensor = tensor.detach().cpu().contiguous()
    return tensor.view(torch.int16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()


def split_bulk(group: Group) -> tuple[Group, dict[str, tuple[str, np.ndarray]]]:
    """The group without its :data:`BULK_FIELDS` tensors (``bulk_bytes`` set), and those tensors as
    ``name -> (dtype name, numpy array)``: plain buffers, which Ray's object store holds and hands
    to a reader without a copy or pickling."""
    arrays = {name: (str(t.dtype).removeprefix("torch."), _array(t))
              for name in BULK_FIELDS if (t := getattr(group, name)) is not None}
    light = dataclasses.replace(group, **{name: None for name in BULK_FIELDS},
                                bulk_bytes=sum(a.nbytes for _, a in arrays.values()))
    return light, arrays


def join_bulk(group: Group, arrays: dict[str, tuple[str, np.ndarray]]) -> Group:
    """The group with its tensors back from :func:`split_bulk`'s arrays, sharing their memory
    (read-only buffers of the object store are not copied; nothing writes to them)."""
    tensors = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, (dtype, array) in arrays.items():
            tensor = torch.from_numpy(array)
            tensors[name] = tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor
    return dataclasses.replace(group, **tensors, bulk=None)


def trained_positions(stochastic: list[bool] | tuple[bool, ...]) -> tuple[int, ...]:
    """The latent positions the learner reads of a trajectory whose steps ``stochastic`` are
    trained: every trained step t and t + 1 (a window of w consecutive steps is w + 1 positions).

    Example: ``[False, True, True, False]`` (T = 4) -> ``(1, 2, 3)``.
    """
    return tuple(sorted({p for t, s in enumerate(stochastic) if s for p in (t, t + 1)}))


@dataclass
class GroupFailure:
    """A group that could not be completed; it is reported and never trained."""

    task: GroupTask
    worker_id: int
    reason: str


@dataclass
class ScoreFailure(GroupFailure):
    """A group that was sampled but not scored: the reward server stayed unreachable
    for every attempt of the client, rejected the request, answered garbage, or could
    not score some of its items. Sampling it again may succeed, so the driver re-issues
    it or drops it as ``runtime.on_score_failure`` says; it never carries rewards."""
