"""Where the active reward config lives: in this process, or in Redis for several replicas.

Every accepted change gets a new *revision* (an increasing integer). With Redis
the config is a hash ``<prefix>:config`` (``revision``, ``version``, ``config``
as canonical JSON) and a change publishes its revision on the channel
``<prefix>:config:changed``. Replicas subscribe to that channel and also re-read
the hash every ``poll_s`` seconds (a notice lost during a reconnect is caught
up), and switch when they see a higher revision. Changes are atomic (a Lua
script), so two concurrent ``PUT`` s get distinct revisions.

A version names one definition: publishing a different config under the version
already active is a :class:`ConfigConflict`; publishing the active config again
changes nothing.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from editrl.reward_server.reward_config import RewardConfig

logger = logging.getLogger(__name__)

OnChange = Callable[[RewardConfig, int], Awaitable[None]]


class ConfigConflict(ValueError):
    """A different config was published under the version that is already active."""


def canonical_json(config: RewardConfig) -> str:
    """The config as JSON with sorted keys: equal configs give equal strings."""
    return json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


class ConfigStore(Protocol):
    async def start(self, initial: RewardConfig) -> tuple[RewardConfig, int]: ...
    async def publish(self, config: RewardConfig) -> tuple[int, bool]: ...
    def follow(self, on_change: OnChange) -> None: ...
    async def close(self) -> None: ...


class InProcessConfigStore:
    """The config of a single server process (no Redis)."""

    def __init__(self) -> None:
        self._config: RewardConfig | None = None
        self._revision = 0

    async def start(self, initial: RewardConfig) -> tuple[RewardConfig, int]:
        """Adopt ``initial`` as revision 1."""
        self._config, self._revision = initial, 1
        return initial, 1

    async def publish(self, config: RewardConfig) -> tuple[int, bool]:
        """Make ``config`` active; returns (revision, changed).

        Raises:
            ConfigConflict: another config is active under the same version.
        """
        assert self._config is not None, "start() first"
        if canonical_json(config) == canonical_json(self._config):
            return self._revision, False
        if config.version == self._config.version:
            raise ConfigConflict(f"version {config.version!r} is active with a different definition")
        self._config = config
        self._revision += 1
        return self._revision, True

    def follow(self, on_change: OnChange) -> None:
        return None  # nothing else can change it

    async def close(self) -> None:
        return None


# KEYS[1] = hash, ARGV = version, canonical json, channel.
# Returns {revision, changed (1/0)}, or {-1, 0} on a version conflict.
_PUBLISH = """
local current_version = redis.call('HGET', KEYS[1], 'version')
if current_version then
  local current_config = redis.call('HGET', KEYS[1], 'config')
  if current_config == ARGV[2] then
    return {tonumber(redis.call('HGET', KEYS[1], 'revision')), 0}
  end
  if current_version == ARGV[1] then
    return {-1, 0}
  end
end
local revision = redis.call('HINCRBY', KEYS[1], 'revision', 1)
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'config', ARGV[2])
redis.call('PUBLISH', ARGV[3], revision)
return {revision, 1}
"""

# KEYS[1] = hash, ARGV = version, canonical json. Seeds the registry if it is empty.
_SEED = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'revision', 1, 'version', ARGV[1], 'config', ARGV[2])
end
return redis.call('HMGET', KEYS[1], 'revision', 'config')
"""


class RedisConfigStore:
    """The reward-config registry in Redis, shared by every replica with the same ``prefix``.

    Args:
        client: a ``redis.asyncio`` client (owned by the caller).
        prefix: key prefix of this deployment.
        poll_s: seconds between re-reads of the registry besides change notices.
    """

    def __init__(self, client: aioredis.Redis, prefix: str, poll_s: float = 5.0) -> None:
        self._client = client
        self.key = f"{prefix}:config"
        self.channel = f"{prefix}:config:changed"
        self._poll_s = poll_s
        self._publish = client.register_script(_PUBLISH)
        self._seed = client.register_script(_SEED)
        self._task: asyncio.Task[None] | None = None
        self._seen = 0

    async def start(self, initial: RewardConfig) -> tuple[RewardConfig, int]:
        """The registry's config and revision, seeding it with ``initial`` when it is empty.

        Raises:
            RedisError: Redis is unreachable.
            ValueError: the registry holds a config this server cannot read.
        """
        revision, raw = await self._seed(keys=[self.key], args=[initial.version, canonical_json(initial)])
        config = RewardConfig.model_validate_json(raw)
        self._seen = int(revision)
        return config, self._seen

    async def publish(self, config: RewardConfig) -> tuple[int, bool]:
        """Make ``config`` the registry's active config and notify every replica.

        Returns:
            (revision, changed); ``changed`` is False when it was already active.

        Raises:
            ConfigConflict: another config is active under the same version.
            RedisError: Redis is unreachable.
        """
        revision, changed = await self._publish(
            keys=[self.key], args=[config.version, canonical_json(config), self.channel]
        )
        if int(revision) < 0:
            raise ConfigConflict(f"version {config.version!r} is active with a different definition")
        self._seen = max(self._seen, int(revision))
        return int(revision), bool(changed)

    async def read(self) -> tuple[RewardConfig, int] | None:
        """The registry's (config, revision), or None when it is empty."""
        revision, raw = await self._client.hmget(self.key, ["revision", "config"])
        if revision is None or raw is None:
            return None
        return RewardConfig.model_validate_json(raw), int(revision)

    def follow(self, on_change: OnChange) -> None:
        """Call ``on_change(config, revision)`` for every later revision (background task)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._follow(on_change), name="reward-config-follower")

    async def _follow(self, on_change: OnChange) -> None:
        while True:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                await self._catch_up(on_change)  # anything published before the subscription
                while True:
                    await pubsub.get_message(ignore_subscribe_messages=True, timeout=self._poll_s)
                    await self._catch_up(on_change)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                logger.warning("reward-config follower lost Redis (%s); retrying in %.1f s", exc, self._poll_s)
                await asyncio.sleep(self._poll_s)
            finally:
                try:
                    await pubsub.aclose()
                except (RedisError, OSError):
                    pass

    async def _catch_up(self, on_change: OnChange) -> None:
        try:
            current = await self.read()
        except ValueError as exc:
            logger.error("the reward-config registry %s holds an unreadable config: %s", self.key, exc)
            return
        if current is not None and current[1] > self._seen:
            self._seen = current[1]
            try:
                await on_change(*current)
            except Exception:  # noqa: BLE001 - a replica that cannot apply a change keeps serving and says so
                logger.exception("could not apply reward config revision %d", current[1])

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
