"""Gemini VLM-judge backend (``gemini``) on the google-genai async client.

Per item one ``generateContent`` call (see :mod:`.judge_prompts` for the two
protocols). Robustness, in layers:

* HTTP 408, 429 and 5xx are retried inside the client with exponential backoff
  and jitter (``HttpRetryOptions``: ``http_attempts`` attempts, waits from
  ``backoff_initial_s`` doubling up to ``backoff_max_s``, plus up to
  ``min(1, backoff_initial_s)`` seconds of jitter);
* every HTTP attempt has a timeout (``timeout_s``); a timed-out call, or an answer
  that does not parse (:class:`~.judge_prompts.Unparseable`), is tried again, up
  to ``max_tries`` tries in all, with the same backoff;
* a safety block (``promptFeedback.blockReason``, or a candidate whose
  ``finishReason`` is a safety reason) is not retried;
* at most ``max_concurrency`` calls are in flight over all requests.

An item whose tries are used up, that is blocked, or that hits another API
error comes back as an explicit failure naming the cause, never as a score.
The API key is read from the environment variable ``api_key_env`` and is never
logged or returned.
"""
from __future__ import annotations

import asyncio
import logging
import os

from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from editrl.reward_server.backends.base import BackendResult, ScoreInput
from editrl.reward_server.backends.frames import image_to_jpeg, jpeg_frames
from editrl.reward_server.backends.judge_prompts import (
    Unparseable,
    infer_category,
    parse_rvedit,
    parse_viva,
    rvedit_prompt,
    rvedit_schema,
    viva_prompt,
    viva_schema,
)
from editrl.reward_server.backends.specs import GeminiSpec

logger = logging.getLogger(__name__)

PROTOCOL_REVISION = "r1"
RETRY_STATUS_CODES = (408, 429, 500, 502, 503, 504)
_SAFETY_FINISH = {"SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII", "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT"}


class Blocked(RuntimeError):
    """The judge refused the prompt or its answer for safety reasons (not retried)."""


def _finish_name(value: object) -> str:
    return str(getattr(value, "value", value) or "")


def answer_text(response: types.GenerateContentResponse) -> str | None:
    """The text of the first candidate.

    Raises:
        Blocked: the prompt was blocked (``promptFeedback.blockReason``) or the
            candidate stopped for a safety reason.
    """
    feedback = response.prompt_feedback
    if feedback is not None and feedback.block_reason is not None:
        detail = f" ({feedback.block_reason_message})" if feedback.block_reason_message else ""
        raise Blocked(f"prompt blocked: {_finish_name(feedback.block_reason)}{detail}")
    if response.candidates:
        reason = _finish_name(response.candidates[0].finish_reason)
        if reason in _SAFETY_FINISH:
            raise Blocked(f"answer blocked: finishReason {reason}")
    return response.text


