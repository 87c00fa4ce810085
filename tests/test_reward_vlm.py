"""The internal-VLM backend (ReViSE P(Yes)) on a tiny random Qwen2.5-VL, and its vLLM HTTP engine on a stand-in."""
from __future__ import annotations

import asyncio
import base64
import io
import math

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from reward_media import brighter, camera_pan, item
from reward_servers import app_server
from standins import VLLMStandIn
from tiny_vlm import build_tiny_qwen_vl

from editrl.protocol.reward import ScoreRequest
from editrl.reward_server.app import create_app
from editrl.reward_server.backends.base import ScoreInput
from editrl.reward_server.backends.internal_vlm import InternalVLMBackend, build_internal_vlm
from editrl.reward_server.backends.specs import InternalVLMSpec
from editrl.reward_server.backends.vlm_engines import TransformersEngine
from editrl.reward_server.backends.vlm_questions import margin_from_logprobs, to_score
from editrl.reward_server.config import ServerConfig

SOURCE = camera_pan(frames=4, size=32)
EDITS = [brighter(SOURCE), 255 - SOURCE, SOURCE[:, ::-1].copy()]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(build_tiny_qwen_vl(tmp_path_factory.mktemp("tiny_qwen_vl") / "model"))


def vlm_spec(model: str, **overrides) -> InternalVLMSpec:
    return InternalVLMSpec(model=model, num_frames=2, max_side=56, **overrides)


def inputs(edits=EDITS, instruction="make it brighter") -> list[ScoreInput]:
    return [ScoreInput(instruction, SOURCE, edit, f"e{i}") for i, edit in enumerate([SOURCE, *edits])]


def score(backend: InternalVLMBackend, items: list[ScoreInput]):
    return asyncio.run(backend.score_batch(items))


def test_identity_scores_neutral_and_swapping_yes_no_mirrors_every_score(model_dir):
    backend = build_internal_vlm(vlm_spec(model_dir))
    unchanged, *edited = score(backend, inputs())
    assert unchanged.dimensions == {d: pytest.approx(5.0, abs=1e-6) for d in backend.dimensions}  # 5 (1 + 0)
    values = [v for r in edited for v in r.dimensions.values()]
    assert all(0.0 <= v <= 10.0 for v in values) and max(abs(v - 5.0) for v in values) > 1e-3
    absolute = build_internal_vlm(vlm_spec(model_dir, relative=False))
    plain = [r.dimensions for r in score(absolute, inputs())]
    head = absolute.engine.model.lm_head.weight
    with torch.no_grad():  # exchange the output rows of the Yes and No tokens: l_yes - l_no changes sign
        yes, no = absolute.engine.yes_ids, absolute.engine.no_ids
        head[yes + no] = head[no + yes].clone()
    mirrored = [r.dimensions for r in score(absolute, inputs())]
    mirrored_relative = [r.dimensions for r in score(InternalVLMBackend(backend.spec, absolute.engine), inputs())]
    for before, after in zip(plain, mirrored):  # 10 sigmoid(-m) = 10 - 10 sigmoid(m)
        assert all(after[d] == pytest.approx(10.0 - before[d], abs=1e-4) for d in before)
    for before, after in zip([unchanged, *edited], mirrored_relative):  # 5 (1 - d) = 10 - 5 (1 + d)
        assert all(after[d] == pytest.approx(10.0 - before.dimensions[d], abs=1e-4) for d in before.dimensions)


