"""The reward server as a real process over real HTTP, and the client rollout workers use."""
from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from skimage import data as skdata

from editrl.cluster.reward_process import free_port
from editrl.protocol.reward import ScoreItem, ScoreRequest, VideoPayload
from editrl.protocol.video import decode_video, encode_mp4
from editrl.reward_server.backends.pixel import PixelInput, score_batch
from editrl.rollout_workers.reward_client import RewardClient, RewardServerError

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_REWARD_VERSION = "pixel-test-3"
MAX_REQUEST_BYTES = 2 * 1024 * 1024
WEIGHTS = {"instruction_following": 0.5, "preservation": 0.3, "temporal_consistency": 0.2}


@contextlib.contextmanager
def running_server(tmp_path: Path, port: int, wait: bool = True):
    """``python -m editrl.reward_server`` in a subprocess; stopped through its Popen handle."""
    reward = {"version": TEST_REWARD_VERSION, "weights": WEIGHTS}
    config = {"max_batch_size": 16, "max_wait_s": 0.1, "max_request_bytes": MAX_REQUEST_BYTES, "reward": reward}
    config_path = tmp_path / f"reward_server_{port}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / f"reward_server_{port}.log"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "editrl.reward_server", "--config", str(config_path), "--port", str(port)],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        if wait:
            with RewardClient(url) as client:
                try:
                    client.wait_until_healthy(timeout_s=30)
                except RewardServerError:
                    pytest.fail(f"server did not start:\n{log_path.read_text()}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("reward_server"), free_port()) as url:
        yield url


def camera_pan(frames: int = 6, size: int = 64, step: int = 4) -> np.ndarray:
    """A real picture (scikit-image's astronaut) seen by a camera panning right."""
    image = skdata.astronaut()[::4, ::4]  # 128 x 128
    return np.stack([image[20:20 + size, 10 + t * step:10 + t * step + size] for t in range(frames)])


def payload(frames: np.ndarray) -> VideoPayload:
    return VideoPayload.from_bytes(encode_mp4(frames))


SOURCE = camera_pan()
BRIGHTER = np.clip(SOURCE.astype(np.int64) + 40, 0, 255).astype(np.uint8)
LUMA = (SOURCE.astype(np.float64) @ np.array([0.299, 0.587, 0.114])).round().astype(np.uint8)
GRAY = np.repeat(LUMA[..., None], 3, axis=-1)


def raw_request(items: list[dict]) -> dict:
    return {"request_id": "raw-1", "items": items}


def raw_item(item_id: str, source: str, edited: str, instruction: str = "make it brighter") -> dict:
    return {"item_id": item_id, "instruction": instruction, "source": {"data": source}, "edited": {"data": edited}}


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in metrics"
    return float(match.group(1))


# ---------------------------------------------------------------- scoring
def test_score_batch_end_to_end(server):
    url = server
    src = payload(SOURCE)
    items = [
        ScoreItem(item_id="g1/0", instruction="Make the video brighter", source=src, edited=payload(BRIGHTER)),
        ScoreItem(item_id="g1/1", instruction="Turn it into a black-and-white film", source=src, edited=payload(GRAY)),
        ScoreItem(item_id="g1/2", instruction="Add a hat to the astronaut", source=src, edited=src),
        ScoreItem(item_id="g1/3", instruction="Make it brighter", source=src, edited=payload(BRIGHTER[:4])),
    ]
    request = ScoreRequest(request_id="req-e2e", items=items)
    with RewardClient(url) as client:
        response = client.score(request)
    assert response.request_id == "req-e2e"
    assert response.reward_config_version == TEST_REWARD_VERSION
    assert [r.item_id for r in response.results] == ["g1/0", "g1/1", "g1/2", "g1/3"]
    # the server's dimensions are the backend's numbers on the decoded videos, bit for bit
    decoded = [
        PixelInput(i.instruction, decode_video(i.source.to_bytes()), decode_video(i.edited.to_bytes()), i.item_id)
        for i in items
    ]
    local = score_batch(decoded)
    for result, expected in zip(response.results[:3], local[:3]):
        assert result.ok and result.error is None
        assert result.backends == {"pixel": "pixel-v3"}
        assert result.dimensions == expected.dimensions
        used = {k: v for k, v in result.dimensions.items() if v is not None}
        assert all(0.0 <= v <= 10.0 for v in used.values())
        # the reward is the weighted mean of the weighted dimensions that apply; the others are only reported
        weighted = {k: v for k, v in used.items() if k in WEIGHTS}
        assert "detail_preservation" in used and "detail_preservation" not in weighted
        expected_reward = sum(WEIGHTS[k] * v for k, v in weighted.items()) / sum(WEIGHTS[k] for k in weighted)
        assert result.reward == pytest.approx(expected_reward)
    brighter, gray, unchanged, mismatched = response.results
    assert brighter.dimensions["instruction_following"] > 7.0
    assert brighter.dimensions["preservation"] > 9.0 and brighter.dimensions["temporal_consistency"] > 9.0
    assert gray.dimensions["instruction_following"] > 9.0
    assert unchanged.dimensions["instruction_following"] is None
    assert unchanged.dimensions["preservation"] > 9.5
    assert not mismatched.ok and mismatched.reward is None
    assert "(6, 64, 64, 3)" in mismatched.error and "(4, 64, 64, 3)" in mismatched.error


def test_concurrent_requests_are_batched(server):
    url = server
    before = httpx.get(f"{url}/metrics").text
    src = payload(SOURCE)
    barrier = threading.Barrier(8)
    responses, errors = [], []

    def worker(index: int) -> None:
        request = ScoreRequest(
            request_id=f"conc-{index}",
            # distinct instructions: identical items would be scored once and shared (the score cache)
            items=[ScoreItem(item_id=f"c/{index}", instruction=f"make it darker ({index})", source=src, edited=src)],
        )
        with RewardClient(url) as client:
            barrier.wait()
            try:
                responses.append(client.score(request))
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and len(responses) == 8
    after = httpx.get(f"{url}/metrics").text
    batches = metric(after, "reward_batch_size_count") - metric(before, "reward_batch_size_count")
    items = metric(after, "reward_batch_size_sum") - metric(before, "reward_batch_size_sum")
    singles = metric(after, 'reward_batch_size_bucket{le="1.0"}') - metric(before, 'reward_batch_size_bucket{le="1.0"}')
    assert items == 8
    assert batches < 8 and singles < batches  # at least one batch held more than one request's item
    assert metric(after, 'reward_items_scored_total{backend="pixel"}') >= 8
    assert metric(after, "reward_request_latency_seconds_count") >= 8


# ---------------------------------------------------------------- bad input
def test_bad_base64_is_422_naming_the_field(server):
    url = server
    good = payload(SOURCE[:2]).data
    response = httpx.post(f"{url}/v1/score", json=raw_request([raw_item("a", good, "@@not base64@@")]))
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "items", 0, "edited", "data"] and "base64" in error["msg"]


