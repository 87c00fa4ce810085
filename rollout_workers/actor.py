"""Ray actor shell around :class:`editrl.rollout_workers.worker.RolloutWorker`.

Three concurrency groups: ``compute`` (one at a time: sampling, and loading the
staged adapter right before a group, so an adapter is only ever loaded between
groups), ``adapter`` (verifying and staging a new adapter at once, even while a
group samples and others wait in ``compute``) and ``io`` (collecting scored groups
while the next one samples).

A group leaves the actor without its tensors: ``collect`` and ``sample`` return the groups'
metadata and rewards as their first value and each group's tensors (numpy buffers,
:func:`editrl.protocol.rollout.split_bulk`) as one more return value each. The caller
(the driver) owns those objects and receives references to them without fetching them;
Ray keeps them in the object store of the worker's node (objects under 100 KiB inline
with their owner), where they outlive the worker's process, and the learner reads them
from there (:func:`editrl.learner.actor.fetch_bulk`).
"""
from __future__ import annotations

import ray

from editrl.protocol.rollout import Group, GroupFailure, GroupTask, split_bulk
from editrl.rollout_workers.worker import RolloutWorker


def split_results(results: list[Group | GroupFailure], slots: int) -> tuple:
    """``(results without tensors, tensors of result 0, ..., of result slots - 1)``: a group's
    arrays at its index, None for a failure and for the slots beyond the results.

    Raises:
        ValueError: more results than ``slots`` (the caller asked for too few return values).
    """
    if len(results) > slots:
        raise ValueError(f"{len(results)} results for {slots} return slots")
    light, bulk = [], []
    for result in results:
        if isinstance(result, GroupFailure):
            light.append(result)
            bulk.append(None)
        else:
            group, arrays = split_bulk(result)
            light.append(group)
            bulk.append(arrays)
    return (light, *bulk, *[None] * (slots - len(results)))


class _RolloutActor(RolloutWorker):
    @ray.method(concurrency_group="compute")
    def ready(self) -> int:
        return super().ready()

    @ray.method(concurrency_group="adapter")
    def set_adapter(self, state, policy_version: int, checksum: str) -> int:
        return super().set_adapter(state, policy_version, checksum)

    @ray.method(concurrency_group="compute")
    def load_staged_adapter(self) -> int:
        return super().load_staged_adapter()

    @ray.method(concurrency_group="compute")
    def sample(self, tasks: list[GroupTask]) -> tuple:
        """Call with ``.options(num_returns=1 + len(tasks))``: see :func:`split_results`."""
        return split_results(super().sample(tasks), len(tasks))

    @ray.method(concurrency_group="compute")
    def submit(self, task: GroupTask) -> str:
        return super().submit(task)

    @ray.method(concurrency_group="io")
    def collect(self, timeout_s: float = 0.0, slots: int = 1) -> tuple:
        """At most ``slots`` scored groups; call with ``.options(num_returns=1 + slots)``: see
        :func:`split_results` (the others stay for the next call)."""
        return split_results(super().collect(timeout_s, max_results=slots), slots)

    @ray.method(concurrency_group="io")
    def pid(self) -> int:
        return super().pid()


def make_rollout_actor(num_cpus: float = 1.0, num_gpus: float = 0.0, max_restarts: int = 0,
                       resources: dict[str, float] | None = None):
    """The rollout worker as a Ray actor class with the given resources (``resources``:
    custom ones, e.g. ``{"rollout": 1}`` to land on a cluster's rollout group); a
    crashed actor is restarted up to ``max_restarts`` times (its constructor runs
    again, so it holds no adapter until the driver sends the current one)."""
    return ray.remote(
        num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts, resources=resources or None,
        concurrency_groups={"compute": 1, "adapter": 1, "io": 1},
    )(_RolloutActor)
