"""The reward server's HTTP layer under hostile input: never a 500, never the input echoed
back whole, ids that cannot forge log lines, and an OpenAPI schema that says what the server does.

Real servers over real HTTP: the app in a uvicorn thread, and ``python -m editrl.reward_server``
as a process where its log file is read.
"""
from __future__ import annotations

import json
import re
import time

import httpx
import pytest
from reward_media import brighter, camera_pan, item
from reward_servers import app_server, process_server

from editrl.protocol.reward import BASE64_PATTERN, SAFE_ID_PATTERN, ScoreItem, ScoreRequest, VideoPayload
from editrl.reward_server.app import METRICS_CONTENT_TYPE, create_app
from editrl.reward_server.config import ServerConfig
from editrl.reward_server.http_errors import MAX_ERRORS, log_safe, safe_errors

TOKEN = "hardening-admin-token"
MAX_REQUEST_BYTES = 8 << 20
SOURCE = camera_pan(frames=2, size=16)
JSON = {"content-type": "application/json"}
ADMIN = {**JSON, "authorization": f"Bearer {TOKEN}"}
FORGED = "2026-01-01 00:00:00,000 INFO editrl.reward_server.app: FORGED"


def good_request(request_id: str = "good-1") -> bytes:
    return ScoreRequest(request_id=request_id, items=[
        item(f"{request_id}/0", "make it brighter", SOURCE, brighter(SOURCE))]).model_dump_json().encode()


def strict_json(response: httpx.Response):
    """The body parsed as strict JSON: UTF-8, no NaN/Infinity."""
    def refuse(constant):
        raise AssertionError(f"non-finite number {constant} in the error body")
    return json.loads(response.content.decode("utf-8"), parse_constant=refuse)


def local_port(response: httpx.Response) -> int:
    """The client-side port of the connection that carried ``response``."""
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


@pytest.fixture(scope="module")
def server():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDITRL_REWARD_ADMIN_TOKEN", TOKEN)
        config = ServerConfig.model_validate({"max_wait_s": 0.0, "max_request_bytes": MAX_REQUEST_BYTES})
        with app_server(create_app(config)) as url:
            yield url


# ---------------------------------------------------------------- 422, never 500
BAD_BODIES = {
    "nan request_id": ("POST", "/v1/score", b'{"request_id": NaN, "items": []}', JSON),
    "lone surrogate request_id": ("POST", "/v1/score", b'{"request_id": "\\ud800", "items": []}', JSON),
    "lone surrogate key": ("POST", "/v1/score", b'{"request_id": "r", "\\udfff": Infinity, "items": []}', JSON),
    "nan weight": ("PUT", "/v1/config", b'{"version": "x-1", "weights": {"preservation": NaN}}', ADMIN),
    "infinite weight": ("PUT", "/v1/config", b'{"version": "x-1", "weights": {"preservation": Infinity}}', ADMIN),
    "1e309 weight": ("PUT", "/v1/config", b'{"version": "x-1", "weights": {"preservation": 1e309}}', ADMIN),
    "invalid utf-8": ("POST", "/v1/score", b'{"request_id": "\xff\xfe", "items": []}', JSON),
    "nested too deep": ("POST", "/v1/score", b"[" * 100_000, JSON),
    "integer too long": ("POST", "/v1/score", b'{"request_id": 1' + b"0" * 5000 + b', "items": []}', JSON),
    "not json content type": ("POST", "/v1/score", b'\xff{"request_id": "r"}', {"content-type": "text/plain"}),
}


@pytest.mark.parametrize("case", list(BAD_BODIES), ids=list(BAD_BODIES))
def test_bad_body_is_a_json_safe_422_and_the_connection_stays_usable(server, case):
    method, path, body, headers = BAD_BODIES[case]
    with httpx.Client(base_url=server, timeout=30) as client:
        bad = client.request(method, path, content=body, headers=headers)
        assert bad.status_code == 422, bad.text[:500]
        assert bad.headers.get("connection") != "close"
        errors = strict_json(bad)["detail"]
        assert errors and all({"loc", "msg", "type"} <= set(e) and isinstance(e["msg"], str) for e in errors)
        assert all(isinstance(part, (str, int)) for e in errors for part in e["loc"])
        good = client.post("/v1/score", content=good_request(), headers=JSON)
        assert good.status_code == 200 and good.json()["results"][0]["ok"]
        assert local_port(good) == local_port(bad)  # the same keep-alive connection carried both


