"""Judge key variables and hosts are server settings: a reward config (at start or swapped in by
``PUT /v1/config``) that names any other environment variable or host is refused with 422, and
no judge call leaves the server for it. Real server over HTTP, the real google-genai client
against the local Gemini stand-in.
"""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from reward_media import brighter, camera_pan, item
from reward_servers import app_server
from standins import GeminiStandIn, gemini_text_answer

from editrl.protocol.reward import ScoreRequest
from editrl.reward_server.app import create_app
from editrl.reward_server.backends.allowlist import GEMINI_DEFAULT_URL, AllowlistError, JudgeAllowlist
from editrl.reward_server.backends.specs import GeminiSpec
from editrl.reward_server.config import ServerConfig

TOKEN = "allowlist-admin-token"
SECRET = "the-value-of-a-variable-no-judge-may-read"
ADMIN = {"authorization": f"Bearer {TOKEN}"}
SOURCE = camera_pan(frames=2, size=16)
VIVA = gemini_text_answer(json.dumps({"instruction_following": 8, "preservation": 7, "quality": 9, "reason": "ok"}))


def judge(url: str, **fields) -> dict:
    return {"type": "gemini", "base_url": url, "api_version": "v1beta", "model": "j", "max_tries": 1,
            "http_attempts": 1, "timeout_s": 10.0, **fields}


def reward(version: str, url: str, **fields) -> dict:
    return {"version": version, "backends": {"judge": judge(url, **fields)}, "weights": {"instruction_following": 1.0}}


def api_key(request: dict) -> str | None:
    """The key header of a request the Gemini stand-in recorded."""
    return {name.lower(): value for name, value in request["headers"].items()}.get("x-goog-api-key")


def score_once(client: httpx.Client, request_id: str) -> httpx.Response:
    body = ScoreRequest(request_id=request_id, items=[item(f"{request_id}/0", "make it brighter", SOURCE, brighter(SOURCE))])
    return client.post("/v1/score", content=body.model_dump_json(), headers={"content-type": "application/json"})


@pytest.fixture
def admin_token(monkeypatch):
    monkeypatch.setenv("EDITRL_REWARD_ADMIN_TOKEN", TOKEN)
    monkeypatch.setenv("GEMINI_API_KEY", "the-judge-key")
    monkeypatch.setenv("EDITRL_SECRET_FOR_TEST", SECRET)


@pytest.mark.parametrize("change,field", [
    ({"api_key_env": "EDITRL_SECRET_FOR_TEST"}, "api_key_env"),
    ({"api_key_env": "EDITRL_REWARD_ADMIN_TOKEN"}, "api_key_env"),
    ({"base_url": "http://exfiltrate.invalid:8080"}, "base_url"),
    ({"base_url": "http://127.0.0.1.exfiltrate.invalid"}, "base_url"),
    ({"base_url": "http://user:pass@127.0.0.1:9"}, "base_url"),
    ({"base_url": None}, "base_url"),  # the public Gemini API, not in this server's list
])
def test_a_swapped_config_naming_a_variable_or_host_outside_the_allowlist_is_refused(admin_token, change, field):
    with GeminiStandIn({}, default=[(200, VIVA)]) as standin:
        config = ServerConfig.model_validate({"max_wait_s": 0.0, "reward": reward("allowed-1", standin.url),
                                              "judge_hosts": ["http://127.0.0.1"]})
        with app_server(create_app(config)) as url, httpx.Client(base_url=url, timeout=30) as client:
            refused = client.put("/v1/config", json=reward("exfil-1", standin.url, **change), headers=ADMIN)
            assert refused.status_code == 422, refused.text
            error, = refused.json()["detail"]
            assert error["loc"] == ["body", "backends", "judge", field]
            assert "not an allowed judge" in error["msg"] or "not allowed" in error["msg"]
            assert SECRET not in refused.text
            # the old config keeps serving, and its judge got the allowed key only
            assert client.get("/v1/config").json()["version"] == "allowed-1"
            assert score_once(client, "after-refusal").json()["results"][0]["ok"]
        keys = [api_key(request) for request in standin.requests]
        assert keys == ["the-judge-key"]


