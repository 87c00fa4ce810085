"""The VLM instruction writer: the real google-genai client and httpx against local stand-ins."""
from __future__ import annotations

import base64
import io
import json
import logging
import re
import socket
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from standins import (
    GEMINI_ANSWER_BLOCK,
    GEMINI_PROMPT_BLOCK,
    GeminiStandIn,
    VLLMStandIn,
    gemini_error,
    gemini_text_answer,
)

from editrl.cluster.instruction_writer import (
    ClipFailure,
    ClipFrames,
    InstructionWriter,
    WriterConfig,
    WrittenPrompt,
    write_instructions,
)

SECRET = "writer-key-5b21e0"
CATEGORIES = ["colour", "add", "remove", "replace", "style", "background"]
NUM_FRAMES = 6
SENT_FRAMES = [0, 2, 3, 5]  # 4 of 6 frames, evenly spaced, first and last included


def clip(k: int) -> ClipFrames:
    """Clip ``k``: left half grey level ``20 + 25 k`` (which clip), right half ``40 f`` (which frame)."""
    frames = np.zeros((NUM_FRAMES, 32, 48, 3), np.uint8)
    frames[:, :, :24] = 20 + 25 * k
    for f in range(NUM_FRAMES):
        frames[f, :, 24:] = 40 * f
    return ClipFrames(clip_id=f"clip{k}", frames=frames)


