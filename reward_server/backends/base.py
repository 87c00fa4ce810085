"""What every reward backend consumes and produces, and the interface the server drives.

A backend turns (instruction, source frames, edited frames[, reference image])
into named dimensions on a 0-10 scale. Local backends (the pixel metrics, an
in-process VLM) are driven through a dynamic batcher; remote ones (an API judge,
a vLLM server) are called directly per request and cap their own concurrency.
"""
from __future__ import annotations

import inspect
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class ScoreInput:
    """One item to score, decoded.

    ``source`` and ``edited`` are ``uint8 (F, H, W, 3)`` RGB frames;
    ``reference`` is an optional ``uint8 (H, W, 3)`` RGB image. The ``*_bytes``
    fields keep the files as they came over the wire (mp4) for backends that
    send whole videos to a judge; they are None when the caller only has frames.
    """

    instruction: str
    source: np.ndarray
    edited: np.ndarray
    item_id: str = ""
    reference: np.ndarray | None = None
    category: str | None = None
    """Edit category (``local_change``, ``remove``, ``add``, ``global_style``) when the caller gave one."""
    source_bytes: bytes | None = None
    edited_bytes: bytes | None = None


@dataclass
class BackendResult:
    """Either ``dimensions`` (name -> 0-10 score or None) or an ``error``; ``reason`` is a judge's note."""

    item_id: str = ""
    dimensions: dict[str, float | None] | None = None
    error: str | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.dimensions is not None


@runtime_checkable
class Backend(Protocol):
    """What the server needs from a reward backend.

    Optional attributes: ``remote`` (bool, default False: the server batches
    calls across requests; True: it calls ``score_batch`` once per request and
    the backend caps its own concurrency), ``fingerprint`` (str, default
    ``name:version``: everything that changes the scores, used in cache keys)
    and ``close()`` / ``aclose()`` (release models, clients, connections).
    """

    name: str
    version: str
    dimensions: tuple[str, ...]

    def score_batch(self, items: list[ScoreInput]) -> Sequence[BackendResult] | Awaitable[Sequence[BackendResult]]:
        """Score items in order; failed items carry ``error`` instead of raising."""
        ...


def is_remote(backend: Backend) -> bool:
    """Whether the server should call ``backend`` per request instead of batching across requests."""
    return bool(getattr(backend, "remote", False))


def fingerprint(backend: Backend) -> str:
    """The backend's cache identity: its ``fingerprint`` attribute, else ``name:version``."""
    return str(getattr(backend, "fingerprint", None) or f"{backend.name}:{backend.version}")


def is_async(backend: Backend) -> bool:
    """Whether ``backend.score_batch`` is a coroutine function (awaited on the event loop)."""
    return inspect.iscoroutinefunction(backend.score_batch)


async def close_backend(backend: Backend) -> None:
    """Call the backend's ``aclose()`` or ``close()`` if it has one."""
    aclose = getattr(backend, "aclose", None)
    if aclose is not None:
        await aclose()
        return
    close = getattr(backend, "close", None)
    if close is not None:
        close()
