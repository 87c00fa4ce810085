"""One ``POST /v1/score`` request through the cache, the backends and the aggregation.

For every backend of the request's runtime and every item: look the item up in
the score cache; join a scoring of the same item already in flight in this
process; with a shared cache, claim the item so that other replicas wait for
this one's result; score what is left through the backend's executor; store the
successes. Videos are decoded only for items some backend has to score, each
distinct video of a request once; raw-frame videos are not decoded at all. Then
each item's dimensions are merged under their config names and aggregated; a
failure is an explicit ``ok: false`` with the reason, never a zero.
"""
from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from editrl.protocol.reward import ItemScore, ScoreItem, ScoreRequest, VideoPayload
from editrl.protocol.video import (
    DecodeBudget, ImageDecodeError, VideoDecodeError, VideoTooLargeError, decode_image, decode_video,
)
from editrl.reward_server.backends import BackendResult, ScoreInput
from editrl.reward_server.cache import ScoreCache, cache_key, content_digest
from editrl.reward_server.metrics import Metrics
from editrl.reward_server.reward_config import AggregationError
from editrl.reward_server.runtime import ActiveBackend, Runtime

logger = logging.getLogger(__name__)


class UndecodableInputs(Exception):
    """Videos or images of the request cannot be decoded; ``errors`` are FastAPI-style details."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(error["msg"] for error in errors))
        self.errors = errors

    @property
    def status_code(self) -> int:
        """413 when a video is past the decode budget, else 422."""
        return 413 if any(error["type"] == "video_too_large" for error in self.errors) else 422

    @property
    def detail(self) -> str | list[dict[str, Any]]:
        """The response's ``detail``: for 413 the messages joined (a string, as for a body over
        the size limit; each names ``items[i].field`` and the item id), for 422 the errors."""
        return str(self) if self.status_code == 413 else self.errors


@dataclass
class _Wire:
    """One request item's raw bytes and digests."""

    item: ScoreItem
    source: bytes
    edited: bytes
    reference: bytes | None
    digests: tuple[str, str, str | None]


class _Decoded:
    """Each distinct video of one request decoded once, keyed by its content digest
    (a GRPO group sends its source video with every one of its G items), each within
    ``budget`` (raw frames too, by their shape)."""

    def __init__(self, budget: DecodeBudget | None = None) -> None:
        self._videos: dict[str, np.ndarray | tuple[str, VideoDecodeError]] = {}
        self.budget = budget if budget is not None else DecodeBudget()

    def video(self, payload: VideoPayload, data: bytes, digest: str, what: str) -> np.ndarray:
        """``uint8 (F, H, W, 3)`` frames (read-only for raw payloads, shared between items).

        Raises:
            VideoTooLargeError: the video is past the budget.
            VideoDecodeError: the mp4 cannot be decoded (both raised again for every item that sends it).
        """
        if digest not in self._videos:
            try:
                if payload.format == "raw":
                    self.budget.check(*payload.shape[:3], what=what, note="raw frames of that shape")  # type: ignore[index]
                    self._videos[digest] = payload.to_frames()
                else:
                    self._videos[digest] = decode_video(data, what=what, budget=self.budget)
            except VideoDecodeError as exc:
                self._videos[digest] = (what, exc)
        found = self._videos[digest]
        if isinstance(found, tuple):
            first_what, exc = found
            message = str(exc)
            raise type(exc)(what + message[len(first_what):] if message.startswith(first_what) else message)
        return found


