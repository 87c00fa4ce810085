"""Load for the reward-server benchmark: unique scoring requests built from the
bundled clips, a closed-loop HTTP driver at a fixed concurrency, and the
server's batch counters read from ``GET /metrics``."""
from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11
import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench.workload import PROJECT_ROOT
from editrl.protocol.dataset import PromptDataset
from editrl.protocol.reward import ScoreItem, ScoreRequest, VideoPayload
from editrl.protocol.video import decode_video, encode_mp4
from editrl.reward_server.backends import ScoreInput


@dataclass
class Request:
    """One ``POST /v1/score`` body (serialised once) and the same items decoded for the backend."""

    body: bytes
    inputs: list[ScoreInput]
    """What the server's backend receives for this request's items, in order."""
    mp4s: list[bytes]
    """Every distinct video of the request as an mp4 (the source once, then each
    item's edit), for decode timings."""


def build_requests(count: int, items_per_request: int, frames: int, size: int, tag: str, fps: int = 8,
                   video_format: str = "mp4") -> list[Request]:
    """``count`` requests shaped like a rollout worker's: one GRPO group each, i.e.
    ``items_per_request`` unique items sharing one source video.

    Sources are the bundled training clips at ``size`` x ``size`` (request ``r``
    uses clip ``r``, cycling); item ``i``'s edit is the source brightened by
    ``10 (i + 1)`` grey levels; every item's instruction is its clip's instruction
    plus a unique suffix (so the server never joins two items in flight and the
    score cache, disabled anyway, could not answer them). ``video_format`` is
    ``mp4`` (H.264 files, decoded by the server) or ``raw`` (the frames the mp4s
    decode to, sent as raw ``uint8`` with their shape): both give the backend the
    same frames, which are also what :attr:`Request.inputs` holds.
    """
    if video_format not in ("mp4", "raw"):
        raise ValueError(f"video_format must be 'mp4' or 'raw', got {video_format!r}")
    dataset = PromptDataset(PROJECT_ROOT / "assets" / "clips" / "prompts_train.parquet", frames, size, size)
    encoded: dict[tuple[str, int], tuple[bytes, np.ndarray]] = {}

    def video(path: str, frames_: np.ndarray, level: int) -> tuple[bytes, np.ndarray]:
        if (path, level) not in encoded:
            mp4 = encode_mp4(frames_, fps=fps)
            encoded[(path, level)] = (mp4, decode_video(mp4))
        return encoded[(path, level)]

    def wire(mp4: bytes, decoded: np.ndarray) -> VideoPayload:
        return VideoPayload.from_bytes(mp4) if video_format == "mp4" else VideoPayload.from_frames(decoded)

    requests = []
    for r in range(count):
        row = dataset[r % len(dataset)]
        clip = dataset.clip(row)
        source_mp4, source_frames = video(row.video_path, clip, 0)
        items, inputs, mp4s = [], [], [source_mp4]
        for i in range(items_per_request):
            level = 10 * (i + 1)
            edited = np.clip(clip.astype(np.int16) + level, 0, 255).astype(np.uint8)
            edited_mp4, edited_frames = video(row.video_path, edited, level)
            item_id = f"{tag}-{r}/{i}"
            instruction = f"{row.instruction} [{tag} {r}.{i}]"
            items.append(ScoreItem(item_id=item_id, instruction=instruction, source=wire(source_mp4, source_frames),
                                   edited=wire(edited_mp4, edited_frames)))
            inputs.append(ScoreInput(instruction=instruction, source=source_frames, edited=edited_frames, item_id=item_id,
                                     source_bytes=source_mp4 if video_format == "mp4" else None,
                                     edited_bytes=edited_mp4 if video_format == "mp4" else None))
            mp4s.append(edited_mp4)
        body = ScoreRequest(request_id=f"{tag}-{r}", items=items).model_dump_json().encode()
        requests.append(Request(body=body, inputs=inputs, mp4s=mp4s))
    return requests


def _server_timing_s(header: str) -> float:
    """The server's ``Server-Timing: app;dur=<ms>`` header value in seconds (NaN when absent)."""
    for part in header.split(","):
        name, _, params = part.strip().partition(";")
        if name == "app" and params.startswith("dur="):
            return float(params[4:]) / 1e3
    return float("nan")


async def _drive(client: httpx.AsyncClient, bodies: list[bytes], concurrency: int) -> tuple[float, list[float], list[float]]:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    latencies: list[float] = []
    app_times: list[float] = []

    async def user() -> None:
        while not queue.empty():
            body = queue.get_nowait()
            start = time.perf_counter()
            response = await client.post("/v1/score", content=body, headers={"Content-Type": "application/json"})
            latencies.append(time.perf_counter() - start)
            app_times.append(_server_timing_s(response.headers.get("server-timing", "")))
            _check_answer(response.status_code, response.content)

    start = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(concurrency)))
    return time.perf_counter() - start, latencies, app_times


class LoadDriver:
    """A closed-loop client: ``concurrency`` users, each posting its next request as
    soon as the previous one is answered, until the requests run out."""

    def __init__(self, url: str, max_concurrency: int, timeout_s: float = 300.0) -> None:
        self._loop = asyncio.new_event_loop()
        # idle connections are dropped after 2 s, before uvicorn's 5 s keep-alive closes them under a request
        limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency, keepalive_expiry=2.0)
        self._client = httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits)

    def run(self, requests: list[Request], concurrency: int) -> tuple[float, list[float], list[float]]:
        """Wall seconds for all requests, each request's latency in seconds as the
        client saw it, and each request's time inside the server app in seconds
        (its ``Server-Timing`` header)."""
        return self._loop.run_until_complete(_drive(self._client, [r.body for r in requests], concurrency))

    def close(self) -> None:
        self._loop.run_until_complete(self._client.aclose())
        self._loop.close()


