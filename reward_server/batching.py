"""Dynamic batching for asyncio servers: concurrent callers' items share backend calls.

Callers ``await batcher.submit(items)`` from any number of concurrent request
handlers. One background task takes items off a queue in arrival order: it waits
for the first item, then for at most ``max_wait_s`` more (or until
``max_batch_size`` items are there), and runs ``process(batch)`` in a worker
thread (or awaits it, when ``process`` is a coroutine function that offloads its
own work) so the event loop stays free to accept requests. Items arriving while a
batch is being processed form the next batch, so batches grow under load. Each
caller gets its own items' results back in the order it submitted them.

``ray.serve.batch`` does the same inside a Ray Serve deployment only; this
batcher serves the standalone process and Serve replicas alike.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class BatcherStopped(RuntimeError):
    """Raised to callers whose items were still queued when the batcher stopped."""


class DynamicBatcher(Generic[T, R]):
    """Group items from concurrent callers into batches for a synchronous ``process``.

    Args:
        process: called in a worker thread with a list of at most
            ``max_batch_size`` items (awaited instead when it is a coroutine
            function); must return one result per item, in order.
            If it raises, every caller with an item in that batch gets the exception.
        max_batch_size: most items per ``process`` call (>= 1).
        max_wait_s: seconds to wait for more items after the first of a batch
            arrived (>= 0; 0 takes whatever is already queued).
        on_batch: optional callback ``(batch_size, seconds)`` after each batch,
            e.g. for metrics; its exceptions are logged and ignored.
        name: used in log messages.
    """

    def __init__(
        self,
        process: Callable[[list[T]], Sequence[R] | Awaitable[Sequence[R]]],
        max_batch_size: int,
        max_wait_s: float,
        on_batch: Callable[[int, float], None] | None = None,
        name: str = "batcher",
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self._process = process
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._name = name
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the background task on the running event loop (idempotent)."""
        if self.running:
            return
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"{self._name}-loop")

    async def stop(self) -> None:
        """Stop the background task; unfinished items fail with :class:`BatcherStopped`.

        A later :meth:`submit` starts the batcher again.
        """
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if self._queue is not None:
            while not self._queue.empty():
                _, future = self._queue.get_nowait()
                if not future.done():
                    future.set_exception(BatcherStopped(f"{self._name} stopped before the item was processed"))

    async def submit(self, items: Sequence[T]) -> list[R]:
        """Queue ``items`` and wait for their results (same order as ``items``).

        Starts the batcher on first use. Raises whatever ``process`` raised for
        a batch containing one of these items.
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
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while True:
                batch = []
                await self._collect(batch)
                await self._process_batch([(item, future) for item, future in batch if not future.done()])
        except asyncio.CancelledError:
            for _, future in batch:
                if not future.done():
                    future.set_exception(BatcherStopped(f"{self._name} stopped before the item was scored"))
            raise

    async def _process_batch(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        if not batch:
            return
        items = [item for item, _ in batch]
        started = time.perf_counter()
        try:
            if inspect.iscoroutinefunction(self._process):
                results = await self._process(items)
            else:
                results = await asyncio.to_thread(self._process, items)
            if len(results) != len(items):
                raise RuntimeError(f"{self._name}: process returned {len(results)} results for {len(items)} items")
        except Exception as exc:  # noqa: BLE001 - delivered to every caller of the batch
            logger.exception("%s: batch of %d failed", self._name, len(items))
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
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
