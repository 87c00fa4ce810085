"""Load for the reward-server benchmark: unique scoring requests built from the
bundled clips, a closed-loop HTTP driver at a fixed concurrency, and the
server's batch counters read from ``GET /metrics``."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench.workload import PROJECT_ROOT
from editrl.data.dataset import PromptDataset
from protocol.reward import ScoreItem, ScoreRequest, VideoPayload
from protocol.video import decode_video, encode_mp4
from reward_server.backends import ScoreInput


@dataclass
class Request:
    """One ``POST /v1/score`` body (serialised once) and the same items decoded for the backend."""

    body: bytes
    inputs: list[ScoreInput]
    """What the server's backend receives for this request's items, in order."""
    mp4s: list[bytes]
    """Every video of the request as sent (source and edited per item), for decode timings."""


def build_requests(count: int, items_per_request: int, frames: int, size: int, tag: str, fps: int = 8) -> list[Request]:
    """``count`` requests of ``items_per_request`` unique items each.

    Sources are the bundled training clips at ``size`` x ``size``; the edit is the
    source brightened by 30 grey levels; every item's instruction is its clip's
    instruction plus a unique suffix (so the server never joins two items in flight
    and the score cache, disabled anyway, could not answer them).
    """
    dataset = PromptDataset(PROJECT_ROOT / "assets" / "clips" / "prompts_train.parquet", frames, size, size)
    encoded = {}
    requests = []
    for r in range(count):
        items, inputs, mp4s = [], [], []
        for i in range(items_per_request):
            row = dataset[(r * items_per_request + i) % len(dataset)]
            if row.video_path not in encoded:
                source = dataset.clip(row)
                edited = np.clip(source.astype(np.int16) + 30, 0, 255).astype(np.uint8)
                source_mp4, edited_mp4 = encode_mp4(source, fps=fps), encode_mp4(edited, fps=fps)
                encoded[row.video_path] = (source_mp4, edited_mp4, decode_video(source_mp4), decode_video(edited_mp4))
            source_mp4, edited_mp4, source_frames, edited_frames = encoded[row.video_path]
            item_id = f"{tag}-{r}/{i}"
            instruction = f"{row.instruction} [{tag} {r}.{i}]"
            items.append(ScoreItem(item_id=item_id, instruction=instruction, source=VideoPayload.from_bytes(source_mp4),
                                   edited=VideoPayload.from_bytes(edited_mp4)))
            inputs.append(ScoreInput(instruction=instruction, source=source_frames, edited=edited_frames, item_id=item_id,
                                     source_bytes=source_mp4, edited_bytes=edited_mp4))
            mp4s += [source_mp4, edited_mp4]
        body = ScoreRequest(request_id=f"{tag}-{r}", items=items).model_dump_json().encode()
        requests.append(Request(body=body, inputs=inputs, mp4s=mp4s))
    return requests


async def _drive(client: httpx.AsyncClient, bodies: list[bytes], concurrency: int) -> tuple[float, list[float]]:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    latencies: list[float] = []

    async def user() -> None:
        while not queue.empty():
            body = queue.get_nowait()
            start = time.perf_counter()
            response = await client.post("/v1/score", content=body, headers={"Content-Type": "application/json"})
            latencies.append(time.perf_counter() - start)
            if response.status_code != 200:
                raise RuntimeError(f"reward server answered HTTP {response.status_code}: {response.text[:300]}")
            if not all(result["ok"] for result in response.json()["results"]):
                raise RuntimeError(f"an item failed: {response.text[:300]}")

    start = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(concurrency)))
    return time.perf_counter() - start, latencies


class LoadDriver:
    """A closed-loop client: ``concurrency`` users, each posting its next request as
    soon as the previous one is answered, until the requests run out."""

    def __init__(self, url: str, max_concurrency: int, timeout_s: float = 300.0) -> None:
        self._loop = asyncio.new_event_loop()
        limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
        self._client = httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits)

    def run(self, requests: list[Request], concurrency: int) -> tuple[float, list[float]]:
        """Wall seconds for all requests and each request's latency in seconds."""
        return self._loop.run_until_complete(_drive(self._client, [r.body for r in requests], concurrency))

    def close(self) -> None:
        self._loop.run_until_complete(self._client.aclose())
        self._loop.close()


def batch_counters(url: str, backend: str = "pixel") -> tuple[float, float]:
    """(backend calls, items scored) so far, from the server's
    ``reward_backend_batch_size`` histogram."""
    text = httpx.get(f"{url}/metrics", timeout=30.0).text
    count = total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "reward_backend_batch_size":
            continue
        for sample in family.samples:
            if sample.labels.get("backend") != backend:
                continue
            if sample.name.endswith("_count"):
                count = sample.value
            elif sample.name.endswith("_sum"):
                total = sample.value
    return count, total


def score_directly(backend, requests: list[Request], batches: int) -> tuple[float, list[float]]:
    """Score the requests' items with ``backend.score_batch`` in ``batches`` calls of
    near-equal size (the server's number of calls for the same items); wall seconds
    and each call's seconds."""
    items = [item for request in requests for item in request.inputs]
    durations = []
    start = time.perf_counter()
    for chunk in np.array_split(np.arange(len(items)), max(1, batches)):
        if len(chunk):
            call = time.perf_counter()
            backend.score_batch([items[i] for i in chunk])
            durations.append(time.perf_counter() - call)
    return time.perf_counter() - start, durations