class GeminiBackend:
    """The Gemini judge behind the :class:`editrl.reward_server.backends.base.Backend` interface.

    Args:
        spec: model, protocol, media and robustness settings.

    Raises:
        ValueError: the API key variable ``spec.api_key_env`` is not set.
    """

    name = "gemini"
    remote = True

    def __init__(self, spec: GeminiSpec) -> None:
        api_key = os.environ.get(spec.api_key_env)
        if not api_key:
            raise ValueError(f"environment variable {spec.api_key_env} (the Gemini API key) is not set")
        self.spec = spec
        self.version = f"gemini-{spec.protocol}-{PROTOCOL_REVISION}/{spec.model}"
        self.dimensions = spec.dimension_names()
        self.fingerprint = f"{self.version}|{spec.fingerprint()}"
        retry = types.HttpRetryOptions(
            attempts=spec.http_attempts, initial_delay=spec.backoff_initial_s, max_delay=spec.backoff_max_s,
            exp_base=2.0, jitter=min(1.0, spec.backoff_initial_s), http_status_codes=list(RETRY_STATUS_CODES),
        )
        http_options = types.HttpOptions(
            base_url=spec.base_url, api_version=spec.api_version, timeout=int(spec.timeout_s * 1000), retry_options=retry
        )
        self._client = genai.Client(api_key=api_key, http_options=http_options)
        self._semaphore = asyncio.Semaphore(spec.max_concurrency)

    async def aclose(self) -> None:
        await self._client.aio.aclose()

    async def score_batch(self, items: list[ScoreInput]) -> list[BackendResult]:
        """Score items concurrently (at most ``max_concurrency`` calls at once); one failure never fails the others."""
        return list(await asyncio.gather(*(self._score_item(item) for item in items)))

    # ------------------------------------------------------------------ one item
    def _contents(self, item: ScoreInput) -> tuple[list[types.Part], dict]:
        spec = self.spec
        frames = dict(count=spec.num_frames, max_side=spec.max_side, quality=spec.jpeg_quality)
        if spec.protocol == "rvedit":
            category = item.category or infer_category(item.instruction)
            parts = [types.Part.from_text(text=rvedit_prompt(item.instruction, category, min(spec.num_frames, item.source.shape[0])))]
            for video in (item.source, item.edited):  # source frames first
                parts += [types.Part.from_bytes(data=jpeg, mime_type="image/jpeg") for jpeg in jpeg_frames(video, **frames)]
            return parts, rvedit_schema()
        has_reference = item.reference is not None
        parts = [types.Part.from_text(text=viva_prompt(item.instruction, has_reference))]
        for label, video, data in (("Source video:", item.source, item.source_bytes), ("Edited video:", item.edited, item.edited_bytes)):
            parts.append(types.Part.from_text(text=label))
            if spec.media == "video" and data is not None:
                parts.append(types.Part.from_bytes(data=data, mime_type="video/mp4"))
            else:
                parts += [types.Part.from_bytes(data=jpeg, mime_type="image/jpeg") for jpeg in jpeg_frames(video, **frames)]
        if has_reference:
            parts += [types.Part.from_text(text="Reference image:"),
                      types.Part.from_bytes(data=image_to_jpeg(item.reference, spec.jpeg_quality), mime_type="image/jpeg")]
        return parts, viva_schema(has_reference)

    async def _ask(self, parts: list[types.Part], schema: dict) -> str | None:
        config = types.GenerateContentConfig(
            temperature=self.spec.temperature, response_mime_type="application/json", response_json_schema=schema,
        )
        async with self._semaphore:
            response = await self._client.aio.models.generate_content(
                model=self.spec.model, contents=[types.Content(role="user", parts=parts)], config=config
            )
        return answer_text(response)

    async def _score_item(self, item: ScoreInput) -> BackendResult:
        try:
            parts, schema = await asyncio.to_thread(self._contents, item)
        except Exception as exc:  # noqa: BLE001 - a malformed item fails alone
            return BackendResult(item_id=item.item_id, error=f"cannot prepare the judge input: {type(exc).__name__}: {exc}")
        spec = self.spec
        retrying = AsyncRetrying(
            stop=stop_after_attempt(spec.max_tries),
            wait=wait_exponential(multiplier=spec.backoff_initial_s, min=spec.backoff_initial_s, max=spec.backoff_max_s),
            retry=retry_if_exception_type((Unparseable, TimeoutError)),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    number = attempt.retry_state.attempt_number
                    try:
                        text = await self._ask(parts, schema)
                        if spec.protocol == "rvedit":
                            dimensions, reason = parse_rvedit(text)
                        else:
                            dimensions, reason = parse_viva(text, item.reference is not None)
                    except (Unparseable, TimeoutError) as exc:
                        logger.warning("gemini item %s try %d/%d: %s: %s", item.item_id, number, spec.max_tries,
                                       type(exc).__name__, exc)
                        raise
            return BackendResult(item_id=item.item_id, dimensions=dimensions, reason=reason)
        except Unparseable as exc:
            return BackendResult(item_id=item.item_id, error=f"unparseable judge answer after {spec.max_tries} tries: {exc}")
        except TimeoutError:
            return BackendResult(item_id=item.item_id, error=f"judge timed out ({spec.timeout_s:g} s) on all {spec.max_tries} tries")
        except Blocked as exc:
            return BackendResult(item_id=item.item_id, error=f"judge safety block: {exc}")
        except genai_errors.APIError as exc:
            return BackendResult(item_id=item.item_id, error=f"judge API error {exc.code} {exc.status or ''}: {exc.message}")
        except Exception as exc:  # noqa: BLE001 - transport errors and the like fail the item, not the batch
            logger.warning("gemini item %s failed: %s: %s", item.item_id, type(exc).__name__, exc)
            return BackendResult(item_id=item.item_id, error=f"judge call failed: {type(exc).__name__}: {exc}")
