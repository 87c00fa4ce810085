"""Local stand-ins for remote model servers, speaking their real wire protocols over HTTP.

* :class:`GeminiStandIn`: ``POST /{v1,v1beta}/models/{model}:generateContent``
  as the Gemini REST API does (camelCase JSON, URL-safe base64 inline data,
  ``x-goog-api-key`` header, ``promptFeedback`` / ``finishReason`` safety
  blocks, ``{"error": {...}}`` bodies with HTTP error codes).
* :class:`VLLMStandIn`: ``POST /v1/chat/completions`` as vLLM's OpenAI-compatible
  server does with ``logprobs`` / ``top_logprobs``.

Both pick their behaviour per call from the request itself (the instruction in
the prompt), so concurrent calls are deterministic, record every request, and
track the most requests in flight at once. Start and stop them with ``with``.
"""
from __future__ import annotations

import base64
import contextlib
import json
import re
import threading
from collections import Counter, defaultdict
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Answer = tuple[int, dict[str, Any]]


class _StandIn:
    """A threaded HTTP server with request recording and an in-flight high-water mark."""

    path_pattern = re.compile(r".*")

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.calls: dict[str, int] = defaultdict(int)
        self.in_flight = 0
        self.max_in_flight = 0
        self.release = threading.Event()  # set to end every hanging or gated answer
        self._lock = threading.Lock()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with standin._lock:
                    standin.in_flight += 1
                    standin.max_in_flight = max(standin.max_in_flight, standin.in_flight)
                    standin.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                try:
                    if not standin.path_pattern.fullmatch(self.path):
                        status, payload = 404, {"error": {"code": 404, "message": f"no route {self.path}", "status": "NOT_FOUND"}}
                    else:
                        status, payload = standin.answer(self.path, body)
                finally:
                    with standin._lock:
                        standin.in_flight -= 1
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def answer(self, path: str, body: dict[str, Any]) -> Answer:
        raise NotImplementedError

    def count(self, key: str) -> int:
        with self._lock:
            self.calls[key] += 1
            return self.calls[key]

    def __enter__(self) -> "_StandIn":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def gemini_text_answer(text: str, model: str = "stand-in") -> dict[str, Any]:
    """A successful ``generateContent`` body whose only candidate says ``text``."""
    return {
        "candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 100, "candidatesTokenCount": 20, "totalTokenCount": 120},
        "modelVersion": model,
    }


def gemini_error(code: int, status: str, message: str) -> Answer:
    return code, {"error": {"code": code, "message": message, "status": status}}


GEMINI_PROMPT_BLOCK = (200, {"promptFeedback": {"blockReason": "SAFETY", "safetyRatings": [
    {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True}]}})
GEMINI_ANSWER_BLOCK = (200, {"candidates": [{"finishReason": "SAFETY", "index": 0, "safetyRatings": [
    {"category": "HARM_CATEGORY_HARASSMENT", "probability": "HIGH", "blocked": True}]}]})


class GeminiStandIn(_StandIn):
    """``generateContent`` with a script per instruction.

    Args:
        scripts: instruction -> list of answers for its 1st, 2nd, ... call (the
            last repeats). An answer is ``(status, body)``, the string ``"hang"``
            (no answer until :attr:`release` is set, i.e. a client timeout) or a
            callable ``(request body) -> (status, body)``.
        default: the script of instructions not in ``scripts``.
    """

    path_pattern = re.compile(r"/(v1|v1beta)/models/[^/:]+:generateContent")

    def __init__(self, scripts: dict[str, list[Any]], default: list[Any] | None = None) -> None:
        super().__init__()
        self.scripts = scripts
        self.default = default or []

    @staticmethod
    def instruction_of(body: dict[str, Any]) -> str:
        text = "\n".join(p.get("text", "") for c in body.get("contents", []) for p in c.get("parts", []))
        match = re.search(r"Instruction: (.*)", text)
        return match.group(1).strip() if match else ""

    @staticmethod
    def inline_parts(body: dict[str, Any]) -> list[tuple[str, bytes]]:
        """(mime type, bytes) of every inline part, decoded from URL-safe base64."""
        out = []
        for content in body.get("contents", []):
            for part in content.get("parts", []):
                inline = part.get("inlineData") or part.get("inline_data")
                if inline:
                    mime = inline.get("mimeType") or inline.get("mime_type")
                    out.append((mime, base64.urlsafe_b64decode(inline["data"])))
        return out

    def instructions(self, since: int = 0) -> Counter[str]:
        """Calls per instruction among the requests recorded from index ``since`` on."""
        with self._lock:
            recorded = self.requests[since:]
        return Counter(self.instruction_of(request["body"]) for request in recorded)

    def answer(self, path: str, body: dict[str, Any]) -> Answer:
        instruction = self.instruction_of(body)
        script = self.scripts.get(instruction, self.default)
        if not script:
            return gemini_error(400, "INVALID_ARGUMENT", f"no script for instruction {instruction!r}")
        step = script[min(self.count(instruction), len(script)) - 1]
        if step == "hang":
            self.release.wait(timeout=30)
            return gemini_error(504, "DEADLINE_EXCEEDED", "released")
        if callable(step):
            return step(body)
        return step


class VLLMStandIn(_StandIn):
    """``/v1/chat/completions`` answering one token with ``top_logprobs``.

    Args:
        respond: ``(request body) -> (status, body)``; the body is the whole
            chat-completion response.
    """

    path_pattern = re.compile(r"/v1/chat/completions")

    def __init__(self, respond: Callable[[dict[str, Any]], Answer]) -> None:
        super().__init__()
        self.respond = respond

    def answer(self, path: str, body: dict[str, Any]) -> Answer:
        return self.respond(body)


@contextlib.contextmanager
def http_standin(handler_cls):
    """A local ``http.server`` in a thread; yields its URL; shut down through its handle."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
