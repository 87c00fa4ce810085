"""HTTP client of the reward server, used by rollout workers.

``RewardClient.score`` posts a :class:`editrl.protocol.reward.ScoreRequest` and returns
the validated :class:`editrl.protocol.reward.ScoreResponse`. Connection errors, timeouts,
HTTP 429 and 5xx (but 501 and 505) are retried with exponential backoff (the identical
body, hence the same ``request_id``, is sent on every attempt); any other answer fails
at once with the server's message, summarised (an HTML page by its first line). A response that is not the answer to this request
(not JSON, not a ``ScoreResponse``, other ids) is an error, never passed on.
"""
from __future__ import annotations

import json
import logging
import time

import httpx
from pydantic import ValidationError
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from editrl.protocol.answers import first_line
from editrl.protocol.reward import ScoreRequest, ScoreResponse

logger = logging.getLogger(__name__)


class RewardServerError(RuntimeError):
    """The reward server could not be reached, rejected the request, or answered garbage."""


class _RetryableStatus(Exception):
    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code = status_code


NOT_RETRIED_5XX = (501, 505)
"""5xx answers that no retry changes (not implemented, HTTP version not supported): failed at once."""


def _server_message(response: httpx.Response, limit: int = 2000) -> str:
    """The ``detail`` of a FastAPI error body; any other body (e.g. an HTML error page)
    in one line of at most 200 characters (:func:`editrl.protocol.answers.first_line`)."""
    try:
        body = response.json()
    except ValueError:
        return first_line(response.text, min(limit, 200))
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        return (detail if isinstance(detail, str) else json.dumps(detail))[:limit]
    return json.dumps(body)[:limit]


class RewardClient:
    """Synchronous client of one reward server.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000``.
        timeout_s: per-attempt HTTP timeout (connect, read, write, pool).
        max_attempts: attempts per ``score`` call, the first included (>= 1).
        backoff_initial_s: wait before the second attempt; doubled after each
            failed attempt.
        backoff_max_s: cap on a single wait.
    """

    def __init__(
        self,
        base_url: str,
        timeout_s: float = 60.0,
        max_attempts: int = 5,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 10.0,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        # an idle connection is dropped after 2 s, before the server's keep-alive timeout (uvicorn: 5 s) can
        # close it just as a request goes out on it (a read error and a retry)
        self._client = httpx.Client(base_url=self.base_url, timeout=timeout_s, limits=httpx.Limits(keepalive_expiry=2.0))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "RewardClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        logger.warning(
            "reward server %s attempt %d/%d failed (%s: %s); retrying in %.2f s",
            self.base_url, state.attempt_number, self.max_attempts, type(exc).__name__, exc, wait,
        )

    def _post_once(self, body: bytes) -> httpx.Response:
        response = self._client.post("/v1/score", content=body, headers={"Content-Type": "application/json"})
        if response.status_code == 429 or (response.status_code >= 500 and response.status_code not in NOT_RETRIED_5XX):
            raise _RetryableStatus(response.status_code, _server_message(response, limit=500))
        return response

    def score(self, request: ScoreRequest) -> ScoreResponse:
        """Score ``request``; results come back in request order.

        Raises:
            RewardServerError: a non-retryable 4xx (with the server's message);
                all attempts failed (naming the URL and the attempt count); or a
                garbage response (not JSON, not a ``ScoreResponse``, or ids that do
                not match the request's).
        """
        url = f"{self.base_url}/v1/score"
        body = request.model_dump_json().encode("utf-8")
        retrying = Retrying(
            stop=stop_after_attempt(self.max_attempts),
            wait=wait_exponential(multiplier=self.backoff_initial_s, exp_base=2, min=self.backoff_initial_s, max=self.backoff_max_s),
            retry=retry_if_exception_type((httpx.TransportError, _RetryableStatus)),
            before_sleep=self._log_retry,
            reraise=True,
        )
        started = time.monotonic()
        try:
            response = retrying(self._post_once, body)
        except (httpx.TransportError, _RetryableStatus) as exc:
            raise RewardServerError(
                f"reward server {url} failed after {self.max_attempts} attempts "
                f"({time.monotonic() - started:.1f} s) for request {request.request_id!r}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if response.status_code != 200:
            raise RewardServerError(
                f"reward server {url} rejected request {request.request_id!r} with HTTP "
                f"{response.status_code}: {_server_message(response)}"
            )
        return self._parse(response, request, url)

    @staticmethod
    def _parse(response: httpx.Response, request: ScoreRequest, url: str) -> ScoreResponse:
        try:
            parsed = ScoreResponse.model_validate_json(response.content)
        except ValidationError as exc:
            raise RewardServerError(
                f"garbage response from {url} for request {request.request_id!r}: "
                f"{exc.error_count()} validation error(s): {exc}; body starts {response.content[:200]!r}"
            ) from exc
        if parsed.request_id != request.request_id:
            raise RewardServerError(
                f"garbage response from {url}: request_id {parsed.request_id!r} != {request.request_id!r}"
            )
        sent = [item.item_id for item in request.items]
        got = [result.item_id for result in parsed.results]
        if got != sent:
            raise RewardServerError(
                f"garbage response from {url} for request {request.request_id!r}: "
                f"result ids {got[:20]} do not match item ids {sent[:20]} in order"
            )
        return parsed

    def wait_until_healthy(self, timeout_s: float = 60.0, poll_interval_s: float = 0.2) -> None:
        """Poll ``GET /healthz`` until it answers ``{"status": "ok"}``.

        Raises:
            RewardServerError: not healthy within ``timeout_s`` (names the URL and
                the last problem seen).
        """
        url = f"{self.base_url}/healthz"
        deadline = time.monotonic() + timeout_s
        last = "no attempt made"
        while True:
            try:
                response = self._client.get("/healthz", timeout=max(0.1, min(2.0, timeout_s)))
                if response.status_code == 200 and response.json() == {"status": "ok"}:
                    return
                last = f"HTTP {response.status_code}: {response.text[:200]}"
            except (httpx.HTTPError, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise RewardServerError(f"reward server {url} not healthy after {timeout_s:.1f} s: {last}")
            time.sleep(poll_interval_s)
