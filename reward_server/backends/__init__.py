"""Reward backends: each turns (instruction, source frames, edited frames) into 0-10 dimensions.

* ``pixel`` (:mod:`.pixel`): pixel metrics, CPU, no weights;
* ``gemini`` (:mod:`.gemini`): a Gemini VLM judge (VIVA rubric or the RVEDiT
  multi-frame protocol) through the google-genai client;
* ``internal_vlm`` (:mod:`.internal_vlm`): an open VLM's P(Yes) per dimension
  relative to the self-comparison pair (ReViSE), on transformers or vLLM.

:func:`build_backend` turns a spec (:mod:`.specs`) into a backend; heavy
dependencies (google-genai, torch, transformers, vllm) are imported only by the
backends that need them.
"""
from __future__ import annotations

from editrl.reward_server.backends.base import Backend, BackendResult, ScoreInput
from editrl.reward_server.backends.pixel import PixelBackend, PixelInput, PixelResult
from editrl.reward_server.backends.specs import BACKEND_TYPES, BackendSpec, GeminiSpec, InternalVLMSpec, PixelSpec


def build_backend(spec: BackendSpec) -> Backend:
    """Instantiate the backend ``spec`` describes (may load a model or open a client).

    Raises:
        ValueError: the spec cannot be satisfied here (a missing API key variable,
            a missing checkpoint directory, an engine that is not installed).
    """
    if isinstance(spec, PixelSpec):
        return PixelBackend(latency_s=spec.latency_s)
    if isinstance(spec, GeminiSpec):
        from editrl.reward_server.backends.gemini import GeminiBackend

        return GeminiBackend(spec)
    if isinstance(spec, InternalVLMSpec):
        from editrl.reward_server.backends.internal_vlm import build_internal_vlm

        return build_internal_vlm(spec)
    raise ValueError(f"unknown reward backend spec {type(spec).__name__}; known types: {list(BACKEND_TYPES)}")


def get_backend(name: str) -> Backend:
    """Instantiate the backend of type ``name`` with its default settings.

    Raises:
        ValueError: unknown type, or a type that needs settings (``internal_vlm`` needs a model).
    """
    if name == "pixel":
        return PixelBackend()
    if name == "gemini":
        return build_backend(GeminiSpec())
    raise ValueError(f"unknown reward backend {name!r} or one that needs settings; known: {list(BACKEND_TYPES)}")


__all__ = [
    "Backend", "BackendResult", "BackendSpec", "PixelInput", "PixelResult", "ScoreInput", "build_backend", "get_backend",
]
