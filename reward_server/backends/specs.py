"""Typed specifications of the reward backends, as they appear in a reward config.

A spec says which backend to build and how (model, protocol, batching); it never
holds a secret, only the name of the environment variable that does. The
``type`` field selects the backend, so an unknown backend is a validation error
naming ``backends.<key>.type``.
"""
from __future__ import annotations

import json
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

# Fields that change how a backend runs but never what it scores; left out of cache keys.
_OPERATIONAL = frozenset({
    "max_batch_size", "max_wait_s", "max_concurrency", "timeout_s", "http_attempts", "max_tries",
    "backoff_initial_s", "backoff_max_s", "api_key_env", "base_url", "forward_batch_size", "device",
    "latency_s", "max_concurrent_batches",
})

VIVA_DIMENSIONS = ("instruction_following", "edit_quality", "source_preservation", "reference_similarity")
RVEDIT_DIMENSIONS = ("instruction_compliance", "detail_fidelity", "visual_quality")
REVISE_DIMENSIONS = ("edit_accuracy", "preservation", "naturalness", "realism")
PIXEL_DIMENSIONS = ("instruction_following", "preservation", "temporal_consistency")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    def fingerprint(self) -> str:
        """Canonical JSON of every field that changes the scores (operational knobs left out)."""
        data = self.model_dump(mode="json", exclude=set(_OPERATIONAL) & set(type(self).model_fields))
        return json.dumps(data, sort_keys=True, separators=(",", ":"))


class PixelSpec(_Spec):
    """The pixel-metric backend (CPU, no weights)."""

    type: Literal["pixel"] = "pixel"
    """Backend type."""
    max_batch_size: int | None = Field(default=None, ge=1)
    """Items per call of the batcher; None uses the server's ``max_batch_size``."""
    max_wait_s: float | None = Field(default=None, ge=0.0)
    """Seconds a batch waits to fill; None uses the server's ``max_wait_s``."""
    latency_s: float = Field(default=0.0, ge=0.0, le=60.0)
    """Benchmarking aid: extra seconds every backend call takes (a sleep after scoring the
    batch, in the batcher's worker thread), to stand in for a slow judge; the scores do
    not change. 0 (the default) adds nothing."""
    max_concurrent_batches: int = Field(default=1, ge=1, le=256)
    """Backend calls the batcher runs at once, each in its own worker thread. 1 (the default)
    scores one batch at a time: the pixel metrics are CPU-bound numpy, so more calls only
    compete for the same cores. Above 1 makes sense with ``latency_s``, where the call mostly
    waits as a remote judge would (e.g. the number of rollout workers times their scoring
    requests in flight)."""

    def dimension_names(self) -> tuple[str, ...]:
        return PIXEL_DIMENSIONS


class GeminiSpec(_Spec):
    """A Gemini VLM judge through the google-genai client."""

    type: Literal["gemini"] = "gemini"
    """Backend type."""
    model: str = Field(default="gemini-2.5-flash", min_length=1, max_length=128)
    """Gemini model name."""
    protocol: Literal["viva", "rvedit"] = "viva"
    """``viva``: VIVA rubric, 0-10 for instruction following, edit quality, source preservation
    and (with a reference image) reference similarity, JSON enforced by a response schema.
    ``rvedit``: RVEDiT appendix multi-frame protocol, 1-100 for instruction compliance,
    consistency and detail fidelity, visual quality and stability, with a rubric per edit
    category; scores are divided by 10."""
    media: Literal["video", "frames"] = "video"
    """How the ``viva`` protocol shows the videos: the mp4 files, or sampled JPEG frames
    (``rvedit`` always uses frames)."""
    num_frames: int = Field(default=5, ge=1, le=32)
    """Frames sampled evenly from each video when frames are sent."""
    max_side: int = Field(default=512, ge=16, le=4096)
    """Longer side of each sent frame, in pixels (frames are only ever downscaled)."""
    jpeg_quality: int = Field(default=85, ge=1, le=95)
    """JPEG quality of the sent frames."""
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    """Sampling temperature of the judge."""
    api_key_env: str = Field(default="GEMINI_API_KEY", min_length=1, max_length=128)
    """Environment variable holding the API key (the key itself is never in a config or a log)."""
    base_url: str | None = Field(default=None, max_length=512)
    """API endpoint; None is Google's default."""
    api_version: str | None = Field(default=None, max_length=32)
    """API version path segment (``v1beta``, ``v1``); None is the client's default."""
    max_concurrency: int = Field(default=8, ge=1, le=1024)
    """Most judge calls in flight at once, over all requests of this server process."""
    timeout_s: float = Field(default=60.0, gt=0.0, le=3600.0)
    """Seconds per HTTP attempt."""
    http_attempts: int = Field(default=5, ge=1, le=20)
    """Attempts per call on HTTP 408, 429 and 5xx (the client's ``HttpRetryOptions``), the first included."""
    max_tries: int = Field(default=3, ge=1, le=10)
    """Tries per item on timeouts and unparseable answers; after the last the item fails."""
    backoff_initial_s: float = Field(default=1.0, ge=0.0, le=60.0)
    """First wait between retries, in seconds; doubled after each retry."""
    backoff_max_s: float = Field(default=30.0, ge=0.0, le=600.0)
    """Longest wait between retries, in seconds."""

    def dimension_names(self) -> tuple[str, ...]:
        return VIVA_DIMENSIONS if self.protocol == "viva" else RVEDIT_DIMENSIONS