def test_batching_pads_correctly_and_groups_share_the_self_pair(model_dir):
    batched = build_internal_vlm(vlm_spec(model_dir, forward_batch_size=16))
    single = build_internal_vlm(vlm_spec(model_dir, forward_batch_size=1))
    group = inputs()
    prompts, _ = batched._plan(group)
    # 4 items x 4 dimensions edit prompts, and one self pair per dimension for the whole group
    assert len(prompts) == 4 * 4 + 4
    lengths = {len(single.engine._encode([p], [""])["input_ids"][0]) for p in prompts}
    assert len(lengths) > 1  # prompts of different lengths: the batch really is padded
    assert batched.engine.margins(prompts) == pytest.approx(single.engine.margins(prompts), abs=1e-4)
    first = score(batched, group)
    again, _ = batched._plan(group)
    assert len(again) == 4 * 4  # the self pairs come from the cache now
    assert [r.dimensions for r in score(batched, group)] == [
        {d: pytest.approx(v, abs=1e-4) for d, v in r.dimensions.items()} for r in first
    ]


def test_reasoning_before_the_answer(model_dir):
    backend = build_internal_vlm(vlm_spec(model_dir, reasoning_tokens=3, dimensions=("edit_accuracy", "realism")))
    unchanged, changed, *_ = score(backend, inputs())
    assert unchanged.dimensions == {"edit_accuracy": pytest.approx(5.0, abs=1e-6), "realism": pytest.approx(5.0, abs=1e-6)}
    assert changed.ok and all(0.0 <= v <= 10.0 for v in changed.dimensions.values())


def test_served_with_batching_across_requests(model_dir, tmp_path):
    reward = {"version": "revise-1", "backends": {"internal_vlm": {**vlm_spec(model_dir).model_dump(), "max_wait_s": 0.2}},
              "weights": {"edit_accuracy": 0.5, "preservation": 0.5}}
    with app_server(create_app(ServerConfig.model_validate({"reward": reward}))) as url:
        async def main():
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                bodies = [ScoreRequest(request_id=f"r{i}", items=[item(f"i{i}", f"make it brighter {i}", SOURCE, edit)])
                          for i, edit in enumerate(EDITS)]
                return await asyncio.gather(*(client.post("/v1/score", content=b.model_dump_json(),
                                                          headers={"content-type": "application/json"}) for b in bodies))

        responses = asyncio.run(main())
        metrics = httpx.get(f"{url}/metrics").text
    results = [r.json()["results"][0] for r in responses]
    assert all(r["ok"] and set(r["dimensions"]) == {"edit_accuracy", "preservation", "naturalness", "realism"} for r in results)
    assert all(r["reward"] == pytest.approx((r["dimensions"]["edit_accuracy"] + r["dimensions"]["preservation"]) / 2)
               for r in results)
    count = float(metrics.split('reward_backend_batch_size_count{backend="internal_vlm"} ')[1].split()[0])
    assert count < 3  # three concurrent requests shared backend calls


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        build_internal_vlm(vlm_spec(str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="base_url"):
        build_internal_vlm(vlm_spec("served-name", engine="vllm_http"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_transformers_engine_on_cuda_matches_cpu(model_dir):
    cpu = TransformersEngine.from_pretrained(model_dir, device="cpu", dtype="float32")
    gpu = TransformersEngine.from_pretrained(model_dir, device="cuda", dtype="float32")
    prompts, _ = build_internal_vlm(vlm_spec(model_dir, device="cpu"))._plan(inputs())
    assert gpu.margins(prompts) == pytest.approx(cpu.margins(prompts), abs=1e-3)


# ---------------------------------------------------------------- vLLM over HTTP
def chat_answer(top: list[tuple[str, float]], content: str = "Yes") -> dict:
    alternatives = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top]
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "served", "choices": [{
        "index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "length",
        "logprobs": {"content": [{"token": top[0][0], "logprob": top[0][1], "top_logprobs": alternatives}]},
    }]}


def images_of(body: dict) -> list[np.ndarray]:
    urls = [p["image_url"]["url"] for m in body["messages"] for p in (m["content"] if isinstance(m["content"], list) else [])
            if p["type"] == "image_url"]
    assert all(url.startswith("data:image/jpeg;base64,") for url in urls)
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))).astype(int) for url in urls]


