"""Schemas of the reward server's HTTP API (``POST /v1/score``).

Videos travel inside JSON as base64 mp4 files or as base64 raw ``uint8`` RGB
frames with an explicit shape (no decoding on the server: what a caller that
holds frames, like a rollout worker, should send when bandwidth allows);
reference images as base64 PNG or JPEG; nothing is pickled on the wire. Scores are on a 0-10 scale per dimension;
the scalar ``reward`` is the reward config's aggregate of the dimensions, also
0-10.
"""
from __future__ import annotations

import base64
import binascii
import math
import threading
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

MAX_RAW_VIDEO_BYTES = 1 << 30
"""Largest raw video accepted (F * H * W * 3 bytes); the request size limit usually binds first."""


_LAST_DECODED = threading.local()
"""The bytes the ``data`` validator of the payload being validated in this thread
decoded (pydantic validates ``data`` and then runs the model validator of the
same payload right after, in the same thread)."""

_RECENT = threading.local()
_RECENT_MAX_BYTES = 4 << 20
"""The last two videos (at most this large) decoded in a thread, by their base64
text: the items of a group repeat the same source video."""


def _recent() -> dict[str, bytes]:
    if not hasattr(_RECENT, "videos"):
        _RECENT.videos = {}
    return _RECENT.videos


SAFE_ID_PATTERN = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]+$"
"""``request_id`` and ``item_id``: no control characters (C0, DEL, C1), line or paragraph
separators, zero-width or bidirectional controls or BOM, so that an id cannot break or
disguise a log line (lone surrogates are refused by JSON string validation already)."""

BASE64_PATTERN = "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
"""Standard padded base64, as published in the OpenAPI schema of ``data``; the validator
enforces exactly this language (alphabet and padding via :func:`base64.b64decode`, length
a multiple of 4, at most two ``=``) without a second pass of a regular expression over megabytes."""


def _decode_base64(value: str) -> bytes:
    if len(value) % 4:
        raise ValueError(f"not valid base64: {len(value)} characters, not a multiple of 4")
    if value.endswith("==="):
        raise ValueError("not valid base64: more than two '=' of padding")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not valid base64: {exc}") from exc