class InternalVLMSpec(_Spec):
    """An open VLM asked Yes/No per dimension, scored from its Yes/No logits (ReViSE)."""

    type: Literal["internal_vlm"] = "internal_vlm"
    """Backend type."""
    engine: Literal["transformers", "vllm_http", "vllm"] = "transformers"
    """``transformers``: in-process (CPU or GPU); ``vllm_http``: a vLLM OpenAI-compatible server
    (needs ``base_url``); ``vllm``: vLLM in-process (GPU, the optional ``vllm`` extra)."""
    model: str = Field(min_length=1, max_length=512)
    """Local checkpoint directory (transformers, vllm) or the served model name (vllm_http)."""
    base_url: str | None = Field(default=None, max_length=512)
    """vLLM server root, e.g. ``http://gpu-node:8000`` (vllm_http only)."""
    api_key_env: str | None = Field(default=None, max_length=128)
    """Environment variable with a bearer token for the vLLM server, if it needs one."""
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    """Torch device of the transformers engine; ``auto`` is CUDA when available."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype; ``auto`` is bfloat16 on CUDA and float32 on CPU."""
    dimensions: tuple[Literal["edit_accuracy", "preservation", "naturalness", "realism"], ...] = Field(
        default=REVISE_DIMENSIONS, min_length=1
    )
    """Dimensions asked about, each as its own Yes/No question."""
    num_frames: int = Field(default=4, ge=1, le=16)
    """Frames sampled evenly from each video and shown as images."""
    max_side: int = Field(default=448, ge=16, le=2048)
    """Longer side of each frame shown, in pixels."""
    reasoning_tokens: int = Field(default=0, ge=0, le=512)
    """Greedy tokens of reasoning before the answer; 0 asks for the answer directly."""
    relative: bool = True
    """Subtract P(Yes) of the self-comparison pair (source, source) from that of the edit."""
    mapping: Literal["shifted", "clipped"] = "shifted"
    """0-10 map of the relative score d = p_edit - p_self: ``shifted`` 5 (1 + d) (an unchanged
    video scores 5, linear over d in [-1, 1]); ``clipped`` 10 clip(d, 0, 1). Without
    ``relative`` the score is 10 p_edit."""
    max_batch_size: int | None = Field(default=None, ge=1)
    """Items per batcher call (in-process engines); None uses the server's ``max_batch_size``."""
    max_wait_s: float | None = Field(default=None, ge=0.0)
    """Seconds a batch waits to fill (in-process engines); None uses the server's ``max_wait_s``."""
    max_concurrent_batches: int = Field(default=1, ge=1, le=64)
    """Batcher calls run at once (in-process engines). 1 (the default): one model forward
    at a time, since the in-process model is compute-bound and not shared safely between
    threads. ``vllm_http`` is not batched by the server: its requests in flight are capped
    by ``max_concurrency`` instead."""
    forward_batch_size: int = Field(default=16, ge=1, le=1024)
    """Prompts per forward pass of the in-process engines."""
    max_concurrency: int = Field(default=16, ge=1, le=1024)
    """Requests in flight to the vLLM server (vllm_http)."""
    timeout_s: float = Field(default=120.0, gt=0.0, le=3600.0)
    """Seconds per HTTP request to the vLLM server."""
    top_logprobs: int = Field(default=20, ge=2, le=20)
    """Alternatives per token requested from vLLM; Yes and No are looked up among them."""

    def dimension_names(self) -> tuple[str, ...]:
        return tuple(self.dimensions)


BackendSpec = Annotated[Union[PixelSpec, GeminiSpec, InternalVLMSpec], Field(discriminator="type")]
"""Any backend spec; the ``type`` field picks the class."""

BACKEND_TYPES = ("pixel", "gemini", "internal_vlm")