def test_nan_request_id_names_the_field_without_echoing_the_number(server):
    response = httpx.post(f"{server}/v1/score", content=BAD_BODIES["nan request_id"][2], headers=JSON)
    errors = strict_json(response)["detail"]
    assert errors[0]["loc"] == ["body", "request_id"] and errors[0]["type"] == "string_type"
    assert "input" not in errors[0]


def test_a_big_invalid_body_gets_a_small_error(server):
    bad_data = "@" * (3 << 20)  # 3 MiB of non-base64 in one field
    items = [{"item_id": f"bad\n{i}", "instruction": "x" * 2000, "source": {"data": bad_data if i == 0 else "QQ=="},
              "edited": {"data": "QQ=="}} for i in range(200)]
    body = json.dumps({"request_id": "big", "items": items}).encode()
    assert 3 << 20 < len(body) < MAX_REQUEST_BYTES
    response = httpx.post(f"{server}/v1/score", content=body, headers=JSON, timeout=60)
    assert response.status_code == 422
    errors = strict_json(response)["detail"]
    assert len(errors) == MAX_ERRORS + 1 and errors[-1]["type"] == "too_many_errors"
    assert all(len(json.dumps(e)) < 4096 for e in errors)
    assert len(response.content) < 4096 * len(errors)
    base64_error = next(e for e in errors if e["loc"] == ["body", "items", 0, "source", "data"])
    assert "base64" in base64_error["msg"] and len(base64_error.get("input", "")) <= 67


def test_safe_errors_bound_every_part():
    errors = [{"loc": ("body", "\ud800" * 1000, 3), "msg": "m" * 10_000, "type": "t", "input": float("nan"),
               "ctx": {"error": ValueError("x")}},
              {"loc": ("body",), "msg": "ok", "type": "t", "input": "\udc80" + "y" * 1000},
              {"loc": ("body",), "msg": "ok", "type": "t", "input": {"nested": [1, 2]}}]
    first, second, third = safe_errors(errors)
    json.dumps([first, second, third], allow_nan=False).encode("utf-8")  # encodable, strictly
    assert len(first["loc"][1]) < 1000 and first["loc"][2] == 3 and "input" not in first and "ctx" not in first
    assert len(first["msg"]) <= 503
    assert second["input"].startswith("\\udc80y") and second["input"].endswith("y...") and len(second["input"]) < 80
    assert "input" not in third


# ---------------------------------------------------------------- ids and logs
WORKER_IDS = ["g0000012-astronaut_zoom_in-00", "g0000012-astronaut_zoom_in-00/3", "eval-000035-coffee_pan_lr-00/7",
              "conc-3", "c/3", "raw-1", "a", "0", "prompt with spaces/1", "café-ünïcode/2", "a:b@c+d=e#f"]
BAD_IDS = ["a\nb", "a\rb", "tab\tid", "nul\x00", "del\x7f", "c1\x85", "ls\u2028", "ps\u2029", "rlo\u202e", "zw\u200b",
           "bom\ufeff"]


@pytest.mark.parametrize("good", WORKER_IDS)
def test_ids_callers_generate_are_accepted(good):
    video = VideoPayload.from_frames(SOURCE)
    request = ScoreRequest.model_validate({"request_id": good, "items": [
        {"item_id": good, "instruction": "x", "source": video.model_dump(), "edited": video.model_dump()}]})
    assert request.request_id == good and re.fullmatch(SAFE_ID_PATTERN, good)


@pytest.mark.parametrize("bad", BAD_IDS, ids=[repr(b) for b in BAD_IDS])
def test_ids_with_control_characters_are_refused(bad):
    video = VideoPayload.from_frames(SOURCE).model_dump()
    with pytest.raises(ValueError, match="request_id"):
        ScoreRequest.model_validate({"request_id": bad, "items": [
            {"item_id": "a", "instruction": "x", "source": video, "edited": video}]})
    with pytest.raises(ValueError, match="item_id"):
        ScoreItem.model_validate({"item_id": bad, "instruction": "x", "source": video, "edited": video})
    assert re.fullmatch(SAFE_ID_PATTERN, bad) is None  # the published pattern says the same


def test_log_safe_escapes_line_breaks_and_surrogates():
    assert log_safe(f"id\n{FORGED}") == f"id\\x0a{FORGED}"
    assert log_safe("a\u2028b\ud800") == "a\\u2028b\\ud800"
    assert log_safe("x" * 50, limit=10) == "x" * 10 + "..."