class VideoPayload(BaseModel):
    """One video inside a request: an mp4 file, or raw frames.

    * ``format: "mp4"`` (default): ``data`` is the base64 of an H.264 mp4 file;
      ``shape`` must be absent. The server decodes it (a few ms per video).
    * ``format: "raw"``: ``data`` is the base64 of ``uint8`` RGB frames in C order,
      ``shape`` is ``[F, H, W, 3]`` and ``data`` must hold exactly ``F * H * W * 3``
      bytes. Nothing is decoded; the bytes are larger than an mp4's.

    A mismatch (shape with mp4, no shape with raw, a shape that is not
    ``[F, H, W, 3]`` with positive sizes, a byte count that differs from the
    shape's) is a validation error (HTTP 422 at ``.../source`` or ``.../edited``).
    """

    model_config = ConfigDict(extra="forbid")

    format: Literal["mp4", "raw"] = "mp4"
    """``mp4`` (H.264 in an mp4 container) or ``raw`` (uint8 RGB frames, see ``shape``)."""
    data: str = Field(min_length=1, json_schema_extra={"pattern": BASE64_PATTERN})
    """Standard base64 of the video file's bytes (mp4) or of the frames' bytes (raw)."""
    shape: tuple[int, int, int, int] | None = None
    """Raw frames only: ``[F, H, W, 3]`` (frames, height, width, RGB channels)."""

    _bytes: bytes | None = PrivateAttr(default=None)

    @field_validator("data")
    @classmethod
    def _is_base64(cls, value: str) -> str:
        recent = _recent()
        decoded = recent.pop(value, None)  # a group's source video comes again with every item
        if decoded is None:
            decoded = _decode_base64(value)
            if len(recent) >= 2:
                recent.pop(next(iter(recent)))  # the least recently used
        if len(decoded) <= _RECENT_MAX_BYTES:
            recent[value] = decoded
        _LAST_DECODED.value = (value, decoded)  # for _check_shape of this payload: base64 is decoded once
        return value

    @model_validator(mode="after")
    def _check_shape(self) -> "VideoPayload":
        last = getattr(_LAST_DECODED, "value", None)
        _LAST_DECODED.value = None
        if last is not None and last[0] is self.data:
            self._bytes = last[1]
        if self.format == "mp4":
            if self.shape is not None:
                raise ValueError("shape is only for format 'raw' (an mp4 carries its own)")
            return self
        if self.shape is None:
            raise ValueError("format 'raw' needs shape [F, H, W, 3]")
        if self.shape[3] != 3 or min(self.shape) < 1:
            raise ValueError(f"raw shape must be [F, H, W, 3] with positive sizes, got {list(self.shape)}")
        needed = math.prod(self.shape)
        if needed > MAX_RAW_VIDEO_BYTES:
            raise ValueError(f"raw video of shape {list(self.shape)} is larger than {MAX_RAW_VIDEO_BYTES} bytes")
        held = len(self.data) // 4 * 3 - (len(self.data) - len(self.data.rstrip("=")))  # valid, padded base64
        if held != needed:
            raise ValueError(f"raw data holds {held} bytes, shape {list(self.shape)} needs {needed}")
        return self

    @classmethod
    def from_bytes(cls, data: bytes) -> "VideoPayload":
        """An mp4 payload of the file ``data``."""
        payload = cls.model_construct(format="mp4", data=base64.b64encode(data).decode("ascii"), shape=None)
        payload._bytes = bytes(data)
        return payload

    @classmethod
    def from_frames(cls, frames: np.ndarray) -> "VideoPayload":
        """A raw payload of ``uint8`` ``(F, H, W, 3)`` RGB frames.

        Raises:
            ValueError: another dtype or shape.
        """
        frames = np.ascontiguousarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.size == 0:
            raise ValueError(f"frames must be non-empty uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
        data = frames.tobytes()
        payload = cls.model_construct(format="raw", data=base64.b64encode(data).decode("ascii"),
                                      shape=tuple(int(n) for n in frames.shape))
        payload._bytes = data
        return payload

    def to_bytes(self) -> bytes:
        """The bytes as sent: the mp4 file, or the raw frames' bytes."""
        if self._bytes is None:
            self._bytes = base64.b64decode(self.data)
        return self._bytes

    def to_frames(self) -> np.ndarray:
        """Raw payloads only: the frames, ``uint8`` ``(F, H, W, 3)``, a read-only view of :meth:`to_bytes`.

        Raises:
            ValueError: an mp4 payload (decode it with :func:`editrl.protocol.video.decode_video`).
        """
        if self.format != "raw" or self.shape is None:
            raise ValueError("only raw payloads hold frames; decode mp4 with protocol.video.decode_video")
        return np.frombuffer(self.to_bytes(), dtype=np.uint8).reshape(self.shape)

    def identity(self) -> bytes:
        """What the score cache hashes for this video: the mp4 file's bytes, or for raw
        frames their shape followed by their bytes (equal bytes of another shape
        are another video)."""
        if self.format == "mp4":
            return self.to_bytes()
        return f"raw:{','.join(map(str, self.shape or ()))}:".encode() + self.to_bytes()


class ImagePayload(BaseModel):
    """One still image inside a request (a reference image for the edit)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["png", "jpeg"] = "png"
    """Encoding of ``data``."""
    data: str = Field(min_length=1, json_schema_extra={"pattern": BASE64_PATTERN})
    """Standard base64 of the image file's bytes."""

    @field_validator("data")
    @classmethod
    def _is_base64(cls, value: str) -> str:
        _decode_base64(value)
        return value

    @classmethod
    def from_bytes(cls, data: bytes, format: Literal["png", "jpeg"] = "png") -> "ImagePayload":
        return cls(format=format, data=base64.b64encode(data).decode("ascii"))

    def to_bytes(self) -> bytes:
        return base64.b64decode(self.data)


EditCategory = Literal["local_change", "remove", "add", "global_style"]
"""Edit categories of the judge rubrics (RVEDiT appendix): change an object or
region, remove something, add something, or restyle the whole video."""


class ScoreItem(BaseModel):
    """One (source, edited, instruction) triple to score."""

    model_config = ConfigDict(extra="forbid")

    item_id: str = Field(min_length=1, max_length=256, pattern=SAFE_ID_PATTERN)
    """Caller's id, echoed back (e.g. ``<group_id>/<sample index>``); :data:`SAFE_ID_PATTERN`."""
    instruction: str = Field(min_length=1, max_length=2000)
    """The editing instruction the edited video should follow."""
    source: VideoPayload
    """The unedited source video (mp4 or raw frames)."""
    edited: VideoPayload
    """The policy's edited video (mp4 or raw frames); same frame count as the source."""
    reference: ImagePayload | None = None
    """Optional reference image (e.g. the object to insert or the target style);
    judges that use it add a ``reference_similarity`` dimension."""
    category: EditCategory | None = None
    """Optional edit category for category rubrics; inferred from the instruction when omitted."""


class ScoreRequest(BaseModel):
    """Body of ``POST /v1/score``."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=256, pattern=SAFE_ID_PATTERN)
    """Caller's id for this request; echoed back and used in logs; :data:`SAFE_ID_PATTERN`."""
    items: list[ScoreItem] = Field(min_length=1, max_length=256)
    """Items to score; ids must be unique within the request."""

    @field_validator("items")
    @classmethod
    def _unique_ids(cls, items: list[ScoreItem]) -> list[ScoreItem]:
        seen: set[str] = set()
        for item in items:
            if item.item_id in seen:
                raise ValueError(f"duplicate item_id {item.item_id!r}")
            seen.add(item.item_id)
        return items


class ItemScore(BaseModel):
    """The score of one item, or an explicit failure."""

    item_id: str
    ok: bool
    """False when the backend could not score this item; ``reward`` is then None."""
    reward: float | None = None
    """Aggregate reward, 0-10; None when ``ok`` is False."""
    dimensions: dict[str, float | None] = Field(default_factory=dict)
    """Per-dimension scores, 0-10; None where a dimension does not apply to this item."""
    error: str | None = None
    """Why scoring failed, when ``ok`` is False."""
    backends: dict[str, str] = Field(default_factory=dict)
    """Backend name -> backend version that produced the dimensions."""
    cached: bool = False
    """True when every backend's scores for this item came from the score cache."""
    reasons: dict[str, str] = Field(default_factory=dict)
    """Backend name -> the judge's short justification, where the backend gives one."""
    backend_errors: dict[str, str] = Field(default_factory=dict)
    """Backend name -> why that backend failed on this item (with ``allow_partial``
    the reward can still be ok from the other backends)."""


class ScoreResponse(BaseModel):
    """Body returned by ``POST /v1/score``; results are in request order."""

    request_id: str
    reward_config_version: str
    """Version of the reward config that scored every item of this request."""
    results: list[ItemScore]
    backends: dict[str, str] = Field(default_factory=dict)
    """Backend name -> version of every backend of that reward config."""