def decode_item(index: int, wire: _Wire, decoded: _Decoded | None = None) -> tuple[ScoreInput | None, list[dict[str, Any]]]:
    """Decode one item's videos (and reference image); errors name ``items[i].field``.

    Raw-frame videos are viewed, not decoded; ``decoded`` shares videos between
    the items of one request. ``source_bytes``/``edited_bytes`` of the result
    are the mp4 files as sent (None for raw frames).
    """
    item, errors, frames = wire.item, [], {}
    decoded = decoded if decoded is not None else _Decoded()
    for field, payload, data, digest in (("source", item.source, wire.source, wire.digests[0]),
                                         ("edited", item.edited, wire.edited, wire.digests[1])):
        what = f"items[{index}].{field} (item_id={item.item_id})"
        try:
            frames[field] = decoded.video(payload, data, digest, what)
        except VideoDecodeError as exc:
            kind = "video_too_large" if isinstance(exc, VideoTooLargeError) else "video_decode_error"
            errors.append({"loc": ["body", "items", index, field, "data"], "msg": str(exc), "type": kind})
    reference = None
    if wire.reference is not None:
        try:
            reference = decode_image(wire.reference, what=f"items[{index}].reference (item_id={item.item_id})")
        except ImageDecodeError as exc:
            errors.append({"loc": ["body", "items", index, "reference", "data"], "msg": str(exc), "type": "image_decode_error"})
    if errors:
        return None, errors
    return ScoreInput(
        instruction=item.instruction, source=frames["source"], edited=frames["edited"], item_id=item.item_id,
        reference=reference, category=item.category,
        source_bytes=wire.source if item.source.format == "mp4" else None,
        edited_bytes=wire.edited if item.edited.format == "mp4" else None,
    ), []


INLINE_BYTES = 1 << 20
"""Requests whose videos and images hold at most this many base64 characters in
all, and need no mp4 decoding, are hashed and viewed on the event loop (well under
a millisecond) instead of in a worker thread (a round trip through the thread
pool costs about as much again)."""


def _wire_items(request: ScoreRequest) -> list[_Wire]:
    """Bytes and content digests of every item; each distinct video is hashed once
    (a group repeats its source video in every item)."""
    wires = []
    seen: dict[tuple[str, tuple[int, ...] | None, str], tuple[bytes, str]] = {}

    def video(payload: VideoPayload) -> tuple[bytes, str]:
        key = (payload.format, payload.shape, payload.data)
        if key not in seen:
            seen[key] = (payload.to_bytes(), content_digest(payload.identity()))
        return seen[key]

    for item in request.items:
        (source, source_digest), (edited, edited_digest) = video(item.source), video(item.edited)
        reference = item.reference.to_bytes() if item.reference is not None else None
        digests = (source_digest, edited_digest, content_digest(reference) if reference else None)
        wires.append(_Wire(item, source, edited, reference, digests))
    return wires


def _payload_chars(request: ScoreRequest) -> int:
    """Base64 characters of all of the request's videos and images."""
    return sum(len(i.source.data) + len(i.edited.data) + (len(i.reference.data) if i.reference else 0) for i in request.items)


def _needs_decoding(wires: list[_Wire], needed: list[int]) -> bool:
    """Whether any needed item has an mp4 video or a reference image to decode."""
    return any(wires[i].item.source.format == "mp4" or wires[i].item.edited.format == "mp4" or wires[i].reference is not None
               for i in needed)


def _decode_all(wires: list[_Wire], needed: list[int], budget: DecodeBudget | None = None) -> dict[int, ScoreInput]:
    inputs, errors = {}, []
    decoded = _Decoded(budget)
    for index in needed:
        item_input, problems = decode_item(index, wires[index], decoded)
        errors.extend(problems)
        if item_input is not None:
            inputs[index] = item_input
    if errors:
        raise UndecodableInputs(errors)
    return inputs


