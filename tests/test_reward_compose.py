"""Composed reward configs (several backends, geometric mean, two judges) and the in-process score cache."""
from __future__ import annotations

import json
import math
import threading
import time

import httpx
import pytest
from reward_media import brighter, camera_pan, item
from reward_servers import app_server
from standins import GEMINI_ANSWER_BLOCK, GeminiStandIn, gemini_text_answer

from editrl.protocol.reward import ImagePayload, ScoreRequest
from editrl.reward_server.app import create_app
from editrl.reward_server.config import RewardConfig, ServerConfig
from editrl.rollout_workers.reward_client import RewardClient

SOURCE = camera_pan(frames=4, size=32)


def rvedit_answer(compliance: int, fidelity: int, quality: int):
    text = json.dumps({"instruction_compliance": compliance, "detail_fidelity": fidelity, "visual_quality": quality,
                       "reason": f"{compliance}/{fidelity}/{quality}"})
    return 200, gemini_text_answer(text)


def judge(url: str, model: str) -> dict:
    return {"type": "gemini", "protocol": "rvedit", "model": model, "base_url": url, "api_version": "v1beta",
            "backoff_initial_s": 0.01, "backoff_max_s": 0.02}


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", "k")


def test_aggregations_by_hand():
    geo = RewardConfig.model_validate({
        "version": "g", "backends": {"judge": {"type": "gemini"}, "pixel": {"type": "pixel"}},
        "aggregation": "geometric_mean", "semantic": {"judge.instruction_following": 1.0},
        "perceptual": {"judge.edit_quality": 3.0, "pixel.temporal_consistency": 1.0},
    })
    dims = {"judge.instruction_following": 9.0, "judge.edit_quality": 4.0, "pixel.temporal_consistency": 8.0}
    # S = 9, P = (3 * 4 + 1 * 8) / 4 = 5 -> sqrt(45)
    assert geo.aggregate(dims) == pytest.approx(math.sqrt(45))
    # VIEScore's min sub-scores: S = 9, P = min(4, 8) = 4 -> sqrt(36) = 6
    assert geo.model_copy(update={"subscore": "min"}).aggregate(dims) == pytest.approx(6.0)
    # an inapplicable perceptual dimension is dropped from its sub-score: P = 4 -> 6
    assert geo.aggregate({**dims, "pixel.temporal_consistency": None}) == pytest.approx(6.0)
    with pytest.raises(ValueError, match="all semantic dimensions"):
        geo.aggregate({**dims, "judge.instruction_following": None})
    assert geo.dimension_name("judge", "edit_quality") == "judge.edit_quality"
    assert RewardConfig().dimension_name("pixel", "preservation") == "preservation"
    for bad, message in [
        ({"aggregation": "geometric_mean", "semantic": {"a": 1}}, "both 'semantic' and 'perceptual'"),
        ({"backend": "pixel", "backends": {"pixel": {"type": "pixel"}}}, "not both"),
        ({"backends": {"Bad.Key": {"type": "pixel"}}, "weights": {"x": 1}}, "must match"),
        ({"backends": {"judge": {"type": "gemini"}}}, "needs 'weights'"),
    ]:
        with pytest.raises(ValueError, match=message):
            RewardConfig.model_validate(bad)


def test_two_judges_averaged_and_a_failed_judge_is_dropped_not_imputed():
    scripts = {"Make it brighter": [rvedit_answer(80, 60, 70)], "Remove the flag": [rvedit_answer(40, 50, 60)]}
    with GeminiStandIn(scripts) as judge_a, GeminiStandIn({"Make it brighter": [rvedit_answer(60, 60, 90)],
                                                            "Remove the flag": [GEMINI_ANSWER_BLOCK]}) as judge_b:
        reward = {
            "version": "two-judges", "allow_partial": True,
            "backends": {"judge_a": judge(judge_a.url, "a"), "judge_b": judge(judge_b.url, "b"), "pixel": {"type": "pixel"}},
            "weights": {"judge_a.instruction_compliance": 1.0, "judge_b.instruction_compliance": 1.0},
        }
        app = create_app(ServerConfig.model_validate({"max_wait_s": 0.0, "reward": reward}))
        with app_server(app) as url, RewardClient(url, max_attempts=1) as client:
            response = client.score(ScoreRequest(request_id="r", items=[
                item("both", "Make it brighter", SOURCE, brighter(SOURCE)),
                item("one", "Remove the flag", SOURCE, brighter(SOURCE)),
            ]))
            metrics = httpx.get(f"{url}/metrics").text
    both, one = response.results
    assert response.backends.keys() == {"judge_a", "judge_b", "pixel"}
    assert both.ok and both.reward == pytest.approx((8.0 + 6.0) / 2)
    assert both.dimensions["judge_b.visual_quality"] == 9.0 and "pixel.preservation" in both.dimensions
    assert both.reasons == {"judge_a": "80/60/70", "judge_b": "60/60/90"}
    # judge_b refused: its dimensions are None and the reward is judge_a's alone (4.0), not an average with a guess
    assert one.ok and one.reward == pytest.approx(4.0) and one.dimensions["judge_b.instruction_compliance"] is None
    assert "safety" in one.backend_errors["judge_b"]
    assert 'reward_backend_errors_total{backend="judge_b"} 1.0' in metrics
    assert 'reward_backend_batch_size_count{backend="pixel"} 1.0' in metrics


