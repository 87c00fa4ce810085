"""Schemathesis fuzzes every operation of the OpenAPI schema of a running server: no 5xx,
ever, and every answer conforms to the schema.

Valid and invalid requests (the schema's positive and negative generation
modes) are sent over real HTTP, with and without the admin token, to a server
whose active config has a Gemini judge (answered by a local stand-in) and the
pixel backend, so that both the validation layer and real scoring are hit.
Strings are drawn from all of Unicode (control characters, NUL, astral planes:
``codec=None``, ``allow_x00``), and one case in three gets a hostile value JSON
cannot carry strictly (NaN, Infinity, a lone surrogate, an integer too long to
parse, a line or paragraph separator) put somewhere in its body. Each answer
must pass schemathesis' conformance checks (status code, content type, response
schema, response headers; negative cases must be rejected), not only "no 5xx".
"""
from __future__ import annotations

import base64
import io
import copy
import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from reward_media import brighter, camera_pan, payload
from reward_servers import app_server
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
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


CONFORMANCE = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
               response_headers_conformance]
class TooLongInteger:
    """A JSON integer of 5001 digits: more than Python's JSON parser takes (4300), so it never validates."""

    TEXT = "1" + "0" * 5000


HOSTILE = [float("nan"), float("inf"), float("-inf"), "\ud800", "x\udfffy", TooLongInteger(), "line\nFORGED", "\u2028",
           "\u202e\ufeff", "\x00", "\U0010ffff"]
"""Values put into generated bodies: non-finite numbers and lone surrogates (sent as ``NaN``,
``Infinity`` and ``\\ud800``, as Python's ``json.dumps`` writes them), an integer Python's JSON
parser refuses, line breaks, bidirectional and zero-width controls, NUL, the last code point."""
NEVER_VALID = (TooLongInteger, "\ud800", "x\udfffy")
"""Hostile values no field accepts (lone surrogates fail every string validation): a 4xx, always.
The others may be valid where they land (free text, a float without bounds), so only the
conformance checks apply to them."""


def hostile_json(body) -> bytes:
    """``body`` as JSON the way a careless client writes it: ``NaN``/``Infinity`` literals, lone
    surrogates as ``\\udxxx`` escapes, :class:`TooLongInteger` as its digits (schemathesis' own
    serialiser refuses all three)."""
    marker = "__too_long_integer__"
    text = json.dumps(body, allow_nan=True, ensure_ascii=True, default=lambda value: marker)
    return text.replace(f'"{marker}"', TooLongInteger.TEXT).encode("ascii")


def inject(body, where: int, value, as_key: bool):
    """``body`` with ``value`` put into its ``where``-th container (modulo their count): as a new
    key when ``as_key`` and ``value`` is a string, else replacing one entry; the whole body when it
    holds no container."""
    containers = []

    def walk(node) -> None:
        if isinstance(node, (dict, list)):
            containers.append(node)
            for child in node.values() if isinstance(node, dict) else node:
                walk(child)

    walk(body)
    if not containers:
        return value
    target = containers[where % len(containers)]
    if isinstance(target, dict):
        if as_key and isinstance(value, str) or not target:
            target[value if isinstance(value, str) else "hostile"] = 1 if as_key else value
        else:
            target[list(target)[where % len(target)]] = value
    elif target:
        target[where % len(target)] = value
    else:
        target.append(value)
    return body


def fuzz(url: str, mode: GenerationMode, headers: dict[str, str], examples: int) -> list[tuple[str, int]]:
    """Run ``examples`` cases per operation; returns (operation, status) of every call."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    schema.config.generation.codec = None  # any code point but lone surrogates (those come from HOSTILE)
    schema.config.generation.allow_x00 = True
    statuses: list[tuple[str, int]] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if mode == GenerationMode.NEGATIVE and operation.method.upper() not in ("POST", "PUT"):
            continue  # the GET routes take no body and no parameters: nothing to make invalid

        @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode), real_media=st.booleans(),
               hostile=st.one_of(st.none(), st.none(), st.tuples(st.sampled_from(HOSTILE), st.integers(0, 63),
                                                                  st.booleans())))
        def check(case, real_media, hostile):
            if real_media:
                with_real_media(case.body)
            checks = list(CONFORMANCE)
            body = {}
            if hostile is not None and operation.method.upper() in ("POST", "PUT"):
                value, where, as_key = hostile
                # sent as these bytes in place of the generated body, which schemathesis keeps (it hashes it)
                body = {"data": hostile_json(inject(copy.deepcopy(case.body), where, value, as_key))}
            elif mode == GenerationMode.NEGATIVE:
                checks.append(negative_data_rejection)
            response = case.call(base_url=url, headers=headers, timeout=30, **body)
            statuses.append((operation.label, response.status_code))
            assert response.status_code < 500, f"{operation.label} -> {response.status_code}: {response.text[:500]}"
            if hostile is not None and body and (isinstance(hostile[0], TooLongInteger) or hostile[0] in NEVER_VALID[1:]):
                assert 400 <= response.status_code < 500, f"{operation.label} accepted {hostile!r}: {response.text[:300]}"
            case.validate_response(response, checks=checks, headers=headers)

        check()
    return statuses


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors_and_conformant_answers(fuzz_target, mode):
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
