"""Start a local Ray instance or join an existing cluster."""
from __future__ import annotations

import logging
import os

import ray

logger = logging.getLogger(__name__)

# Set by Ray's job manager in the environment of a Ray job's entrypoint; it
# carries the job's runtime_env, which every worker of the job inherits.
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def init_ray(address: str | None, num_cpus: int | None = None, project_root: str | None = None) -> None:
    """Join the cluster at ``address`` or start a private local one.

    ``address`` may be ``"auto"``: inside a Ray job (``editrl submit``, a
    KubeRay RayJob) ``RAY_ADDRESS`` names the job's cluster and Ray connects to
    it. A local instance gets a free GCS port picked by Ray (not 6379, which a
    Redis server may hold), no dashboard, and ``project_root`` on the workers'
    ``PYTHONPATH`` so actors import the project's packages. Inside a Ray job the
    job's runtime_env already puts its working directory on every worker's
    ``PYTHONPATH``; adding one here would be refused by Ray as a conflict when
    the job sets ``PYTHONPATH`` itself, so none is added.
    """
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [project_root, os.environ.get("PYTHONPATH")]))}}
    if address:
        in_job = RAY_JOB_CONFIG_ENV in os.environ
        ray.init(address=address, runtime_env=None if in_job else env, log_to_driver=True)
        logger.info("joined Ray cluster at %s%s", address, " from a Ray job" if in_job else "")
        return
    ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=env, log_to_driver=True)
    logger.info("started a local Ray instance (%s)", ray.get_runtime_context().gcs_address)
