"""Work items of a minibatch: the unit the learner runs through one forward and backward,
and the unit data-parallel ranks split.

A work item is one group's samples ``rows`` at the trained steps ``steps`` (up to
``timesteps_per_forward`` of them, batched in one forward). Every (group, sample, trained
step) of a minibatch is in exactly one item, and every item's loss is weighted by its
share of its group's samples, so the items' gradients add up to the minibatch's gradient
however they are split across ranks.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from editrl.learner.loss import ObjectiveStats


@dataclass(frozen=True)
class WorkItem:
    """One forward and backward of the learner.

    Attributes:
        group: index of the group in the minibatch's list of groups.
        steps: the trained (stochastic) steps, ascending, batched in one forward.
        rows: ``(start, stop)``, the group's samples ``start .. stop - 1``.
        share: ``(stop - start) / G``, the item's weight in its group's mean over samples.
    """

    group: int
    steps: tuple[int, ...]
    rows: tuple[int, int]
    share: float


def work_items(stochastic: list[list[bool]], group_sizes: list[int], timesteps_per_forward: int,
               micro_batch_samples: int | None) -> list[WorkItem]:
    """The minibatch's work items, in a fixed order (group, step chunk, sample range) that every
    rank computes alike.

    Args:
        stochastic: per group, which denoising steps are stochastic (trained).
        group_sizes: G of each group (samples).
        timesteps_per_forward: trained steps per forward (>= 1).
        micro_batch_samples: samples per forward (None: the whole group).

    Returns:
        The items; a group without a stochastic step has none.

    Raises:
        ValueError: ``timesteps_per_forward`` or ``micro_batch_samples`` below 1.
    """
    if timesteps_per_forward < 1 or (micro_batch_samples is not None and micro_batch_samples < 1):
        raise ValueError(f"timesteps_per_forward={timesteps_per_forward} and micro_batch_samples="
                         f"{micro_batch_samples} must be >= 1")
    items = []
    for index, (flags, group_size) in enumerate(zip(stochastic, group_sizes, strict=True)):
        micro = micro_batch_samples or group_size
        steps = [t for t, flag in enumerate(flags) if flag]
        for first in range(0, len(steps), timesteps_per_forward):
            chunk = tuple(steps[first : first + timesteps_per_forward])
            for start in range(0, group_size, micro):
                stop = min(start + micro, group_size)
                items.append(WorkItem(index, chunk, (start, stop), (stop - start) / group_size))
    return items


def items_per_rank(num_items: int, world_size: int) -> int:
    """The most items any rank runs: sharded ranks all run this many forwards (padding
    with zero-weight repeats), since every forward of a sharded model is a collective."""
    return math.ceil(num_items / world_size)


StepParts = dict[tuple[int, int], list[tuple[int, ObjectiveStats]]]
"""(group index, step) -> (first sample, statistics) of that step's sample ranges, one per work item."""


def merge_parts(parts: list[StepParts]) -> StepParts:
    """The parts of several ranks (or item lists), concatenated per (group, step) in rank order."""
    merged: StepParts = defaultdict(list)
    for one in parts:
        for key, value in one.items():
            merged[key].extend(value)
    return dict(merged)


def pool_steps(parts: StepParts) -> tuple[dict[tuple[int, int], ObjectiveStats], dict[int, float]]:
    """Each (group, step)'s statistics pooled over its sample ranges
    (:meth:`editrl.learner.loss.ObjectiveStats.pooled`, in sample order whichever rank ran
    which range), and each group's largest
    ``|exp(log r) - 1|`` over its samples and steps.

    Returns:
        ``(terms, ratio_error)``: terms keyed and sorted by (group, step); ratio error per group index.
    """
    terms = {key: ObjectiveStats.pooled([stats for _, stats in sorted(parts[key], key=lambda part: part[0])])
             for key in sorted(parts)}
    errors: dict[int, float] = {}
    for (group, _), term in terms.items():
        errors[group] = max(errors.get(group, 0.0), (term.log_ratio.exp() - 1.0).abs().max().item())
    return terms, errors


STAT_KEYS = ("loss", "pg_loss", "kl_ref", "ratio_mean", "clip_frac", "approx_kl")
"""Statistics of :class:`editrl.learner.loss.ObjectiveStats` averaged over (group, step) terms."""


@dataclass
class GradientStats:
    """What :meth:`Learner.accumulate_gradients` measured: sums over (group, step) terms
    of :class:`editrl.learner.loss.ObjectiveStats`, and the extremes of the surrogate's ratio."""

    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAT_KEYS, 0.0))
    terms: int = 0
    ratio_min: float = float("inf")
    ratio_max: float = float("-inf")
    log_ratios: list[torch.Tensor] = field(default_factory=list)
    """Raw ``logp_theta - logp_old`` of every trained (sample, step), detached."""
    ratio_error_per_group: list[float] = field(default_factory=list)
    """max |exp(log r) - 1| over each group's samples and steps (NaN for an untrained group)."""

    def add(self, term: ObjectiveStats) -> None:
        for key in STAT_KEYS:
            self.sums[key] += getattr(term, key)
        self.ratio_min, self.ratio_max = min(self.ratio_min, term.ratio_min), max(self.ratio_max, term.ratio_max)
        self.log_ratios.append(term.log_ratio)
        self.terms += 1

    def merge(self, other: "GradientStats") -> None:
        for key in STAT_KEYS:
            self.sums[key] += other.sums[key]
        self.ratio_min, self.ratio_max = min(self.ratio_min, other.ratio_min), max(self.ratio_max, other.ratio_max)
        self.log_ratios += other.log_ratios
        self.terms += other.terms
