"""The reward server's HTTP API (FastAPI).

Routes:

* ``GET /healthz`` -> ``{"status": "ok"}``.
* ``POST /v1/score``: :class:`protocol.reward.ScoreRequest` ->
  :class:`protocol.reward.ScoreResponse`. Videos are decoded in a worker thread;
  an undecodable one is HTTP 422 naming the item and field. Decoded items go
  through a :class:`reward_server.batching.DynamicBatcher`, so items of concurrent
  requests share backend calls. Items the backend or the aggregation could not
  score come back with ``ok=False``, an ``error`` and ``reward=None`` (the
  response is still 200).
* ``GET /v1/config``: the active reward config.
* ``GET /metrics``: Prometheus text exposition of a registry private to the app.

Bodies larger than ``max_request_bytes`` get HTTP 413 (FastAPI's ``max_body_size``
checks both the Content-Length header and the bytes actually received);
malformed JSON and schema violations get FastAPI's 422 naming the field.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool

from protocol.reward import ItemScore, ScoreRequest, ScoreResponse
from protocol.video import VideoDecodeError, decode_video
from reward_server.backends import Backend, PixelInput, PixelResult, get_backend
from reward_server.batching import DynamicBatcher
from reward_server.config import AggregationError, ServerConfig

logger = logging.getLogger(__name__)

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _Metrics:
    """The app's Prometheus collectors, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.batch_size = Histogram(
            "reward_batch_size", "Items per backend scoring call.", buckets=_BATCH_BUCKETS, registry=self.registry
        )
        self.batch_seconds = Histogram(
            "reward_batch_seconds", "Seconds per backend scoring call.", buckets=_LATENCY_BUCKETS, registry=self.registry
        )
        self.request_latency = Histogram(
            "reward_request_latency_seconds",
            "Seconds to answer POST /v1/score, decoding and queueing included.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.items_scored = Counter(
            "reward_items_scored", "Items that got a reward.", labelnames=("backend",), registry=self.registry
        )
        self.item_errors = Counter(
            "reward_item_errors", "Items returned with ok=False.", labelnames=("backend",), registry=self.registry
        )

    def on_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)


class _UndecodableVideos(Exception):
    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(error["msg"] for error in errors))
        self.errors = errors


def _decode_items(request: ScoreRequest) -> list[PixelInput]:
    """Decode every video of the request; collect all failures into one exception."""
    inputs: list[PixelInput] = []
    errors: list[dict[str, Any]] = []
    for index, item in enumerate(request.items):
        frames = {}
        for field in ("source", "edited"):
            what = f"items[{index}].{field} (item_id={item.item_id})"
            try:
                frames[field] = decode_video(getattr(item, field).to_bytes(), what=what)
            except VideoDecodeError as exc:
                errors.append(
                    {"loc": ["body", "items", index, field, "data"], "msg": str(exc), "type": "video_decode_error"}
                )
        if len(frames) == 2:
            inputs.append(
                PixelInput(instruction=item.instruction, source=frames["source"], edited=frames["edited"], item_id=item.item_id)
            )
    if errors:
        raise _UndecodableVideos(errors)
    return inputs


def _finite_or_none(dimensions: dict[str, float | None]) -> dict[str, float | None]:
    return {k: (v if v is None or math.isfinite(v) else None) for k, v in dimensions.items()}


def create_app(config: ServerConfig, backend: Backend | None = None) -> FastAPI:
    """Build the reward server app for ``config``.

    Args:
        config: server and reward configuration.
        backend: the scoring backend; defaults to ``get_backend(config.reward.backend)``.

    Raises:
        ValueError: the reward weights name a dimension the backend does not produce.
    """
    backend = backend if backend is not None else get_backend(config.reward.backend)
    unknown = sorted(set(config.reward.weights) - set(backend.dimensions))
    if unknown:
        raise ValueError(
            f"reward weights name dimensions {unknown} that backend {backend.name!r} "
            f"does not produce (it produces {list(backend.dimensions)})"
        )
    reward_config = config.reward
    metrics = _Metrics()
    batcher: DynamicBatcher[PixelInput, PixelResult] = DynamicBatcher(
        backend.score_batch,
        max_batch_size=config.max_batch_size,
        max_wait_s=config.max_wait_s,
        on_batch=metrics.on_batch,
        name=f"{backend.name}-batcher",
    )
    backends_field = {backend.name: backend.version}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        logger.info(
            "reward server ready: backend %s (%s), reward config %s, max_batch_size=%d, max_wait_s=%g",
            backend.name, backend.version, reward_config.version, config.max_batch_size, config.max_wait_s,
        )
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(
        title="editrl reward server",
        version=backend.version,
        lifespan=lifespan,
        max_body_size=config.max_request_bytes,
    )
    app.state.config = config
    app.state.backend = backend
    app.state.metrics_registry = metrics.registry

    def to_item_score(result: PixelResult, item_id: str) -> ItemScore:
        if not result.ok:
            return ItemScore(item_id=item_id, ok=False, error=result.error, backends=backends_field)
        dimensions = result.dimensions or {}
        try:
            reward = reward_config.aggregate(dimensions)
        except AggregationError as exc:
            return ItemScore(
                item_id=item_id, ok=False, dimensions=_finite_or_none(dimensions), error=str(exc), backends=backends_field
            )
        return ItemScore(item_id=item_id, ok=True, reward=reward, dimensions=dimensions, backends=backends_field)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/config")
    async def get_config() -> dict[str, Any]:
        return {
            "version": reward_config.version,
            "backend": backend.name,
            "backend_version": backend.version,
            "aggregation": reward_config.aggregation,
            "weights": dict(reward_config.weights),
        }

    @app.get("/metrics")
    async def get_metrics() -> Response:
        return Response(content=generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/score", response_model=ScoreResponse)
    async def score(request: ScoreRequest) -> ScoreResponse:
        started = time.perf_counter()
        try:
            try:
                inputs = await run_in_threadpool(_decode_items, request)
            except _UndecodableVideos as exc:
                logger.info("request %s rejected: %s", request.request_id, exc)
                raise HTTPException(status_code=422, detail=exc.errors) from exc
            try:
                results = await batcher.submit(inputs)
            except Exception as exc:  # noqa: BLE001 - the backend failed the whole batch
                message = f"backend {backend.name!r} failed on the batch: {type(exc).__name__}: {exc}"
                results = [PixelResult(item_id=item.item_id, error=message) for item in inputs]
            scores = [to_item_score(result, item.item_id) for result, item in zip(results, request.items)]
        finally:
            metrics.request_latency.observe(time.perf_counter() - started)
        failed = sum(not s.ok for s in scores)
        metrics.items_scored.labels(backend=backend.name).inc(len(scores) - failed)
        metrics.item_errors.labels(backend=backend.name).inc(failed)
        for item_score in scores:
            if not item_score.ok:
                logger.warning("request %s item %s failed: %s", request.request_id, item_score.item_id, item_score.error)
        logger.info(
            "request %s: %d items (%d failed) in %.3f s",
            request.request_id, len(scores), failed, time.perf_counter() - started,
        )
        return ScoreResponse(request_id=request.request_id, reward_config_version=reward_config.version, results=scores)

    return app
