"""Content-addressed score cache: in process (the embedded default) or in Redis (shared by replicas).

A key is the SHA-256 of the backend's fingerprint (name, version, rubric and
model settings), the instruction, the edit category and the SHA-256 of each
video's and the reference image's bytes as sent, so the same item scored by the
same backend definition is looked up instead of scored again: a retried request
never costs a second judge call. Only successful scores are stored; failures
are scored again on the next attempt. Values are JSON (never pickle).

With Redis, a replica about to score an item first *claims* its key: ``SET NX``
of an owner token (replica id and a random part) with a short lease, which the
owner renews in the background while it scores and deletes only while it still
owns it (compare-and-delete). Another replica asked for the same item meanwhile
waits for the result instead of scoring it twice, and takes the item over
(claims and scores it itself) when the lease lapses: a replica killed mid-batch
holds its items up for at most one lease. Redis being unreachable degrades to
no caching (logged), never to failed requests.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
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
    async def claim(self, key: str) -> bool:
        """Whether this process may score ``key`` now (it then calls :meth:`release` when done)."""
        ...

    async def release(self, key: str) -> None:
        """End this process's claim on ``key`` (nothing if it holds none)."""
        ...

    async def wait_for(self, key: str) -> dict[str, Any] | None:
        """The entry another process stores for ``key``, or None once this process holds the claim
        (it scores ``key`` itself and calls :meth:`release`)."""
        ...

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


_RENEW = """
local renewed = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i + 1] then
    redis.call('PEXPIRE', key, ARGV[1])
    renewed[i] = 1
  else
    renewed[i] = 0
  end
end
return renewed
"""
"""Extend every claim in KEYS whose value is still its owner token (ARGV[i + 1]) to ARGV[1] ms."""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
"""Delete the claim KEYS[1] only while its value is the owner token ARGV[1]."""


class RedisCache:
    """Scores in Redis under ``<prefix>:score:<key>`` with a time to live; claims under ``<prefix>:claim:<key>``.

    A claim's value is ``<owner>:<random hex>``; it lives ``claim_lease_s`` and is
    renewed every third of that by a background task while this process holds it.

    Args:
        client: a ``redis.asyncio`` client.
        prefix: key prefix of this deployment.
        ttl_s: seconds an entry lives.
        claim_lease_s: seconds a claim lives without renewal (a crashed owner's claim
            lapses after at most this long and a waiter takes the item over).
        owner: who claims (the replica id, ``host:pid``); logged and stored in the claim.
        poll_initial_s: first wait between checks in :meth:`wait_for`, doubled up to
            a quarter of the lease (at most 0.5 s).
    """

    shared = True

    def __init__(
        self, client: aioredis.Redis, prefix: str, ttl_s: float, claim_lease_s: float, owner: str = "replica",
        poll_initial_s: float = 0.05,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._lease_ms = max(1, int(claim_lease_s * 1000))
        self._lease_s = claim_lease_s
        self.owner = owner
        self._poll_initial_s = min(poll_initial_s, claim_lease_s / 4)
        self._poll_max_s = min(0.5, claim_lease_s / 4)
        self._held: dict[str, str] = {}
        self._renewer: asyncio.Task[None] | None = None
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def _score_key(self, key: str) -> str:
        return f"{self._prefix}:score:{key}"

    def _claim_key(self, key: str) -> str:
        return f"{self._prefix}:claim:{key}"

    @property
    def held(self) -> frozenset[str]:
        """Keys whose claim this process holds (and renews)."""
        return frozenset(self._held)

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
        """``SET NX`` of a fresh owner token with the lease; True when this process now holds
        ``key`` (or Redis failed: then it scores without a claim)."""
        if key in self._held:
            return True
        token = f"{self.owner}:{secrets.token_hex(8)}"
        try:
            won = bool(await self._client.set(self._claim_key(key), token, nx=True, px=self._lease_ms))
        except RedisError as exc:
            logger.warning("score cache claim failed, scoring anyway: %s", exc)
            return True
        if won:
            self._held[key] = token
            if self._renewer is None or self._renewer.done():
                self._renewer = asyncio.get_running_loop().create_task(self._renew_loop(), name="claim-renewal")
        return won

    async def _renew_loop(self) -> None:
        """Extend every held claim each third of the lease until none is held; a claim found
        owned by someone else (lapsed while this process stalled) is dropped with a warning."""
        while self._held:
            await asyncio.sleep(self._lease_s / 3)
            held = dict(self._held)
            if not held:
                return
            try:
                renewed = await self._renew(
                    keys=[self._claim_key(k) for k in held], args=[self._lease_ms, *held.values()]
                )
            except RedisError as exc:
                logger.warning("renewing %d score claims failed: %s", len(held), exc)
                continue
            for (key, token), ok in zip(held.items(), renewed):
                if not ok and self._held.get(key) == token:
                    del self._held[key]
                    logger.warning("score claim %s lapsed before it was renewed; another replica may score it", key)

    async def release(self, key: str) -> None:
        """Delete the claim on ``key`` if this process still owns it (another owner's claim stays)."""
        token = self._held.pop(key, None)
        if token is None:
            return
        try:
            await self._release(keys=[self._claim_key(key)], args=[token])
        except RedisError as exc:
            logger.warning("score cache release failed (the claim lapses by itself): %s", exc)

    async def wait_for(self, key: str) -> dict[str, Any] | None:
        """Wait for another replica's score of ``key``.

        Returns:
            The stored entry, or None once this process has claimed ``key`` itself
            (the other claim ended without a score, e.g. its lease lapsed after a
            crash): the caller then scores it and calls :meth:`release`. On a Redis
            error, None without a claim (the caller scores anyway).
        """
        delay = self._poll_initial_s
        try:
            while True:
                entry = _decode_entry(await self._client.get(self._score_key(key)))
                if entry is not None:
                    return entry
                if not await self._client.exists(self._claim_key(key)) and await self.claim(key):
                    entry = _decode_entry(await self._client.get(self._score_key(key)))
                    if entry is not None:  # stored between the lookup and the claim
                        await self.release(key)
                        return entry
                    logger.info("took over score claim %s (its owner ended without a score)", key)
                    return None
                await asyncio.sleep(delay)
                delay = min(self._poll_max_s, delay * 2)
        except RedisError as exc:
            logger.warning("waiting for a shared score failed, scoring it here: %s", exc)
        return None

    async def close(self) -> None:
        """Stop renewing (claims still held lapse after their lease); the client belongs to the caller."""
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
