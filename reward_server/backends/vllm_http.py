"""The internal-VLM engine that talks to a vLLM OpenAI-compatible server over HTTP.

``POST {base_url}/v1/chat/completions`` with the frames as JPEG data URLs,
``max_tokens: 1``, ``temperature: 0``, ``logprobs: true`` and ``top_logprobs: k``;
the Yes/No margin comes from the first token's alternatives
(:func:`~.vlm_questions.margin_from_logprobs`). With reasoning, a first call
generates up to ``reasoning_tokens`` tokens, and a second one continues the
assistant message (vLLM's ``continue_final_message``) after the answer cue.
Connection errors, timeouts, HTTP 429 and 5xx are retried with exponential
backoff (tenacity); at most ``max_concurrency`` requests are in flight.
"""
from __future__ import annotations

import asyncio
import base64
import logging
import os
from typing import Any

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from editrl.reward_server.backends.frames import image_to_jpeg
from editrl.reward_server.backends.vlm_questions import YesNoPrompt, margin_from_logprobs, reasoning_prefix

logger = logging.getLogger(__name__)

JPEG_QUALITY = 90


def openai_messages(prompt: YesNoPrompt, jpeg_quality: int = JPEG_QUALITY) -> list[dict[str, Any]]:
    """The prompt as an OpenAI chat ``messages`` list (images as base64 JPEG data URLs)."""
    content = []
    for part in prompt.content():
        if part["type"] == "image":
            data = base64.b64encode(image_to_jpeg(part["image"], jpeg_quality)).decode("ascii")
            content.append({"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{data}"}})
        else:
            content.append({"type": "text", "text": part["text"]})
    return [{"role": "user", "content": content}]


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, httpx.HTTPStatusError) and (exc.response.status_code == 429 or exc.response.status_code >= 500)


class VLLMHTTPEngine:
    """Yes/No margins from a vLLM server.

    Args:
        base_url: server root, e.g. ``http://gpu-node:8000``.
        model: the served model name.
        api_key_env: environment variable with a bearer token, or None.
        timeout_s: seconds per HTTP request.
        max_concurrency: requests in flight at once.
        top_logprobs: alternatives per token (vLLM allows up to 20 by default).
        reasoning_tokens: greedy tokens generated before the answer (0: none).
        attempts: tries per request on connection errors, timeouts, 429 and 5xx.
        backoff_initial_s: first wait between tries, doubled up to 30 s.

    Raises:
        ValueError: ``api_key_env`` is given but not set.
    """

    remote = True

    def __init__(self, base_url: str, model: str, api_key_env: str | None = None, timeout_s: float = 120.0,
                 max_concurrency: int = 16, top_logprobs: int = 20, reasoning_tokens: int = 0, attempts: int = 3,
                 backoff_initial_s: float = 0.5) -> None:
        headers = {}
        if api_key_env:
            token = os.environ.get(api_key_env)
            if not token:
                raise ValueError(f"environment variable {api_key_env} (the vLLM server's token) is not set")
            headers["Authorization"] = f"Bearer {token}"
        self.model = model
        self.top_logprobs = top_logprobs
        self.reasoning_tokens = reasoning_tokens
        self._client = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout_s, headers=headers)
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self._attempts = attempts
        self._backoff = backoff_initial_s

    async def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._attempts),
            wait=wait_exponential(multiplier=self._backoff, min=self._backoff, max=30.0),
            retry=retry_if_exception(_retryable),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                async with self._semaphore:
                    response = await self._client.post("/v1/chat/completions", json=body)
                response.raise_for_status()
                return response.json()
        raise AssertionError("unreachable")  # tenacity re-raises the last error

    async def margin(self, prompt: YesNoPrompt) -> float:
        """``l_yes - l_no`` of one prompt.

        Raises:
            httpx.HTTPError: the server failed after the retries.
            ValueError: the answer has no usable log-probabilities.
        """
        messages = openai_messages(prompt)
        extra: dict[str, Any] = {}
        if self.reasoning_tokens:
            first = await self._post({"model": self.model, "messages": messages,
                                      "max_tokens": self.reasoning_tokens, "temperature": 0.0})
            text = first["choices"][0]["message"].get("content") or ""
            messages = messages + [{"role": "assistant", "content": reasoning_prefix(text)}]
            extra = {"continue_final_message": True, "add_generation_prompt": False}
        answer = await self._post({"model": self.model, "messages": messages, "max_tokens": 1, "temperature": 0.0,
                                   "logprobs": True, "top_logprobs": self.top_logprobs, **extra})
        try:
            alternatives = answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            candidates = [(alt["token"], float(alt["logprob"])) for alt in alternatives]
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ValueError(f"vLLM answer without top_logprobs: {str(answer)[:200]}") from exc
        return margin_from_logprobs(candidates)

    async def amargins(self, prompts: list[YesNoPrompt]) -> list[float | str]:
        """The margin of each prompt, or the error message of a prompt that failed."""
        results = await asyncio.gather(*(self.margin(p) for p in prompts), return_exceptions=True)
        out: list[float | str] = []
        for result in results:
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result
                out.append(f"{type(result).__name__}: {result}")
            else:
                out.append(result)
        return out

    async def aclose(self) -> None:
        await self._client.aclose()
