"""The reward server's Prometheus collectors, in a registry private to one app.

Per backend (label ``backend``: the backend's name, or its key in a config with
several backends): batch sizes and seconds per backend call, cache hits, misses
and joins (an item already being scored elsewhere), backend failures, and items
scored or failed. The unlabelled ``reward_batch_size`` and ``reward_batch_seconds``
count every backend call of the server together. The standard ``process_*``
collectors (CPU seconds, resident memory, open files) describe the server process.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


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
        self.config_revision = Gauge("reward_config_revision", "Revision of the active reward config.", registry=r)
        self.config_swaps = Counter("reward_config_swaps", "Reward config changes applied by this replica.", registry=r)
        self.config_errors = Counter(
            "reward_config_apply_errors", "Registry changes this replica could not apply.", registry=r
        )

    def on_batch(self, backend: str, size: int, seconds: float) -> None:
        """Record one backend call of ``size`` items that took ``seconds``."""
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        self.backend_batch_size.labels(backend=backend).observe(size)
        self.backend_seconds.labels(backend=backend).observe(seconds)
