"""The dynamic batcher and the reward config's aggregation rules."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from reward_server.batching import BatcherStopped, DynamicBatcher
from reward_server.config import AggregationError, RewardConfig, ServerConfig, load_server_config

REPO_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- config and aggregation
def test_aggregation_rules():
    config = RewardConfig(weights={"a": 0.6, "b": 0.25, "c": 0.15})
    assert config.aggregate({"a": 10.0, "b": 4.0, "c": 2.0}) == pytest.approx(6 + 1 + 0.3)
    # "a" not applicable: weights renormalised over b and c: (0.25 * 4 + 0.15 * 2) / 0.4 = 3.25
    assert config.aggregate({"a": None, "b": 4.0, "c": 2.0}) == pytest.approx(3.25)
    with pytest.raises(AggregationError, match="all weighted dimensions"):
        config.aggregate({"a": None, "b": None, "c": None})
    with pytest.raises(AggregationError, match="'b' is not finite"):
        config.aggregate({"a": 1.0, "b": float("nan"), "c": 2.0})
    with pytest.raises(AggregationError, match="'c' is missing"):
        config.aggregate({"a": 1.0, "b": 2.0})
    with pytest.raises(ValueError, match="at least one weight"):
        RewardConfig(weights={"a": 0.0})


def test_shipped_config_loads():
    config = load_server_config(REPO_ROOT / "configs" / "reward_server.yaml")
    assert config.port == 8000 and config.max_batch_size == 16 and config.max_wait_s == 0.01
    assert config.reward.weights["instruction_following"] == 0.6


# ---------------------------------------------------------------- batcher
def test_batcher_groups_concurrent_callers_and_keeps_order():
    sizes: list[int] = []

    def process(items: list[int]) -> list[int]:
        sizes.append(len(items))
        return [x * 10 for x in items]

    async def main() -> list[list[int]]:
        batcher = DynamicBatcher(process, max_batch_size=4, max_wait_s=0.05)
        try:
            return await asyncio.gather(batcher.submit([1]), batcher.submit([2, 3]), batcher.submit([4, 5, 6]))
        finally:
            await batcher.stop()

    assert asyncio.run(main()) == [[10], [20, 30], [40, 50, 60]]
    assert sizes == [4, 2]


def test_batcher_delivers_failures_and_stops():
    def process(items: list[int]) -> list[int]:
        if 0 in items:
            raise ValueError("zero")
        return items[:-1]  # wrong length

    async def main() -> None:
        batcher = DynamicBatcher(process, max_batch_size=8, max_wait_s=0.0)
        with pytest.raises(ValueError, match="zero"):
            await batcher.submit([0, 1])
        with pytest.raises(RuntimeError, match="returned 1 results for 2 items"):
            await batcher.submit([1, 2])
        await batcher.stop()
        assert not batcher.running

    asyncio.run(main())


def slow_until(gate: asyncio.Event, loop: asyncio.AbstractEventLoop):
    def process(items: list[int]) -> list[int]:
        asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(timeout=5)
        return items

    return process


def test_batcher_stop_fails_queued_items_and_zero_wait():
    release = asyncio.Event()
    sizes: list[int] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def slow(items: list[int]) -> list[int]:
            sizes.append(len(items))
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result(timeout=5)
            return items

        batcher = DynamicBatcher(slow, max_batch_size=1, max_wait_s=0.0)
        first = asyncio.ensure_future(batcher.submit([1]))
        queued = asyncio.ensure_future(batcher.submit([2]))
        await asyncio.sleep(0.05)  # [1] is being processed, [2] waits in the queue
        assert sizes == [1]
        release.set()
        assert await first == [1]
        assert await queued == [2]
        stopping = DynamicBatcher(lambda items: items, max_batch_size=4, max_wait_s=30.0)
        collecting = asyncio.ensure_future(stopping.submit([7, 8]))  # taken off the queue, waiting to fill
        await asyncio.sleep(0.02)
        await stopping.stop()
        with pytest.raises(BatcherStopped):
            await asyncio.wait_for(collecting, timeout=1)
        # one batch inside process (blocked), one item queued behind it: both fail on stop
        gate = asyncio.Event()
        busy = DynamicBatcher(slow_until(gate, loop), max_batch_size=1, max_wait_s=0.0)
        in_process = asyncio.ensure_future(busy.submit([5]))
        behind = asyncio.ensure_future(busy.submit([6]))
        await asyncio.sleep(0.05)
        await busy.stop()
        gate.set()
        for future in (in_process, behind):
            with pytest.raises(BatcherStopped):
                await asyncio.wait_for(future, timeout=1)

    asyncio.run(main())
    assert sizes == [1, 1]


# ---------------------------------------------------------------- the app's use of aggregation
class _StubBackend:
    """A backend with fixed outputs, to drive the app's failure paths."""

    name = "stub"
    version = "stub-1"
    dimensions = ("instruction_following", "preservation", "temporal_consistency")

    def score_batch(self, items):
        from reward_server.backends import PixelResult

        if any(item.instruction == "explode" for item in items):
            raise RuntimeError("backend crashed")
        table = {
            "nan": {"instruction_following": float("nan"), "preservation": 5.0, "temporal_consistency": 5.0},
            "none": {"instruction_following": None, "preservation": None, "temporal_consistency": None},
            "fine": {"instruction_following": None, "preservation": 8.0, "temporal_consistency": 4.0},
        }
        return [PixelResult(item_id=item.item_id, dimensions=table[item.instruction]) for item in items]