def test_undecodable_video_is_422_naming_the_item(server):
    url = server
    good = payload(SOURCE[:2]).data
    junk = base64.b64encode(b"this is not an mp4 file at all").decode()
    body = raw_request([raw_item("g1/0", good, good), raw_item("g1/1", good, junk)])
    response = httpx.post(f"{url}/v1/score", json=body)
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "items", 1, "edited", "data"]
    assert error["msg"].startswith("items[1].edited (item_id=g1/1): cannot decode video")
    # the client gives up at once on a 4xx and passes the server's message on
    request = ScoreRequest.model_validate(body)
    with RewardClient(url, max_attempts=5, backoff_initial_s=5.0) as client:
        started = time.monotonic()
        with pytest.raises(RewardServerError, match=r"HTTP 422.*item_id=g1/1"):
            client.score(request)
        assert time.monotonic() - started < 2.0


def test_raw_frames_score_exactly_like_the_decoded_mp4(server):
    url = server
    mp4_items = [
        ScoreItem(item_id=f"g2/{i}", instruction="Make the video brighter", source=payload(SOURCE), edited=payload(edited))
        for i, edited in enumerate((BRIGHTER, GRAY))
    ]
    raw_items = [
        ScoreItem(item_id=i.item_id, instruction=i.instruction,
                  source=VideoPayload.from_frames(decode_video(i.source.to_bytes())),
                  edited=VideoPayload.from_frames(decode_video(i.edited.to_bytes())))
        for i in mp4_items
    ]
    body = ScoreRequest(request_id="raw-2", items=raw_items).model_dump(mode="json")
    assert body["items"][0]["source"]["format"] == "raw" and body["items"][0]["source"]["shape"] == list(SOURCE.shape)
    with RewardClient(url) as client:
        from_mp4 = client.score(ScoreRequest(request_id="mp4-2", items=mp4_items))
        from_raw = client.score(ScoreRequest(request_id="raw-2", items=raw_items))
    assert all(r.ok for r in from_raw.results)
    assert [r.dimensions for r in from_raw.results] == [r.dimensions for r in from_mp4.results]