def test_a_newline_from_a_client_cannot_start_a_log_line(tmp_path):
    config = {"max_wait_s": 0.0, "reward": {"version": "logs-1", "weights": {"preservation": 1.0}}}
    with process_server(tmp_path, config, env={"EDITRL_REWARD_ADMIN_TOKEN": TOKEN}, name="logs") as url:
        with httpx.Client(base_url=url, timeout=30) as client:
            forged_id = client.post("/v1/score", content=good_request().replace(b'"good-1"', json.dumps(
                f"good-1\n{FORGED}").encode(), 1), headers=JSON)
            assert forged_id.status_code == 422
            assert strict_json(forged_id)["detail"][0]["loc"] == ["body", "request_id"]
            # the reward-config version is free text: logged (app and runtime) escaped
            new = {"version": f"logs-2\n{FORGED}", "weights": {"preservation": 1.0}}
            swapped = client.put("/v1/config", json=new, headers=ADMIN)
            assert swapped.status_code == 200, swapped.text
            assert client.post("/v1/score", content=good_request("after"), headers=JSON).status_code == 200
        log_path = next(tmp_path.glob("logs_*.log"))
        deadline = time.monotonic() + 10
        while "logs-2" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)  # the process writes its log asynchronously to this test
    log = log_path.read_text()
    assert f"logs-2\\x0a{FORGED}" in log  # the version was logged, escaped
    assert not any(line.startswith(FORGED) for line in log.splitlines()), log


# ---------------------------------------------------------------- the OpenAPI schema says what the server does
def test_metrics_content_type_is_the_documented_one(server):
    response = httpx.get(f"{server}/metrics")
    documented = httpx.get(f"{server}/openapi.json").json()["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert response.status_code == 200 and response.headers["content-type"] == METRICS_CONTENT_TYPE
    assert list(documented) == [METRICS_CONTENT_TYPE] and METRICS_CONTENT_TYPE.startswith("text/plain; version=0.0.4")


@pytest.mark.parametrize("method", ["DELETE", "POST", "PATCH", "OPTIONS"])
def test_405_allows_every_method_of_the_path(server, method):
    response = httpx.request(method, f"{server}/v1/config")
    assert response.status_code == 405
    allowed = {m.strip() for m in response.headers["allow"].split(",")}
    documented = {m.upper() for m in httpx.get(f"{server}/openapi.json").json()["paths"]["/v1/config"]}
    assert documented == {"GET", "PUT"} and documented <= allowed


def test_data_schema_is_base64_and_agrees_with_the_validator(server):
    schemas = httpx.get(f"{server}/openapi.json").json()["components"]["schemas"]
    assert schemas["VideoPayload"]["properties"]["data"]["pattern"] == BASE64_PATTERN
    assert schemas["ImagePayload"]["properties"]["data"]["pattern"] == BASE64_PATTERN
    for text in ["QUJD", "QQ==", "QUI=", "QUJDRA==", "QQ", "QQQ==", "QQ=", "QQ==QQ==", "QQQQ====", "QQ=A", "A",
                 "Q===", "====", " QQ==", "QQ==\n", "Q-_A", "QUJD\u00e9"]:
        try:
            VideoPayload.model_validate({"data": text})
            accepted = True
        except ValueError:
            accepted = False
        assert accepted == bool(re.fullmatch(BASE64_PATTERN, text)), text


@pytest.mark.parametrize("method,path,headers", [("POST", "/v1/score", JSON), ("PUT", "/v1/config", ADMIN)])
def test_oversized_bodies_get_the_documented_413(server, method, path, headers):
    body = b'{"request_id": "' + b"x" * (MAX_REQUEST_BYTES + 10) + b'"}'
    with httpx.Client(base_url=server, timeout=60) as client:
        response = client.request(method, path, content=body, headers=headers)
        assert response.status_code == 413 and response.headers["content-type"].startswith("text/plain")
        operation = client.get("/openapi.json").json()["paths"][path][method.lower()]
        assert {"413", "422", "503"} <= set(operation["responses"])
        # a body past max_request_bytes is Starlette's plain text; a score request's video past the
        # decode budget is a JSON error naming the item
        expected = {"text/plain", "application/json"} if path == "/v1/score" else {"text/plain"}
        assert set(operation["responses"]["413"]["content"]) == expected
