"""Start a local Ray instance or join an existing cluster."""
from __future__ import annotations

import logging
import os

import ray

logger = logging.getLogger(__name__)


def init_ray(address: str | None, num_cpus: int | None = None, project_root: str | None = None) -> None:
    """Join the cluster at ``address`` or start a private local one.

    A local instance gets a free GCS port picked by Ray (not 6379, which a Redis
    server may hold), no dashboard, and ``project_root`` on the workers'
    ``PYTHONPATH`` so actors import the project's packages.
    """
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [project_root, os.environ.get("PYTHONPATH")]))}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        logger.info("joined Ray cluster at %s", address)
        return
    ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=env, log_to_driver=True)
    logger.info("started a local Ray instance (%s)", ray.get_runtime_context().gcs_address)
