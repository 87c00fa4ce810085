"""Schemathesis fuzzes every operation of the OpenAPI schema of a running server: no 5xx, ever.

Valid and invalid requests (the schema's positive and negative generation
modes) are sent over real HTTP, with and without the admin token, to a server
whose active config has a Gemini judge (answered by a local stand-in) and the
pixel backend, so that both the validation layer and real scoring are hit.
"""
from __future__ import annotations

import base64
import io
import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from reward_media import brighter, camera_pan, payload
from reward_servers import app_server
from schemathesis.generation import GenerationMode
from standins import GeminiStandIn, gemini_text_answer

from editrl.protocol.reward import ScoreItem, ScoreRequest
from editrl.reward_server.app import create_app
from editrl.reward_server.config import ServerConfig

TOKEN = "fuzz-admin-token"
SOURCE = camera_pan(frames=2, size=16)


@pytest.fixture(scope="module")
def fuzz_target():
    answer = 200, gemini_text_answer(json.dumps(
        {"instruction_following": 7, "edit_quality": 7, "source_preservation": 7, "reason": "ok"}))
    with pytest.MonkeyPatch.context() as patch, GeminiStandIn({}, default=[answer]) as standin:
        patch.setenv("EDITRL_REWARD_ADMIN_TOKEN", TOKEN)
        patch.setenv("GEMINI_API_KEY", "fuzz-key")
        judge = {"type": "gemini", "base_url": standin.url, "api_version": "v1beta", "model": "j", "max_tries": 1,
                 "http_attempts": 1}
        reward = {"version": "fuzz-1", "backends": {"judge": judge, "pixel": {"type": "pixel"}},
                  "weights": {"judge.instruction_following": 1.0, "pixel.preservation": 1.0}}
        config = ServerConfig.model_validate({"max_wait_s": 0.0, "max_request_bytes": 256 * 1024, "reward": reward})
        with app_server(create_app(config)) as url:
            yield url


def image_to_png(frame) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return buffer.getvalue()


VIDEO = payload(SOURCE).data
EDITED = payload(brighter(SOURCE)).data
IMAGE = base64.b64encode(image_to_png(SOURCE[0])).decode()


def with_real_media(body) -> None:
    """Put decodable videos (and a PNG where a reference image is) into a generated score request,
    keeping everything else the fuzzer chose, so that requests reach the backends."""
    items = body.get("items") if isinstance(body, dict) else None
    for entry in items if isinstance(items, list) else []:
        if not isinstance(entry, dict):
            continue
        for field, data in (("source", VIDEO), ("edited", EDITED)):
            if isinstance(entry.get(field), dict):
                entry[field]["data"] = data
        if isinstance(entry.get("reference"), dict):
            entry["reference"]["data"] = IMAGE


def fuzz(url: str, mode: GenerationMode, headers: dict[str, str], examples: int) -> list[tuple[str, int]]:
    """Run ``examples`` cases per operation; returns (operation, status) of every call."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    statuses: list[tuple[str, int]] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if mode == GenerationMode.NEGATIVE and operation.method.upper() not in ("POST", "PUT"):
            continue  # the GET routes take no body and no parameters: nothing to make invalid

        @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode), real_media=st.booleans())
        def check(case, real_media):
            if real_media:
                with_real_media(case.body)
            response = case.call(base_url=url, headers=headers, timeout=30)
            statuses.append((operation.label, response.status_code))
            assert response.status_code < 500, f"{operation.label} -> {response.status_code}: {response.text[:500]}"

        check()
    return statuses


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(fuzz_target, mode):
    anonymous = fuzz(fuzz_target, mode, {}, examples=15)
    admin = fuzz(fuzz_target, mode, {"Authorization": f"Bearer {TOKEN}"}, examples=15)
    labels = {label for label, _ in anonymous}
    expected = {"POST /v1/score", "PUT /v1/config"}
    if mode == GenerationMode.POSITIVE:
        expected |= {"GET /v1/config", "GET /metrics", "GET /healthz"}
    assert expected <= labels
    anonymous_put = {status for label, status in anonymous if label == "PUT /v1/config"}
    assert 401 in anonymous_put and not any(200 <= status < 300 for status in anonymous_put)
    put_statuses = {status for label, status in admin if label == "PUT /v1/config"}
    assert put_statuses & {200, 409, 422}  # the token let requests through to validation and swapping


def test_valid_scoring_request_through_the_fuzzed_server(fuzz_target):
    """The server still scores after the fuzzing (whatever config the fuzzer left active)."""
    import httpx

    request = ScoreRequest(request_id="after", items=[
        ScoreItem(item_id="a", instruction="make it brighter", source=payload(SOURCE), edited=payload(brighter(SOURCE)))])
    response = httpx.post(f"{fuzz_target}/v1/score", content=request.model_dump_json(),
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 200 and response.json()["results"][0]["item_id"] == "a"
