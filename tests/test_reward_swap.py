"""Runtime swap of the reward config through the admin API, on a real server in a thread."""
from __future__ import annotations

import json
import threading

import httpx
import pytest
from reward_media import brighter, camera_pan, item
from reward_servers import app_server
from standins import GeminiStandIn, gemini_text_answer

from editrl.protocol.reward import ScoreRequest
from editrl.reward_server.app import create_app
from editrl.reward_server.config import ServerConfig
from editrl.rollout_workers.reward_client import RewardClient

TOKEN = "admin-token-for-tests"
SOURCE = camera_pan(frames=4, size=32)
JUDGE_SCORES = {"instruction_following": 9, "edit_quality": 8, "source_preservation": 7}
PIXEL_V2 = {"version": "pixel-v2", "backend": "pixel", "weights": {"preservation": 1.0}}


def judge_config(url: str, version: str = "judge-v1") -> dict:
    judge = {"type": "gemini", "base_url": url, "api_version": "v1beta", "model": "judge", "backoff_initial_s": 0.01}
    return {"version": version, "backends": {"gemini": judge},
            "weights": {"instruction_following": 0.5, "edit_quality": 0.25, "source_preservation": 0.25}}


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("EDITRL_REWARD_ADMIN_TOKEN", TOKEN)
    monkeypatch.setenv("GEMINI_API_KEY", "judge-key")


def admin(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_swap_without_restart_lets_running_batches_finish_on_the_old_config(env):
    gate = threading.Event()
    judged = threading.Event()

    def gated(body):
        judged.set()
        gate.wait(timeout=20)
        return 200, gemini_text_answer(json.dumps({**JUDGE_SCORES, "reason": "fine"}))

    with GeminiStandIn({"make it brighter": [gated]}) as standin:
        app = create_app(ServerConfig.model_validate({"max_wait_s": 0.0, "reward": judge_config(standin.url)}))
        with app_server(app) as url:
            outcome = {}
            request = ScoreRequest(request_id="old", items=[item("a", "make it brighter", SOURCE, brighter(SOURCE))])

            def score_old():
                with RewardClient(url, max_attempts=1) as client:
                    outcome["old"] = client.score(request)

            thread = threading.Thread(target=score_old)
            thread.start()
            assert judged.wait(timeout=10), "the judge never got the first request"
            put = httpx.put(f"{url}/v1/config", json=PIXEL_V2, headers=admin())
            assert put.status_code == 200, put.text
            assert put.json()["version"] == "pixel-v2" and put.json()["changed"] is True and put.json()["revision"] == 2
            assert httpx.get(f"{url}/v1/config").json()["version"] == "pixel-v2"
            with RewardClient(url, max_attempts=1) as client:
                new = client.score(ScoreRequest(request_id="new", items=[item("b", "make it brighter", SOURCE, SOURCE)]))
            assert new.reward_config_version == "pixel-v2" and new.backends == {"pixel": "pixel-v3"}
            assert new.results[0].ok and new.results[0].reward == new.results[0].dimensions["preservation"] > 9.0
            assert thread.is_alive()  # the old request is still waiting for its judge
            gate.set()
            thread.join(timeout=20)
            old = outcome["old"]
            assert old.reward_config_version == "judge-v1" and set(old.backends) == {"gemini"}
            # 0.5 * 9 + 0.25 * 8 + 0.25 * 7 = 8.25, from the judge the old config named
            assert old.results[0].ok and old.results[0].reward == pytest.approx(8.25)
            assert old.results[0].reasons == {"gemini": "fine"}
            metrics = httpx.get(f"{url}/metrics").text
            assert "reward_config_swaps_total 1.0" in metrics and "reward_config_revision 2.0" in metrics


def test_admin_routes_and_config_errors(env, monkeypatch):
    with app_server(create_app(ServerConfig())) as url:
        assert httpx.put(f"{url}/v1/config", json=PIXEL_V2).status_code == 401
        assert httpx.put(f"{url}/v1/config", json=PIXEL_V2, headers=admin("wrong")).status_code == 401
        active = httpx.get(f"{url}/v1/config").json()
        assert active["version"] == "pixel-default-1" and active["revision"] == 1 and active["backend_version"] == "pixel-v3"
        same = httpx.put(f"{url}/v1/config", json=active["config"], headers=admin())
        assert same.status_code == 200 and same.json()["changed"] is False and same.json()["revision"] == 1
        clash = {**PIXEL_V2, "version": "pixel-default-1"}
        response = httpx.put(f"{url}/v1/config", json=clash, headers=admin())
        assert response.status_code == 409 and "new version" in response.json()["detail"]
        unknown = {"version": "x1", "backends": {"judge": {"type": "oracle"}}, "weights": {"judge.a": 1}}
        response = httpx.put(f"{url}/v1/config", json=unknown, headers=admin())
        assert response.status_code == 422
        (error,) = response.json()["detail"]
        assert error["loc"][:3] == ["body", "backends", "judge"] and "'pixel', 'gemini', 'internal_vlm'" in error["msg"]
        bad_weight = {"version": "x2", "backend": "pixel", "weights": {"aesthetics": 1.0}}
        response = httpx.put(f"{url}/v1/config", json=bad_weight, headers=admin())
        assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "weights", "aesthetics"]
        monkeypatch.delenv("GEMINI_API_KEY")
        no_key = judge_config("http://127.0.0.1:9", version="x3")
        response = httpx.put(f"{url}/v1/config", json=no_key, headers=admin())
        assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "backends", "gemini"]
        assert "GEMINI_API_KEY" in response.json()["detail"][0]["msg"]
        assert httpx.get(f"{url}/v1/config").json()["version"] == "pixel-default-1"  # nothing changed
        schema = httpx.get(f"{url}/openapi.json").json()
        assert "put" in schema["paths"]["/v1/config"] and "HTTPBearer" in schema["components"]["securitySchemes"]
    monkeypatch.delenv("EDITRL_REWARD_ADMIN_TOKEN")
    with app_server(create_app(ServerConfig())) as url:
        response = httpx.put(f"{url}/v1/config", json=PIXEL_V2, headers=admin())
        assert response.status_code == 403 and "EDITRL_REWARD_ADMIN_TOKEN" in response.json()["detail"]
