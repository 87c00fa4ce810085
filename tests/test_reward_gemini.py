"""The Gemini judge backend: the real google-genai client against a local generateContent stand-in."""
from __future__ import annotations

import asyncio
import io
import json
import logging

import numpy as np
import pytest
from PIL import Image
from reward_media import brighter, camera_pan, wide_pan
from standins import (
    GEMINI_ANSWER_BLOCK,
    GEMINI_PROMPT_BLOCK,
    GeminiStandIn,
    gemini_error,
    gemini_text_answer,
)

from editrl.protocol.video import encode_mp4
from editrl.reward_server.backends.base import ScoreInput
from editrl.reward_server.backends.gemini import GeminiBackend
from editrl.reward_server.backends.specs import GeminiSpec

SECRET = "test-key-3f9a1c77"
SOURCE = camera_pan(frames=4, size=32)


def viva_answer(scores: dict, reason: str = "the edit matches the instruction") -> tuple[int, dict]:
    return 200, gemini_text_answer(json.dumps({**scores, "reason": reason}))


def spec(url: str, **overrides) -> GeminiSpec:
    fields = dict(base_url=url, api_version="v1beta", model="gemini-judge", timeout_s=5.0, http_attempts=3,
                  max_tries=3, backoff_initial_s=0.01, backoff_max_s=0.05)
    fields.update(overrides)
    return GeminiSpec(**fields)


def score_input(item_id: str, instruction: str, source=SOURCE, edited=None, **extra) -> ScoreInput:
    edited = brighter(source) if edited is None else edited
    return ScoreInput(instruction=instruction, source=source, edited=edited, item_id=item_id,
                      source_bytes=encode_mp4(source), edited_bytes=encode_mp4(edited), **extra)


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", SECRET)


def run(backend: GeminiBackend, items: list[ScoreInput]):
    async def main():
        try:
            return await backend.score_batch(items)
        finally:
            await backend.aclose()

    return asyncio.run(main())


def test_viva_rubric_sends_both_videos_and_enforces_json(api_key):
    good = {"instruction_following": 8, "edit_quality": 7, "source_preservation": 9}
    with_reference = {**good, "reference_similarity": 6}
    scripts = {"Make it brighter": [viva_answer(good)], "Put this hat on him": [viva_answer(with_reference)]}
    reference = camera_pan(frames=1, size=48)[0]
    with GeminiStandIn(scripts) as standin:
        plain_item = score_input("a", "Make it brighter")
        ref_item = score_input("b", "Put this hat on him", reference=reference)
        plain, with_ref = run(GeminiBackend(spec(standin.url)), [plain_item, ref_item])
    assert plain.ok and plain.dimensions == {**{k: float(v) for k, v in good.items()}, "reference_similarity": None}
    assert plain.reason == "the edit matches the instruction"
    assert with_ref.ok and with_ref.dimensions["reference_similarity"] == 6.0
    by_instruction = {GeminiStandIn.instruction_of(r["body"]): r for r in standin.requests}
    request = by_instruction["Make it brighter"]
    assert request["path"] == "/v1beta/models/gemini-judge:generateContent"
    assert request["headers"]["x-goog-api-key"] == SECRET
    config = request["body"]["generationConfig"]
    assert config["responseMimeType"] == "application/json" and config["temperature"] == 0.0
    assert config["responseJsonSchema"]["required"] == ["instruction_following", "edit_quality", "source_preservation", "reason"]
    # the mp4 files as sent, source first
    assert GeminiStandIn.inline_parts(request["body"]) == [
        ("video/mp4", plain_item.source_bytes), ("video/mp4", plain_item.edited_bytes)
    ]
    ref_request = by_instruction["Put this hat on him"]
    assert "reference_similarity" in ref_request["body"]["generationConfig"]["responseJsonSchema"]["required"]
    (mime, jpeg), = GeminiStandIn.inline_parts(ref_request["body"])[2:]
    sent = np.asarray(Image.open(io.BytesIO(jpeg)))
    assert mime == "image/jpeg" and sent.shape == reference.shape
    assert np.abs(sent.astype(int) - reference.astype(int)).mean() < 6  # the reference image, JPEG-compressed


def _jpeg_quality_tables(quality: int) -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, format="JPEG", quality=quality)
    return Image.open(buffer).quantization


