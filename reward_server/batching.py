"""Dynamic batching for asyncio servers: concurrent callers' items share backend calls.

Callers ``await batcher.submit(items)`` from any number of concurrent request
handlers. One background task takes items off a queue in arrival order: it waits
for the first item, then for at most ``max_wait_s`` more (or until
``max_batch_size`` items are there), and hands the batch to ``process`` in a
worker thread of the batcher's own pool (or awaits it, when ``process`` is a
coroutine function that offloads its own work) so the event loop stays free to
accept requests. Up to ``max_concurrent_batches`` calls run at once; while that
many are in flight no new batch is formed, so items arriving meanwhile form the
next batch and batches grow under load. With the default of one call at a time
the next batch is collected only after the previous call returned. Each caller
gets its own items' results back in the order it submitted them.

``ray.serve.batch`` does the same inside a Ray Serve deployment only; this
batcher serves the standalone process and Serve replicas alike.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class BatcherStopped(RuntimeError):
    """Raised to callers whose items were still queued or being processed when the batcher stopped."""


class BusyClock:
    """Wall seconds during which at least one call was in flight (overlapping calls counted once).

    :meth:`enter` and :meth:`exit` bracket each call; :meth:`seconds` may be read
    from any thread at any time and includes the busy period still running.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        """``clock``: the time source, in seconds (monotonic)."""
        self._clock = clock
        self._lock = threading.Lock()
        self._in_flight = 0
        self._since = 0.0
        self._total = 0.0

    def enter(self) -> None:
        """A call started."""
        with self._lock:
            if self._in_flight == 0:
                self._since = self._clock()
            self._in_flight += 1

    def exit(self) -> None:
        """A call ended (after an :meth:`enter`).

        Raises:
            RuntimeError: more exits than enters.
        """
        with self._lock:
            if self._in_flight == 0:
                raise RuntimeError("BusyClock.exit without a matching enter")
            self._in_flight -= 1
            if self._in_flight == 0:
                self._total += self._clock() - self._since

    @property
    def in_flight(self) -> int:
        """Calls in flight now."""
        with self._lock:
            return self._in_flight

    def seconds(self) -> float:
        """Busy wall seconds so far, the running busy period included."""
        with self._lock:
            running = self._clock() - self._since if self._in_flight else 0.0
            return self._total + running


