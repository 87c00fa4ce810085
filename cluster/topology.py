"""Where a run's processes go: the ``topology`` section of a run config.

One place names every process kind of a run, how many of it there are and what each one
reserves from Ray: the rollout workers, the learner ranks (and how they hold the model)
and the reward-server replicas. ``editrl plan`` sizes each kind from it, and the cluster
manifests (``cluster/rayjob.yaml``, ``cluster/reward_serve.yaml``) are checked against the
cluster preset's topology by ``tests/test_cluster_manifests.py``.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MOVED = {
    "rollout.num_workers": "topology.rollout.workers",
    "rollout.num_cpus_per_worker": "topology.rollout.cpus",
    "rollout.num_gpus_per_worker": "topology.rollout.gpus",
    "rollout.resources": "topology.rollout.resources",
    "runtime.learner_num_cpus": "topology.learner.cpus",
    "runtime.learner_num_gpus": "topology.learner.gpus",
    "runtime.learner_resources": "topology.learner.resources",
    "learner.ranks": "topology.learner.ranks",
    "learner.sharding": "topology.learner.sharding",
    "learner.sequence_parallel": "topology.learner.sequence_parallel",
}
"""Fields that used to live in other sections, and where they are now."""


def moved_fields(data: dict) -> list[str]:
    """``old -> new`` for every moved field (:data:`MOVED`) that the raw config ``data`` still sets."""
    found = []
    for old, new in MOVED.items():
        section, field = old.split(".")
        if isinstance(data.get(section), dict) and field in data[section]:
            found.append(f"{old} is now {new}")
    return found


class _Placement(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    cpus: float = Field(1.0, ge=0)
    """Ray CPUs each process reserves."""
    gpus: float = Field(0.0, ge=0)
    """Ray GPUs each process reserves; above 0 its models run on CUDA (0 on CPU machines)."""
    resources: dict[str, float] = {}
    """Custom Ray resources each process reserves, e.g. ``{rollout: 1}`` to place it on a
    cluster's worker group of that name (see cluster/README.md)."""

    def ask(self) -> dict[str, float]:
        """What one process asks Ray for (``CPU``, ``GPU``, custom resources), zeros left out."""
        ask = {"CPU": self.cpus, "GPU": self.gpus, **self.resources}
        return {key: value for key, value in ask.items() if value > 0}


class RolloutTopology(_Placement):
    """The rollout workers: Ray actors that sample groups."""

    workers: int = Field(2, ge=1)
    """Rollout actors started by the run (``editrl scale`` and ``runtime.autoscale`` change the count later)."""


class LearnerTopology(_Placement):
    """The learner ranks: Ray actors that train one adapter together."""

    ranks: int = Field(1, ge=1)
    """Learner processes training data-parallel (one Ray actor each, placed by a placement group
    of one bundle per rank, packed): the minibatch's work items (group, trained steps, sample
    range: :mod:`editrl.learner.work`) are split round-robin and the gradients are summed
    before each optimizer step. ``--resume`` needs the same count and sharding."""
    sharding: Literal["replicate", "fsdp"] = "replicate"
    """With ``ranks > 1``: ``replicate`` keeps the whole DiT, adapter and optimizer on every rank
    and all-reduces the LoRA gradients (rank 0 publishes and writes checkpoints); ``fsdp``
    shards them with FSDP2 (``fully_shard`` per transformer block, :mod:`editrl.learner.sharding`):
    each rank reads and holds 1/ranks of the weights, the adapter's fp32 master weights and the
    AdamW state, gathers one block at a time, and checkpoints write the optimizer state as
    per-rank shards (torch.distributed.checkpoint; the run directory must be on storage every
    learner node sees)."""
    sequence_parallel: int = Field(1, ge=1)
    """Ulysses sequence parallelism: groups of this many consecutive learner ranks run the same
    work items, each on 1/k of every sequence's tokens (attention exchanges tokens for heads
    with all-to-alls; diffusers' context parallelism for Wan), so activations per rank are
    about 1/k; work is split over ``ranks / k`` groups. Must divide ``ranks``, the DiT's
    attention heads and the tokens per sequence; not for ``policy.kind: vace`` (diffusers
    has no plan for it). Combines with either ``sharding``."""

    @model_validator(mode="after")
    def _sharding_needs_ranks(self) -> "LearnerTopology":
        if self.sharding == "fsdp" and self.ranks < 2:
            raise ValueError(f"topology.learner.sharding=fsdp shards over learner ranks: needs "
                             f"topology.learner.ranks >= 2, got {self.ranks}")
        if self.ranks % self.sequence_parallel:
            raise ValueError(f"topology.learner.sequence_parallel={self.sequence_parallel} must divide "
                             f"topology.learner.ranks={self.ranks}")
        return self


class RewardTopology(_Placement):
    """The reward-server replicas. A run that starts its own server (``reward_server.url``
    None) starts one process; replicas beyond one are a Ray Serve deployment reached at
    ``reward_server.url`` (``cluster/reward_serve.yaml``), whose ``num_replicas``, CPUs, GPUs and
    resources must be these (checked by ``tests/test_cluster_manifests.py`` for the cluster preset)."""

    replicas: int = Field(1, ge=1)
    """Reward-server replicas serving the run."""


class TopologyConfig(BaseModel):
    """Every process kind of a run: how many, and what each reserves."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    rollout: RolloutTopology = RolloutTopology()
    """Rollout workers."""
    learner: LearnerTopology = LearnerTopology()
    """Learner ranks."""
    reward: RewardTopology = RewardTopology()
    """Reward-server replicas."""
