"""Editing prompts for a dataset, written by a VLM that looks at each source clip (VIVA's data step).

Per clip the VLM sees ``frames_per_clip`` evenly spaced JPEG frames and answers the JSON object
``{"source_caption", "instruction", "target_caption", "edit_category"}``. Clip ``i`` (input order) is
asked for ``categories[i % K]``, so each of ``K`` categories gets ``floor(N / K)`` or ``ceil(N / K)`` of
``N`` clips; an answer naming another category fails. Clients (the reward server's judge clients):
``gemini``, google-genai built as :class:`~editrl.reward_server.backends.gemini.GeminiBackend` builds it
(HTTP 408/429/5xx and connection errors retried inside it, JSON enforced by ``response_mime_type`` and
``response_schema``); ``openai``, ``POST {base_url}/v1/chat/completions`` of a vLLM server over httpx
(frames as base64 JPEG data URLs, ``response_format={"type": "json_object"}``, connection errors, 429
and 5xx retried with tenacity). Both try a timed-out call again, ``attempts`` tries in all; a malformed
answer is not retried. Each clip comes back once, in input order, as a :class:`WrittenPrompt` or a
:class:`ClipFailure` whose one-line ``reason`` starts with the cause: ``blocked``, ``malformed``,
``http <code>``, ``timeout``, ``connection error`` or ``error``. One warning is logged per failure and
one summary line per call. API keys are read from the environment and never logged.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import numpy as np
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tenacity import AsyncRetrying, retry_if_exception, retry_if_exception_type, stop_after_attempt, wait_exponential

from editrl.reward_server.backends.frames import image_to_jpeg, sampled_images
from editrl.reward_server.backends.gemini import RETRY_STATUS_CODES, Blocked, answer_text
from editrl.reward_server.backends.vllm_http import _retryable, openai_messages
from editrl.tools.dataset.catalog import EDIT_CATEGORIES

_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (httpx.TransportError, OSError)
try:  # the google-genai async client talks aiohttp when it is installed
    import aiohttp
    _CONNECTION_ERRORS += (aiohttp.ClientError,)
except ImportError:  # pragma: no cover - depends on the environment
    pass

logger = logging.getLogger(__name__)

FIELDS: tuple[str, ...] = ("source_caption", "instruction", "target_caption", "edit_category")
"""The string fields of every answer, in the order they are asked for."""
DEFAULT_GEMINI_KEY_ENV = "GEMINI_API_KEY"
CATEGORY_HINTS: dict[str, str] = {
    "colour": "change the colours, lighting or colour grade of the whole scene",
    "add": "add one new object that is not in the clip",
    "remove": "remove one object that is clearly visible in the clip",
    "replace": "replace one visible object with a different object",
    "style": "re-render the whole clip in another visual style",
    "background": "change the background while keeping the main subject as it is",
}
"""What each category of the bundled set asks for; other categories are named without a hint."""


class WriterConfig(BaseModel):
    """Which VLM writes the prompts, how it is reached, and what it is asked for."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    client: Literal["gemini", "openai"]
    """``gemini``: the google-genai client; ``openai``: an OpenAI-compatible server such as vLLM."""
    model: str = Field(min_length=1, max_length=512)
    """Model name (Gemini model, or the served model name of the OpenAI-compatible server)."""
    base_url: str | None = Field(default=None, max_length=512)
    """API endpoint. Gemini: None is Google's default; openai: the server root, e.g. ``http://gpu-node:8000`` (required)."""
    api_version: str | None = Field(default=None, max_length=32)
    """Gemini API version path segment (``v1beta``, ``v1``); None is the client's default (gemini only)."""
    api_key_env: str | None = Field(default=None, max_length=128)
    """Environment variable with the API key. Gemini: must be set (None: ``GEMINI_API_KEY``); openai: a bearer token, if any."""
    categories: list[str] = Field(default_factory=lambda: list(EDIT_CATEGORIES), min_length=1)
    """Edit categories, asked for in turn (clip ``i`` gets ``categories[i % len(categories)]``)."""
    frames_per_clip: int = Field(default=4, ge=1, le=32)
    """Frames sampled evenly from each clip (first and last included; all of a shorter clip)."""
    max_side: int = Field(default=512, ge=16, le=4096)
    """Longer side of each sent frame, in pixels (frames are only ever downscaled)."""
    jpeg_quality: int = Field(default=85, ge=1, le=95)
    """JPEG quality of the sent frames."""
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    """Sampling temperature of the VLM."""
    timeout_s: float = Field(default=60.0, gt=0.0, le=3600.0)
    """Seconds per HTTP attempt."""
    attempts: int = Field(default=3, ge=1, le=20)
    """Attempts per clip on timeouts, connection errors, HTTP 408/429/5xx, the first included."""
    backoff_initial_s: float = Field(default=1.0, ge=0.0, le=60.0)
    """First wait between attempts, in seconds; doubled after each retry."""
    backoff_max_s: float = Field(default=30.0, ge=0.0, le=600.0)
    """Longest wait between attempts, in seconds."""
    max_concurrency: int = Field(default=8, ge=1, le=1024)
    """Most requests in flight at once."""

    @model_validator(mode="after")
    def _check(self) -> "WriterConfig":
        if any(not c.strip() for c in self.categories) or len(set(self.categories)) != len(self.categories):
            raise ValueError(f"categories must be distinct non-empty names, got {self.categories}")
        if self.client == "openai" and not self.base_url:
            raise ValueError("base_url is required with client 'openai' (the server root, e.g. http://gpu-node:8000)")
        return self