class LeanClient:
    """One keep-alive HTTP/1.1 connection on a blocking socket, framed by ``h11``: a
    client that adds almost nothing to the latency it measures, so that p50 latency
    minus the backend's time is the server's overhead and not the client's.

    Each request's bytes are built before its clock starts; the clock stops when the
    last byte of the response has arrived. Use as a context manager (closes the socket).
    """

    def __init__(self, url: str, timeout_s: float = 60.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"LeanClient needs http://host:port, got {url!r}")
        self._host = f"{parts.hostname}:{parts.port}"
        self._sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout_s)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._conn = h11.Connection(h11.CLIENT)

    def post(self, path: str, body: bytes) -> tuple[int, bytes, float, float]:
        """POST ``body`` as JSON; returns (status, response body, seconds from the first byte
        sent to the last byte received, the server's ``Server-Timing`` app time in seconds or NaN).

        Raises:
            ConnectionError: the server closed the connection before answering.
        """
        headers = [("Host", self._host), ("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        wire = (self._conn.send(h11.Request(method="POST", target=path, headers=headers))
                + self._conn.send(h11.Data(data=body)) + self._conn.send(h11.EndOfMessage()))
        start = time.perf_counter()
        self._sock.sendall(wire)
        status, app_s, chunks = 0, float("nan"), []
        while True:
            event = self._conn.next_event()
            if event is h11.NEED_DATA:
                data = self._sock.recv(1 << 16)
                if not data:
                    raise ConnectionError(f"{self._host} closed the connection before answering")
                self._conn.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
                app_s = _server_timing_s(dict(event.headers).get(b"server-timing", b"").decode())
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
        elapsed = time.perf_counter() - start
        self._conn.start_next_cycle()
        return status, b"".join(chunks), elapsed, app_s

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "LeanClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def lean_latencies(url: str, requests: list[Request]) -> list[float]:
    """Post ``requests`` one after the other over a :class:`LeanClient`; each request's
    latency in seconds.

    Raises:
        RuntimeError: a request was not answered 200 or an item came back not ok.
    """
    latencies = []
    with LeanClient(url) as client:
        for request in requests:
            status, body, seconds, _ = client.post("/v1/score", request.body)
            _check_answer(status, body)
            latencies.append(seconds)
    return latencies


def _check_answer(status: int, body: bytes) -> None:
    if status != 200:
        raise RuntimeError(f"reward server answered HTTP {status}: {body[:300]!r}")
    if not all(result["ok"] for result in json.loads(body)["results"]):
        raise RuntimeError(f"an item failed: {body[:300]!r}")


def server_counters(url: str, backend: str = "pixel") -> dict[str, float]:
    """Totals so far from the server's ``GET /metrics``: ``calls`` and ``items`` of
    the backend (``reward_backend_batch_size``), ``backend_s`` (seconds inside its
    calls, ``reward_backend_latency_seconds``), ``requests`` and ``handler_s``
    (seconds inside ``POST /v1/score`` handlers after the body was parsed and
    validated, ``reward_request_latency_seconds``), ``cpu_s`` (CPU seconds of the
    server process, all threads, ``process_cpu_seconds_total``)."""
    text = httpx.get(f"{url}/metrics", timeout=30.0).text
    wanted = {
        ("reward_backend_batch_size", "_count"): "calls", ("reward_backend_batch_size", "_sum"): "items",
        ("reward_backend_latency_seconds", "_sum"): "backend_s",
        ("reward_request_latency_seconds", "_count"): "requests", ("reward_request_latency_seconds", "_sum"): "handler_s",
        ("process_cpu_seconds", "_total"): "cpu_s",
    }
    out = dict.fromkeys(wanted.values(), 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if family.name.startswith("reward_backend") and sample.labels.get("backend") != backend:
                continue
            for suffix in ("_count", "_sum", "_total"):
                if sample.name == family.name + suffix and (family.name, suffix) in wanted:
                    out[wanted[(family.name, suffix)]] = sample.value
    return out


def batch_counters(url: str, backend: str = "pixel") -> tuple[float, float]:
    """(backend calls, items scored) so far, from the server's
    ``reward_backend_batch_size`` histogram."""
    counters = server_counters(url, backend)
    return counters["calls"], counters["items"]


def score_directly(backend, requests: list[Request], batches: int) -> tuple[float, list[float], float]:
    """Score the requests' items with ``backend.score_batch`` in ``batches`` calls of
    near-equal size (the server's number of calls for the same items); wall seconds,
    each call's seconds, and this process's CPU seconds for all of it."""
    items = [item for request in requests for item in request.inputs]
    durations = []
    cpu = time.process_time()
    start = time.perf_counter()
    for chunk in np.array_split(np.arange(len(items)), max(1, batches)):
        if len(chunk):
            call = time.perf_counter()
            backend.score_batch([items[i] for i in chunk])
            durations.append(time.perf_counter() - call)
    return time.perf_counter() - start, durations, time.process_time() - cpu
