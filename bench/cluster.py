"""A reward server process and a private local Ray instance with rollout actors,
for the benchmarks that run the real distributed loop (weight sync, scaling)."""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import ray
import yaml

from bench.harness import PROJECT_ROOT, subprocess_env
from bench.workload import corpus
from editrl.cluster.ray_cluster import init_ray
from editrl.cluster.reward_process import RewardServerProcess
from editrl.policy.config import PolicyConfig
from editrl.rollout_workers.actor import make_rollout_actor

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def patched_environ(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` updated with ``values`` inside the block, restored after."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def reward_server(config: dict, work_dir: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """``python -m editrl.reward_server`` with ``config`` (a ServerConfig as a dict) on a free
    port, this checkout on its ``PYTHONPATH``; yields its URL; stopped by its handle."""
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / "reward_server.yaml"
    path.write_text(yaml.safe_dump(config))
    child_env = subprocess_env(env)
    with patched_environ({k: v for k, v in child_env.items() if os.environ.get(k) != v}):
        server = RewardServerProcess(path, work_dir / "reward_server.log", startup_timeout_s=180.0)
        url = server.__enter__()
    try:
        yield url
    finally:
        server.stop()


@contextlib.contextmanager
def ray_session(num_cpus: int) -> Iterator[None]:
    """A private local Ray instance (never an existing cluster: ``RAY_ADDRESS=local``)."""
    with patched_environ({"RAY_ADDRESS": "local"}):
        init_ray(None, num_cpus=num_cpus, project_root=str(PROJECT_ROOT))
    try:
        yield
    finally:
        ray.shutdown()


def start_workers(policy_config: PolicyConfig, reward_url: str, count: int, num_cpus: float = 1.0,
                  first_id: int = 0) -> list:
    """``count`` RolloutWorker actors (torch 1 thread each, as in a run); returned
    before they are ready: pass them to :func:`wait_ready`."""
    actor_cls = make_rollout_actor(num_cpus=num_cpus)
    return [actor_cls.remote(first_id + i, policy_config, list(corpus()), str(PROJECT_ROOT), reward_url, torch_threads=1)
            for i in range(count)]


def wait_ready(workers: list) -> None:
    """Block until every actor has built its policy."""
    ray.get([w.ready.remote() for w in workers])


def default_server_config(**overrides) -> dict:
    """``configs/reward_server.yaml`` as a dict, with ``overrides`` applied at the top level."""
    config = yaml.safe_load((PROJECT_ROOT / "configs" / "reward_server.yaml").read_text())
    config.update(overrides)
    return config