@dataclass(frozen=True, eq=False)
class ClipFrames:
    """One source clip: ``frames`` is ``uint8 (F, H, W, 3)`` RGB, ``F >= 1`` (ValueError otherwise, or for an empty id)."""

    clip_id: str
    frames: np.ndarray

    def __post_init__(self) -> None:
        if not self.clip_id:
            raise ValueError("clip_id must be a non-empty string")
        frames = self.frames
        if not (isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.ndim == 4
                and frames.shape[0] >= 1 and frames.shape[-1] == 3):
            got = f"{frames.dtype} {frames.shape}" if isinstance(frames, np.ndarray) else type(frames).__name__
            raise ValueError(f"clip {self.clip_id}: frames must be uint8 (F, H, W, 3) with F >= 1, got {got}")


@dataclass(frozen=True)
class WrittenPrompt:
    """The VLM's answer for one clip; ``edit_category`` is the category it was asked for."""

    clip_id: str
    source_caption: str
    instruction: str
    target_caption: str
    edit_category: str


@dataclass(frozen=True)
class ClipFailure:
    """A clip without a prompt; ``reason`` is one line starting with the cause (see the module docstring)."""

    clip_id: str
    reason: str


@dataclass(frozen=True)
class WriterResult:
    """Every clip once, in input order, as a :class:`WrittenPrompt` or a :class:`ClipFailure`."""

    items: list[WrittenPrompt | ClipFailure] = field(default_factory=list)

    @property
    def written(self) -> list[WrittenPrompt]:
        return [item for item in self.items if isinstance(item, WrittenPrompt)]

    @property
    def failures(self) -> list[ClipFailure]:
        return [item for item in self.items if isinstance(item, ClipFailure)]

    def category_counts(self) -> Counter[str]:
        """Written prompts per edit category."""
        return Counter(item.edit_category for item in self.written)

    def summary(self) -> str:
        """One line: clips written per category, failures per cause."""
        causes = Counter(failure.reason.split(":")[0] for failure in self.failures)
        written = ", ".join(f"{c} {n}" for c, n in sorted(self.category_counts().items())) or "none"
        failed = ", ".join(f"{c} {n}" for c, n in sorted(causes.items())) or "none"
        return f"{len(self.written)} of {len(self.items)} clips written ({written}); {len(self.failures)} failed ({failed})"


class Malformed(ValueError):
    """The answer is not the asked JSON object; the message names the field."""


def writer_prompt(category: str, num_frames: int) -> str:
    """The text shown before the ``num_frames`` frames of a clip, asking for ``category``."""
    hint = CATEGORY_HINTS.get(category)
    named = f'"{category}" ({hint})' if hint else f'"{category}"'
    return (
        "You are writing training data for an instruction-based video editing model.\n"
        f"The {num_frames} images below are frames of one source video clip, in temporal order.\n"
        "1. source_caption: one sentence describing the clip: the main subject, the setting and the camera motion.\n"
        f"2. instruction: one imperative editing instruction of the category {named} that fits this clip "
        "and whose result is visible in every frame.\n"
        "3. target_caption: one sentence describing the clip after the edit, in the style of source_caption, "
        "with everything the instruction does not change kept as it is.\n"
        'Answer with only a JSON object with the string fields "source_caption", "instruction", '
        f'"target_caption" and "edit_category"; "edit_category" must be "{category}".\n'
        f"Edit category: {category}"
    )