def test_responses_carry_server_timing_and_metrics_the_process_cpu(server):
    url = server
    item = ScoreItem(item_id="g5/0", instruction="Make the video brighter", source=VideoPayload.from_frames(SOURCE[:2]),
                     edited=VideoPayload.from_frames(BRIGHTER[:2]))
    response = httpx.post(f"{url}/v1/score", content=ScoreRequest(request_id="timing", items=[item]).model_dump_json(),
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 200
    match = re.fullmatch(r"app;dur=(\d+\.\d+)", response.headers["server-timing"])
    assert match and float(match.group(1)) > 0
    assert metric(httpx.get(f"{url}/metrics").text, "process_cpu_seconds_total") > 0


def test_bad_raw_frames_are_422_naming_the_field(server):
    url = server
    frames = SOURCE[:2]
    good = VideoPayload.from_frames(frames).model_dump()
    data = good["data"]
    cases = {
        "needs shape": {"format": "raw", "data": data},
        "must be [F, H, W, 3]": {"format": "raw", "data": data, "shape": [2, 64, 64, 4]},
        "holds 24576 bytes, shape [2, 64, 65, 3] needs 24960": {"format": "raw", "data": data, "shape": [2, 64, 65, 3]},
        "positive sizes": {"format": "raw", "data": data, "shape": [0, 64, 64, 3]},
        "only for format 'raw'": {"format": "mp4", "data": payload(frames).data, "shape": [2, 64, 64, 3]},
    }
    for message, edited in cases.items():
        body = raw_request([{"item_id": "g3/0", "instruction": "make it brighter", "source": good, "edited": edited}])
        response = httpx.post(f"{url}/v1/score", json=body)
        assert response.status_code == 422, message
        (error,) = response.json()["detail"]
        assert error["loc"][:4] == ["body", "items", 0, "edited"] and message.split(" needs")[0] in error["msg"], (message, error)


def test_a_shared_undecodable_source_is_422_for_every_item(server):
    url = server
    good = payload(SOURCE[:2]).data
    junk = base64.b64encode(b"this is not an mp4 file at all").decode()
    response = httpx.post(f"{url}/v1/score", json=raw_request([raw_item("g4/0", junk, good), raw_item("g4/1", junk, good)]))
    assert response.status_code == 422
    errors = response.json()["detail"]
    assert [e["loc"] for e in errors] == [["body", "items", i, "source", "data"] for i in (0, 1)]
    assert [e["msg"].split(": ", 1)[0] for e in errors] == [f"items[{i}].source (item_id=g4/{i})" for i in (0, 1)]
    assert all("cannot decode video" in e["msg"] for e in errors)


def test_duplicate_ids_and_malformed_json_are_422(server):
    url = server
    good = payload(SOURCE[:2]).data
    response = httpx.post(f"{url}/v1/score", json=raw_request([raw_item("x", good, good), raw_item("x", good, good)]))
    assert response.status_code == 422 and "duplicate item_id 'x'" in response.text
    response = httpx.post(f"{url}/v1/score", content=b'{"request_id": ', headers={"content-type": "application/json"})
    assert response.status_code == 422 and "json_invalid" in response.text
    response = httpx.post(f"{url}/v1/score", json={"request_id": "r", "items": [{"item_id": "a"}]})
    assert response.status_code == 422 and "instruction" in response.text


def test_oversized_body_is_413(server):
    url = server
    big = base64.b64encode(b"\0" * (MAX_REQUEST_BYTES * 3 // 4 + 1024)).decode()
    response = httpx.post(f"{url}/v1/score", json=raw_request([raw_item("a", big, big)]))
    assert response.status_code == 413
    chunk = b" " * 65536  # no Content-Length: the server counts the bytes it receives

    chunks = (chunk for _ in range(MAX_REQUEST_BYTES // len(chunk) + 2))
    response = httpx.post(f"{url}/v1/score", content=chunks, headers={"content-type": "application/json"})
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert response.status_code == 413
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}


def test_config_endpoint(server):
    url = server
    body = httpx.get(f"{url}/v1/config").json()
    assert body["version"] == TEST_REWARD_VERSION and body["backend_version"] == "pixel-v3"
    assert body["weights"] == WEIGHTS


# ---------------------------------------------------------------- client
def one_item_request(request_id: str = "req-client") -> ScoreRequest:
    src = payload(SOURCE[:2])
    return ScoreRequest(request_id=request_id, items=[ScoreItem(item_id="i/0", instruction="brighter", source=src, edited=src)])


def test_client_retries_until_the_server_is_up(tmp_path, caplog):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    outcome: dict = {}

    def call() -> None:
        with RewardClient(url, max_attempts=40, backoff_initial_s=0.1, backoff_max_s=0.25) as client:
            try:
                outcome["response"] = client.score(one_item_request("req-late"))
            except Exception as exc:  # noqa: BLE001 - checked below
                outcome["error"] = exc

    caplog.set_level(logging.WARNING, logger="rollout_workers.reward_client")
    thread = threading.Thread(target=call)
    thread.start()
    deadline = time.monotonic() + 10
    while "attempt 1/40 failed" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.02)  # poll interval
    assert "attempt 1/40 failed" in caplog.text, "the client did not log its first failed attempt within 10 s"
    with running_server(tmp_path, port, wait=False):
        thread.join(timeout=40)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["response"].request_id == "req-late" and outcome["response"].results[0].ok


def test_client_gives_up_on_a_closed_port():
    url = f"http://127.0.0.1:{free_port()}"
    with RewardClient(url, max_attempts=3, backoff_initial_s=0.01, backoff_max_s=0.02) as client:
        with pytest.raises(RewardServerError, match=rf"{re.escape(url)}/v1/score failed after 3 attempts"):
            client.score(one_item_request())
        with pytest.raises(RewardServerError, match="not healthy"):
            client.wait_until_healthy(timeout_s=0.3, poll_interval_s=0.05)


@contextlib.contextmanager
def stub_server(responses: list[tuple[int, bytes]]):
    """A plain http.server answering POSTs with ``responses`` in turn (the last repeats)."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server API
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(json.loads(body)["request_id"])
            status, content = responses[min(len(seen), len(responses)) - 1]
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def valid_body(request: ScoreRequest, item_ids: list[str] | None = None) -> bytes:
    ids = item_ids if item_ids is not None else [i.item_id for i in request.items]
    results = [{"item_id": i, "ok": True, "reward": 5.0, "dimensions": {"preservation": 5.0}} for i in ids]
    return json.dumps({"request_id": request.request_id, "reward_config_version": "v", "results": results}).encode()


def test_client_retries_5xx_and_429_with_the_same_request_id():
    request = one_item_request("req-same")
    responses = [(503, b'{"detail": "busy"}'), (429, b"slow down"), (500, b"oops"), (200, valid_body(request))]
    with stub_server(responses) as (url, seen):
        with RewardClient(url, max_attempts=5, backoff_initial_s=0.01, backoff_max_s=0.02) as client:
            response = client.score(request)
    assert seen == ["req-same"] * 4
    assert response.results[0].reward == 5.0


@pytest.mark.parametrize(
    "status, body, attempts, message",
    [
        (400, b'{"detail": "bad things in items[0]"}', 1, r"HTTP 400: bad things in items\[0\]"),  # no retry
        (502, b"bad gateway", 3, "failed after 3 attempts.*HTTP 502"),
    ],
)
def test_client_http_errors(status, body, attempts, message):
    with stub_server([(status, body)]) as (url, seen):
        with RewardClient(url, max_attempts=3, backoff_initial_s=0.01, backoff_max_s=0.02) as client:
            with pytest.raises(RewardServerError, match=message):
                client.score(one_item_request())
    assert len(seen) == attempts


@pytest.mark.parametrize(
    "body",
    [
        b"<html>not json</html>",
        b'{"request_id": "req-client", "results": "nope"}',
        b'{"request_id": "someone-else", "reward_config_version": "v", "results": []}',
        "ids",
    ],
    ids=["not-json", "wrong-schema", "wrong-request-id", "wrong-item-ids"],
)
def test_client_rejects_garbage_responses(body):
    request = one_item_request()
    if body == "ids":
        body = valid_body(request, item_ids=["someone/else"])
    with stub_server([(200, body)]) as (url, seen):
        with RewardClient(url, max_attempts=3, backoff_initial_s=0.01) as client:
            with pytest.raises(RewardServerError, match="garbage response"):
                client.score(request)
    assert len(seen) == 1
