"""Score claims in Redis: owned, leased and renewed, taken over when their owner dies (real Redis, real processes)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import redis.asyncio as aioredis
import yaml
from reward_media import brighter, camera_pan, item
from reward_servers import REPO_ROOT, stop_processes, wait_healthy
from standins import GeminiStandIn, gemini_text_answer

from editrl.cluster.reward_process import free_port
from editrl.protocol.reward import ScoreRequest
from editrl.protocol.video import encode_mp4
from editrl.reward_server.backends.base import ScoreInput
from editrl.reward_server.backends.specs import GeminiSpec
from editrl.reward_server.cache import RedisCache
from editrl.reward_server.metrics import Metrics
from editrl.reward_server.runtime import BackendPool
from editrl.reward_server.scoring import Scorer
from editrl.rollout_workers.reward_client import RewardClient, RewardServerError

SOURCE = camera_pan(frames=4, size=32)
LEASE_S = 1.5
MARGIN_S = 2.0  # one poll (a quarter lease), a judge call and the HTTP round trips on a loaded 2-core machine


def viva(body):
    return 200, gemini_text_answer(json.dumps(
        {"instruction_following": 7, "edit_quality": 6, "source_preservation": 5, "reason": "ok"}))


def score_input(item_id: str, instruction: str) -> ScoreInput:
    edited = brighter(SOURCE)
    return ScoreInput(instruction=instruction, source=SOURCE, edited=edited, item_id=item_id,
                      source_bytes=encode_mp4(SOURCE), edited_bytes=encode_mp4(edited))


def _caches(client_a, client_b, prefix, lease_s):
    return (RedisCache(client_a, prefix, ttl_s=30, claim_lease_s=lease_s, owner="a", poll_initial_s=0.01),
            RedisCache(client_b, prefix, ttl_s=30, claim_lease_s=lease_s, owner="b", poll_initial_s=0.01))


def test_a_renewed_claim_outlives_its_lease_and_names_its_owner(redis_url, redis_prefix):
    async def main():
        client_a, client_b = aioredis.Redis.from_url(redis_url), aioredis.Redis.from_url(redis_url)
        a, b = _caches(client_a, client_b, redis_prefix, lease_s=0.6)
        try:
            assert await a.claim("k")
            owner = (await client_a.get(f"{redis_prefix}:claim:k")).decode()
            assert owner.startswith("a:") and len(owner) > len("a:") + 8  # the replica and a random token
            await asyncio.sleep(1.8)  # three leases: only renewal keeps it
            assert not await b.claim("k")
            assert 0 < await client_a.pttl(f"{redis_prefix}:claim:k") <= 600
            await a.release("k")
            assert await client_a.exists(f"{redis_prefix}:claim:k") == 0
            assert await b.claim("k")
            await b.release("k")
        finally:
            await a.close()
            await b.close()
            await client_a.aclose()
            await client_b.aclose()

    asyncio.run(main())


def test_a_lapsed_claim_is_taken_over_and_its_old_owner_cannot_release_it(redis_url, redis_prefix):
    async def main():
        client_a, client_b = aioredis.Redis.from_url(redis_url), aioredis.Redis.from_url(redis_url)
        a, b = _caches(client_a, client_b, redis_prefix, lease_s=0.6)
        try:
            assert await a.claim("k")
            await a.close()  # a stalls (or dies): no more renewal, the claim is neither released nor renewed
            started = time.monotonic()
            assert await asyncio.wait_for(b.wait_for("k"), 5) is None  # no score: b took the item over...
            assert time.monotonic() - started <= 0.6 + 0.5  # ...within about one lease
            assert b.held == {"k"}
            assert (await client_b.get(f"{redis_prefix}:claim:k")).decode().startswith("b:")
            await a.release("k")  # the old owner comes back and releases: b's claim must stay
            assert (await client_b.get(f"{redis_prefix}:claim:k")).decode().startswith("b:")
            await b.put_many({"k": {"dimensions": {"x": 1.0}}})
            await b.release("k")
            assert await client_b.exists(f"{redis_prefix}:claim:k") == 0
        finally:
            await b.close()
            await client_a.aclose()
            await client_b.aclose()

    asyncio.run(main())


def test_a_score_stored_between_lookup_and_claim_is_not_scored_again(redis_url, redis_prefix, monkeypatch):
    """Another replica stored the item and released its claim after this request's cache lookup
    missed: the claim succeeds, and the score is looked up again instead of judged twice."""
    monkeypatch.setenv("GEMINI_API_KEY", "k")

    async def main(url):
        client = aioredis.Redis.from_url(redis_url)
        cache = RedisCache(client, redis_prefix, ttl_s=30, claim_lease_s=2.0, owner="me")
        metrics = Metrics()
        pool = BackendPool(metrics, max_batch_size=4, max_wait_s=0.0)
        spec = GeminiSpec(base_url=url, api_version="v1beta", model="j", max_tries=1)
        active = await pool.acquire("judge", False, spec)
        try:
            await cache.put_many({"key-1": {"dimensions": {"instruction_following": 9.0}, "reason": "elsewhere"}})
            done = await Scorer(cache, metrics)._compute(active, {"key-1": score_input("i1", "make it brighter")})
            assert done["key-1"].dimensions == {"instruction_following": 9.0}
            assert done["key-1"].reason == "elsewhere"
            assert cache.held == frozenset() and await client.exists(f"{redis_prefix}:claim:key-1") == 0
        finally:
            await pool.release(active)
            await cache.close()
            await client.aclose()

    with GeminiStandIn({}, default=[viva]) as standin:
        asyncio.run(main(standin.url))
        assert standin.requests == []  # the judge was never asked


@contextlib.contextmanager
def _replicas(tmp_path: Path, config: dict, env: dict[str, str]):
    """Start ``python -m editrl.reward_server`` processes on demand; yields ``start(name, port) -> Popen``.
    Every process started is stopped through its handle at the end."""
    config_path = tmp_path / "server.yaml"
    config_path.write_text(yaml.safe_dump(config))
    procs: list[subprocess.Popen] = []

    def start(name: str, port: int) -> subprocess.Popen:
        log_path = tmp_path / f"{name}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "editrl.reward_server", "--config", str(config_path), "--port", str(port)],
                cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env}, stdout=log,
                stderr=subprocess.STDOUT,
            )
        procs.append(proc)
        wait_healthy(f"http://127.0.0.1:{port}", proc=proc, log=log_path)
        return proc

    try:
        yield start
    finally:
        stop_processes(procs)


def _timed_score(url: str, request: ScoreRequest, timeout_s: float):
    started = time.monotonic()
    with RewardClient(url, max_attempts=1, timeout_s=timeout_s) as client:
        response = client.score(request)
    return response, time.monotonic() - started


def test_a_replica_killed_mid_batch_holds_its_items_for_at_most_one_lease(tmp_path, redis_url, redis_prefix):
    """kill -9 of replica A while the judge holds its calls; the same request resent to replica B and
    to A restarted: every item is judged exactly once after the crash, no resent request waits much
    longer than one lease, and the scores cached before the crash are reused."""
    gate = threading.Event()
    gate.set()

    def held(body):
        gate.wait(timeout=30)
        return viva(body)

    instructions = [f"make it brighter {i}" for i in range(12)]
    items = [item(f"item-{i}", text, SOURCE, brighter(SOURCE, 10 + 3 * i)) for i, text in enumerate(instructions)]
    with GeminiStandIn({}, default=[held]) as standin:
        judge = {"type": "gemini", "base_url": standin.url, "api_version": "v1beta", "model": "j", "max_tries": 1,
                 "timeout_s": 30.0, "http_attempts": 1}
        reward = {"version": "judge-v1", "backends": {"gemini": judge}, "weights": {"instruction_following": 1.0}}
        config = {"redis_url": redis_url, "redis_prefix": redis_prefix, "config_poll_s": 30.0, "reward": reward,
                  "cache": {"claim_lease_s": LEASE_S}}
        port_a, port_b = free_port(), free_port()
        url_a, url_b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
        with _replicas(tmp_path, config, {"GEMINI_API_KEY": "k"}) as start:
            replica_a = start("a", port_a)
            start("b", port_b)
            warm, _ = _timed_score(url_a, ScoreRequest(request_id="warm", items=items[:4]), 30)
            assert all(result.ok for result in warm.results)
            assert standin.instructions() == {text: 1 for text in instructions[:4]}

            gate.clear()  # the judge now holds every call
            request = ScoreRequest(request_id="batch-7", items=items)
            failed: list[BaseException] = []

            def doomed():
                try:
                    _timed_score(url_a, request, 60)
                except RewardServerError as exc:
                    failed.append(exc)

            thread = threading.Thread(target=doomed)
            thread.start()
            deadline = time.monotonic() + 20
            while standin.in_flight < 8:  # A claimed items 4-11 and is with the judge on all of them
                assert time.monotonic() < deadline, f"replica A had {standin.in_flight} judge calls in flight, not 8"
                time.sleep(0.02)
            replica_a.kill()  # SIGKILL: no release, no cleanup
            replica_a.wait(timeout=10)
            after_crash = len(standin.requests)
            gate.set()
            thread.join(timeout=30)
            assert failed, "the request to the killed replica did not fail"

            # the client's retry, to the other replica: items 0-3 cached, 4-7 still claimed by the dead A
            resent_b = ScoreRequest(request_id="batch-7", items=items[:8])
            response_b, waited_b = _timed_score(url_b, resent_b, LEASE_S + 10)
            assert waited_b <= LEASE_S + MARGIN_S, f"replica B waited {waited_b:.1f} s for a dead replica's claims"
            assert [r.ok for r in response_b.results] == [True] * 8
            assert [r.cached for r in response_b.results] == [True] * 4 + [False] * 4

            start("a-restarted", port_a)
            response_a, waited_a = _timed_score(url_a, request, LEASE_S + 10)
            assert waited_a <= LEASE_S + MARGIN_S, f"restarted replica A waited {waited_a:.1f} s"
            assert [r.ok for r in response_a.results] == [True] * 12
            assert [r.cached for r in response_a.results] == [True] * 8 + [False] * 4

            # exactly one judge call per item after the crash; none for the items cached before it
            assert standin.instructions(since=after_crash) == {text: 1 for text in instructions[4:]}
            assert standin.instructions()[instructions[0]] == 1
