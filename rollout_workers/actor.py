"""Ray actor shell around :class:`rollout_workers.worker.RolloutWorker`."""
from __future__ import annotations

import ray

from rollout_workers.worker import RolloutWorker


def make_rollout_actor(num_cpus: float = 1.0, num_gpus: float = 0.0, max_restarts: int = 0,
                       resources: dict[str, float] | None = None):
    """The RolloutWorker class as a Ray actor class with the given resources (``resources``: custom ones)."""
    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts, resources=resources or None)(RolloutWorker)
