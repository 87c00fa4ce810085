"""Content-addressed score cache: in process (the embedded default) or in Redis (shared by replicas).

A key is the SHA-256 of the backend's fingerprint (name, version, rubric and
model settings), the instruction, the edit category and the SHA-256 of each
video's and the reference image's bytes as sent, so the same item scored by the
same backend definition is looked up instead of scored again: a retried request
never costs a second judge call. Only successful scores are stored; failures
are scored again on the next attempt. Values are JSON (never pickle).

With Redis, a replica about to score an item first *claims* its key (``SET NX``
with a time limit); another replica asked for the same item meanwhile waits for
the result instead of scoring it twice. Redis being unreachable degrades to no
caching (logged), never to failed requests.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import OrderedDict
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

CACHE_SCHEMA = "score-cache-v1"


def content_digest(data: bytes) -> str:
    """SHA-256 hex digest of ``data`` (a video or image file as sent)."""
    return hashlib.sha256(data).hexdigest()


def cache_key(
    backend_fingerprint: str,
    instruction: str,
    category: str | None,
    source_digest: str,
    edited_digest: str,
    reference_digest: str | None,
) -> str:
    """The cache key (64 hex characters) of one item scored by one backend definition."""
    payload = json.dumps(
        [CACHE_SCHEMA, backend_fingerprint, instruction, category, source_digest, edited_digest, reference_digest],
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _decode_entry(raw: bytes | str | None) -> dict[str, Any] | None:
    """A stored entry, or None when absent or not a valid entry (treated as a miss)."""
    if raw is None:
        return None
    try:
        entry = json.loads(raw)
    except (TypeError, ValueError):
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("dimensions"), dict):
        return None
    return entry


class ScoreCache(Protocol):
    """Where scores are looked up and stored; entries are ``{"dimensions": {...}, "reason": str | None}``."""

    shared: bool
    """Whether other processes see the entries (Redis) or not (in process)."""

    async def get_many(self, keys: list[str]) -> list[dict[str, Any] | None]: ...
    async def put_many(self, entries: dict[str, dict[str, Any]]) -> None: ...
    async def claim(self, key: str) -> bool: ...
    async def release(self, key: str) -> None: ...
    async def wait_for(self, key: str) -> dict[str, Any] | None: ...
    async def close(self) -> None: ...


class InProcessCache:
    """A bounded least-recently-used cache in this process.

    Args:
        max_entries: entries kept; the least recently used go first.
    """

    shared = False

    def __init__(self, max_entries: int = 65536) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, str] = OrderedDict()

    async def get_many(self, keys: list[str]) -> list[dict[str, Any] | None]:
        found = []
        for key in keys:
            raw = self._entries.get(key)
            if raw is not None:
                self._entries.move_to_end(key)
            found.append(_decode_entry(raw))
        return found

    async def put_many(self, entries: dict[str, dict[str, Any]]) -> None:
        for key, entry in entries.items():
            self._entries[key] = json.dumps(entry)
            self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def claim(self, key: str) -> bool:
        return True  # one process: concurrent duplicates are joined before they get here

    async def release(self, key: str) -> None:
        return None

    async def wait_for(self, key: str) -> dict[str, Any] | None:
        return (await self.get_many([key]))[0]

    async def close(self) -> None:
        self._entries.clear()


class RedisCache:
    """Scores in Redis under ``<prefix>:score:<key>`` with a time to live; claims under ``<prefix>:claim:<key>``.

    Args:
        client: a ``redis.asyncio`` client.
        prefix: key prefix of this deployment.
        ttl_s: seconds an entry lives.
        claim_ttl_s: seconds a claim lasts (and the longest :meth:`wait_for` waits).
        poll_initial_s: first wait between checks in :meth:`wait_for`, doubled up to 0.5 s.
    """

    shared = True

    def __init__(
        self, client: aioredis.Redis, prefix: str, ttl_s: float, claim_ttl_s: float, poll_initial_s: float = 0.05
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._claim_ttl_ms = max(1, int(claim_ttl_s * 1000))
        self._claim_ttl_s = claim_ttl_s
        self._poll_initial_s = poll_initial_s

    def _score_key(self, key: str) -> str:
        return f"{self._prefix}:score:{key}"

    def _claim_key(self, key: str) -> str:
        return f"{self._prefix}:claim:{key}"

    async def get_many(self, keys: list[str]) -> list[dict[str, Any] | None]:
        if not keys:
            return []
        try:
            raw = await self._client.mget([self._score_key(k) for k in keys])
        except RedisError as exc:
            logger.warning("score cache lookup failed, scoring without it: %s", exc)
            return [None] * len(keys)
        return [_decode_entry(value) for value in raw]

    async def put_many(self, entries: dict[str, dict[str, Any]]) -> None:
        if not entries:
            return
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key, entry in entries.items():
                    pipe.set(self._score_key(key), json.dumps(entry), px=self._ttl_ms)
                await pipe.execute()
        except RedisError as exc:
            logger.warning("score cache store failed: %s", exc)

    async def claim(self, key: str) -> bool:
        try:
            return bool(await self._client.set(self._claim_key(key), "1", nx=True, px=self._claim_ttl_ms))
        except RedisError as exc:
            logger.warning("score cache claim failed, scoring anyway: %s", exc)
            return True

    async def release(self, key: str) -> None:
        try:
            await self._client.delete(self._claim_key(key))
        except RedisError as exc:
            logger.warning("score cache release failed (the claim expires by itself): %s", exc)

    async def wait_for(self, key: str) -> dict[str, Any] | None:
        """Wait for another replica's score of ``key``; None when its claim ended without one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._claim_ttl_s
        delay = self._poll_initial_s
        try:
            while loop.time() < deadline:
                entry = _decode_entry(await self._client.get(self._score_key(key)))
                if entry is not None:
                    return entry
                if not await self._client.exists(self._claim_key(key)):
                    return _decode_entry(await self._client.get(self._score_key(key)))
                await asyncio.sleep(delay)
                delay = min(0.5, delay * 2)
        except RedisError as exc:
            logger.warning("waiting for a shared score failed: %s", exc)
        return None

    async def close(self) -> None:
        return None  # the client belongs to the caller
