"""The active reward config with its backends, and swapping it without a restart.

A :class:`Runtime` is one reward config bound to live backends and their
executors. Each ``POST /v1/score`` takes the current runtime when it starts and
keeps it to the end, so a request (and the batches it is in) finishes on the
config it started with. :meth:`RuntimeManager.install` makes a new runtime
current; the old one is retired, and when its last request is done the backends
it alone used are stopped and closed. Backends whose label and spec are equal
in the old and the new config are shared, not rebuilt (a change of weights keeps
a loaded model).

Executors: a local backend is driven by a :class:`~editrl.reward_server.batching.DynamicBatcher`
(max batch size, max wait, calls at once), so items of concurrent requests share a call; a
remote backend (``remote = True``) is called once per request and caps its own
concurrency.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from editrl.reward_server.backends import Backend, BackendResult, BackendSpec, ScoreInput, build_backend
from editrl.reward_server.backends.allowlist import AllowlistError, JudgeAllowlist
from editrl.reward_server.backends.base import close_backend, fingerprint, is_async, is_remote
from editrl.reward_server.batching import BusyClock, DynamicBatcher
from editrl.reward_server.metrics import Metrics
from editrl.reward_server.reward_config import DimensionError, RewardConfig

logger = logging.getLogger(__name__)


class ConfigBuildError(ValueError):
    """A reward config cannot be served here; ``loc`` names the offending field."""

    def __init__(self, loc: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


class _Executor:
    """Runs a backend on lists of items and records per-call metrics and busy time.

    ``max_concurrent_batches`` is the batcher's calls in flight (local backends only).
    """

    def __init__(self, backend: Backend, label: str, metrics: Metrics, max_batch_size: int, max_wait_s: float,
                 max_concurrent_batches: int = 1) -> None:
        self.backend = backend
        self.label = label
        self._metrics = metrics
        self._batcher: DynamicBatcher[ScoreInput, BackendResult] | None = None
        if not is_remote(backend):
            self._batcher = DynamicBatcher(
                backend.score_batch,
                max_batch_size=max_batch_size,
                max_wait_s=max_wait_s,
                on_batch=lambda size, seconds: metrics.on_batch(label, size, seconds),
                name=f"{label}-batcher",
                max_concurrent_batches=max_concurrent_batches,
            )
        self.busy = self._batcher.busy if self._batcher is not None else BusyClock()
        metrics.track_busy(label, self.busy.seconds)

    async def submit(self, items: list[ScoreInput]) -> list[BackendResult]:
        """Results for ``items`` in order; raises what the backend raised for the whole call."""
        if not items:
            return []
        if self._batcher is not None:
            return await self._batcher.submit(items)
        started = time.perf_counter()
        self.busy.enter()
        try:
            if is_async(self.backend):
                results: Sequence[BackendResult] = await self.backend.score_batch(items)  # type: ignore[misc]
            else:
                results = await asyncio.to_thread(self.backend.score_batch, items)  # type: ignore[arg-type]
        finally:
            self.busy.exit()
        if len(results) != len(items):
            raise RuntimeError(f"backend {self.label!r} returned {len(results)} results for {len(items)} items")
        self._metrics.on_batch(self.label, len(items), time.perf_counter() - started)
        return list(results)

    async def stop(self) -> None:
        if self._batcher is not None:
            await self._batcher.stop()
        self._metrics.untrack_busy(self.label, self.busy.seconds)


@dataclass
class _PoolEntry:
    backend: Backend
    executor: _Executor
    refs: int = 0


@dataclass(frozen=True)
class ActiveBackend:
    """One backend of a runtime: its config key, its label in responses and metrics, and the live objects."""

    key: str
    label: str
    spec: BackendSpec
    backend: Backend
    executor: _Executor
    fingerprint: str
    pool_key: tuple[str, str]


class BackendPool:
    """Live backends keyed by (key or "" for a single backend, spec), shared by the runtimes that use them (reference counted).

    Args:
        metrics: the app's collectors.
        max_batch_size, max_wait_s: batching defaults for specs that leave them unset.
        injected: (key, spec JSON) -> a ready backend to use instead of building one.
        allowlist: the judge key variables and hosts specs may name; None is
            :class:`~editrl.reward_server.backends.allowlist.JudgeAllowlist`'s defaults.
    """

    def __init__(
        self, metrics: Metrics, max_batch_size: int, max_wait_s: float,
        injected: dict[tuple[str, str], Backend] | None = None, allowlist: JudgeAllowlist | None = None,
    ) -> None:
        self._metrics = metrics
        self.allowlist = allowlist if allowlist is not None else JudgeAllowlist()
        self._defaults = (max_batch_size, max_wait_s)
        self._injected = dict(injected or {})
        self._entries: dict[tuple[str, str], _PoolEntry] = {}
        self._lock = asyncio.Lock()

    async def acquire(self, key: str, qualified: bool, spec: BackendSpec) -> ActiveBackend:
        """The live backend for ``spec`` at ``key``, built (in a worker thread) on first use.

        Its label is ``key`` in a config with several backends (``qualified``),
        else the backend's name.

        Raises:
            ConfigBuildError: the spec names a key variable or host outside the
                allowlist (``loc`` is ``("backends", key, "api_key_env" | "base_url")``),
                or building failed (``loc`` is ``("backends", key)``).
        """
        try:
            self.allowlist.check(spec)
        except AllowlistError as exc:
            logger.warning("refused backend %r (%s): %s", key, spec.type, exc)
            raise ConfigBuildError(("backends", key, exc.field), f"backend {key!r}: {exc}") from exc
        pool_key = (key if qualified else "", spec.model_dump_json())
        async with self._lock:
            entry = self._entries.get(pool_key)
            if entry is None:
                backend = self._injected.get((key, pool_key[1]))
                label = key if qualified else ""
                if backend is None:
                    try:
                        backend = await asyncio.to_thread(build_backend, spec)
                    except Exception as exc:  # noqa: BLE001 - any build failure is a config the server cannot serve
                        logger.warning("cannot build backend %r (%s): %s", key, spec.type, exc)
                        raise ConfigBuildError(("backends", key), f"cannot build backend {key!r} ({spec.type}): {exc}") from exc
                label = label or backend.name
                batch = getattr(spec, "max_batch_size", None) or self._defaults[0]
                wait = getattr(spec, "max_wait_s", None)
                executor = _Executor(backend, label, self._metrics, batch, self._defaults[1] if wait is None else wait,
                                     getattr(spec, "max_concurrent_batches", 1))
                entry = self._entries[pool_key] = _PoolEntry(backend, executor)
                logger.info("backend %r ready: %s %s", label, backend.name, backend.version)
            entry.refs += 1
        return ActiveBackend(
            key, entry.executor.label, spec, entry.backend, entry.executor, fingerprint(entry.backend), pool_key
        )

    async def release(self, active: ActiveBackend) -> None:
        """Drop one reference; the last one stops the executor and closes the backend."""
        pool_key = active.pool_key
        async with self._lock:
            entry = self._entries.get(pool_key)
            if entry is None:
                return
            entry.refs -= 1
            if entry.refs > 0:
                return
            del self._entries[pool_key]
        await entry.executor.stop()
        try:
            await close_backend(entry.backend)
        except Exception:  # noqa: BLE001 - closing must not break a swap
            logger.exception("closing backend %r failed", active.label)
        logger.info("backend %r released", active.label)


@dataclass
class Runtime:
    """A reward config bound to live backends; ``revision`` orders the configs a replica has seen."""

    config: RewardConfig
    revision: int
    backends: list[ActiveBackend]
    _inflight: int = 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._idle.set()

    @property
    def versions(self) -> dict[str, str]:
        """Backend label -> version."""
        return {b.label: b.backend.version for b in self.backends}

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator["Runtime"]:
        """Hold the runtime for one request; a retired runtime is released after its last holder."""
        self._inflight += 1
        self._idle.clear()
        try:
            yield self
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


class RuntimeManager:
    """Owns the current runtime and swaps it.

    Args:
        pool: where backends come from.
        metrics: the app's collectors.
    """

    def __init__(self, pool: BackendPool, metrics: Metrics) -> None:
        self.pool = pool
        self._metrics = metrics
        self.current: Runtime | None = None
        self.lock = asyncio.Lock()
        self.sync_error: str | None = None
        self._retiring: set[asyncio.Task[None]] = set()

    async def build(self, config: RewardConfig, revision: int) -> Runtime:
        """Acquire every backend of ``config`` (building what is new).

        Raises:
            ConfigBuildError: a backend cannot be built, or a weighted dimension
                is not produced by the backends (``loc`` names the field).
        """
        produced = {key: spec.dimension_names() for key, spec in config.backends.items()}
        try:
            config.check_dimensions(produced)
        except DimensionError as exc:
            raise ConfigBuildError(exc.loc, str(exc)) from exc
        acquired: list[ActiveBackend] = []
        try:
            for key, spec in config.backends.items():
                acquired.append(await self.pool.acquire(key, config.qualified, spec))
            produced = {a.key: tuple(a.backend.dimensions) for a in acquired}
            try:
                config.check_dimensions(produced)
            except DimensionError as exc:
                raise ConfigBuildError(exc.loc, str(exc)) from exc
        except BaseException:
            for active in acquired:
                await self.pool.release(active)
            raise
        return Runtime(config=config, revision=revision, backends=acquired)

    def install(self, runtime: Runtime) -> None:
        """Make ``runtime`` current and retire the previous one (released once idle)."""
        old, self.current = self.current, runtime
        self.sync_error = None
        self._metrics.config_revision.set(runtime.revision)
        if old is not None:
            self._metrics.config_swaps.inc()
            logger.info(
                "reward config %s (revision %d) -> %s (revision %d)",
                old.config.version, old.revision, runtime.config.version, runtime.revision,
            )
            task = asyncio.get_running_loop().create_task(self._retire(old))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def _retire(self, old: Runtime) -> None:
        await old.wait_idle()
        for active in old.backends:
            await self.pool.release(active)

    async def apply(self, config: RewardConfig, revision: int) -> None:
        """Switch to ``config`` if ``revision`` is newer than the current one (a registry change)."""
        async with self.lock:
            if self.current is not None and revision <= self.current.revision:
                return
            try:
                runtime = await self.build(config, revision)
            except ConfigBuildError as exc:
                self.sync_error = f"revision {revision} ({config.version}): {exc}"
                self._metrics.config_errors.inc()
                logger.error("cannot apply reward config %s (revision %d): %s", config.version, revision, exc)
                return
            self.install(runtime)

    async def close(self) -> None:
        """Release every backend (after the requests still running)."""
        for task in list(self._retiring):
            await task
        current, self.current = self.current, None
        if current is not None:
            for active in current.backends:
                await self.pool.release(active)
