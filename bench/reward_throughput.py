"""Item 4: reward-server throughput and latency vs concurrency and batch size,
against the backend called directly with the same batches.

One ``python -m editrl.reward_server`` process (pixel backend, score cache off) is
driven over HTTP by a closed loop of 1, 8 and 64 concurrent users, each request
carrying a group of 4 unique items sharing one source video (what a rollout
worker sends). Videos travel as raw ``uint8`` frames (``format: raw``: the
server does not decode, so server and direct call score the very same frames
from the same bytes: like with like) or as mp4 files (the server decodes each
distinct video of a request once; that decoding is work the direct call does
not do, reported apart). Backend
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
from bench.http_load import LoadDriver, build_requests, lean_latencies, score_directly, server_counters
from bench.results import BenchResult, Measurement, Ratio, Stats, Target
from editrl.protocol.video import decode_video
from editrl.reward_server.backends.pixel import PixelBackend
from editrl.reward_server.reward_config import DEFAULT_WEIGHTS

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
    video_format: str = "raw"
    """``raw`` (frames on the wire, nothing to decode) or ``mp4`` (the server decodes)."""


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
    latency_requests: int = 32
    """Requests per run of the pixel cells at concurrency 1 (the per-request overhead rows: more samples for p50)."""


SETTINGS = {
    "cpu": Settings("cpu", cases=(
        ServerCase("pixel b4", 4, 0.01, 0.0, (1, 8, 64)),
        ServerCase("pixel b16", 16, 0.01, 0.0, (1, 8, 64)),
        ServerCase("pixel b16 no-wait", 16, 0.0, 0.0, (1,)),
        ServerCase("judge-like b16", 16, 0.01, 0.5, (1, 8, 64)),
        ServerCase("pixel b4 mp4", 4, 0.01, 0.0, (1, 64), video_format="mp4"),
    )),
    "smoke": Settings("smoke", cases=(ServerCase("pixel b4", 4, 0.0, 0.0, (1, 2)), ServerCase("judge-like b4", 4, 0.0, 0.02, (2,)),
                                      ServerCase("pixel b4 mp4", 4, 0.0, 0.0, (1,), video_format="mp4")),
                      items_per_request=2, size=16, min_requests=2, repeats=1, latency_requests=2),
}


def _reward_config(case: ServerCase, index: int) -> dict:
    spec = {"type": "pixel", "max_batch_size": case.max_batch_size, "max_wait_s": case.max_wait_s, "latency_s": case.latency_s}
    return {"version": f"bench-{index}", "backends": {"pixel": spec}, "aggregation": "weighted_mean", "weights": dict(DEFAULT_WEIGHTS)}


def _switch(url: str, config: dict) -> None:
    response = httpx.put(f"{url}/v1/config", json=config, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60.0)
    response.raise_for_status()


def measure(settings: Settings) -> BenchResult:
    max_c = max(c for case in settings.cases for c in case.concurrencies)
    formats = sorted({case.video_format for case in settings.cases})
    pools = {fmt: build_requests(max(settings.min_requests, max_c, settings.latency_requests), settings.items_per_request, settings.frames, settings.size,
                                 f"bench-{fmt}", video_format=fmt) for fmt in formats}
    any_pool = pools[formats[0]]
    decode_ms = []
    for request in any_pool[: min(len(any_pool), 16)]:
        start = time.perf_counter()
        for mp4 in request.mp4s:
            decode_video(mp4)
        decode_ms.append((time.perf_counter() - start) * 1e3)
    body_kib = {fmt: float(np.median([len(r.body) for r in pool])) / 1024 for fmt, pool in pools.items()}
    measurements, ratios, targets = [], [], []
    server_config = default_server_config(cache={"enabled": False}, admin_token_env="EDITRL_REWARD_ADMIN_TOKEN")
    with tempfile.TemporaryDirectory(prefix="bench-reward-") as tmp, \
            reward_server(server_config, Path(tmp), env={"EDITRL_REWARD_ADMIN_TOKEN": ADMIN_TOKEN}) as url:
        driver = LoadDriver(url, max_c)
        try:
            for index, case in enumerate(settings.cases):
                _switch(url, _reward_config(case, index))
                backend = PixelBackend(latency_s=case.latency_s)
                pool = pools[case.video_format]
                driver.run(pool[: max(case.concurrencies)], max(case.concurrencies))  # warm-up burst: connections, code paths
                for c in case.concurrencies:
                    count = max(settings.min_requests, c, settings.latency_requests if c == 1 and case.latency_s == 0 else 0)
                    row, ratio = _cell(url, driver, backend, pool[:count], case, c, settings.repeats)
                    row.params["body_kib"] = round(body_kib[case.video_format], 1)
                    if "overhead_p50_ms" in row.metrics and case.video_format == "mp4":
                        row.metrics["lean_overhead_minus_decode_p50_ms"] = row.metrics["lean_overhead_p50_ms"] - float(np.median(decode_ms))
                    measurements.append(row)
                    ratios.append(ratio)
        finally:
            driver.close()
    for case in (c for c in settings.cases if max(c.concurrencies) == max_c):
        top = max_c
        ratio = next(r for r in ratios if r.name == f"{case.name} c={top}: server / direct throughput")
        targets.append(Target.check(
            f"reward_throughput[{case.name} c={top}]", "server throughput at least 90% of the backend's own with the same batches",
            ratio.stats.median, ">=", TARGET_THROUGHPUT_RATIO,
            note=f"IQR {ratio.stats.q1:.2f}-{ratio.stats.q3:.2f}; videos as {case.video_format}"))
    for row in measurements:
        if row.params["concurrency"] == 1 and row.params["latency_s"] == 0.0:
            m = row.metrics
            note = (f"max_wait_s {row.params['max_wait_s']} (a batch of fewer than max_batch_size items waits that long); "
                    f"videos as {row.params['video_format']}; with the benchmark's httpx client {m['overhead_p50_ms']:.2f} ms "
                    f"(p50 {m['p50_ms']:.2f} ms); inside the server app (Server-Timing) {m['app_overhead_p50_ms']:.2f} ms "
                    f"over the backend call at p50, the rest is HTTP; means: in the handler beyond the backend "
                    f"call {m['handler_minus_backend_ms']:.2f} ms, outside the handler {m['outside_handler_ms']:.2f} ms; "
                    f"CPU per request: server {m['server_cpu_ms_per_request']:.2f} ms against {m['direct_cpu_ms_per_request']:.2f} ms "
                    f"for the backend's work, client {m['client_cpu_ms_per_request']:.2f} ms")
            if row.params["video_format"] == "mp4":
                note += (f"; decoding the request's videos alone takes {np.median(decode_ms):.1f} ms at p50 "
                         f"(overhead without it: {m['lean_overhead_minus_decode_p50_ms']:.2f} ms)")
            targets.append(Target.check(
                f"reward_overhead_p50[{row.name}]",
                "server overhead per request at p50 (p50 latency over a lean HTTP/1.1 client minus the backend's p50 per call)",
                row.metrics["lean_overhead_p50_ms"], "<=", TARGET_OVERHEAD_MS, unit="ms", note=note))
    per_request_videos = 1 + settings.items_per_request
    cpu_notes = [
        f"{row.name}: CPU per request {row.metrics['server_cpu_ms_per_request']:.2f} ms in the server process (all threads, "
        f"its backend calls included) and {row.metrics['client_cpu_ms_per_request']:.2f} ms in the client, against "
        f"{row.metrics['direct_cpu_ms_per_request']:.2f} ms for the direct backend calls of the same items: serving over HTTP "
        f"costs {(row.metrics['server_cpu_ms_per_request'] + row.metrics['client_cpu_ms_per_request']) / max(row.metrics['direct_cpu_ms_per_request'], 1e-9):.1f}x "
        "the CPU of the backend's own work, on the same shared cores."
        for row in measurements if row.params["concurrency"] == max_c
    ]
    cpu_notes.append(
        "Why the pixel rows miss the targets: the pixel backend's work per request is about as small as the HTTP "
        "path's (parse, validate, hash, batch, serialise) and smaller than the client's; both run on the same 2 cores as "
        "the backend, shared with other jobs, whose load also stretches every thread hand-off (the 1-minute load average "
        "is in the header of docs/benchmarks.md). The judge-like rows, where the backend's own time dominates, meet the throughput "
        "target; the mp4 rows show what decoding adds.")
    return BenchResult(
        name=NAME, item=ITEM, title=TITLE, profile=settings.profile, status="measured",
        settings={**dataclasses.asdict(settings), "cache": "disabled", "decode_ms_per_request": Stats.of(decode_ms).model_dump(),
                  "body_kib": body_kib},
        measurements=measurements, ratios=ratios, targets=targets,
        notes=[
            "server_items_per_s: items / wall time of the run, over HTTP from this process; direct_items_per_s: the same "
            "items (the same decoded frames) through PixelBackend.score_batch in as many calls as the server made "
            "(mean_batch = items / calls).",
            "Latency at concurrency 1 is measured twice per repeat on the same requests: with the benchmark's httpx "
            "client (p50_ms, p99_ms, overhead_p50_ms) and with a lean client (bench.http_load.LeanClient: one keep-alive "
            "HTTP/1.1 connection on a blocking socket, framed by h11, each request's bytes built before its clock starts; "
            "lean_p50_ms, lean_p99_ms, lean_overhead_p50_ms). The difference is the Python HTTP client's own time, "
            "which a caller on another machine pays there, not on the server's cores; the overhead target is judged on "
            "the lean client.",
            "p50/p99 are over all timed requests of the cell; overhead_p50_ms = server p50 minus the direct call's p50 "
            "(concurrency 1: one call per request). app_p50_ms: the server's own time per request from its Server-Timing "
            "header (from the request entering the app to the response starting: body, JSON parsing and validation, "
            "handler, serialisation); app_overhead_p50_ms = app_p50_ms minus the direct call's p50.",
            "What the server does beyond the backend, per request: parse the JSON body and validate it (pydantic: schema, "
            "base64, raw shapes and byte counts), decode base64, hash every video (SHA-256, cache keys even with the cache off), "
            "view raw frames or decode mp4s (each distinct video once), queue the items for the dynamic batcher, run the "
            "backend in a worker thread, aggregate the dimensions, serialise the response; and HTTP both ways. "
            "handler_minus_backend_ms = mean time inside the handler (server's reward_request_latency_seconds) minus the mean "
            "backend call (reward_backend_latency_seconds); outside_handler_ms = mean client latency minus mean handler time: "
            "HTTP, body parsing and validation, response serialisation, the client.",
            f"Decoding one request's {per_request_videos} distinct mp4 videos (source once, {settings.items_per_request} "
            f"edits; what the server does for mp4 requests, the direct call gets frames) takes {np.median(decode_ms):.1f} ms "
            "at p50 on its own; it is part of the mp4 rows' overhead.",
            f"Request bodies: {', '.join(f'{fmt} {kib:.1f} KiB' for fmt, kib in body_kib.items())} (median).",
            "Client, server and direct calls share this machine's cores. server_cpu_ms_per_request: CPU seconds of the server "
            "process (process_cpu_seconds_total) per request; client_cpu_ms_per_request: this process's CPU while it drove "
            "the load; direct_cpu_ms_per_request: this process's CPU for the direct calls, per request's worth of items.",
            *cpu_notes,
        ],
    )


def _cell(url: str, driver: LoadDriver, backend: PixelBackend, requests, case: ServerCase, concurrency: int,
          repeats: int) -> tuple[Measurement, Ratio]:
    """Paired runs: the server at ``concurrency``, then the same items directly in the same number of calls."""
    items = len(requests) * len(requests[0].inputs)
    server_s, direct_s, latencies, app_times, direct_calls, batch_sizes, lean = [], [], [], [], [], [], []
    handler_s = backend_s = calls_total = requests_total = server_cpu = client_cpu = direct_cpu = 0.0
    for _ in range(repeats):
        before = server_counters(url)
        cpu = time.process_time()
        wall, lats, apps = driver.run(requests, concurrency)
        app_times += apps
        client_cpu += time.process_time() - cpu
        after = server_counters(url)
        server_cpu += after["cpu_s"] - before["cpu_s"]
        calls = int(round(after["calls"] - before["calls"]))
        batch_sizes.append((after["items"] - before["items"]) / max(calls, 1))
        handler_s += after["handler_s"] - before["handler_s"]
        backend_s += after["backend_s"] - before["backend_s"]
        calls_total += calls
        requests_total += after["requests"] - before["requests"]
        direct_wall, durations, cpu_s = score_directly(backend, requests, calls)
        direct_cpu += cpu_s
        if concurrency == 1:  # the same requests again over the lean client: latency without the client's own overhead
            lean += lean_latencies(url, requests)
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
        "server_cpu_ms_per_request": 1e3 * server_cpu / (repeats * len(requests)),
        "client_cpu_ms_per_request": 1e3 * client_cpu / (repeats * len(requests)),
        "direct_cpu_ms_per_request": 1e3 * direct_cpu / (repeats * len(requests)),
    }
    if concurrency == 1:
        metrics["overhead_p50_ms"] = metrics["p50_ms"] - metrics["direct_call_p50_ms"]
        metrics["lean_p50_ms"] = float(np.percentile(np.asarray(lean) * 1e3, 50))
        metrics["lean_p99_ms"] = float(np.percentile(np.asarray(lean) * 1e3, 99))
        metrics["lean_overhead_p50_ms"] = metrics["lean_p50_ms"] - metrics["direct_call_p50_ms"]
        metrics["app_p50_ms"] = float(np.nanpercentile(np.asarray(app_times) * 1e3, 50))
        metrics["app_overhead_p50_ms"] = metrics["app_p50_ms"] - metrics["direct_call_p50_ms"]
        handler_ms = 1e3 * handler_s / max(requests_total, 1)
        metrics["handler_minus_backend_ms"] = handler_ms - 1e3 * backend_s / max(calls_total, 1)
        metrics["outside_handler_ms"] = float(np.mean(lat_ms)) - handler_ms
    name = f"{case.name} c={concurrency}"
    ratio = Ratio(name=f"{name}: server / direct throughput", numerator="server", denominator="direct",
                  description="items per second over HTTP / items per second calling the backend",
                  stats=Stats.of([d / s for s, d in zip(server_s, direct_s)]))
    params = {"video_format": case.video_format, "max_batch_size": case.max_batch_size, "max_wait_s": case.max_wait_s,
              "latency_s": case.latency_s, "concurrency": concurrency, "requests": len(requests), "items": items}
    return Measurement(name=name, params=params, metrics=metrics), ratio


def run(profile: str) -> BenchResult:
    return measure(SETTINGS[profile])
