"""Item 4: reward-server throughput and latency vs concurrency and batch size,
against the backend called directly with the same batches.

One ``python -m reward_server`` process (pixel backend, score cache off) is
driven over HTTP by a closed loop of 1, 8 and 64 concurrent users, each request
carrying a group of 4 unique items (what a rollout worker sends). Backend
settings are switched between cells with ``PUT /v1/config`` (the runtime swap),
so one server serves every cell. For each run the server's batch counters give
the number of backend calls it made; the same items are then scored by
``PixelBackend.score_batch`` in the same number of calls, in this process, right
after (paired repeats).

Configurations: the pixel backend with batches of at most 4 and 16 items, and
a judge-like backend (pixel plus 0.5 s per call, ``PixelSpec.latency_s``: a
local judge scoring 16 items in half a second) with batches of 16; plus batches of 16 with no batching
wait (``max_wait_s = 0``) at concurrency 1 for the per-request overhead.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from bench.cluster import default_server_config, reward_server
from bench.http_load import LoadDriver, batch_counters, build_requests, score_directly
from bench.results import BenchResult, Measurement, Ratio, Stats, Target
from protocol.video import decode_video
from reward_server.backends.pixel import PixelBackend
from reward_server.reward_config import DEFAULT_WEIGHTS

NAME = "reward_throughput"
ITEM = 4
TITLE = "Reward server: throughput and latency vs concurrency and batch size"
ADMIN_TOKEN = "bench-admin-token"
TARGET_THROUGHPUT_RATIO = 0.9
TARGET_OVERHEAD_MS = 2.0


@dataclass(frozen=True)
class ServerCase:
    """Backend settings served for some concurrencies."""

    name: str
    max_batch_size: int
    max_wait_s: float
    latency_s: float
    concurrencies: tuple[int, ...]


@dataclass(frozen=True)
class Settings:
    profile: str
    cases: tuple[ServerCase, ...]
    items_per_request: int = 4
    frames: int = 5
    size: int = 32
    """Frame height and width in pixels (square)."""
    min_requests: int = 8
    """Requests per run at concurrency c: max(min_requests, c)."""
    repeats: int = 3
    """Timed runs per cell (after one warm-up burst per case)."""


SETTINGS = {
    "cpu": Settings("cpu", cases=(
        ServerCase("pixel b4", 4, 0.01, 0.0, (1, 8, 64)),
        ServerCase("pixel b16", 16, 0.01, 0.0, (1, 8, 64)),
        ServerCase("pixel b16 no-wait", 16, 0.0, 0.0, (1,)),
        ServerCase("judge-like b16", 16, 0.01, 0.5, (1, 8, 64)),
    )),
    "smoke": Settings("smoke", cases=(ServerCase("pixel b4", 4, 0.0, 0.0, (1, 2)), ServerCase("judge-like b4", 4, 0.0, 0.02, (2,))),
                      items_per_request=2, size=16, min_requests=2, repeats=1),
}


def _reward_config(case: ServerCase, index: int) -> dict:
    spec = {"type": "pixel", "max_batch_size": case.max_batch_size, "max_wait_s": case.max_wait_s, "latency_s": case.latency_s}
    return {"version": f"bench-{index}", "backends": {"pixel": spec}, "aggregation": "weighted_mean", "weights": dict(DEFAULT_WEIGHTS)}


def _switch(url: str, config: dict) -> None:
    response = httpx.put(f"{url}/v1/config", json=config, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60.0)
    response.raise_for_status()


def measure(settings: Settings) -> BenchResult:
    max_c = max(c for case in settings.cases for c in case.concurrencies)
    pool = build_requests(max(settings.min_requests, max_c), settings.items_per_request, settings.frames, settings.size, "bench")
    decode_ms = []
    for request in pool[: min(len(pool), 16)]:
        start = time.perf_counter()
        for mp4 in request.mp4s:
            decode_video(mp4)
        decode_ms.append((time.perf_counter() - start) * 1e3)
    measurements, ratios, targets = [], [], []
    server_config = default_server_config(cache={"enabled": False}, admin_token_env="EDITRL_REWARD_ADMIN_TOKEN")
    with tempfile.TemporaryDirectory(prefix="bench-reward-") as tmp, \
            reward_server(server_config, Path(tmp), env={"EDITRL_REWARD_ADMIN_TOKEN": ADMIN_TOKEN}) as url:
        driver = LoadDriver(url, max_c)
        try:
            for index, case in enumerate(settings.cases):
                _switch(url, _reward_config(case, index))
                backend = PixelBackend(latency_s=case.latency_s)
                driver.run(pool[: max(case.concurrencies)], max(case.concurrencies))  # warm-up burst: connections, code paths
                for c in case.concurrencies:
                    row, ratio = _cell(url, driver, backend, pool[: max(settings.min_requests, c)], case, c, settings.repeats)
                    if "overhead_p50_ms" in row.metrics:
                        row.metrics["overhead_minus_decode_p50_ms"] = row.metrics["overhead_p50_ms"] - float(np.median(decode_ms))
                    measurements.append(row)
                    ratios.append(ratio)
        finally:
            driver.close()
    for case in (c for c in settings.cases if max(c.concurrencies) == max_c):
        top = max_c
        ratio = next(r for r in ratios if r.name == f"{case.name} c={top}: server / direct throughput")
        targets.append(Target.check(
            f"reward_throughput[{case.name} c={top}]", "server throughput at least 90% of the backend's own with the same batches",
            ratio.stats.median, ">=", TARGET_THROUGHPUT_RATIO, note=f"IQR {ratio.stats.q1:.2f}-{ratio.stats.q3:.2f}"))
    for row in measurements:
        if row.params["concurrency"] == 1 and row.params["latency_s"] == 0.0:
            targets.append(Target.check(
                f"reward_overhead_p50[{row.name}]", "server overhead per request at p50 (p50 latency minus the backend's p50 per call)",
                row.metrics["overhead_p50_ms"], "<=", TARGET_OVERHEAD_MS, unit="ms",
                note=f"max_wait_s {row.params['max_wait_s']}; decoding the request's videos alone takes "
                     f"{np.median(decode_ms):.1f} ms at p50"))
    return BenchResult(
        name=NAME, item=ITEM, title=TITLE, profile=settings.profile, status="measured",
        settings={**dataclasses.asdict(settings), "cache": "disabled", "decode_ms_per_request": Stats.of(decode_ms).model_dump()},
        measurements=measurements, ratios=ratios, targets=targets,
        notes=[
            "server_items_per_s: items / wall time of the run, over HTTP from this process; direct_items_per_s: the same "
            "items through PixelBackend.score_batch in as many calls as the server made (mean_batch = items / calls).",
            "p50/p99 are over all timed requests of the cell; overhead_p50_ms = server p50 minus the direct call's p50 "
            "(concurrency 1: one call per request).",
            f"Decoding a request's {2 * settings.items_per_request} mp4 videos (the server must, the direct call gets "
            f"frames) takes {np.median(decode_ms):.1f} ms at p50 on its own; it is part of the server's overhead.",
            "Client, server and direct calls share this machine's cores.",
        ],
    )


def _cell(url: str, driver: LoadDriver, backend: PixelBackend, requests, case: ServerCase, concurrency: int,
          repeats: int) -> tuple[Measurement, Ratio]:
    """Paired runs: the server at ``concurrency``, then the same items directly in the same number of calls."""
    items = len(requests) * len(requests[0].inputs)
    server_s, direct_s, latencies, direct_calls, batch_sizes = [], [], [], [], []
    for _ in range(repeats):
        calls_before, items_before = batch_counters(url)
        wall, lats = driver.run(requests, concurrency)
        calls_after, items_after = batch_counters(url)
        calls = int(round(calls_after - calls_before))
        batch_sizes.append((items_after - items_before) / max(calls, 1))
        direct_wall, durations = score_directly(backend, requests, calls)
        server_s.append(wall)
        direct_s.append(direct_wall)
        latencies += lats
        direct_calls += durations
    lat_ms = np.asarray(latencies) * 1e3
    metrics = {
        "server_items_per_s": Stats.of([items / s for s in server_s]),
        "direct_items_per_s": Stats.of([items / s for s in direct_s]),
        "p50_ms": float(np.percentile(lat_ms, 50)),
        "p99_ms": float(np.percentile(lat_ms, 99)),
        "mean_batch": float(np.mean(batch_sizes)),
        "direct_call_p50_ms": float(np.median(direct_calls) * 1e3),
    }
    if concurrency == 1:
        metrics["overhead_p50_ms"] = metrics["p50_ms"] - metrics["direct_call_p50_ms"]
    name = f"{case.name} c={concurrency}"
    ratio = Ratio(name=f"{name}: server / direct throughput", numerator="server", denominator="direct",
                  description="items per second over HTTP / items per second calling the backend",
                  stats=Stats.of([d / s for s, d in zip(server_s, direct_s)]))
    params = {"max_batch_size": case.max_batch_size, "max_wait_s": case.max_wait_s, "latency_s": case.latency_s,
              "concurrency": concurrency, "requests": len(requests), "items": items}
    return Measurement(name=name, params=params, metrics=metrics), ratio


def run(profile: str) -> BenchResult:
    return measure(SETTINGS[profile])