def respond(body: dict):
    """P(Yes) 0.9 when the edited frames differ from the source frames, 0.3 for the self pair."""
    if body.get("max_tokens", 1) > 1:
        return 200, chat_answer([("The", -0.1)], content="The colours changed. Answer: Yes")
    images = images_of(body)
    half = len(images) // 2
    same = all(np.abs(a - b).mean() < 1 for a, b in zip(images[:half], images[half:]))
    p_yes = 0.3 if same else 0.9
    question = body["messages"][0]["content"][-1]["text"]
    if "realistic" in question:  # only Yes among the alternatives: No is bounded by the smallest listed value
        return 200, chat_answer([("Yes", math.log(p_yes)), (" maybe", math.log(0.01))])
    if "natural" in question:
        return 200, chat_answer([("Hmm", -0.01), ("Well", -5.0)])
    return 200, chat_answer([("Yes", math.log(p_yes)), ("No", math.log(1 - p_yes)), (" Maybe", -9.0)])


def test_vllm_http_engine_reads_yes_no_from_top_logprobs():
    with VLLMStandIn(respond) as standin:
        spec = vlm_spec("served", engine="vllm_http", base_url=standin.url, max_concurrency=3,
                        dimensions=("edit_accuracy", "preservation", "realism"))
        backend = build_internal_vlm(spec)
        naturalness = build_internal_vlm(spec.model_copy(update={"dimensions": ("naturalness",)}))

        async def main():
            try:
                return await backend.score_batch(inputs(edits=[255 - SOURCE])), await naturalness.score_batch(inputs(edits=[]))
            finally:
                await backend.aclose()
                await naturalness.aclose()

        (unchanged, changed), (failed,) = asyncio.run(main())
    # p_edit = 0.9 / (0.9 + 0.1), p_self = 0.3 -> 5 (1 + 0.6) = 8
    assert changed.dimensions["edit_accuracy"] == pytest.approx(8.0) and changed.dimensions["preservation"] == pytest.approx(8.0)
    assert unchanged.dimensions["edit_accuracy"] == pytest.approx(5.0)
    # realism: l_no <= log 0.01 -> margins log 0.9 - log 0.01 and log 0.3 - log 0.01
    expected = to_score(0.9 / (0.9 + 0.01), 0.3 / (0.3 + 0.01), "shifted")
    assert changed.dimensions["realism"] == pytest.approx(expected)
    assert not failed.ok and "neither Yes nor No" in failed.error
    body = standin.requests[0]["body"]
    assert body["max_tokens"] == 1 and body["logprobs"] is True and body["top_logprobs"] == 20 and body["temperature"] == 0.0
    # 2 items x 3 dimensions + 3 self pairs shared by the group, then 1 + 1 for the naturalness backend
    assert len(standin.requests) == 2 * 3 + 3 + 2 and standin.max_in_flight <= 3
    assert margin_from_logprobs([("Yes", -1.0), (" yes", -2.0), ("No", -0.5)]) == pytest.approx(
        math.log(math.exp(-1.0) + math.exp(-2.0)) + 0.5)


def test_vllm_http_engine_reasons_then_continues_the_answer():
    with VLLMStandIn(respond) as standin:
        backend = build_internal_vlm(vlm_spec("served", engine="vllm_http", base_url=standin.url, reasoning_tokens=16,
                                              dimensions=("edit_accuracy",), relative=False))

        async def main():
            try:
                return await backend.score_batch([ScoreInput("make it brighter", SOURCE, 255 - SOURCE, "x")])
            finally:
                await backend.aclose()

        (result,) = asyncio.run(main())
    first, second = (r["body"] for r in standin.requests)
    assert first["max_tokens"] == 16 and "logprobs" not in first
    assert second["messages"][-1] == {"role": "assistant", "content": "The colours changed.\nAnswer:"}
    assert second["continue_final_message"] is True and second["add_generation_prompt"] is False
    assert result.dimensions["edit_accuracy"] == pytest.approx(9.0)  # 10 p_edit without the self pair
