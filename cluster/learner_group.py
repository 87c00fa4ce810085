"""The run's learner: one Ray actor, or ``topology.learner.ranks`` actors that train data-parallel.

:func:`start_learner` returns something the driver uses as it uses one actor handle
(``learner.train_step.remote(groups)`` and the like). For several ranks it is a
:class:`LearnerGroup`: the actors are placed by a placement group (one bundle per rank,
packed onto as few nodes as possible), join one ``torch.distributed`` process group
with rank 0's address, and every call that changes or reads training state (an
update, a resume, the policy version) goes to every rank, its result that of rank 0
once all ranks answered (a failure or death of any rank fails the call at once, and a rank
silent ``learner.collective_timeout_s`` + 60 s after the first answered fails it too, each
naming the rank: :class:`LearnerRankError`);
publishing the adapter and writing checkpoints go to rank 0, whose adapter and
optimizer state are every rank's, unless the learner is sharded (``topology.learner.sharding: fsdp``):
then they too go to every rank, since gathering the adapter and writing the optimizer's
shards are collectives.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any

import ray
from ray.exceptions import RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from editrl.cluster.config import TrainConfig
from editrl.learner.actor import make_learner_actor

logger = logging.getLogger(__name__)

EVERY_RANK = ("train_step", "resume", "ready")
"""Learner methods every rank runs (rank 0's result is returned); the others run on rank 0."""
EVERY_SHARDED_RANK = EVERY_RANK + ("publish", "save_checkpoint", "save_adapter")
"""The same for a sharded learner (collectives: the adapter is gathered, the optimizer shards written)."""


class LearnerRankError(RuntimeError):
    """A learner rank failed, died or did not answer a call every rank runs; the message names it."""


FAILURE_GRACE_S = 10.0
"""After a rank fails, how long the other ranks' answers are awaited, so that the message names
a rank that died rather than only the peer its collective then lost."""


def _describe(rank: int, exc: BaseException) -> str:
    if isinstance(exc, RayActorError):
        return f"learner rank {rank} died (its actor is gone)"
    return f"learner rank {rank} failed: {type(exc).__name__}: {' '.join(str(exc).split())[:400]}"


@ray.remote(num_cpus=0)
def _rank_zero(name: str, refs: list, timeout_s: float) -> Any:
    """Rank 0's result of ``name`` once every rank answered.

    A rank that fails (an exception, or its actor died) fails the call, with every rank that
    failed within ``FAILURE_GRACE_S`` of it, dead ones first; a rank that has not answered
    ``timeout_s`` after the first answer (a peer hangs in a collective) fails it too.

    Raises:
        LearnerRankError: naming the ranks and what happened to each.
    """
    pending = dict(enumerate(refs))
    results: dict[int, Any] = {}
    errors: dict[int, BaseException] = {}
    deadline = None
    while pending:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, _ = ray.wait(list(pending.values()), num_returns=1, timeout=wait)
        if not done:
            if errors:
                break
            raise LearnerRankError(f"learner rank(s) {sorted(pending)} did not answer {name} within {timeout_s:.0f} s "
                                   f"of rank(s) {sorted(results)} (learner.collective_timeout_s)")
        rank = next(r for r, ref in pending.items() if ref == done[0])
        try:
            results[rank] = ray.get(pending.pop(rank))
        except Exception as exc:  # noqa: BLE001 - re-raised below, naming the rank
            errors[rank] = exc
            deadline = min(deadline or math.inf, time.monotonic() + FAILURE_GRACE_S)
            continue
        if deadline is None:
            deadline = time.monotonic() + timeout_s
    if errors:
        order = sorted(errors, key=lambda r: (not isinstance(errors[r], RayActorError), r))
        silent = [f"learner rank(s) {sorted(pending)} did not answer"] if pending else []
        raise LearnerRankError(f"{name}: " + "; ".join([_describe(r, errors[r]) for r in order] + silent)) from errors[order[0]]
    return results[0]


class _Call:
    def __init__(self, handles: list, name: str, timeout_s: float, every_rank: tuple[str, ...]) -> None:
        self._handles, self._name, self._timeout_s, self._every_rank = handles, name, timeout_s, every_rank

    def remote(self, *args: Any, **kwargs: Any):
        if self._name not in self._every_rank:
            return getattr(self._handles[0], self._name).remote(*args, **kwargs)
        refs = [getattr(handle, self._name).remote(*args, **kwargs) for handle in self._handles]
        return _rank_zero.remote(self._name, refs, self._timeout_s)


class LearnerGroup:
    """``ranks`` learner actors as one (see the module docstring); ``handles[r]`` is rank r. The
    actors and their placement group end with the driver's Ray session."""

    def __init__(self, handles: list, placement: Any, timeout_s: float = 600.0, sharded: bool = False) -> None:
        self.handles = handles
        self.placement = placement
        self.timeout_s = timeout_s
        """Seconds the other ranks may take after the first answered (then the call fails, naming them)."""
        self.every_rank = EVERY_SHARDED_RANK if sharded else EVERY_RANK
        """The methods that go to every rank."""

    def __getattr__(self, name: str) -> _Call:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Call(self.handles, name, self.timeout_s, self.every_rank)


def _bundle(config: TrainConfig) -> dict[str, float]:
    return config.topology.learner.ask() or {"CPU": 0.01}


def check_placement(config: TrainConfig) -> None:
    """Refuse ``topology.learner.ranks`` bundles the cluster does not have, before anything starts.

    Raises:
        ValueError: naming the resource, what the ranks need and what the cluster has.
    """
    ranks, bundle, available = config.topology.learner.ranks, _bundle(config), ray.cluster_resources()
    for key, value in bundle.items():
        if ranks * value > available.get(key, 0.0):
            raise ValueError(f"topology.learner.ranks={ranks} needs {ranks * value:g} {key} ({value:g} per rank, "
                             f"topology.learner.cpus / gpus / resources); the Ray cluster has {available.get(key, 0.0):g}")


def start_learner(config: TrainConfig, name: str, namespace: str, args: tuple, placement_timeout_s: float = 300.0):
    """The run's learner: a named actor handle for one rank, a :class:`LearnerGroup` for several.

    Rank 0 is named ``name`` either way (rank r > 0 ``name-r``).

    Raises:
        ValueError: the cluster lacks the resources of the ranks (:func:`check_placement`).
        TimeoutError: the placement group was not ready within ``placement_timeout_s``.
    """
    placement_config = config.topology.learner
    ranks = placement_config.ranks
    actor_cls = make_learner_actor(placement_config.cpus, placement_config.gpus, placement_config.resources)
    if ranks == 1:
        return actor_cls.options(name=name, namespace=namespace).remote(*args)
    check_placement(config)
    placement = placement_group([_bundle(config)] * ranks, strategy="PACK")
    ready, _ = ray.wait([placement.ready()], timeout=placement_timeout_s)
    if not ready:
        remove_placement_group(placement)
        raise TimeoutError(f"the placement group of topology.learner.ranks={ranks} (bundles {_bundle(config)}) was not ready "
                           f"within {placement_timeout_s:.0f} s")
    handles = [actor_cls.options(
        name=name if rank == 0 else f"{name}-{rank}", namespace=namespace,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=placement, placement_group_bundle_index=rank),
    ).remote(*args) for rank in range(ranks)]
    address = ray.get(handles[0].rendezvous_address.remote())
    ray.get([handle.join.remote(address, rank, ranks, config.learner.collective_timeout_s, placement_config.sequence_parallel)
             for rank, handle in enumerate(handles)])
    sharded = placement_config.sharding == "fsdp"
    logger.info("learner: %d ranks data-parallel (%s), process group at %s", ranks, placement_config.sharding, address)
    return LearnerGroup(handles, placement, timeout_s=config.learner.collective_timeout_s + 60.0, sharded=sharded)
