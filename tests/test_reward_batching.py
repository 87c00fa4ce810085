"""The dynamic batcher and the reward config's aggregation rules."""
from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from editrl.reward_server.backends.specs import InternalVLMSpec, PixelSpec
from editrl.reward_server.batching import BatcherStopped, BusyClock, DynamicBatcher
from editrl.reward_server.config import AggregationError, RewardConfig, ServerConfig, load_server_config

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


def slow_until(gate: asyncio.Event, loop: asyncio.AbstractEventLoop, entered: threading.Event):
    """A ``process`` that sets ``entered`` and then returns only once ``gate`` (on ``loop``) is set."""
    def process(items: list[int]) -> list[int]:
        entered.set()
        asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(timeout=5)
        return items

    return process


async def _entered(event: threading.Event, what: str, timeout_s: float = 10.0) -> None:
    """Wait (off the event loop) until a ``process`` running in the batcher's thread set ``event``."""
    if not await asyncio.to_thread(event.wait, timeout_s):
        pytest.fail(f"{what} did not happen within {timeout_s} s")


async def _until(condition, what: str, timeout_s: float = 10.0) -> None:
    """Poll ``condition()`` on the event loop (letting the batcher's task run) until it is true."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout_s} s")
        await asyncio.sleep(0.001)


def test_batcher_stop_fails_queued_items_and_zero_wait():
    release = asyncio.Event()
    sizes: list[int] = []
    slow_entered = threading.Event()

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def slow(items: list[int]) -> list[int]:
            sizes.append(len(items))
            slow_entered.set()
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result(timeout=5)
            return items

        batcher = DynamicBatcher(slow, max_batch_size=1, max_wait_s=0.0)
        first = asyncio.ensure_future(batcher.submit([1]))
        queued = asyncio.ensure_future(batcher.submit([2]))
        # [1] is being processed; [2] was queued by its submit before the batcher's task first ran
        await _entered(slow_entered, "the first batch entering process")
        assert sizes == [1]
        release.set()
        assert await first == [1]
        assert await queued == [2]
        stopping = DynamicBatcher(lambda items: items, max_batch_size=4, max_wait_s=30.0)
        collecting = asyncio.ensure_future(stopping.submit([7, 8]))
        # [7, 8] taken off the queue, the batch waiting to fill: stop must fail the items being
        # collected (not only queued ones). No public view of the queue, so its private one is read.
        await _until(lambda: stopping._queue is not None and stopping._queue.empty(),
                     "the batcher taking [7, 8] off its queue")
        await stopping.stop()
        with pytest.raises(BatcherStopped):
            await asyncio.wait_for(collecting, timeout=1)
        # one batch inside process (blocked), one item queued behind it: both fail on stop
        gate = asyncio.Event()
        busy_entered = threading.Event()
        busy = DynamicBatcher(slow_until(gate, loop, busy_entered), max_batch_size=1, max_wait_s=0.0)
        in_process = asyncio.ensure_future(busy.submit([5]))
        behind = asyncio.ensure_future(busy.submit([6]))
        await _entered(busy_entered, "[5] entering process")
        assert busy._queue.qsize() == 1  # [6] was queued before the batcher's task ran (no public view of the queue)
        await busy.stop()
        gate.set()
        for future in (in_process, behind):
            with pytest.raises(BatcherStopped):
                await asyncio.wait_for(future, timeout=1)

    asyncio.run(main())
    assert sizes == [1, 1]


# ---------------------------------------------------------------- concurrent batches
def _barrier_process(parties: int, calls: list[list[int]], timeout_s: float = 10.0):
    """A ``process`` that returns only once ``parties`` calls are inside it at the same time
    (``threading.BrokenBarrierError`` after ``timeout_s`` otherwise)."""
    barrier = threading.Barrier(parties, timeout=timeout_s)
    lock = threading.Lock()

    def process(items: list[int]) -> list[int]:
        with lock:
            calls.append(list(items))
        barrier.wait()
        if 0 in items:
            raise ValueError(f"zero in {items}")
        return [x * 10 for x in items]

    return process


def test_concurrent_batches_overlap_and_keep_each_callers_results():
    calls: list[list[int]] = []

    async def main() -> list[list[int]]:
        batcher = DynamicBatcher(_barrier_process(3, calls), max_batch_size=2, max_wait_s=0.0, max_concurrent_batches=3)
        try:
            # three calls of two items each must be in flight together for any of them to return
            return await asyncio.gather(*(batcher.submit([2 * i + 1, 2 * i + 2]) for i in range(3)))
        finally:
            assert batcher.busy.in_flight == 0
            await batcher.stop()

    assert asyncio.run(main()) == [[10, 20], [30, 40], [50, 60]]
    assert sorted(calls) == [[1, 2], [3, 4], [5, 6]]


def test_one_batch_at_a_time_by_default():
    calls: list[list[int]] = []

    async def main() -> None:
        batcher = DynamicBatcher(_barrier_process(2, calls, timeout_s=0.5), max_batch_size=1, max_wait_s=0.0)
        assert batcher.max_concurrent_batches == 1
        first, second = await asyncio.gather(batcher.submit([1]), batcher.submit([2]), return_exceptions=True)
        # each call waited alone at the barrier: the second started only after the first had failed
        assert isinstance(first, threading.BrokenBarrierError) and isinstance(second, threading.BrokenBarrierError)
        await batcher.stop()

    asyncio.run(main())
    assert calls == [[1], [2]]


def test_a_failing_batch_fails_only_its_own_callers():
    calls: list[list[int]] = []

    async def main() -> None:
        batcher = DynamicBatcher(_barrier_process(2, calls), max_batch_size=2, max_wait_s=0.0, max_concurrent_batches=2)
        failing = asyncio.ensure_future(batcher.submit([0, 7]))
        await asyncio.sleep(0)  # the loop forms [0, 7] before the next caller queues
        fine = await batcher.submit([8, 9])  # returns only if [0, 7] was in flight at the same time
        assert fine == [80, 90]
        with pytest.raises(ValueError, match=r"zero in \[0, 7\]"):
            await failing
        await batcher.stop()

    asyncio.run(main())
    assert sorted(calls) == [[0, 7], [8, 9]]


def test_backpressure_holds_new_batches_until_a_call_returns():
    started = threading.Semaphore(0)
    release = threading.Event()
    calls: list[list[int]] = []

    def process(items: list[int]) -> list[int]:
        calls.append(list(items))
        started.release()
        if not release.wait(timeout=10):
            raise TimeoutError("never released")
        return items

    async def main() -> list[list[int]]:
        batcher = DynamicBatcher(process, max_batch_size=4, max_wait_s=0.0, max_concurrent_batches=2)
        first = asyncio.ensure_future(batcher.submit([1]))
        await asyncio.to_thread(started.acquire, True, 10)
        second = asyncio.ensure_future(batcher.submit([2]))
        await asyncio.to_thread(started.acquire, True, 10)
        assert batcher.busy.in_flight == 2
        # both slots taken: these wait in the queue and then leave as one batch
        rest = [asyncio.ensure_future(batcher.submit([x])) for x in (3, 4, 5)]
        # a third call would release `started` again: nothing to wait for but a bounded window in
        # which a batcher ignoring the limit would start one (the event loop runs meanwhile)
        third = await asyncio.to_thread(started.acquire, True, 0.2)
        assert not third and len(calls) == 2, f"a third batch started with both slots taken: {calls}"
        release.set()
        try:
            return [await f for f in (first, second, *rest)]
        finally:
            await batcher.stop()

    assert asyncio.run(main()) == [[1], [2], [3], [4], [5]]
    assert calls[:2] == [[1], [2]] and sorted(x for c in calls[2:] for x in c) == [3, 4, 5]


def test_stop_fails_calls_in_flight_and_queued_items_then_restarts():
    gate = threading.Event()
    started = threading.Semaphore(0)

    def process(items: list[int]) -> list[int]:
        started.release()
        gate.wait(timeout=10)
        return items

    async def main() -> None:
        batcher = DynamicBatcher(process, max_batch_size=1, max_wait_s=0.0, max_concurrent_batches=2)
        in_flight = [asyncio.ensure_future(batcher.submit([x])) for x in (1, 2)]
        await asyncio.to_thread(started.acquire, True, 10)
        await asyncio.to_thread(started.acquire, True, 10)
        queued = asyncio.ensure_future(batcher.submit([3]))
        # one turn of the loop: the task of `queued` runs submit(), which queues [3] before its
        # first await (a stop before that would let this submit start the batcher again)
        await asyncio.sleep(0)
        assert batcher._queue.qsize() == 1  # [3] is queued (no public view of the queue)
        await batcher.stop()
        assert not batcher.running and batcher.busy.in_flight == 0
        gate.set()
        for future in (*in_flight, queued):
            with pytest.raises(BatcherStopped):
                await asyncio.wait_for(future, timeout=5)
        assert await batcher.submit([4, 5]) == [4, 5]  # a later submit starts it again
        await batcher.stop()

    asyncio.run(main())


def test_stop_cancels_coroutine_calls_in_flight():
    cancelled: list[int] = []

    async def main() -> None:
        both_in = asyncio.Barrier(3)

        async def process(items: list[int]) -> list[int]:
            try:
                await both_in.wait()
                await asyncio.sleep(3600)  # never returns: stop() cancels it
            except asyncio.CancelledError:
                cancelled.extend(items)
                raise
            return items

        batcher = DynamicBatcher(process, max_batch_size=1, max_wait_s=0.0, max_concurrent_batches=2)
        calls = [asyncio.ensure_future(batcher.submit([x])) for x in (1, 2)]
        await asyncio.wait_for(both_in.wait(), timeout=10)  # both coroutines are inside process
        await batcher.stop()
        for call in calls:
            with pytest.raises(BatcherStopped):
                await call

    asyncio.run(main())
    assert sorted(cancelled) == [1, 2]


def test_busy_clock_counts_overlapping_calls_once():
    # a clock the test sets: call A runs [0, 3], call B [1, 4] (they overlap), call C [10, 13]
    now = [0.0]
    clock = BusyClock(clock=lambda: now[0])
    assert clock.seconds() == 0.0
    clock.enter()  # A at 0
    now[0] = 1.0
    clock.enter()  # B at 1
    assert clock.in_flight == 2
    now[0] = 3.0
    clock.exit()  # A at 3
    assert clock.seconds() == 3.0  # busy since 0, still running
    now[0] = 4.0
    clock.exit()  # B at 4: one busy period [0, 4] = 4 s, not 3 + 3
    now[0] = 10.0
    assert clock.in_flight == 0 and clock.seconds() == 4.0  # idle time is not counted
    clock.enter()  # C at 10
    now[0] = 12.0
    assert clock.seconds() == 6.0  # 4 + the running 2
    now[0] = 13.0
    clock.exit()
    assert clock.seconds() == 7.0
    with pytest.raises(RuntimeError, match="without a matching enter"):
        clock.exit()


def test_concurrency_settings_are_validated():
    with pytest.raises(ValueError, match="max_concurrent_batches must be >= 1"):
        DynamicBatcher(lambda items: items, max_batch_size=1, max_wait_s=0.0, max_concurrent_batches=0)
    for bad in (0, -1, 1000):
        with pytest.raises(ValidationError, match="max_concurrent_batches"):
            PixelSpec(max_concurrent_batches=bad)
    with pytest.raises(ValidationError, match="max_concurrent_batches"):
        InternalVLMSpec(model="m", max_concurrent_batches=0)
    with pytest.raises(ValidationError, match=r"backends\.pixel\.pixel\.max_concurrent_batches"):
        RewardConfig(backends={"pixel": {"type": "pixel", "max_concurrent_batches": "many"}})
    assert PixelSpec().max_concurrent_batches == 1 and InternalVLMSpec(model="m").max_concurrent_batches == 1
    # an operational knob: the scores, and so the cache keys, do not depend on it
    assert PixelSpec(max_concurrent_batches=8).fingerprint() == PixelSpec().fingerprint()


class _BarrierPixel:
    """The pixel backend, but a call returns only when ``parties`` calls are in it together."""

    def __init__(self, parties: int) -> None:
        from editrl.reward_server.backends.pixel import PixelBackend

        self._pixel = PixelBackend()
        self.name, self.version, self.dimensions = self._pixel.name, self._pixel.version, self._pixel.dimensions
        self._barrier = threading.Barrier(parties, timeout=20)

    def score_batch(self, items):
        self._barrier.wait()
        return self._pixel.score_batch(items)


def test_server_runs_a_backends_batches_concurrently():
    import numpy as np

    from editrl.protocol.reward import VideoPayload
    from editrl.protocol.video import encode_mp4
    from editrl.reward_server.app import create_app
    from tests.reward_servers import app_server

    video = VideoPayload.from_bytes(encode_mp4(np.full((2, 8, 8, 3), 90, dtype=np.uint8))).model_dump()
    spec = PixelSpec(max_batch_size=1, max_concurrent_batches=2)
    config = ServerConfig(max_wait_s=0.0, cache={"enabled": False}, reward=RewardConfig(backends={"pixel": spec}))
    app = create_app(config, backend=_BarrierPixel(2))
    responses: list[dict] = []

    def post(url: str, index: int) -> None:
        # distinct instructions: identical items in flight together would be scored once and shared
        body = {"request_id": f"r{index}", "items": [{"item_id": f"i{index}", "instruction": f"make it brighter ({index})",
                                                       "source": video, "edited": video}]}
        responses.append(httpx.post(f"{url}/v1/score", json=body, timeout=60).json())

    with app_server(app) as url:
        threads = [threading.Thread(target=post, args=(url, i)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        metrics = httpx.get(f"{url}/metrics").text
    assert sorted(r["results"][0]["item_id"] for r in responses) == ["i0", "i1"]
    assert all(r["results"][0]["ok"] for r in responses), responses
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines() if not line.startswith("#")}
    busy = values['reward_backend_busy_seconds_total{backend="pixel"}']
    calls = values['reward_backend_latency_seconds_sum{backend="pixel"}']
    assert values['reward_backend_latency_seconds_count{backend="pixel"}'] == 2
    assert 0 < busy <= calls  # the two calls overlapped: wall time in flight is at most their summed durations


# ---------------------------------------------------------------- the app's use of aggregation
class _StubBackend:
    """A backend with fixed outputs, to drive the app's failure paths."""

    name = "stub"
    version = "stub-1"
    dimensions = ("instruction_following", "preservation", "temporal_consistency")

    def score_batch(self, items):
        from editrl.reward_server.backends import PixelResult

        if any(item.instruction == "explode" for item in items):
            raise RuntimeError("backend crashed")
        table = {
            "nan": {"instruction_following": float("nan"), "preservation": 5.0, "temporal_consistency": 5.0},
            "none": {"instruction_following": None, "preservation": None, "temporal_consistency": None},
            "fine": {"instruction_following": None, "preservation": 8.0, "temporal_consistency": 4.0},
        }
        return [PixelResult(item_id=item.item_id, dimensions=table[item.instruction]) for item in items]


def test_app_reports_non_finite_and_inapplicable_dimensions_as_failures():
    import numpy as np
    from fastapi.testclient import TestClient

    from editrl.protocol.reward import VideoPayload
    from editrl.protocol.video import encode_mp4
    from editrl.reward_server.app import create_app

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
    from editrl.reward_server.app import create_app

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
