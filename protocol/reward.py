"""Schemas of the reward server's HTTP API (``POST /v1/score``).

Videos travel as base64 mp4 inside JSON, reference images as base64 PNG or
JPEG; nothing is pickled on the wire. Scores are on a 0-10 scale per dimension;
the scalar ``reward`` is the reward config's aggregate of the dimensions, also
0-10.
"""
from __future__ import annotations

import base64
import binascii
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


def _check_base64(value: str) -> str:
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not valid base64: {exc}") from exc
    return value


class VideoPayload(BaseModel):
    """One video inside a request."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["mp4"] = "mp4"
    """Container of ``data``; only mp4 (H.264) is accepted."""
    data: str = Field(min_length=1)
    """Standard base64 of the video file's bytes."""

    @field_validator("data")
    @classmethod
    def _is_base64(cls, value: str) -> str:
        return _check_base64(value)

    @classmethod
    def from_bytes(cls, data: bytes) -> "VideoPayload":
        return cls(data=base64.b64encode(data).decode("ascii"))

    def to_bytes(self) -> bytes:
        return base64.b64decode(self.data)


class ImagePayload(BaseModel):
    """One still image inside a request (a reference image for the edit)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["png", "jpeg"] = "png"
    """Encoding of ``data``."""
    data: str = Field(min_length=1)
    """Standard base64 of the image file's bytes."""

    @field_validator("data")
    @classmethod
    def _is_base64(cls, value: str) -> str:
        return _check_base64(value)

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

    item_id: str = Field(min_length=1, max_length=256)
    """Caller's id, echoed back (e.g. ``<group_id>/<sample index>``)."""
    instruction: str = Field(min_length=1, max_length=2000)
    """The editing instruction the edited video should follow."""
    source: VideoPayload
    """The unedited source video."""
    edited: VideoPayload
    """The policy's edited video; same frame count as the source."""
    reference: ImagePayload | None = None
    """Optional reference image (e.g. the object to insert or the target style);
    judges that use it add a ``reference_similarity`` dimension."""
    category: EditCategory | None = None
    """Optional edit category for category rubrics; inferred from the instruction when omitted."""


class ScoreRequest(BaseModel):
    """Body of ``POST /v1/score``."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=256)
    """Caller's id for this request; echoed back and used in logs."""
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
