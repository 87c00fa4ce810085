"""The score cache and the reward-config registry on a real Redis server; replicas as real processes."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from reward_media import brighter, camera_pan, item
from reward_servers import process_servers
from standins import GeminiStandIn, gemini_text_answer

from editrl.cluster.reward_process import free_port
from editrl.protocol.reward import ScoreRequest
from editrl.reward_server.cache import RedisCache
from editrl.reward_server.config_store import ConfigConflict, RedisConfigStore
from editrl.reward_server.reward_config import RewardConfig
from editrl.rollout_workers.reward_client import RewardClient

TOKEN = "replica-admin-token"
SOURCE = camera_pan(frames=4, size=32)


def test_cache_entries_claims_and_waiting(redis_url, redis_prefix):
    async def main():
        client = aioredis.Redis.from_url(redis_url)
        other_client = aioredis.Redis.from_url(redis_url)
        # wait_for checks whether the claim is still held with EXISTS (nothing else here sends it):
        # counting those checks tells when a waiter has seen the claim and gone on waiting
        claim_checks = {"n": 0, "seen": asyncio.Event()}
        real_exists = other_client.exists

        async def counting_exists(*names):
            held = await real_exists(*names)
            claim_checks["n"] += 1
            if claim_checks["n"] >= 2:
                claim_checks["seen"].set()
            return held

        other_client.exists = counting_exists
        cache = RedisCache(client, redis_prefix, ttl_s=30, claim_lease_s=5, owner="a", poll_initial_s=0.01)
        other = RedisCache(other_client, redis_prefix, ttl_s=30, claim_lease_s=5, owner="b", poll_initial_s=0.01)
        try:
            assert await cache.get_many(["k1", "k2"]) == [None, None]
            await cache.put_many({"k1": {"dimensions": {"a": 1.5}, "reason": "r"}})
            assert await other.get_many(["k1", "k2"]) == [{"dimensions": {"a": 1.5}, "reason": "r"}, None]
            assert 0 < await client.pttl(f"{redis_prefix}:score:k1") <= 30_000
            await client.set(f"{redis_prefix}:score:bad", b"\x80 not json")
            assert await cache.get_many(["bad"]) == [None]  # a corrupt entry is a miss
            assert await cache.claim("k3") and not await other.claim("k3")
            waiter = asyncio.ensure_future(other.wait_for("k3"))
            try:
                await asyncio.wait_for(claim_checks["seen"].wait(), 5)  # it found the claim held twice...
            except TimeoutError:
                pytest.fail(f"the waiter checked the claim on k3 {claim_checks['n']} times in 5 s, not twice")
            assert not waiter.done()  # ...and still waits
            await cache.put_many({"k3": {"dimensions": {"a": 3.0}}})
            await cache.release("k3")
            assert await asyncio.wait_for(waiter, 2) == {"dimensions": {"a": 3.0}}
            assert await cache.claim("k4")
            waiter = asyncio.ensure_future(other.wait_for("k4"))
            await cache.release("k4")  # the claimer gave up without a score...
            assert await asyncio.wait_for(waiter, 2) is None  # ...so the waiter claimed k4 to score it itself
            assert other.held == {"k4"} and not await cache.claim("k4")
            await other.release("k4")
        finally:
            await cache.close()
            await other.close()
            await client.aclose()
            await other_client.aclose()

    asyncio.run(main())


def test_registry_publishes_and_replicas_follow(redis_url, redis_prefix):
    v1 = RewardConfig()
    v2 = RewardConfig.model_validate({"version": "v2", "backend": "pixel", "weights": {"preservation": 1.0}})

    async def main():
        a_client, b_client = aioredis.Redis.from_url(redis_url), aioredis.Redis.from_url(redis_url)
        a, b = RedisConfigStore(a_client, redis_prefix, poll_s=30), RedisConfigStore(b_client, redis_prefix, poll_s=30)
        seen = asyncio.Queue()

        async def on_change(config, revision):
            await seen.put((config, revision))

        try:
            assert await a.start(v1) == (v1, 1)
            assert await b.start(v2) == (v1, 1)  # the registry wins over a late replica's file
            b.follow(on_change)
            # b's follower subscribed to the change channel (else the notice is lost and only the 30 s poll remains)
            deadline = time.monotonic() + 5
            while (await a_client.pubsub_numsub(b.channel))[0][1] < 1:
                assert time.monotonic() < deadline, f"replica b did not subscribe to {b.channel} within 5 s"
                await asyncio.sleep(0.01)
            assert await a.publish(v2) == (2, True)
            assert await asyncio.wait_for(seen.get(), 2) == (v2, 2)  # a change notice, not the 30 s poll
            assert await a.publish(v2) == (2, False)
            with pytest.raises(ConfigConflict, match="'v2'"):
                await a.publish(v2.model_copy(update={"weights": {"preservation": 2.0}}))
            # the canonical form ignores key order: the same definition is not a conflict
            reordered = RewardConfig.model_validate_json(json.dumps(json.loads(v2.model_dump_json())))
            assert await b.publish(reordered) == (2, False)
        finally:
            await b.close()
            await a_client.aclose()
            await b_client.aclose()

    asyncio.run(main())


def _exists_calls(redis_url: str) -> int:
    """EXISTS commands the Redis server has run so far (``INFO commandstats``)."""
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.info("commandstats").get("cmdstat_exists", {}).get("calls", 0))
    finally:
        client.close()


def test_replicas_share_scores_and_follow_a_config_change(tmp_path, redis_url, redis_prefix):
    gate = threading.Event()
    judged = threading.Event()

    def gated(body):
        judged.set()
        gate.wait(timeout=20)
        return 200, gemini_text_answer(json.dumps(
            {"instruction_following": 8, "edit_quality": 6, "source_preservation": 4, "reason": "ok"}))

    env = {"EDITRL_REWARD_ADMIN_TOKEN": TOKEN, "GEMINI_API_KEY": "k"}
    with GeminiStandIn({"make it brighter": [gated]}) as standin:
        judge = {"type": "gemini", "base_url": standin.url, "api_version": "v1beta", "model": "j"}
        reward = {"version": "judge-v1", "backends": {"gemini": judge}, "weights": {"instruction_following": 1.0}}
        config = {"redis_url": redis_url, "redis_prefix": redis_prefix, "config_poll_s": 30.0, "reward": reward}
        with process_servers(tmp_path, [("a", config, env), ("b", config, env)]) as (url_a, url_b):
            request = ScoreRequest(request_id="shared", items=[item("x", "make it brighter", SOURCE, brighter(SOURCE))])
            responses = {}

            def call(name, url):
                with RewardClient(url, max_attempts=1) as client:
                    responses[name] = client.score(request)

            exists_before = _exists_calls(redis_url)
            threads = [threading.Thread(target=call, args=(n, u)) for n, u in (("a", url_a), ("b", url_b))]
            for thread in threads:
                thread.start()
            # both replicas hold the item: one claimed it and is with the judge, the other waits for
            # that claim, which it checks with EXISTS (only RedisCache.wait_for sends EXISTS; on a
            # Redis shared with other clients their EXISTS could end this wait early, never hang it)
            assert judged.wait(timeout=10), "the judge never got the item"
            deadline = time.monotonic() + 10
            while _exists_calls(redis_url) == exists_before:
                assert time.monotonic() < deadline, "the second replica never waited for the first one's claim"
                time.sleep(0.01)
            gate.set()
            for thread in threads:
                thread.join(timeout=20)
            assert len(standin.requests) == 1  # one judge call for the same item on two replicas
            assert responses["a"].results[0].reward == responses["b"].results[0].reward == 8.0

            pixel = {"version": "pixel-v9", "backend": "pixel", "weights": {"preservation": 1.0}}
            put = httpx.put(f"{url_a}/v1/config", json=pixel, headers={"Authorization": f"Bearer {TOKEN}"})
            assert put.status_code == 200 and put.json()["revision"] == 2
            deadline = time.monotonic() + 5  # far below config_poll_s: the change notice did it
            while httpx.get(f"{url_b}/v1/config").json()["version"] != "pixel-v9":
                assert time.monotonic() < deadline, "replica b did not switch to pixel-v9 within 5 s"
                time.sleep(0.05)
            assert httpx.get(f"{url_b}/v1/config").json()["revision"] == 2
            with RewardClient(url_a) as client_a, RewardClient(url_b) as client_b:
                first = client_a.score(request)
                second = client_b.score(request)
            assert first.reward_config_version == second.reward_config_version == "pixel-v9"
            assert not first.results[0].cached and second.results[0].cached
            assert second.results[0].dimensions == first.results[0].dimensions
            metrics_b = httpx.get(f"{url_b}/metrics").text
            assert 'reward_cache_hits_total{backend="pixel"} 1.0' in metrics_b
            assert 'reward_backend_batch_size_count{backend="pixel"}' not in metrics_b  # b never ran the pixel backend


def test_an_unreachable_redis_degrades_to_scoring_without_the_cache(caplog):
    async def main():
        client = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.2)
        cache = RedisCache(client, "nowhere", ttl_s=30, claim_lease_s=1)
        try:
            assert await cache.get_many(["k"]) == [None]
            await cache.put_many({"k": {"dimensions": {"a": 1.0}}})  # logged, not raised
            assert await cache.claim("k") is True  # score it here rather than wait for nobody
            await cache.release("k")
        finally:
            await client.aclose()

    asyncio.run(main())
    assert "score cache lookup failed" in caplog.text and "score cache store failed" in caplog.text