def test_strict_config_fails_the_item_when_a_backend_fails():
    with GeminiStandIn({"Remove the flag": [GEMINI_ANSWER_BLOCK]}) as standin:
        reward = {"version": "strict", "backends": {"judge": judge(standin.url, "a"), "pixel": {"type": "pixel"}},
                  "aggregation": "geometric_mean", "semantic": {"judge.instruction_compliance": 1.0},
                  "perceptual": {"pixel.temporal_consistency": 1.0}}
        app = create_app(ServerConfig.model_validate({"max_wait_s": 0.0, "reward": reward}))
        with app_server(app) as url, RewardClient(url, max_attempts=1) as client:
            (result,) = client.score(ScoreRequest(request_id="r", items=[item("x", "Remove the flag", SOURCE, SOURCE)])).results
    assert not result.ok and result.reward is None and result.error.startswith("judge: judge safety block")
    assert result.dimensions["pixel.temporal_consistency"] is not None  # the other backend's scores are still reported


def test_cache_answers_retries_and_joins_concurrent_duplicates():
    gate = threading.Event()
    judged = threading.Event()

    def gated(body):
        judged.set()
        gate.wait(timeout=20)
        return rvedit_answer(70, 70, 70)

    with GeminiStandIn({"Add a red balloon": [gated]}) as standin:
        reward = {"version": "judge-only", "backends": {"gemini": judge(standin.url, "a")},
                  "weights": {"instruction_compliance": 1.0}}
        app = create_app(ServerConfig.model_validate({"max_wait_s": 0.0, "reward": reward}))
        reference = ImagePayload.from_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        request = ScoreRequest(request_id="dup", items=[item("x", "Add a red balloon", SOURCE, brighter(SOURCE))])
        with app_server(app) as url:
            results = []

            def call():
                with RewardClient(url, max_attempts=1) as client:
                    results.append(client.score(request))

            threads = [threading.Thread(target=call) for _ in range(3)]
            for thread in threads:
                thread.start()
            assert judged.wait(timeout=10), "the judge never got the first request"
            # the duplicates arrive while the first is still with the judge: both joined its scoring
            joins = 'reward_cache_joins_total{backend="gemini"} 2.0'
            deadline = time.monotonic() + 10
            while joins not in httpx.get(f"{url}/metrics").text:
                assert time.monotonic() < deadline, "the two duplicates did not join the scoring in flight within 10 s"
                time.sleep(0.01)
            gate.set()
            for thread in threads:
                thread.join(timeout=20)
            with RewardClient(url, max_attempts=1) as client:
                retried = client.score(request)
            bad = request.model_copy(update={"items": [request.items[0].model_copy(update={"reference": reference})]})
            response = httpx.post(f"{url}/v1/score", content=bad.model_dump_json(), headers={"content-type": "application/json"})
            metrics = httpx.get(f"{url}/metrics").text
    assert len(standin.requests) == 1  # three concurrent requests and a retry, one judge call
    assert [r.results[0].reward for r in results] == [7.0] * 3 and retried.results[0].reward == 7.0
    assert retried.results[0].cached and not any(r.results[0].cached for r in results)
    assert 'reward_cache_hits_total{backend="gemini"} 1.0' in metrics
    assert 'reward_cache_joins_total{backend="gemini"} 2.0' in metrics
    assert response.status_code == 422  # a changed reference is a new item, and this one is not an image
    assert response.json()["detail"][0]["loc"] == ["body", "items", 0, "reference", "data"]


def test_shipped_example_configs_validate():
    from reward_servers import REPO_ROOT

    from editrl.reward_server.config import load_server_config

    paths = sorted((REPO_ROOT / "configs").glob("reward_server*.yaml"))
    server_configs = [p for p in paths if p.name != "reward_server_serve.yaml"]
    assert {p.name for p in server_configs} >= {"reward_server.yaml", "reward_server_gemini.yaml",
                                                 "reward_server_revise.yaml", "reward_server_redis.yaml"}
    for path in server_configs:
        reward = load_server_config(path).reward
        reward.check_dimensions({key: spec.dimension_names() for key, spec in reward.backends.items()})
    assert load_server_config(REPO_ROOT / "configs" / "reward_server.yaml") == ServerConfig()
