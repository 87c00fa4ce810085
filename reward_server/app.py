"""The reward server's HTTP API (FastAPI).

Routes:

* ``GET /healthz`` -> ``{"status": "ok"}``.
* ``POST /v1/score``: :class:`editrl.protocol.reward.ScoreRequest` ->
  :class:`editrl.protocol.reward.ScoreResponse`, scored on the reward config active
  when the request arrived (see :mod:`editrl.reward_server.scoring`). An undecodable
  video or image is HTTP 422 naming the item and field; an item a backend or
  the aggregation could not score comes back ``ok: false`` with the reason
  (the response is still 200).
* ``GET /v1/config``: the active reward config, its revision and backend versions.
* ``PUT /v1/config`` (admin: ``Authorization: Bearer <token>``): make a new
  reward config active without a restart (see :mod:`editrl.reward_server.runtime`); with
  Redis every replica follows (see :mod:`editrl.reward_server.config_store`).
* ``GET /metrics``: Prometheus text exposition of a registry private to the app.

Every response carries ``Server-Timing: app;dur=<ms>`` (:class:`ServerTiming`).

Bodies larger than ``max_request_bytes`` get HTTP 413 (FastAPI's ``max_body_size``
checks the Content-Length header and the bytes actually received); malformed
JSON, bodies that are not UTF-8 JSON and schema violations get 422
``{"detail": [{loc, msg, type}]}`` naming the field, bounded and always encodable
(:mod:`editrl.reward_server.http_errors`; never a 500, never the whole input echoed).
OpenAPI is at ``/openapi.json`` and documents every status a route answers. Only
JSON travels: nothing is pickled.
"""
from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from pydantic import BaseModel, ConfigDict
from redis.exceptions import RedisError

from editrl.protocol.reward import ScoreRequest, ScoreResponse
from editrl.protocol.video import DecodeBudget
from editrl.reward_server.backends import Backend
from editrl.reward_server.backends.allowlist import JudgeAllowlist
from editrl.reward_server.config import ServerConfig
from editrl.reward_server.config_store import ConfigConflict
from editrl.reward_server.http_errors import ErrorMessage, install, log_safe
from editrl.reward_server.metrics import Metrics
from editrl.reward_server.reward_config import DimensionError, RewardConfig
from editrl.reward_server.runtime import BackendPool, ConfigBuildError, Runtime, RuntimeManager
from editrl.reward_server.scoring import Scorer, UndecodableInputs
from editrl.reward_server.state import REPLICA_ID, open_state

logger = logging.getLogger(__name__)


_ERROR = {"model": ErrorMessage}
STARTING = {503: {**_ERROR, "description": "the reward server is starting or stopping"}}
TOO_LARGE = {413: {"description": "request body larger than max_request_bytes (Starlette's plain-text answer)",
                   "content": {"text/plain": {"schema": {"type": "string"}}}}}
METRICS_CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
"""``GET /metrics``: Prometheus text exposition format 0.0.4."""


class ActiveConfig(BaseModel):
    """Body of ``GET /v1/config`` and ``PUT /v1/config``."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    version: str
    """Version of the active reward config."""
    revision: int
    """Increasing number of the change that made it active (shared by replicas with Redis)."""
    backends: dict[str, str]
    """Backend label -> backend version."""
    backend: str | None = None
    """The backend's name when the config has exactly one."""
    backend_version: str | None = None
    """That backend's version when the config has exactly one."""
    aggregation: str
    """``weighted_mean`` or ``geometric_mean``."""
    weights: dict[str, float]
    """Weights of ``weighted_mean``."""
    config: RewardConfig
    """The whole reward config."""
    changed: bool | None = None
    """``PUT`` only: False when the config was already active."""
    sync_error: str | None = None
    """Why this replica could not apply the registry's latest change, if it could not."""
    replica: str = REPLICA_ID
    """The answering server process (``host:pid``), to tell replicas apart."""


def _view(runtime: Runtime, sync_error: str | None, changed: bool | None = None) -> ActiveConfig:
    single = runtime.backends[0] if len(runtime.backends) == 1 else None
    return ActiveConfig(
        version=runtime.config.version, revision=runtime.revision, backends=runtime.versions,
        backend=single.backend.name if single else None, backend_version=single.backend.version if single else None,
        aggregation=runtime.config.aggregation, weights=dict(runtime.config.weights), config=runtime.config,
        changed=changed, sync_error=sync_error,
    )