def decode(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


def identify(jpeg: bytes) -> tuple[str, int]:
    """(clip id, frame index) of a sent frame."""
    image = decode(jpeg).astype(float)
    return f"clip{round((image[:, 4:20].mean() - 20) / 25)}", round(image[:, 28:].mean() / 40)


def asked_category(text: str) -> str:
    return re.search(r"^Edit category: (\S+)$", text, re.MULTILINE).group(1)


def answer_json(clip_id: str, category: str, **changes) -> str:
    answer = {"source_caption": f"{clip_id}: a grey wall, static camera.", "instruction": f"{category} edit of {clip_id}",
              "target_caption": f"{clip_id} after the {category} edit, static camera.", "edit_category": category}
    answer.update(changes)
    return json.dumps({k: v for k, v in answer.items() if v is not None})


class WriterStandIn(GeminiStandIn):
    """The Gemini stand-in with scripts keyed by the clip whose frames a request carries."""

    @staticmethod
    def instruction_of(body: dict) -> str:
        parts = GeminiStandIn.inline_parts(body)
        return identify(parts[0][1])[0] if parts else ""

    @staticmethod
    def prompt(body: dict) -> str:
        return "\n".join(p.get("text", "") for c in body["contents"] for p in c["parts"])


def good(body: dict, **changes) -> tuple[int, dict]:
    """A valid answer for the clip and the category the request asks for."""
    text = answer_json(WriterStandIn.instruction_of(body), asked_category(WriterStandIn.prompt(body)), **changes)
    return 200, gemini_text_answer(text)


def gemini_config(url: str, **overrides) -> WriterConfig:
    fields = dict(client="gemini", model="gemini-writer", base_url=url, api_version="v1beta", timeout_s=5.0, attempts=3,
                  backoff_initial_s=0.01, backoff_max_s=0.05, temperature=0.3)
    fields.update(overrides)
    return WriterConfig(**fields)


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", SECRET)


def by_id(result) -> dict:
    return {item.clip_id: item for item in result.items}


def test_gemini_writes_balanced_categories_from_the_sent_frames(api_key, caplog):
    caplog.set_level(logging.INFO)
    clips = [clip(k) for k in range(7)]
    with WriterStandIn({}, default=[good]) as standin:
        result = write_instructions(clips, gemini_config(standin.url))
    assert [item.clip_id for item in result.items] == [c.clip_id for c in clips]
    assert all(isinstance(item, WrittenPrompt) for item in result.items)
    assert [item.edit_category for item in result.items] == [CATEGORIES[k % 6] for k in range(7)]
    assert result.category_counts() == Counter({"colour": 2, "add": 1, "remove": 1, "replace": 1, "style": 1, "background": 1})
    first = result.items[0]
    assert first.instruction == "colour edit of clip0" and first.target_caption == "clip0 after the colour edit, static camera."
    assert len(standin.requests) == 7
    for request in standin.requests:
        body = request["body"]
        assert request["path"] == "/v1beta/models/gemini-writer:generateContent"
        assert request["headers"]["x-goog-api-key"] == SECRET
        parts = GeminiStandIn.inline_parts(body)
        assert [mime for mime, _ in parts] == ["image/jpeg"] * 4
        sent = [identify(jpeg) for _, jpeg in parts]
        clip_id = sent[0][0]
        assert sent == [(clip_id, f) for f in SENT_FRAMES] and all(decode(j).shape == (32, 48, 3) for _, j in parts)
        category = CATEGORIES[int(clip_id.removeprefix("clip")) % 6]
        prompt = WriterStandIn.prompt(body)
        assert asked_category(prompt) == category and f'"edit_category" must be "{category}"' in prompt
        config = body["generationConfig"]
        assert config["responseMimeType"] == "application/json" and config["temperature"] == 0.3
        schema = config["responseSchema"]
        assert schema["required"] == ["source_caption", "instruction", "target_caption", "edit_category"]
        assert schema["properties"]["edit_category"]["enum"] == [category]
    summary = [r.getMessage() for r in caplog.records if "clips written" in r.getMessage()]
    assert summary == ["instruction writer (gemini gemini-writer): 7 of 7 clips written (add 1, background 1, colour 2, "
                       "remove 1, replace 1, style 1); 0 failed (none)"]
    assert SECRET not in caplog.text


def test_malformed_answers_fail_their_clip_naming_the_field(api_key, caplog):
    scripts = {
        "clip0": [(200, gemini_text_answer("Sure! Here is an instruction: make it red."))],
        "clip1": [lambda body: good(body, target_caption=None)],
        "clip2": [lambda body: good(body, edit_category="style")],  # asked "remove"
        "clip4": [lambda body: good(body, instruction=5)],
        "clip5": [lambda body: good(body, source_caption="  ")],
    }
    with WriterStandIn(scripts, default=[good]) as standin:
        result = write_instructions([clip(k) for k in range(6)], gemini_config(standin.url))
    items = by_id(result)
    assert isinstance(items["clip3"], WrittenPrompt) and items["clip3"].edit_category == "replace"
    reasons = {k: v.reason for k, v in items.items() if isinstance(v, ClipFailure)}
    assert set(reasons) == {"clip0", "clip1", "clip2", "clip4", "clip5"}
    assert reasons["clip0"].startswith("malformed: answer is not JSON")
    assert reasons["clip1"] == "malformed: field target_caption missing"
    assert reasons["clip2"] == "malformed: field edit_category is 'style', asked 'remove'"
    assert reasons["clip4"] == "malformed: field instruction is int, not a string"
    assert reasons["clip5"] == "malformed: field source_caption is empty"
    assert all("\n" not in r for r in reasons.values())
    assert dict(standin.calls) == {f"clip{k}": 1 for k in range(6)}  # a malformed answer is not retried
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sorted(warnings) == sorted(f"instruction writer: clip {k} failed: {v}" for k, v in reasons.items())


def test_safety_blocks_are_blocked_failures(api_key):
    scripts = {"clip0": [GEMINI_PROMPT_BLOCK], "clip2": [GEMINI_ANSWER_BLOCK]}
    with WriterStandIn(scripts, default=[good]) as standin:
        result = write_instructions([clip(k) for k in range(3)], gemini_config(standin.url))
    items = by_id(result)
    assert items["clip0"] == ClipFailure("clip0", "blocked: prompt blocked: SAFETY")
    assert items["clip2"] == ClipFailure("clip2", "blocked: answer blocked: finishReason SAFETY")
    assert isinstance(items["clip1"], WrittenPrompt)
    assert standin.calls["clip0"] == 1 and standin.calls["clip2"] == 1
    assert result.summary().endswith("2 failed (blocked 2)")


def test_server_errors_are_retried_client_errors_are_not(api_key):
    scripts = {
        "clip0": [gemini_error(500, "INTERNAL", "boom"), good],
        "clip1": [gemini_error(400, "INVALID_ARGUMENT", "bad image")],
        "clip3": [gemini_error(503, "UNAVAILABLE", "overloaded")],
    }
    with WriterStandIn(scripts, default=[good]) as standin:
        result = write_instructions([clip(k) for k in range(4)], gemini_config(standin.url))
    items = by_id(result)
    assert isinstance(items["clip0"], WrittenPrompt) and standin.calls["clip0"] == 2
    assert items["clip1"] == ClipFailure("clip1", "http 400: INVALID_ARGUMENT bad image") and standin.calls["clip1"] == 1
    assert isinstance(items["clip2"], WrittenPrompt) and standin.calls["clip2"] == 1
    assert items["clip3"].reason == "http 503: UNAVAILABLE overloaded" and standin.calls["clip3"] == 3  # attempts


def test_a_hanging_server_times_out_after_the_attempts(api_key):
    with WriterStandIn({"clip1": ["hang"]}, default=[good]) as standin:
        result = write_instructions([clip(0), clip(1)], gemini_config(standin.url, timeout_s=0.5, attempts=2))
    items = by_id(result)
    assert isinstance(items["clip0"], WrittenPrompt)
    assert items["clip1"].reason == "timeout: no answer within 0.5 s on 2 attempts" and standin.calls["clip1"] == 2


def chat_answer(content: str, finish_reason: str = "stop") -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "served",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}]}


