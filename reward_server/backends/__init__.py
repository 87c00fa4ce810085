"""Reward backends: each turns (instruction, source frames, edited frames) into 0-10 dimensions.

A backend is any object with ``name``, ``version``, ``dimensions`` and a
``score_batch(items) -> results`` method over :class:`PixelInput` /
:class:`PixelResult` (the decoded-frames item and result types shared by all
backends). Backends are looked up by name with :func:`get_backend`.
"""
from __future__ import annotations

from typing import Protocol

from reward_server.backends.pixel import PixelBackend, PixelInput, PixelResult


class Backend(Protocol):
    """What the server needs from a reward backend."""

    name: str
    version: str
    dimensions: tuple[str, ...]

    def score_batch(self, items: list[PixelInput]) -> list[PixelResult]:
        """Score items in order; failed items carry ``error`` instead of raising."""
        ...


_FACTORIES = {"pixel": PixelBackend}


def get_backend(name: str) -> Backend:
    """Instantiate the backend registered under ``name``."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown reward backend {name!r}; known: {sorted(_FACTORIES)}") from None
    return factory()


__all__ = ["Backend", "PixelInput", "PixelResult", "get_backend"]