class ServerTiming:
    """ASGI middleware: every HTTP response carries ``Server-Timing: app;dur=<ms>``,
    the milliseconds from the request entering the app to the response starting
    (body reading, JSON parsing and validation, the handler, serialisation; not
    the network or uvicorn's own parsing of the headers)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed_send(message) -> None:
            if message["type"] == "http.response.start":
                duration = f"app;dur={(time.perf_counter() - started) * 1e3:.3f}".encode()
                message = {**message, "headers": [*message.get("headers", []), (b"server-timing", duration)]}
            await send(message)

        await self.app(scope, receive, timed_send)


def create_app(config: ServerConfig, backend: Backend | None = None) -> FastAPI:
    """Build the reward server app for ``config``.

    Args:
        config: server and initial reward configuration.
        backend: a ready backend to serve the initial config's single backend
            with instead of building it from its spec (embedding and tests).

    Raises:
        ValueError: the reward config weights a dimension its backends do not
            produce, or ``backend`` is given for a config with several backends.
    """
    reward = config.reward
    produced = {key: spec.dimension_names() for key, spec in reward.backends.items()}
    injected = {}
    if backend is not None:
        if len(reward.backends) != 1:
            raise ValueError("an injected backend needs a reward config with exactly one backend")
        (key, spec), = reward.backends.items()
        produced = {key: tuple(backend.dimensions)}
        injected = {(key, spec.model_dump_json()): backend}
    try:
        reward.check_dimensions(produced)
    except DimensionError as exc:
        raise ValueError(f"reward config {reward.version!r}: {exc}") from exc
    metrics = Metrics()
    pool = BackendPool(metrics, config.max_batch_size, config.max_wait_s, injected,
                       allowlist=JudgeAllowlist(config.judge_key_envs, config.judge_hosts))
    manager = RuntimeManager(pool, metrics)
    admin_token = os.environ.get(config.admin_token_env) or None
    bearer = HTTPBearer(auto_error=False, description=f"the token in ${config.admin_token_env}")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_state(config) as state:
            initial, revision = await state.store.start(reward)
            try:
                manager.install(await manager.build(initial, revision))
            except ConfigBuildError as exc:
                raise RuntimeError(f"cannot serve reward config {initial.version!r} (revision {revision}): {exc}") from exc
            state.store.follow(manager.apply)
            app.state.store = state.store
            app.state.scorer = Scorer(state.cache, metrics, DecodeBudget(config.max_video_pixels, config.max_video_frames))
            logger.info(
                "reward server ready: reward config %s (revision %d), backends %s, cache %s, registry %s",
                initial.version, revision, manager.current.versions if manager.current else {},
                type(state.cache).__name__ if state.cache else "off", type(state.store).__name__,
            )
            try:
                yield
            finally:
                await state.store.close()
                await manager.close()

    app = FastAPI(title="editrl reward server", version="2", lifespan=lifespan, max_body_size=config.max_request_bytes)
    app.add_middleware(ServerTiming)
    install(app)
    app.state.config = config
    app.state.manager = manager
    app.state.metrics_registry = metrics.registry

    def current() -> Runtime:
        if manager.current is None:
            raise HTTPException(status_code=503, detail="the reward server is starting")
        return manager.current

    def require_admin(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if admin_token is None:
            raise HTTPException(status_code=403, detail=f"admin routes are disabled: ${config.admin_token_env} is not set")
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), admin_token.encode()):
            raise HTTPException(status_code=401, detail="missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/config", response_model=ActiveConfig, response_model_exclude_none=True, responses=STARTING)
    async def get_config() -> ActiveConfig:
        return _view(current(), manager.sync_error)

    @app.put(
        "/v1/config", response_model=ActiveConfig, response_model_exclude_none=True,
        dependencies=[Depends(require_admin)],
        responses={401: {**_ERROR, "description": "missing or wrong token"},
                   403: {**_ERROR, "description": "admin routes disabled"},
                   409: {**_ERROR, "description": "another definition is active under this version"}, **TOO_LARGE,
                   503: {**_ERROR, "description": "the config registry (Redis) is unreachable, or the server is starting"}},
    )
    async def put_config(new: RewardConfig, request: Request) -> ActiveConfig:
        store = request.app.state.store
        async with manager.lock:
            active = current()
            if new == active.config:
                return _view(active, manager.sync_error, changed=False)
            if new.version == active.config.version:
                raise HTTPException(409, detail=f"version {new.version!r} is active with a different definition; "
                                                "give the new definition a new version")
            try:
                runtime = await manager.build(new, revision=0)
            except ConfigBuildError as exc:
                raise HTTPException(422, detail=[{"loc": ["body", *exc.loc], "msg": str(exc), "type": "config_error"}]) from exc
            try:
                revision, _ = await store.publish(new)
            except (ConfigConflict, RedisError, OSError) as exc:
                for held in runtime.backends:
                    await manager.pool.release(held)
                if isinstance(exc, ConfigConflict):
                    raise HTTPException(409, detail=str(exc)) from exc
                raise HTTPException(503, detail=f"config registry unreachable: {exc}") from exc
            runtime.revision = revision
            manager.install(runtime)
            logger.info("reward config %s active (revision %d) by PUT /v1/config", log_safe(new.version), revision)
            return _view(runtime, None, changed=True)

    @app.get("/metrics", response_class=Response, responses={200: {
        "description": "Prometheus text exposition", "content": {METRICS_CONTENT_TYPE: {"schema": {"type": "string"}}}}})
    async def get_metrics() -> Response:
        return Response(content=generate_latest(metrics.registry), media_type=METRICS_CONTENT_TYPE)

    @app.post("/v1/score", response_model=ScoreResponse, responses={**STARTING, 413: {
        **_ERROR, "content": {**TOO_LARGE[413]["content"]}, "description": "request body larger than max_request_bytes "
        "(plain text), or a video past max_video_pixels or max_video_frames (JSON naming the item and field)"}})
    async def score(score_request: ScoreRequest, request: Request) -> Response:
        started = time.perf_counter()
        try:
            async with current().use() as runtime:
                try:
                    scores = await request.app.state.scorer.score(runtime, score_request)
                except UndecodableInputs as exc:
                    logger.info("request %s rejected: %s", score_request.request_id, log_safe(exc))
                    raise HTTPException(status_code=exc.status_code, detail=exc.detail) from exc
        finally:
            metrics.request_latency.observe(time.perf_counter() - started)
        failed = [s for s in scores if not s.ok]
        for item_score in failed:
            logger.warning("request %s item %s failed: %s", score_request.request_id, item_score.item_id,
                           log_safe(item_score.error))
        logger.info(
            "request %s: %d items (%d failed) on %s in %.3f s",
            score_request.request_id, len(scores), len(failed), runtime.config.version, time.perf_counter() - started,
        )
        body = ScoreResponse(
            request_id=score_request.request_id, reward_config_version=runtime.config.version,
            results=scores, backends=runtime.versions,
        )
        # serialised here, once: returning the model would make FastAPI validate it against response_model again
        return Response(content=body.model_dump_json(), media_type="application/json")

    return app