class Scorer:
    """Scores requests on a runtime with a score cache.

    Args:
        cache: the score cache, or None to score everything.
        metrics: the app's collectors.
        budget: the most frames and pixels each video of a request may decode to (None: no limit).
    """

    def __init__(self, cache: ScoreCache | None, metrics: Metrics, budget: DecodeBudget | None = None) -> None:
        self.cache = cache
        self.metrics = metrics
        self.budget = budget
        self._flights: dict[str, asyncio.Future[BackendResult]] = {}

    async def score(self, runtime: Runtime, request: ScoreRequest) -> list[ItemScore]:
        """Per-item scores of ``request`` in request order.

        Raises:
            UndecodableInputs: a video or the reference image of an item that had
                to be scored cannot be decoded (HTTP 422 naming the item and field),
                or a video is past the decode budget (HTTP 413).
        """
        inline = _payload_chars(request) <= INLINE_BYTES
        wires = _wire_items(request) if inline else await asyncio.to_thread(_wire_items, request)
        keys = {
            active.key: [cache_key(active.fingerprint, w.item.instruction, w.item.category, *w.digests) for w in wires]
            for active in runtime.backends
        }
        found: dict[str, list[dict[str, Any] | None]] = {}
        for active in runtime.backends:
            found[active.key] = await self.cache.get_many(keys[active.key]) if self.cache is not None else [None] * len(wires)
            hits = sum(entry is not None for entry in found[active.key])
            self.metrics.cache_hits.labels(backend=active.label).inc(hits)
            self.metrics.cache_misses.labels(backend=active.label).inc(len(wires) - hits)
        needed = sorted({i for a in runtime.backends for i, entry in enumerate(found[a.key]) if entry is None})
        if not needed:
            inputs = {}
        elif inline and not _needs_decoding(wires, needed):
            inputs = _decode_all(wires, needed, self.budget)  # raw frames: views, nothing to decode
        else:
            inputs = await asyncio.to_thread(_decode_all, wires, needed, self.budget)
        per_backend = await asyncio.gather(*(
            self._resolve(active, keys[active.key], found[active.key], inputs) for active in runtime.backends
        ))
        return [self._compose(runtime, i, wire.item.item_id, per_backend) for i, wire in enumerate(wires)]

    async def _resolve(
        self, active: ActiveBackend, keys: list[str], found: list[dict[str, Any] | None], inputs: dict[int, ScoreInput]
    ) -> list[tuple[BackendResult, bool]]:
        """(result, from the cache) per item for one backend."""
        results: list[BackendResult | None] = [None] * len(keys)
        cached = [entry is not None for entry in found]
        for i, entry in enumerate(found):
            if entry is not None:
                results[i] = _from_entry(entry)
        mine: dict[str, list[int]] = {}
        joined: dict[str, list[int]] = {}
        loop = asyncio.get_running_loop()
        for i, key in enumerate(keys):
            if results[i] is not None:
                continue
            if key in mine:
                mine[key].append(i)
            elif key in joined:
                joined[key].append(i)
            elif key in self._flights:
                joined[key] = [i]
                self.metrics.cache_joins.labels(backend=active.label).inc()
            else:
                mine[key] = [i]
                self._flights[key] = loop.create_future()
        futures = {key: self._flights[key] for key in joined}
        try:
            computed = await self._compute(active, {key: inputs[indices[0]] for key, indices in mine.items()})
        except BaseException as exc:
            for key in mine:
                future = self._flights.pop(key)
                if not future.done():
                    future.set_result(BackendResult(error=f"scoring interrupted: {type(exc).__name__}"))
            raise
        for key, indices in mine.items():
            self._flights.pop(key).set_result(computed[key])
            for i in indices:
                results[i] = computed[key]
        for key, indices in joined.items():
            result = await asyncio.shield(futures[key])
            for i in indices:
                results[i] = result
        return [(result, hit) for result, hit in zip(results, cached)]  # type: ignore[misc]

    async def _compute(self, active: ActiveBackend, todo: dict[str, ScoreInput]) -> dict[str, BackendResult]:
        """Score ``todo`` (cache key -> item). With a shared cache each item is claimed first; an
        item another replica stored meanwhile is taken from the cache, one claimed elsewhere is
        awaited, and scored here when that claim lapses without a score."""
        if not todo:
            return {}
        cache = self.cache
        if cache is None or not cache.shared:
            return await self._run(active, todo)
        claims = await asyncio.gather(*(cache.claim(key) for key in todo))
        claimed = [key for key, ok in zip(todo, claims) if ok]
        elsewhere = [key for key, ok in zip(todo, claims) if not ok]
        done: dict[str, BackendResult] = {}
        try:
            # another replica may have stored the score and released its claim after our lookup
            for key, entry in zip(claimed, await cache.get_many(claimed)):
                if entry is not None:
                    done[key] = _from_entry(entry)
                    self.metrics.cache_joins.labels(backend=active.label).inc()
            await asyncio.gather(*(cache.release(key) for key in done))

            async def wait(key: str) -> tuple[str, BackendResult | None]:
                entry = await cache.wait_for(key)
                return key, (_from_entry(entry) if entry is not None else None)

            mine = {key: todo[key] for key in claimed if key not in done}
            scored, *waited = await asyncio.gather(self._run(active, mine), *(wait(key) for key in elsewhere))
            done.update(scored)
            taken_over = {}
            for key, result in waited:
                if result is None:
                    taken_over[key] = todo[key]  # the other claim ended without a score: ours now
                else:
                    done[key] = result
                    self.metrics.cache_joins.labels(backend=active.label).inc()
            done.update(await self._run(active, taken_over))
        finally:
            await asyncio.gather(*(cache.release(key) for key in todo))
        return done

    async def _run(self, active: ActiveBackend, todo: dict[str, ScoreInput]) -> dict[str, BackendResult]:
        """Score through the executor, count failures, store successes."""
        if not todo:
            return {}
        items = list(todo.values())
        try:
            results = await active.executor.submit(items)
        except Exception as exc:  # noqa: BLE001 - the backend failed the whole call
            message = f"backend {active.label!r} failed on the batch: {type(exc).__name__}: {exc}"
            results = [BackendResult(item_id=item.item_id, error=message) for item in items]
        out = dict(zip(todo, results))
        self.metrics.backend_errors.labels(backend=active.label).inc(sum(not r.ok for r in results))
        if self.cache is not None:
            storable = {key: _to_entry(r) for key, r in out.items() if r.ok and _finite(r.dimensions)}
            await self.cache.put_many(storable)
        return out

    def _compose(
        self, runtime: Runtime, index: int, item_id: str, per_backend: list[list[tuple[BackendResult, bool]]]
    ) -> ItemScore:
        config = runtime.config
        dimensions: dict[str, float | None] = {}
        reasons: dict[str, str] = {}
        errors: dict[str, str] = {}
        all_cached = True
        for active, results in zip(runtime.backends, per_backend):
            result, hit = results[index]
            all_cached = all_cached and hit
            if result.ok:
                for name, value in (result.dimensions or {}).items():
                    dimensions[config.dimension_name(active.key, name)] = value
                if result.reason:
                    reasons[active.label] = result.reason
            else:
                errors[active.label] = result.error or "no result"
                for name in active.backend.dimensions:
                    dimensions[config.dimension_name(active.key, name)] = None
        common = dict(item_id=item_id, backends=runtime.versions, cached=all_cached, reasons=reasons, backend_errors=errors)
        labels = [active.label for active in runtime.backends]
        error = "; ".join(f"{label}: {message}" for label, message in errors.items()) or None
        if errors and not config.allow_partial:
            for label in errors:
                self.metrics.item_errors.labels(backend=label).inc()
            return ItemScore(ok=False, error=error, dimensions=_finite_or_none(dimensions), **common)
        try:
            reward = config.aggregate(dimensions)
        except AggregationError as exc:
            for label in labels:
                self.metrics.item_errors.labels(backend=label).inc()
            message = f"{exc}; {error}" if error else str(exc)
            return ItemScore(ok=False, error=message, dimensions=_finite_or_none(dimensions), **common)
        for label in labels:
            self.metrics.items_scored.labels(backend=label).inc()
        return ItemScore(ok=True, reward=reward, dimensions=dimensions, **common)


def _from_entry(entry: dict[str, Any]) -> BackendResult:
    return BackendResult(dimensions=dict(entry["dimensions"]), reason=entry.get("reason"))


def _to_entry(result: BackendResult) -> dict[str, Any]:
    return {"dimensions": result.dimensions, "reason": result.reason}


def _finite(dimensions: dict[str, float | None] | None) -> bool:
    return dimensions is not None and all(v is None or math.isfinite(v) for v in dimensions.values())


def _finite_or_none(dimensions: dict[str, float | None]) -> dict[str, float | None]:
    return {k: (v if v is None or math.isfinite(v) else None) for k, v in dimensions.items()}
