"""The reward server as a Ray Serve application: the same FastAPI app in several replicas.

Each replica builds its own app (and loads its own backends) from the server
config when Serve starts it; Serve's proxy spreads requests over the replicas.
Replicas share the score cache and follow reward-config changes through Redis,
so a config with more than one replica must set ``redis_url`` (otherwise a
``PUT /v1/config`` would reach one replica only).

Run it with Serve's CLI and the example config::

    serve run configs/reward_server_serve.yaml

or from Python with ``serve.run(build_app({"config": "configs/reward_server_redis.yaml", "num_replicas": 2}))``.
Ray's head listens on port 6379 by default, like Redis: start Ray on another
port when both run on one machine.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from editrl.reward_server.app import create_app
from editrl.reward_server.config import ServerConfig, load_server_config

logger = logging.getLogger(__name__)


class ServeArgs(BaseModel):
    """Arguments of :func:`build_app` (the ``args`` of a Serve config's application)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    config: str | None = None
    """Path of the YAML ServerConfig; None uses the defaults."""
    redis_url: str | None = None
    """Overrides the config's ``redis_url``."""
    num_replicas: int = Field(default=2, ge=1)
    """Replicas of the reward server."""
    max_ongoing_requests: int = Field(default=64, ge=1)
    """Requests one replica handles at once (Serve queues the rest)."""
    num_cpus: float = Field(default=1.0, ge=0.0)
    """CPUs reserved per replica."""
    num_gpus: float = Field(default=0.0, ge=0.0)
    """GPUs reserved per replica (for an in-process VLM backend)."""
    name: str = "RewardServer"
    """Deployment name."""


class RewardServerReplica:
    """One replica: validates the config at construction, builds the app when Serve asks for it.

    Args:
        config: a ServerConfig as a plain dict (what Serve passes to replicas).
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = ServerConfig.model_validate(config)

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The replica's FastAPI app (Serve runs its lifespan: backends, cache and registry start there)."""
        return create_app(self.config)


def build_app(args: dict[str, Any]):
    """The Serve application builder (``import_path: editrl.reward_server.serve_app:build_app``).

    Returns:
        A ``ray.serve.Application`` with ``num_replicas`` replicas of the reward server.

    Raises:
        ValueError: invalid arguments or config, or several replicas without ``redis_url``.
    """
    from ray import serve

    parsed = ServeArgs.model_validate(args)
    config = load_server_config(parsed.config) if parsed.config else ServerConfig()
    if parsed.redis_url is not None:
        config = ServerConfig.model_validate({**config.model_dump(), "redis_url": parsed.redis_url})
    if parsed.num_replicas > 1 and config.redis_url is None:
        raise ValueError(
            f"{parsed.num_replicas} replicas need a shared config registry and score cache: set redis_url "
            "(in the config or the redis_url argument)"
        )
    deployment = serve.deployment(
        serve.ingress()(RewardServerReplica),
        name=parsed.name,
        num_replicas=parsed.num_replicas,
        max_ongoing_requests=parsed.max_ongoing_requests,
        ray_actor_options={"num_cpus": parsed.num_cpus, "num_gpus": parsed.num_gpus},
    )
    logger.info("reward server Serve application: %d replicas, reward config %s", parsed.num_replicas, config.reward.version)
    return deployment.bind(config.model_dump(mode="json"))