def parse_answer(text: str | None, category: str) -> dict[str, str]:
    """The four fields of an answer, stripped.

    Raises:
        Malformed: not a JSON object, a field missing, not a string or empty, or ``edit_category`` not ``category``.
    """
    if not text or not text.strip():
        raise Malformed("empty answer")
    try:
        answer = json.loads(text)
    except json.JSONDecodeError as exc:
        raise Malformed(f"answer is not JSON ({exc.msg} at char {exc.pos}): {text[:80]!r}") from None
    if not isinstance(answer, dict):
        raise Malformed(f"answer is a JSON {type(answer).__name__}, not an object")
    fields = {}
    for name in FIELDS:
        if name not in answer:
            raise Malformed(f"field {name} missing")
        if not isinstance(answer[name], str):
            raise Malformed(f"field {name} is {type(answer[name]).__name__}, not a string")
        fields[name] = answer[name].strip()
        if not fields[name]:
            raise Malformed(f"field {name} is empty")
    if fields["edit_category"] != category:
        raise Malformed(f"field edit_category is {fields['edit_category']!r}, asked {category!r}")
    return fields


@dataclass(frozen=True)
class _Content:
    """Chat content parts (``{"type": "text"|"image", ...}``), duck-typed as the vLLM engine's prompts."""

    parts: list[dict[str, Any]]

    def content(self) -> list[dict[str, Any]]:
        return self.parts


def _retrying(config: WriterConfig, retry: Any) -> AsyncRetrying:
    initial = config.backoff_initial_s
    return AsyncRetrying(stop=stop_after_attempt(config.attempts), retry=retry, reraise=True,
                         wait=wait_exponential(multiplier=initial, min=initial, max=config.backoff_max_s))


class _GeminiClient:
    def __init__(self, config: WriterConfig) -> None:
        env = config.api_key_env or DEFAULT_GEMINI_KEY_ENV
        api_key = os.environ.get(env)
        if not api_key:
            raise ValueError(f"api_key_env: environment variable {env} (the Gemini API key) is not set")
        self.config = config
        retry = types.HttpRetryOptions(attempts=config.attempts, initial_delay=config.backoff_initial_s,
                                       max_delay=config.backoff_max_s, exp_base=2.0, jitter=min(1.0, config.backoff_initial_s),
                                       http_status_codes=list(RETRY_STATUS_CODES))
        http_options = types.HttpOptions(base_url=config.base_url, api_version=config.api_version,
                                         timeout=int(config.timeout_s * 1000), retry_options=retry)
        self._client = genai.Client(api_key=api_key, http_options=http_options)
        self._semaphore = asyncio.Semaphore(config.max_concurrency)

    def prepare(self, content: _Content) -> list[types.Part]:
        return [types.Part.from_text(text=p["text"]) if p["type"] == "text" else
                types.Part.from_bytes(data=image_to_jpeg(p["image"], self.config.jpeg_quality), mime_type="image/jpeg")
                for p in content.parts]

    @staticmethod
    def schema(category: str) -> types.Schema:
        properties = {name: types.Schema(type=types.Type.STRING) for name in FIELDS}
        properties["edit_category"] = types.Schema(type=types.Type.STRING, enum=[category])
        return types.Schema(type=types.Type.OBJECT, properties=properties, required=list(FIELDS),
                            property_ordering=list(FIELDS))

    async def ask(self, parts: list[types.Part], category: str) -> str | None:
        config = self.config
        generation = types.GenerateContentConfig(temperature=config.temperature, response_mime_type="application/json",
                                                 response_schema=self.schema(category))
        # the client retries HTTP codes and connection errors itself, not timeouts
        async for attempt in _retrying(config, retry_if_exception_type(TimeoutError)):
            with attempt:
                async with self._semaphore:
                    response = await self._client.aio.models.generate_content(
                        model=config.model, contents=[types.Content(role="user", parts=parts)], config=generation)
        return answer_text(response)

    async def aclose(self) -> None:
        await self._client.aio.aclose()


class _OpenAIClient:
    def __init__(self, config: WriterConfig) -> None:
        headers = {}
        if config.api_key_env:
            token = os.environ.get(config.api_key_env)
            if not token:
                raise ValueError(f"api_key_env: environment variable {config.api_key_env} (the server's token) is not set")
            headers["Authorization"] = f"Bearer {token}"
        self.config = config
        self._client = httpx.AsyncClient(base_url=str(config.base_url).rstrip("/"), timeout=config.timeout_s, headers=headers)
        self._semaphore = asyncio.Semaphore(config.max_concurrency)

    def prepare(self, content: _Content) -> list[dict[str, Any]]:
        return openai_messages(content, self.config.jpeg_quality)  # type: ignore[arg-type]

    async def ask(self, messages: list[dict[str, Any]], category: str) -> str | None:
        config = self.config
        body = {"model": config.model, "messages": messages, "temperature": config.temperature,
                "response_format": {"type": "json_object"}}
        async for attempt in _retrying(config, retry_if_exception(_retryable)):
            with attempt:
                async with self._semaphore:
                    response = await self._client.post("/v1/chat/completions", json=body)
                response.raise_for_status()
        try:
            choice = response.json()["choices"][0]
            content, finish = choice["message"].get("content"), choice.get("finish_reason")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise Malformed(f"response without choices[0].message: {response.text[:80]!r}") from None
        if finish == "content_filter":
            raise Blocked("answer blocked: finish_reason content_filter")
        return content

    async def aclose(self) -> None:
        await self._client.aclose()