def test_the_allowlist_is_the_servers_setting_and_can_admit_a_host_and_a_variable(admin_token):
    # the same swap as above is accepted when the server's operator lists both: the list decides
    with GeminiStandIn({}, default=[(200, VIVA)]) as standin:
        config = ServerConfig.model_validate({
            "max_wait_s": 0.0, "reward": reward("allowed-1", standin.url),
            "judge_key_envs": ["GEMINI_API_KEY", "EDITRL_SECRET_FOR_TEST"], "judge_hosts": [standin.url]})
        with app_server(create_app(config)) as url, httpx.Client(base_url=url, timeout=30) as client:
            swapped = client.put("/v1/config", json=reward("other-key-1", standin.url, api_key_env="EDITRL_SECRET_FOR_TEST"),
                                 headers=ADMIN)
            assert swapped.status_code == 200, swapped.text
            assert score_once(client, "with-other-key").json()["results"][0]["ok"]
        assert api_key(standin.requests[-1]) == SECRET


def test_a_start_config_outside_the_allowlist_does_not_serve(admin_token):
    config = ServerConfig.model_validate({"reward": reward("exfil-at-start", "http://exfiltrate.invalid")})
    app = create_app(config)

    async def start() -> None:
        async with app.router.lifespan_context(app):
            pytest.fail("the server started serving a judge outside its allowlist")

    with pytest.raises(RuntimeError, match=r"base_url 'http://exfiltrate.invalid' is not an allowed judge host"):
        asyncio.run(start())


def test_server_settings_refuse_an_admin_token_listed_as_a_judge_key_and_bad_host_entries():
    with pytest.raises(ValueError, match="judge_key_envs must not name admin_token_env"):
        ServerConfig.model_validate({"judge_key_envs": ["GEMINI_API_KEY", "EDITRL_REWARD_ADMIN_TOKEN"]})
    with pytest.raises(ValueError, match="only http and https"):
        ServerConfig.model_validate({"judge_hosts": ["ftp://127.0.0.1"]})


@pytest.mark.parametrize("url,allowed", [
    (GEMINI_DEFAULT_URL, True),
    (GEMINI_DEFAULT_URL + "/v1beta", True),
    ("http://127.0.0.1:8123", True),            # loopback entries name no port: any port
    ("http://LOCALHOST.:9/x", True),            # host names compare in lower case, without the trailing dot
    ("http://[::1]:8000", True),
    ("https://generativelanguage.googleapis.com.evil.example", False),
    ("http://2130706433", False),               # 127.0.0.1 as one number is not the listed address
    ("https://127.0.0.1", False),               # scheme differs
    ("http://evil.example/?u=http://127.0.0.1", False),
])
def test_default_hosts(url, allowed):
    spec = GeminiSpec(model="j", base_url=url)
    if allowed:
        JudgeAllowlist().check(spec)
    else:
        with pytest.raises(AllowlistError) as refused:
            JudgeAllowlist().check(spec)
        assert refused.value.field == "base_url"


def test_ports_and_paths_of_host_entries():
    allowlist = JudgeAllowlist(hosts=["https://judge.example:8443/gemini", "http://vlm.example"])
    for url in ("https://judge.example:8443/gemini", "https://judge.example:8443/gemini/v1beta"):
        allowlist.check(GeminiSpec(model="j", base_url=url))
    for url in ("https://judge.example/gemini",         # default port 443, the entry says 8443
                "https://judge.example:8443/geminix",   # a path prefix ends at a "/"
                "https://judge.example:8443/other",
                "http://judge.example:8443/gemini"):
        with pytest.raises(AllowlistError):
            allowlist.check(GeminiSpec(model="j", base_url=url))
    allowlist.check(GeminiSpec(model="j", base_url="http://vlm.example:1234/anything"))
