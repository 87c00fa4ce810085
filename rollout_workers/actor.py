"""Ray actor shell around :class:`editrl.rollout_workers.worker.RolloutWorker`.

Three concurrency groups: ``compute`` (one at a time: sampling, and loading the
staged adapter right before a group, so an adapter is only ever loaded between
groups), ``adapter`` (verifying and staging a new adapter at once, even while a
group samples and others wait in ``compute``) and ``io`` (collecting scored groups
while the next one samples).
"""
from __future__ import annotations

import ray

from editrl.protocol.rollout import Group, GroupFailure, GroupTask
from editrl.rollout_workers.worker import RolloutWorker


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
    def sample(self, tasks: list[GroupTask]) -> list[Group | GroupFailure]:
        return super().sample(tasks)

    @ray.method(concurrency_group="compute")
    def submit(self, task: GroupTask) -> str:
        return super().submit(task)

    @ray.method(concurrency_group="io")
    def collect(self, timeout_s: float = 0.0) -> list[Group | GroupFailure]:
        return super().collect(timeout_s)

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