class DynamicBatcher(Generic[T, R]):
    """Group items from concurrent callers into batches for ``process``.

    Args:
        process: called in a worker thread with a list of at most
            ``max_batch_size`` items (awaited instead when it is a coroutine
            function); must return one result per item, in order. Called from up to
            ``max_concurrent_batches`` threads at once, so it must be thread-safe
            when that is above 1. If it raises, every caller with an item in that
            batch (and no other) gets the exception.
        max_batch_size: most items per ``process`` call (>= 1).
        max_wait_s: seconds to wait for more items after the first of a batch
            arrived (>= 0; 0 takes whatever is already queued).
        max_concurrent_batches: most ``process`` calls in flight at once (>= 1).
            1 (the default) runs one call at a time. More suits an I/O-bound
            ``process`` (a remote judge): the next batch is formed and started while
            earlier ones are still waiting on it. The worker thread pool has this many threads.
        on_batch: optional callback ``(batch_size, seconds)`` after each successful
            call, e.g. for metrics; its exceptions are logged and ignored.
        name: used in log messages and thread names.

    Raises:
        ValueError: ``max_batch_size`` or ``max_concurrent_batches`` below 1, or
            ``max_wait_s`` negative.
    """

    def __init__(
        self,
        process: Callable[[list[T]], Sequence[R] | Awaitable[Sequence[R]]],
        max_batch_size: int,
        max_wait_s: float,
        on_batch: Callable[[int, float], None] | None = None,
        name: str = "batcher",
        max_concurrent_batches: int = 1,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        if max_concurrent_batches < 1:
            raise ValueError(f"max_concurrent_batches must be >= 1, got {max_concurrent_batches}")
        self._process = process
        self._is_coroutine = inspect.iscoroutinefunction(process)
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_concurrent_batches = max_concurrent_batches
        self._on_batch = on_batch
        self._name = name
        self.busy = BusyClock()
        """Wall seconds with at least one ``process`` call in flight."""
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._slots: asyncio.Semaphore | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._pool: ThreadPoolExecutor | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the background task on the running event loop (idempotent)."""
        if self.running:
            return
        self._queue = asyncio.Queue()
        self._slots = asyncio.Semaphore(self.max_concurrent_batches)
        if not self._is_coroutine:
            self._pool = ThreadPoolExecutor(max_workers=self.max_concurrent_batches, thread_name_prefix=self._name)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"{self._name}-loop")

    async def stop(self) -> None:
        """Stop the batcher: items queued or being processed fail with :class:`BatcherStopped`.

        Calls in flight are cancelled (a coroutine ``process`` gets the
        cancellation; a thread cannot be interrupted, it finishes in the background
        and its results are dropped). A later :meth:`submit` starts the batcher again.
        """
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        in_flight, self._in_flight = list(self._in_flight), set()
        for call in in_flight:
            call.cancel()
        if in_flight:
            await asyncio.gather(*in_flight, return_exceptions=True)
        if self._queue is not None:
            while not self._queue.empty():
                _, future = self._queue.get_nowait()
                if not future.done():
                    future.set_exception(BatcherStopped(f"{self._name} stopped before the item was processed"))
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    async def submit(self, items: Sequence[T]) -> list[R]:
        """Queue ``items`` and wait for their results (same order as ``items``).

        Starts the batcher on first use. Raises whatever ``process`` raised for
        a batch containing one of these items, or :class:`BatcherStopped`.
        """
        self.start()
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[R]] = []
        for item in items:
            future: asyncio.Future[R] = loop.create_future()
            self._queue.put_nowait((item, future))
            futures.append(future)
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            for future in futures:  # a caller that gives up frees its queued items
                future.cancel()
            raise

    async def _collect(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        """Fill ``batch`` (in place, so a stop can fail what was taken) from the queue."""
        assert self._queue is not None
        batch.append(await self._queue.get())
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size and not self._queue.empty():  # what is queued already, without awaiting
            batch.append(self._queue.get_nowait())
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                while len(batch) < self.max_batch_size and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                return
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), timeout=remaining))
            except asyncio.TimeoutError:
                return

    async def _run(self) -> None:
        slots = self._slots
        assert slots is not None
        batch: list[tuple[T, asyncio.Future[R]]] = []

        def call_done(call: asyncio.Task[None]) -> None:
            self._in_flight.discard(call)
            slots.release()

        try:
            while True:
                batch = []
                await slots.acquire()  # backpressure: no new batch while max_concurrent_batches calls run
                try:
                    await self._collect(batch)
                except BaseException:
                    slots.release()
                    raise
                live = [(item, future) for item, future in batch if not future.done()]
                if not live:
                    slots.release()
                    continue
                call = asyncio.get_running_loop().create_task(self._process_batch(live), name=f"{self._name}-call")
                self._in_flight.add(call)
                call.add_done_callback(call_done)
                batch = []
        except asyncio.CancelledError:
            _fail(batch, BatcherStopped(f"{self._name} stopped before the item was scored"))
            raise

    async def _call(self, items: list[T]) -> Sequence[R]:
        if self._is_coroutine:
            return await self._process(items)  # type: ignore[misc]
        assert self._pool is not None
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._process, items)  # type: ignore[return-value]

    async def _process_batch(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        items = [item for item, _ in batch]
        started = time.perf_counter()
        self.busy.enter()
        try:
            results = await self._call(items)
            if len(results) != len(items):
                raise RuntimeError(f"{self._name}: process returned {len(results)} results for {len(items)} items")
        except asyncio.CancelledError:
            _fail(batch, BatcherStopped(f"{self._name} stopped while the item was being scored"))
            raise
        except Exception as exc:  # noqa: BLE001 - delivered to every caller of the batch
            logger.exception("%s: batch of %d failed", self._name, len(items))
            _fail(batch, exc)
            return
        finally:
            self.busy.exit()
        elapsed = time.perf_counter() - started
        for (_, future), result in zip(batch, results):
            if not future.done():
                future.set_result(result)
        logger.debug("%s: processed a batch of %d in %.3f s", self._name, len(items), elapsed)
        if self._on_batch is not None:
            try:
                self._on_batch(len(items), elapsed)
            except Exception:  # noqa: BLE001 - metrics must not break scoring
                logger.exception("%s: on_batch callback failed", self._name)


def _fail(batch: list[tuple[T, asyncio.Future[R]]], exc: BaseException) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(exc)
