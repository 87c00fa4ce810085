"""The server's shared state: the score cache and the reward-config store, in process or in Redis."""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from editrl.reward_server.cache import InProcessCache, RedisCache, ScoreCache
from editrl.reward_server.config import ServerConfig
from editrl.reward_server.config_store import ConfigStore, InProcessConfigStore, RedisConfigStore

logger = logging.getLogger(__name__)

REPLICA_ID = f"{socket.gethostname()}:{os.getpid()}"
"""This server process (``host:pid``): the owner named in its score claims."""


@dataclass
class SharedState:
    """What a server process keeps beyond its backends."""

    cache: ScoreCache | None
    """The score cache; None when caching is disabled."""
    store: ConfigStore
    """Where the active reward config lives."""


def redacted(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


@contextlib.asynccontextmanager
async def open_state(config: ServerConfig) -> AsyncIterator[SharedState]:
    """In-process cache and store, or Redis ones when ``config.redis_url`` is set.

    Raises:
        RuntimeError: Redis is configured but unreachable at start (the message
            names the URL without its password).
    """
    if config.redis_url is None:
        cache = InProcessCache(config.cache.max_entries) if config.cache.enabled else None
        yield SharedState(cache=cache, store=InProcessConfigStore())
        return
    client = aioredis.Redis.from_url(config.redis_url, socket_timeout=10.0, socket_connect_timeout=5.0)
    try:
        try:
            await client.ping()
        except (RedisError, OSError) as exc:
            raise RuntimeError(f"Redis at {redacted(config.redis_url)} is unreachable: {exc}") from exc
        logger.info("using Redis at %s (prefix %s)", redacted(config.redis_url), config.redis_prefix)
        cache = (
            RedisCache(client, config.redis_prefix, config.cache.ttl_s, config.cache.claim_lease_s, owner=REPLICA_ID)
            if config.cache.enabled else None
        )
        try:
            yield SharedState(cache=cache, store=RedisConfigStore(client, config.redis_prefix, config.config_poll_s))
        finally:
            if cache is not None:
                await cache.close()
    finally:
        await client.aclose()