def test_app_reports_non_finite_and_inapplicable_dimensions_as_failures():
    from fastapi.testclient import TestClient

    import numpy as np

    from protocol.reward import VideoPayload
    from protocol.video import encode_mp4
    from reward_server.app import create_app

    video = VideoPayload.from_bytes(encode_mp4(np.zeros((2, 8, 8, 3), dtype=np.uint8))).model_dump()
    app = create_app(ServerConfig(max_wait_s=0.0), backend=_StubBackend())

    def item(item_id: str, instruction: str) -> dict:
        return {"item_id": item_id, "instruction": instruction, "source": video, "edited": video}

    with TestClient(app) as client:
        body = {"request_id": "r", "items": [item("a", "nan"), item("b", "none"), item("c", "fine")]}
        response = client.post("/v1/score", json=body)
        assert response.status_code == 200
        nan, none, fine = response.json()["results"]
        assert not nan["ok"] and nan["reward"] is None and "'instruction_following' is not finite" in nan["error"]
        assert not none["ok"] and none["reward"] is None and "all weighted dimensions" in none["error"]
        # default weights renormalised over preservation and temporal: (0.25 * 8 + 0.15 * 4) / 0.4 = 6.5
        assert fine["ok"] and fine["reward"] == pytest.approx(6.5) and fine["backends"] == {"stub": "stub-1"}
        crashed = client.post("/v1/score", json={"request_id": "r2", "items": [item("x", "explode")]}).json()
        assert not crashed["results"][0]["ok"] and "backend crashed" in crashed["results"][0]["error"]
        metrics = client.get("/metrics").text
        assert 'reward_item_errors_total{backend="stub"} 3.0' in metrics


def test_app_rejects_weights_for_unknown_dimensions():
    from reward_server.app import create_app

    config = ServerConfig(reward=RewardConfig(weights={"aesthetics": 1.0}))
    with pytest.raises(ValueError, match="aesthetics"):
        create_app(config)


def test_invalid_config_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("max_batch_size: 0\nunknown_knob: 1\n")
    with pytest.raises(ValueError, match=r"(?s)bad\.yaml.*max_batch_size") as info:
        load_server_config(path)
    assert "unknown_knob" in str(info.value)
    assert load_server_config(REPO_ROOT / "configs" / "reward_server.yaml") == ServerConfig()
