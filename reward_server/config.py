"""Typed configuration of the reward server process.

``ServerConfig`` holds the HTTP, batching, cache and Redis knobs and the initial
:class:`~editrl.reward_server.reward_config.RewardConfig` (the reward definition, which
can be swapped at runtime through ``PUT /v1/config``). Both load from YAML
(``configs/reward_server.yaml``).
"""
from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from editrl.reward_server.backends.allowlist import DEFAULT_JUDGE_HOSTS, DEFAULT_JUDGE_KEY_ENVS, parse_url
from editrl.reward_server.reward_config import DEFAULT_WEIGHTS, AggregationError, DimensionError, RewardConfig

__all__ = [
    "DEFAULT_WEIGHTS", "AggregationError", "CacheSettings", "DimensionError", "RewardConfig", "ServerConfig",
    "load_server_config",
]


class CacheSettings(BaseModel):
    """The content-addressed score cache (in process, or in Redis when ``redis_url`` is set)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    enabled: bool = True
    """Look scores up before scoring and store successful ones afterwards."""
    max_entries: int = Field(default=65536, ge=1)
    """In-process cache: most entries kept (least recently used dropped first)."""
    ttl_s: float = Field(default=7 * 24 * 3600.0, gt=0.0)
    """Redis cache: seconds an entry lives."""
    claim_lease_s: float = Field(default=5.0, ge=0.5, le=600.0)
    """Redis cache: seconds a replica's claim on an item it is scoring lives without renewal.
    The owner renews the claim every third of this while it scores; another replica asked for
    the same item waits for the result, and scores the item itself once the claim lapses (its
    owner crashed or lost Redis), so a killed replica holds its items up for at most this long."""


class ServerConfig(BaseModel):
    """Reward server process: where it listens, how it batches, what it computes."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    host: str = "127.0.0.1"
    """Interface to listen on."""
    port: int = Field(default=8000, ge=1, le=65535)
    """TCP port to listen on."""
    max_batch_size: int = Field(default=16, ge=1)
    """Default most items per call of a local backend; items of concurrent requests share batches."""
    max_wait_s: float = Field(default=0.01, ge=0.0)
    """Default seconds a local backend's batch waits to fill after its first item arrives."""
    max_request_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    """Largest accepted request body in bytes; larger bodies get HTTP 413."""
    max_video_pixels: int = Field(default=50_000_000, ge=1)
    """Decode budget: most frames x height x width of one video of a score request (mp4 or
    raw; 3 bytes per pixel once decoded). Checked against the frame count and size the
    container declares before decoding, and counted while decoding, which stops at the
    budget whatever the container declared. Past it: HTTP 413 naming the item and field.
    The default admits 81 frames of 480x832 (32.3 Mpx) and refuses 60 of 1280x720 (55.3 Mpx)."""
    max_video_frames: int = Field(default=1024, ge=1)
    """Decode budget: most frames of one video of a score request (HTTP 413 past it), which
    bounds the per-frame work of a long video of tiny frames."""
    reward: RewardConfig = Field(default_factory=RewardConfig)
    """The reward definition served at start (when Redis already holds one, Redis wins)."""
    redis_url: str | None = None
    """``redis://host:port/db`` for the shared score cache and the reward-config registry of
    several replicas; None keeps both in this process (the embedded default)."""
    redis_prefix: str = Field(default="editrl:reward", min_length=1, max_length=128)
    """Prefix of every Redis key and channel of this deployment."""
    config_poll_s: float = Field(default=5.0, gt=0.0)
    """Seconds between checks of the Redis registry, besides change notices (a lost notice is caught up)."""
    admin_token_env: str = Field(default="EDITRL_REWARD_ADMIN_TOKEN", min_length=1)
    """Environment variable holding the bearer token of the admin routes (``PUT /v1/config``);
    unset disables them (HTTP 403)."""
    cache: CacheSettings = Field(default_factory=CacheSettings)
    """The score cache."""
    judge_key_envs: list[str] = Field(default_factory=lambda: list(DEFAULT_JUDGE_KEY_ENVS))
    """Environment variables a backend's ``api_key_env`` may name (exact names); a reward config
    naming any other, at start, by ``PUT /v1/config`` or from the Redis registry, is refused
    (HTTP 422 naming ``backends.<key>.api_key_env``). Not part of the swappable reward config."""
    judge_hosts: list[str] = Field(default_factory=lambda: list(DEFAULT_JUDGE_HOSTS))
    """URLs (``scheme://host[:port][/path]``) a backend's ``base_url`` may point into (a Gemini
    judge without one calls the public API, which must be listed too); scheme and host must
    match, an entry without a port allows every port, a path is a prefix. Anything else is
    refused like a key variable (``backends.<key>.base_url``). Defaults: the public Gemini API
    and loopback (127.0.0.1, localhost, [::1])."""

    @field_validator("judge_hosts")
    @classmethod
    def _hosts_are_urls(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            parse_url(host)
        return hosts

    @model_validator(mode="after")
    def _admin_token_is_no_judge_key(self) -> "ServerConfig":
        if self.admin_token_env in self.judge_key_envs:
            raise ValueError(f"judge_key_envs must not name admin_token_env ({self.admin_token_env!r})")
        return self


def load_server_config(path: str | Path) -> ServerConfig:
    """Read a :class:`ServerConfig` from a YAML file (an empty file gives the defaults).

    Raises:
        ValueError: the file is not a YAML mapping or does not validate; the
            message names the file and the offending fields.
    """
    path = Path(path)
    with path.open("r", encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return ServerConfig.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(f"{path}: invalid reward server config:\n{exc}") from exc
