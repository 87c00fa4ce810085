"""Data parallelism of the learner over ``torch.distributed`` ranks (gloo on CPU, NCCL
on GPUs): every rank holds the same LoRA adapter and optimizer, receives the whole
batch, computes the advantages on all of it (group statistics never depend on the
split), trains its share of the minibatch's groups, and the gradients are summed
over the ranks before every optimizer step, so all ranks take the same step.

The loss of each rank is divided by the number of (group, step) terms of the whole
minibatch, so the summed gradient is the one-rank gradient up to the order of
float additions.

With sequence parallelism of degree k, consecutive ranks ``k d .. k d + k - 1`` form
sequence-parallel group d: they run the same work items, each on 1/k of every
sequence's tokens (:func:`editrl.learner.sharding.split_sequences`), so each holds a
part of the items' parameter gradient, and the sum over all ranks is still the whole
minibatch's gradient. Work is split over the ``world_size / k`` groups.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the learner ranks.

    Attributes:
        rank: 0 .. world_size - 1.
        world_size: number of learner ranks.
        process_group: the ``torch.distributed`` group of the ranks (None: the default group).
        sequence_parallel: k, ranks per sequence-parallel group (divides ``world_size``).
    """

    rank: int
    world_size: int
    process_group: Any = None
    sequence_parallel: int = 1

    def __post_init__(self) -> None:
        if self.sequence_parallel < 1 or self.world_size % self.sequence_parallel:
            raise ValueError(f"sequence_parallel={self.sequence_parallel} must divide the {self.world_size} ranks")

    @classmethod
    def from_default_group(cls, sequence_parallel: int = 1) -> "DataParallel":
        """The ranks of the initialised default process group.

        Raises:
            RuntimeError: ``torch.distributed`` is not initialised.
            ValueError: ``sequence_parallel`` does not divide the world size.
        """
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised (init_process_group first)")
        return cls(dist.get_rank(), dist.get_world_size(), sequence_parallel=sequence_parallel)

    @property
    def data_rank(self) -> int:
        """Index of this rank's sequence-parallel group: which share of the work it runs."""
        return self.rank // self.sequence_parallel

    @property
    def data_size(self) -> int:
        """Number of sequence-parallel groups: how many shares the work is split into."""
        return self.world_size // self.sequence_parallel

    @property
    def reports(self) -> bool:
        """True for the first rank of its sequence-parallel group: the one whose statistics count."""
        return self.rank % self.sequence_parallel == 0

    def shard(self, items: list[T]) -> list[T]:
        """This rank's share of ``items``: every ``data_size``-th one, from ``data_rank`` on."""
        return items[self.data_rank :: self.data_size]

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Replace each parameter's ``.grad`` by its sum over the ranks (a missing
        gradient counts as zeros), in one flat fp32 all-reduce."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.process_group)
        offset = 0
        for param in params:
            param.grad = flat[offset : offset + param.numel()].view_as(param).to(param.dtype).clone()
            offset += param.numel()

    def gather(self, value: T) -> list[T]:
        """``value`` of every reporting rank (:attr:`reports`: one per sequence-parallel group), in
        rank order (picklable objects, e.g. statistics). Every rank must call it."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value, group=self.process_group)
        return out[:: self.sequence_parallel]
