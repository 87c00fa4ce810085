"""The run's learner: one Ray actor, or ``learner.ranks`` actors that train data-parallel.

:func:`start_learner` returns something the driver uses as it uses one actor handle
(``learner.train_step.remote(groups)`` and the like). For several ranks it is a
:class:`LearnerGroup`: the actors are placed by a placement group (one bundle per rank,
packed onto as few nodes as possible), join one ``torch.distributed`` process group
with rank 0's address, and every call that changes or reads training state (an
update, a resume, the policy version) goes to every rank, its result that of rank 0
once all ranks answered (a failure on any rank fails the call, naming its actor);
publishing the adapter and writing checkpoints go to rank 0, whose adapter and
optimizer state are every rank's.
"""
from __future__ import annotations

import logging
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from editrl.cluster.config import TrainConfig
from editrl.learner.actor import make_learner_actor

logger = logging.getLogger(__name__)

EVERY_RANK = ("train_step", "resume", "ready")
"""Learner methods every rank runs (rank 0's result is returned); the others run on rank 0."""


@ray.remote(num_cpus=0)
def _rank_zero(*results: Any) -> Any:
    """Rank 0's result, once every rank's result exists (Ray fails this task with the first rank error)."""
    return results[0]


class _Call:
    def __init__(self, handles: list, name: str) -> None:
        self._handles, self._name = handles, name

    def remote(self, *args: Any, **kwargs: Any):
        if self._name not in EVERY_RANK:
            return getattr(self._handles[0], self._name).remote(*args, **kwargs)
        return _rank_zero.remote(*(getattr(handle, self._name).remote(*args, **kwargs) for handle in self._handles))


class LearnerGroup:
    """``ranks`` learner actors as one (see the module docstring); ``handles[r]`` is rank r. The
    actors and their placement group end with the driver's Ray session."""

    def __init__(self, handles: list, placement: Any) -> None:
        self.handles = handles
        self.placement = placement

    def __getattr__(self, name: str) -> _Call:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Call(self.handles, name)


def _bundle(config: TrainConfig) -> dict[str, float]:
    rt = config.runtime
    bundle = {"CPU": rt.learner_num_cpus, "GPU": rt.learner_num_gpus, **rt.learner_resources}
    return {key: value for key, value in bundle.items() if value > 0} or {"CPU": 0.01}


def check_placement(config: TrainConfig) -> None:
    """Refuse ``learner.ranks`` bundles the cluster does not have, before anything starts.

    Raises:
        ValueError: naming the resource, what the ranks need and what the cluster has.
    """
    ranks, bundle, available = config.learner.ranks, _bundle(config), ray.cluster_resources()
    for key, value in bundle.items():
        if ranks * value > available.get(key, 0.0):
            raise ValueError(f"learner.ranks={ranks} needs {ranks * value:g} {key} ({value:g} per rank, "
                             f"runtime.learner_num_* / learner_resources); the Ray cluster has {available.get(key, 0.0):g}")


def start_learner(config: TrainConfig, name: str, namespace: str, args: tuple, placement_timeout_s: float = 300.0):
    """The run's learner: a named actor handle for one rank, a :class:`LearnerGroup` for several.

    Rank 0 is named ``name`` either way (rank r > 0 ``name-r``).

    Raises:
        ValueError: the cluster lacks the resources of the ranks (:func:`check_placement`).
        TimeoutError: the placement group was not ready within ``placement_timeout_s``.
    """
    rt, ranks = config.runtime, config.learner.ranks
    actor_cls = make_learner_actor(rt.learner_num_cpus, rt.learner_num_gpus, rt.learner_resources)
    if ranks == 1:
        return actor_cls.options(name=name, namespace=namespace).remote(*args)
    check_placement(config)
    placement = placement_group([_bundle(config)] * ranks, strategy="PACK")
    ready, _ = ray.wait([placement.ready()], timeout=placement_timeout_s)
    if not ready:
        remove_placement_group(placement)
        raise TimeoutError(f"the placement group of learner.ranks={ranks} (bundles {_bundle(config)}) was not ready "
                           f"within {placement_timeout_s:.0f} s")
    handles = [actor_cls.options(
        name=name if rank == 0 else f"{name}-{rank}", namespace=namespace,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=placement, placement_group_bundle_index=rank),
    ).remote(*args) for rank in range(ranks)]
    address = ray.get(handles[0].rendezvous_address.remote())
    ray.get([handle.join.remote(address, rank, ranks, config.learner.collective_timeout_s)
             for rank, handle in enumerate(handles)])
    logger.info("learner: %d ranks data-parallel, process group at %s", ranks, address)
    return LearnerGroup(handles, placement)
