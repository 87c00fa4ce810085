"""Error responses and log hygiene of the reward server's HTTP layer.

Every error the app answers is JSON that can always be encoded:

* schema violations, malformed JSON and bodies FastAPI cannot parse (invalid
  UTF-8, nesting too deep) are HTTP 422 with ``detail: [{loc, msg, type}]``
  (:func:`validation_error_handler`); an ``input`` member is kept only for a
  short scalar (a string of at most :data:`MAX_INPUT_CHARS` characters, a finite
  number, a bool, null), never a container, bytes or a non-finite number, so a
  rejected 50 MB body gets an error of a few hundred bytes. At most
  :data:`MAX_ERRORS` errors are listed (a last entry says how many were left out).
* other HTTP errors keep ``{"detail": <message>}`` (:func:`http_error_handler`);
  a 405's ``Allow`` header lists every method of the path, not only the first route's.

Strings taken from a request are made encodable (lone surrogates become
``\\udxxx`` text) and truncated. :class:`EscapeControlCharacters` escapes control
characters in every record the reward server's loggers emit, so that a client
string cannot start a log line of its own.
"""
from __future__ import annotations

import logging
import math
import pkgutil
import re
from collections.abc import Iterable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match

logger = logging.getLogger(__name__)

MAX_ERRORS = 32
"""Most errors listed in one 422 body."""
MAX_MSG_CHARS = 500
"""Longest ``msg`` (and string ``detail``) in an error body, in characters."""
MAX_INPUT_CHARS = 64
"""Longest string ``input`` echoed back; longer strings are cut to this many characters plus ``...``."""
MAX_LOC_CHARS = 64
"""Longest string element of ``loc`` (dictionary keys come from the client)."""
MAX_LOG_CHARS = 2000
"""Longest client string :func:`log_safe` returns."""

_PARSE_FAILURE = "There was an error parsing the body"
"""FastAPI's HTTP 400 detail when the body is not decodable JSON (invalid UTF-8, too deep)."""

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff\ud800-\udfff]")
"""Characters that can break or disguise a log line: C0 and C1 controls, DEL, line and
paragraph separators, zero-width and bidirectional controls, the BOM, lone surrogates."""


class ErrorMessage(BaseModel):
    """Body of the non-validation errors (401, 403, 404, 405, 409, 413, 503)."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    detail: str
    """What went wrong."""


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group(0))
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def log_safe(text: object, limit: int = MAX_LOG_CHARS) -> str:
    """``str(text)`` with control characters, line separators and lone surrogates written as
    ``\\xNN`` / ``\\uNNNN`` escapes, cut to ``limit`` characters (plus ``...``).

    Safe to log and to encode as UTF-8 whatever the client sent.
    """
    value = str(text)
    if len(value) > limit:
        value = value[:limit] + "..."
    return _UNSAFE.sub(_escape, value)


def _encodable(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, lone surrogates written as ``\\udxxx`` (valid UTF-8)."""
    if len(text) > limit:
        text = text[:limit] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _safe_input(value: Any) -> tuple[bool, Any]:
    """(keep, value): short scalars only."""
    if value is None or isinstance(value, bool):
        return True, value
    if isinstance(value, int):
        return abs(value) < 2**63, value
    if isinstance(value, float):
        return math.isfinite(value), value
    if isinstance(value, str):
        return True, _encodable(value, MAX_INPUT_CHARS)
    return False, None


def safe_errors(errors: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """pydantic/FastAPI errors as ``[{loc, msg, type[, input]}]`` that always encode as JSON.

    ``loc`` keeps strings (cut to :data:`MAX_LOC_CHARS`) and integers, ``msg`` is cut
    to :data:`MAX_MSG_CHARS`, ``ctx`` and ``url`` are dropped, ``input`` is kept only for
    short scalars. At most :data:`MAX_ERRORS` entries, the last saying how many were left out.
    """
    out: list[dict[str, Any]] = []
    total = 0
    for error in errors:
        total += 1
        if len(out) >= MAX_ERRORS:
            continue
        loc = [part if isinstance(part, int) and not isinstance(part, bool) else _encodable(str(part), MAX_LOC_CHARS)
               for part in error.get("loc", ())]
        entry: dict[str, Any] = {"loc": loc, "msg": _encodable(str(error.get("msg", "")), MAX_MSG_CHARS),
                                 "type": _encodable(str(error.get("type", "value_error")), MAX_LOC_CHARS)}
        if "input" in error:
            keep, value = _safe_input(error["input"])
            if keep:
                entry["input"] = value
        out.append(entry)
    if total > len(out):
        out.append({"loc": ["body"], "msg": f"{total - len(out)} more errors not shown", "type": "too_many_errors"})
    return out


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    """HTTP 422 with :func:`safe_errors` of ``exc`` (never the whole input)."""
    detail = safe_errors(exc.errors())
    logger.info("%s %s rejected with 422: %d errors, first at %s: %s", request.method, log_safe(request.url.path, 200),
                len(detail), log_safe(detail[0]["loc"] if detail else [], 200), log_safe(detail[0]["msg"] if detail else "", 200))
    return JSONResponse(status_code=422, content={"detail": detail})


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE and getattr(route, "methods", None):
            methods |= set(route.methods)
    return sorted(methods)


async def http_error_handler(request: Request, exc: StarletteHTTPException) -> Response:
    """``{"detail": ...}`` with the status of ``exc``, made encodable and bounded.

    FastAPI's 400 for a body it cannot parse becomes the 422 ``json_invalid`` of
    malformed JSON; a 405 lists every method of the path in ``Allow``.
    """
    headers = dict(exc.headers or {})
    if exc.status_code == 400 and exc.detail == _PARSE_FAILURE:
        cause = type(exc.__cause__).__name__ if exc.__cause__ is not None else "unknown"
        detail = [{"loc": ["body"], "msg": f"the body is not parseable JSON ({cause})", "type": "json_invalid"}]
        return JSONResponse(status_code=422, content={"detail": detail})
    if exc.status_code == 405:
        allowed = _allowed_methods(request)
        if allowed:
            headers["Allow"] = ", ".join(allowed)
    if exc.status_code in (204, 304) or exc.status_code < 200:
        return Response(status_code=exc.status_code, headers=headers)
    if isinstance(exc.detail, list):
        content: Any = safe_errors(exc.detail)
    else:
        content = _encodable(str(exc.detail), MAX_MSG_CHARS)
    return JSONResponse(status_code=exc.status_code, content={"detail": content}, headers=headers)


class EscapeControlCharacters(logging.Filter):
    """Rewrites a record's message with :func:`log_safe` (no length limit) when it holds
    a character that could start a forged log line; tracebacks are left as they are."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is the logging module's to report
            return True
        if _UNSAFE.search(message):
            record.msg, record.args = _UNSAFE.sub(_escape, message), None
        return True


def escape_server_logs(package: str = "editrl.reward_server") -> None:
    """Attach one :class:`EscapeControlCharacters` to the logger of ``package`` and of each of
    its modules (imported or not yet), once. Logger filters do not apply to descendants, hence one each."""
    module = __import__(package, fromlist=["__path__"])
    names = [package, *(info.name for info in pkgutil.walk_packages(module.__path__, package + "."))]
    for name in names:
        target = logging.getLogger(name)
        if not any(isinstance(f, EscapeControlCharacters) for f in target.filters):
            target.addFilter(EscapeControlCharacters())


def install(app: FastAPI) -> None:
    """Register the handlers above on ``app`` and escape the reward server's logs."""
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    escape_server_logs()
