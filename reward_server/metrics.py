"""The reward server's Prometheus collectors, in a registry private to one app.

Per backend (label ``backend``: the backend's name, or its key in a config with
several backends): batch sizes and seconds per backend call, cache hits, misses
and joins (an item already being scored elsewhere), backend failures, and items
scored or failed. The unlabelled ``reward_batch_size`` and ``reward_batch_seconds``
count every backend call of the server together. The standard ``process_*``
collectors (CPU seconds, resident memory, open files) describe the server process.
``reward_backend_busy_seconds_total`` is the wall time a backend had at least one
call in flight: with concurrent calls it is less than the sum of their durations.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _BusyCollector(Collector):
    """``reward_backend_busy_seconds_total{backend}``, read from the executors' busy clocks at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sources: dict[str, list[Callable[[], float]]] = {}
        self._retired: dict[str, float] = {}

    def add(self, backend: str, seconds: Callable[[], float]) -> None:
        with self._lock:
            self._sources.setdefault(backend, []).append(seconds)

    def remove(self, backend: str, seconds: Callable[[], float]) -> None:
        """Stop reading ``seconds``; what it counted stays in the total (the counter never goes down)."""
        with self._lock:
            sources = self._sources.get(backend, [])
            if seconds in sources:
                sources.remove(seconds)
                self._retired[backend] = self._retired.get(backend, 0.0) + seconds()

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily("reward_backend_busy_seconds", _BUSY_HELP, labels=("backend",))

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("reward_backend_busy_seconds", _BUSY_HELP, labels=("backend",))
        with self._lock:
            for backend in sorted(set(self._sources) | set(self._retired)):
                total = self._retired.get(backend, 0.0) + sum(source() for source in self._sources.get(backend, []))
                family.add_metric([backend], total)
        yield family


_BUSY_HELP = "Wall seconds with at least one call of the backend in flight (overlapping calls counted once)."


class Metrics:
    """Collectors of one reward server app (``registry`` is what ``GET /metrics`` renders)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        self.batch_size = Histogram(
            "reward_batch_size", "Items per backend call, all backends.", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "reward_batch_seconds", "Seconds per backend call, all backends.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.backend_batch_size = Histogram(
            "reward_backend_batch_size", "Items per backend call.", labelnames=("backend",),
            buckets=BATCH_BUCKETS, registry=r,
        )
        self.backend_seconds = Histogram(
            "reward_backend_latency_seconds", "Seconds per backend call.", labelnames=("backend",),
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.request_latency = Histogram(
            "reward_request_latency_seconds", "Seconds to answer POST /v1/score, decoding and queueing included.",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.items_scored = Counter(
            "reward_items_scored", "Items that got a reward.", labelnames=("backend",), registry=r
        )
        self.item_errors = Counter(
            "reward_item_errors", "Items returned with ok=False, counted under the backend(s) at fault.",
            labelnames=("backend",), registry=r,
        )
        self.backend_errors = Counter(
            "reward_backend_errors", "Items a backend failed to score (cache hits excluded).",
            labelnames=("backend",), registry=r,
        )
        self.cache_hits = Counter(
            "reward_cache_hits", "Backend scores found in the score cache.", labelnames=("backend",), registry=r
        )
        self.cache_misses = Counter(
            "reward_cache_misses", "Backend scores not in the cache (scored, or joined).",
            labelnames=("backend",), registry=r,
        )
        self.cache_joins = Counter(
            "reward_cache_joins", "Cache misses answered by a scoring already in flight for the same item.",
            labelnames=("backend",), registry=r,
        )
        self._busy = _BusyCollector()
        r.register(self._busy)
        self.config_revision = Gauge("reward_config_revision", "Revision of the active reward config.", registry=r)
        self.config_swaps = Counter("reward_config_swaps", "Reward config changes applied by this replica.", registry=r)
        self.config_errors = Counter(
            "reward_config_apply_errors", "Registry changes this replica could not apply.", registry=r
        )

    def track_busy(self, backend: str, seconds: Callable[[], float]) -> None:
        """Report ``seconds()`` (a backend's busy wall seconds so far) in ``reward_backend_busy_seconds_total``."""
        self._busy.add(backend, seconds)

    def untrack_busy(self, backend: str, seconds: Callable[[], float]) -> None:
        """Stop reading ``seconds`` (the backend was released); its last value stays counted."""
        self._busy.remove(backend, seconds)

    def on_batch(self, backend: str, size: int, seconds: float) -> None:
        """Record one backend call of ``size`` items that took ``seconds``."""
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        self.backend_batch_size.labels(backend=backend).observe(size)
        self.backend_seconds.labels(backend=backend).observe(seconds)
