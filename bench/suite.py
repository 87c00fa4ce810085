"""The benchmarks of ``make bench`` and how one of them is run and recorded."""
from __future__ import annotations

import importlib
import logging
import os
import time
import traceback
from types import ModuleType

from bench import environment
from bench.harness import gpu_peak_mib, peak_rss_mib
from bench.results import BenchResult

logger = logging.getLogger(__name__)

BENCHMARKS = (
    "pipelined",
    "sampling_overhead",
    "weight_sync",
    "reward_throughput",
    "learner_batching",
    "scaling",
    "gpu",
    "learner_memory",
    "learner_ranks",
    "cluster_sim",
    "data_plane",
    "rollout_engine",
)
"""Module names under ``bench``, in the order of the issue's items. Each module has
``NAME`` (its result file stem), ``ITEM``, ``TITLE`` and ``run(profile) -> BenchResult``."""


def load(module_name: str) -> ModuleType:
    """The benchmark module ``bench.<module_name>``.

    Raises:
        ValueError: not one of :data:`BENCHMARKS`.
    """
    if module_name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {module_name!r}; known: {', '.join(BENCHMARKS)}")
    return importlib.import_module(f"bench.{module_name}")


def run_one(module_name: str, profile: str) -> BenchResult:
    """Run one benchmark in this process and fill in the machine, duration and memory.

    A benchmark that raises is recorded as ``failed`` with the exception, not raised.
    """
    module = load(module_name)
    env = environment.capture()
    started = time.perf_counter()
    try:
        result = module.run(profile)
    except Exception as exc:  # noqa: BLE001 - a failed benchmark is a result too
        logger.exception("benchmark %s failed", module_name)
        result = BenchResult(
            name=module.NAME, item=module.ITEM, title=module.TITLE, profile=profile, status="failed",
            reason=f"{type(exc).__name__}: {exc}", notes=[traceback.format_exc(limit=5)],
        )
    env["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return result.model_copy(update={
        "environment": env, "duration_s": time.perf_counter() - started,
        "peak_rss_mib": peak_rss_mib(), "gpu_peak_mib": gpu_peak_mib(),
    })