def test_rvedit_protocol_sends_five_small_jpeg_frames_per_video_source_first(api_key):
    source = wide_pan(frames=8)
    edited = 255 - source  # a very different video, so the order is visible
    fenced = "Scores below.\n```json\n" + json.dumps(
        {"Instruction Compliance": "85/100", "Consistency & Detail Fidelity": 70, "visual_quality": 90, "reason": "clean"}
    ) + "\n```"
    with GeminiStandIn({"Remove the helmet": [(200, gemini_text_answer(fenced))]}) as standin:
        (result,) = run(GeminiBackend(spec(standin.url, protocol="rvedit")), [score_input("r", "Remove the helmet", source, edited)])
    assert result.ok and result.dimensions == {"instruction_compliance": 8.5, "detail_fidelity": 7.0, "visual_quality": 9.0}
    body = standin.requests[0]["body"]
    prompt = body["contents"][0]["parts"][0]["text"]
    assert "Remove: the named object is gone" in prompt and "frames 1-5" in prompt
    parts = GeminiStandIn.inline_parts(body)
    assert [mime for mime, _ in parts] == ["image/jpeg"] * 10
    images = [Image.open(io.BytesIO(data)) for _, data in parts]
    assert all(image.size == (512, 384) for image in images)  # 640x480 scaled to a longer side of 512
    assert all(image.quantization == _jpeg_quality_tables(85) for image in images)
    frames = [np.asarray(image.resize((640, 480))).astype(int) for image in images]
    for position, index in enumerate([0, 2, 4, 5, 7]):  # evenly spaced over 8 frames, first and last included
        assert np.abs(frames[position] - source[index]).mean() < 12
        assert np.abs(frames[position + 5] - edited[index]).mean() < 12


def test_every_failure_path_of_the_real_client(api_key, caplog):
    valid = viva_answer({"instruction_following": 6, "edit_quality": 5, "source_preservation": 4})
    scripts = {
        "valid": [valid],
        "rate limited once": [gemini_error(429, "RESOURCE_EXHAUSTED", "quota"), valid],
        "server error": [gemini_error(500, "INTERNAL", "boom")],
        "malformed once": [(200, gemini_text_answer('{"instruction_following": 6, "edit_qual')), valid],
        "always malformed": [(200, gemini_text_answer("I would rather not score this."))],
        "prompt blocked": [GEMINI_PROMPT_BLOCK],
        "answer blocked": [GEMINI_ANSWER_BLOCK],
        "slow once": ["hang", valid],
        "always slow": ["hang"],
    }
    caplog.set_level(logging.DEBUG)
    with GeminiStandIn(scripts) as standin:
        # per-try timeout: long enough that only the hanging scripts time out on a busy machine
        backend = GeminiBackend(spec(standin.url, timeout_s=1.5))
        results = run(backend, [score_input(name, name) for name in scripts])
    by_id = {r.item_id: r for r in results}
    calls = dict(standin.calls)
    for name in ("valid", "rate limited once", "malformed once", "slow once"):
        assert by_id[name].ok and by_id[name].dimensions["edit_quality"] == 5.0, (name, by_id[name].error)
    assert calls["valid"] == 1 and calls["rate limited once"] == 2 and calls["malformed once"] == 2 and calls["slow once"] == 2
    assert "judge API error 500" in by_id["server error"].error and calls["server error"] == 3  # http_attempts
    assert "unparseable judge answer after 3 tries" in by_id["always malformed"].error and calls["always malformed"] == 3
    assert "prompt blocked: SAFETY" in by_id["prompt blocked"].error and calls["prompt blocked"] == 1
    assert "finishReason SAFETY" in by_id["answer blocked"].error and calls["answer blocked"] == 1
    assert "timed out" in by_id["always slow"].error and calls["always slow"] == 3
    for name in ("server error", "always malformed", "prompt blocked", "answer blocked", "always slow"):
        assert not by_id[name].ok and by_id[name].dimensions is None
    assert SECRET not in caplog.text and all(SECRET not in (r.error or "") for r in results)


def test_concurrency_cap_holds_across_calls(api_key):
    def slow(body):
        import time

        time.sleep(0.15)  # the judge's latency: calls overlap, so the cap is what limits them
        return viva_answer({"instruction_following": 5, "edit_quality": 5, "source_preservation": 5})

    with GeminiStandIn({}, default=[slow]) as standin:
        backend = GeminiBackend(spec(standin.url, max_concurrency=2))

        async def main():
            try:  # two concurrent batches (two requests) share the cap
                return await asyncio.gather(
                    backend.score_batch([score_input(f"a{i}", f"edit {i}") for i in range(3)]),
                    backend.score_batch([score_input(f"b{i}", f"change {i}") for i in range(3)]),
                )
            finally:
                await backend.aclose()

        first, second = asyncio.run(main())
    assert all(r.ok for r in first + second)
    assert standin.max_in_flight == 2 and len(standin.requests) == 6


def test_missing_api_key_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="GEMINI_API_KEY"):
        GeminiBackend(GeminiSpec())