def chat_request(body: dict) -> tuple[str, str, list[bytes]]:
    """(asked category, clip id, JPEG frames) of a chat request; every image a base64 JPEG data URL."""
    (message,) = body["messages"]
    text = "\n".join(p["text"] for p in message["content"] if p["type"] == "text")
    urls = [p["image_url"]["url"] for p in message["content"] if p["type"] == "image_url"]
    assert all(url.startswith("data:image/jpeg;base64,") for url in urls)
    jpegs = [base64.b64decode(url.removeprefix("data:image/jpeg;base64,")) for url in urls]
    return asked_category(text), identify(jpegs[0])[0], jpegs


def test_openai_client_against_a_vllm_server(monkeypatch):
    monkeypatch.setenv("VLLM_TOKEN", "vllm-token-1")
    calls = Counter()

    def respond(body):
        category, clip_id, _ = chat_request(body)
        calls[clip_id] += 1
        if clip_id == "clip1":
            return 200, chat_answer(answer_json(clip_id, category, target_caption=None))
        if clip_id == "clip2":
            return 200, chat_answer("no JSON here")
        if clip_id == "clip3" and calls[clip_id] == 1:
            return 503, {"error": "busy"}
        if clip_id == "clip4":
            return 400, {"error": "bad request"}
        if clip_id == "clip5":
            return 200, chat_answer("", finish_reason="content_filter")
        return 200, chat_answer(answer_json(clip_id, category))

    config = WriterConfig(client="openai", model="served-vlm", api_key_env="VLLM_TOKEN", temperature=0.9,
                          backoff_initial_s=0.01, backoff_max_s=0.05, base_url="http://unused")
    with VLLMStandIn(respond) as standin:
        result = write_instructions([clip(k) for k in range(7)], config.model_copy(update={"base_url": standin.url}))
    items = by_id(result)
    assert [item.clip_id for item in result.items] == [f"clip{k}" for k in range(7)]
    assert [k for k, v in items.items() if isinstance(v, WrittenPrompt)] == ["clip0", "clip3", "clip6"]
    assert items["clip6"].edit_category == "colour" and items["clip3"].instruction == "replace edit of clip3"
    assert items["clip1"].reason == "malformed: field target_caption missing"
    assert items["clip2"].reason.startswith("malformed: answer is not JSON")
    assert items["clip4"].reason == 'http 400: {"error": "bad request"}'
    assert items["clip5"].reason == "blocked: answer blocked: finish_reason content_filter"
    assert calls["clip3"] == 2 and calls["clip4"] == 1 and calls["clip1"] == 1
    for request in standin.requests:
        body = request["body"]
        assert request["path"] == "/v1/chat/completions" and request["headers"]["Authorization"] == "Bearer vllm-token-1"
        assert body["response_format"] == {"type": "json_object"}
        assert body["model"] == "served-vlm" and body["temperature"] == 0.9
        category, clip_id, jpegs = chat_request(body)
        assert category == CATEGORIES[int(clip_id.removeprefix("clip")) % 6]
        assert [identify(j) for j in jpegs] == [(clip_id, f) for f in SENT_FRAMES]
        assert body["messages"][0]["content"][0]["type"] == "text"  # the prompt, then the frames


def test_missing_api_key_is_a_clear_error_before_any_request(monkeypatch):
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("WRITER_KEY", raising=False)
    with WriterStandIn({}, default=[good]) as standin:
        with pytest.raises(ValueError, match="GEMINI_API_KEY"):
            write_instructions([clip(0)], gemini_config(standin.url))
        with pytest.raises(ValueError, match="WRITER_KEY"):
            InstructionWriter(gemini_config(standin.url, api_key_env="WRITER_KEY"))
    assert standin.requests == []
    with pytest.raises(ValueError, match="base_url"):
        WriterConfig(client="openai", model="served-vlm")


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_an_unreachable_server_is_a_connection_error_for_both_clients(api_key):
    url = closed_port_url()
    (gemini,) = write_instructions([clip(0)], gemini_config(url, attempts=2)).items
    openai = WriterConfig(client="openai", model="served-vlm", base_url=url, attempts=2, backoff_initial_s=0.01)
    (served,) = write_instructions([clip(0)], openai).items
    for failure in (gemini, served):
        assert isinstance(failure, ClipFailure) and failure.reason.startswith("connection error: ")
        assert failure.reason.endswith("(after 2 attempts)")


def test_requests_in_flight_stay_under_max_concurrency(api_key):
    def slow(body):
        time.sleep(0.1)
        return good(body)

    with WriterStandIn({}, default=[slow]) as standin:
        result = write_instructions([clip(k) for k in range(6)], gemini_config(standin.url, max_concurrency=2))
    assert len(result.written) == 6 and standin.max_in_flight == 2