class InstructionWriter:
    """Writes prompts for clips through the client ``config`` names; close it with :meth:`aclose`.

    Raises:
        ValueError: the API key variable (``api_key_env``) is not set (Gemini: always needed;
            openai: when given); checked here, before any request.
    """

    def __init__(self, config: WriterConfig) -> None:
        self.config = config
        self._client = _GeminiClient(config) if config.client == "gemini" else _OpenAIClient(config)

    async def aclose(self) -> None:
        await self._client.aclose()

    def category_of(self, index: int) -> str:
        """The category asked of clip number ``index`` (0-based, in input order)."""
        return self.config.categories[index % len(self.config.categories)]

    async def write(self, clips: list[ClipFrames]) -> WriterResult:
        """A prompt or a failure for every clip, in input order; one clip's failure never fails the others.

        Raises: ValueError: two clips share a ``clip_id``."""
        duplicates = sorted(c for c, n in Counter(clip.clip_id for clip in clips).items() if n > 1)
        if duplicates:
            raise ValueError(f"clip_id not unique: {duplicates}")
        items = await asyncio.gather(*(self._write_one(clip, self.category_of(i)) for i, clip in enumerate(clips)))
        result = WriterResult(items=list(items))
        for failure in result.failures:
            logger.warning("instruction writer: clip %s failed: %s", failure.clip_id, failure.reason)
        logger.info("instruction writer (%s %s): %s", self.config.client, self.config.model, result.summary())
        return result

    async def _write_one(self, clip: ClipFrames, category: str) -> WrittenPrompt | ClipFailure:
        try:  # frames are sampled and JPEG-encoded off the event loop
            payload = await asyncio.to_thread(lambda: self._client.prepare(self._content(clip, category)))
            text = await self._client.ask(payload, category)
            return WrittenPrompt(clip_id=clip.clip_id, **parse_answer(text, category))
        except Exception as exc:  # noqa: BLE001 - every cause fails this clip alone
            return ClipFailure(clip_id=clip.clip_id, reason=" ".join(self._reason(exc).split())[:300])

    def _content(self, clip: ClipFrames, category: str) -> _Content:
        images = sampled_images(clip.frames, self.config.frames_per_clip, self.config.max_side)
        return _Content([{"type": "text", "text": writer_prompt(category, len(images))}]
                        + [{"type": "image", "image": image} for image in images])

    def _reason(self, exc: Exception) -> str:
        config = self.config
        if isinstance(exc, Blocked):
            return f"blocked: {exc}"
        if isinstance(exc, Malformed):
            return f"malformed: {exc}"
        if isinstance(exc, genai_errors.APIError):
            return f"http {exc.code}: {exc.status or ''} {exc.message}"
        if isinstance(exc, httpx.HTTPStatusError):
            return f"http {exc.response.status_code}: {exc.response.text[:200]}"
        if isinstance(exc, (TimeoutError, httpx.TimeoutException)):
            return f"timeout: no answer within {config.timeout_s:g} s on {config.attempts} attempts"
        if isinstance(exc, _CONNECTION_ERRORS):
            return f"connection error: {type(exc).__name__}: {exc} (after {config.attempts} attempts)"
        return f"error: {type(exc).__name__}: {exc}"


async def awrite_instructions(clips: list[ClipFrames], config: WriterConfig) -> WriterResult:
    """:meth:`InstructionWriter.write` with a writer built for this call and closed after it.

    Raises: ValueError: as :class:`InstructionWriter` (before any request) and :meth:`InstructionWriter.write`."""
    writer = InstructionWriter(config)
    try:
        return await writer.write(clips)
    finally:
        await writer.aclose()


def write_instructions(clips: list[ClipFrames], config: WriterConfig) -> WriterResult:
    """:func:`awrite_instructions` run to completion (not from inside a running event loop).

    Clip ``i`` of ``clips`` (frames ``uint8 (F, H, W, 3)``) is asked for ``config.categories[i % K]``;
    the result holds every clip once, in input order.

    Raises:
        ValueError: the API key variable is not set (before any request), or clip ids repeat.
    """
    return asyncio.run(awrite_instructions(clips, config))
