"""A tiny mp4 of many large blank frames cannot make the reward server allocate its decoded size:
the server process answers 413 naming the item and field, its peak RSS stays near what it was,
and a normal request next to it is scored. Real server process, real HTTP, real PyAV.
"""
from __future__ import annotations

import base64
import threading
from pathlib import Path

import httpx
import pytest
from reward_media import brighter, camera_pan, item
from reward_servers import process_server
from video_streams import blank_video

from editrl.protocol.reward import ScoreItem, ScoreRequest, VideoPayload

BUDGET_PIXELS = 5_000_000
"""The server's ``max_video_pixels`` here: 15 MB of decoded RGB at most per video."""
SOURCE = camera_pan(frames=2, size=16)


def peak_rss_bytes(pid: int) -> int:
    """``VmHWM`` of a Linux process: the peak of its resident set since it started, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def bomb_request(request_id: str, data: bytes) -> bytes:
    video = VideoPayload(data=base64.b64encode(data).decode())
    bomb = ScoreItem(item_id=f"{request_id}/0", instruction="make it brighter", source=video, edited=video)
    return ScoreRequest(request_id=request_id, items=[bomb]).model_dump_json().encode()


def normal_request(request_id: str) -> bytes:
    return ScoreRequest(request_id=request_id, items=[
        item(f"{request_id}/0", "make it brighter", SOURCE, brighter(SOURCE))]).model_dump_json().encode()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak RSS from /proc")
@pytest.mark.parametrize("container,where", [
    ("mp4", "from the container's header, before decoding"),       # declares 240 frames
    ("mpegts", "counted while decoding, stopped there"),             # declares no frame count
])
def test_a_tiny_video_of_many_large_frames_is_refused_with_bounded_server_memory(tmp_path, container, where):
    data = blank_video(240, 1280, 720, container)  # 663 MiB of RGB frames, sent as source and edit
    assert len(data) < 200_000  # mpegts packs blank frames less tightly than mp4 (8 KB)
    config = {"max_wait_s": 0.0, "max_video_pixels": BUDGET_PIXELS,
              "reward": {"version": "pixels-1", "weights": {"preservation": 1.0}}}
    with process_server(tmp_path, config, name="budget") as url, httpx.Client(base_url=url, timeout=60) as client:
        headers = {"content-type": "application/json"}
        assert client.post("/v1/score", content=normal_request("warm"), headers=headers).json()["results"][0]["ok"]
        before = peak_rss_bytes(url.pid)

        answers: dict[str, httpx.Response] = {}
        beside = threading.Thread(target=lambda: answers.update(
            normal=httpx.post(f"{url}/v1/score", content=normal_request("beside"), headers=headers, timeout=60)))
        beside.start()
        refused = client.post("/v1/score", content=bomb_request("bomb", data), headers=headers)
        beside.join(timeout=60)
        grown = peak_rss_bytes(url.pid) - before

    assert refused.status_code == 413, refused.text[:500]
    detail = refused.json()["detail"]
    assert detail.startswith("items[0].source (item_id=bomb/0): ") and "> budget 5.0 Mpx" in detail and where in detail, detail
    assert answers["normal"].status_code == 200 and answers["normal"].json()["results"][0]["ok"]
    # the budget's 15 MB of frames plus the decoder's own buffers; decoding it all took 663 MiB per video
    assert grown < 96 * 2**20, f"the server's peak RSS grew by {grown / 2**20:.0f} MiB"
