"""Shared measurement machinery: interleaved repeats, paired ratios, memory.

Timing rules of the suite:

* every variant of a comparison runs in the same process on identical work and
  seeds; after ``warmup`` discarded rounds, each of ``repeats`` rounds runs every
  variant once, the order rotating from round to round so that slow drift of the
  machine (other jobs, thermal) spreads over all variants;
* a comparison is reported as the per-round ratio (paired), summarised over rounds;
* wall-clock time is ``time.perf_counter``; a ``sync`` callable (CUDA
  synchronisation) runs inside the timed region of GPU variants.

Memory: peak RSS comes from ``getrusage`` (the kernel's high-water mark of this
process) and the current RSS from psutil. Because the high-water mark never goes
down, a per-variant peak needs a fresh process: :func:`probe_memory` runs one
variant in ``python -m bench.memprobe``. GPU memory is torch's peak allocation.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import psutil

from bench.results import Ratio, Stats

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def interleaved(
    variants: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    before: Mapping[str, Callable[[], None]] | None = None,
    sync: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Time every variant ``repeats`` times, interleaved, after ``warmup`` rounds.

    Args:
        variants: name -> callable doing one unit of work.
        repeats: timed rounds (>= 1).
        warmup: untimed rounds first (each variant once per round).
        before: name -> untimed callable run right before that variant (state reset).
        sync: called at the end of each timed call (e.g. ``torch.cuda.synchronize``).

    Returns:
        name -> ``repeats`` wall-clock durations in seconds, in round order.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    names = list(variants)
    before = before or {}
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if name in before:
                before[name]()
            start = time.perf_counter()
            variants[name]()
            if sync is not None:
                sync()
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[name].append(elapsed)
        logger.debug("round %d/%d done", round_index + 1, warmup + repeats)
    return times


def paired_ratio(name: str, numerator: str, denominator: str, times: Mapping[str, list[float]], description: str = "") -> Ratio:
    """Per-round ``times[numerator] / times[denominator]``, summarised."""
    a, b = times[numerator], times[denominator]
    if len(a) != len(b):
        raise ValueError(f"{numerator} and {denominator} have {len(a)} and {len(b)} samples")
    return Ratio(name=name, numerator=numerator, denominator=denominator, description=description,
                 stats=Stats.of([x / y for x, y in zip(a, b)]))


def peak_rss_mib() -> float:
    """High-water mark of this process's resident set size, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mib() -> float:
    """Resident set size of this process now, MiB."""
    return psutil.Process().memory_info().rss / 2**20


def gpu_peak_mib() -> float | None:
    """Peak CUDA memory torch allocated in this process, MiB; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def subprocess_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for child processes: this checkout first on ``PYTHONPATH``."""
    path = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **(extra or {})}


def probe_memory(module: str, variants: list[str], settings: dict, timeout_s: float = 900.0,
                 env: Mapping[str, str] | None = None) -> dict[str, dict[str, float | None]]:
    """Peak memory of each variant, run once after its setup in a fresh process.

    The processes run at the same time (memory is per process, and nothing is
    timed while they run), so the cost is about one process start.

    Args:
        module: benchmark module under ``bench`` with a ``memory_variants(settings)``
            function returning name -> callable (setup done on the call).
        variants: the callables to run, one process each.
        settings: JSON-serialisable settings passed to ``memory_variants``.
        env: extra environment variables of the probe processes (e.g. malloc tuning).

    Returns:
        variant -> ``setup_rss_mib`` (RSS after setup), ``peak_rss_mib`` (kernel
        high-water mark of the process, setup included), ``variant_peak_rss_mib``
        (highest RSS while the variant ran, sampled every 2 ms),
        ``variant_added_rss_mib`` (that minus the setup RSS), ``gpu_peak_mib`` (None
        without CUDA); all MiB.

    Raises:
        RuntimeError: a probe process failed (its stderr tail is in the message).
    """
    procs = {
        variant: subprocess.Popen(
            [sys.executable, "-m", "bench.memprobe", module, variant, json.dumps(settings)],
            cwd=PROJECT_ROOT, env=subprocess_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for variant in variants
    }
    out = {}
    for variant, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            for other in procs.values():
                if other.poll() is None:
                    other.kill()
                    other.wait()
            raise RuntimeError(f"memory probe {module}:{variant} failed ({proc.returncode}): {stderr[-2000:]}")
        out[variant] = json.loads(stdout.strip().splitlines()[-1])
    return out
