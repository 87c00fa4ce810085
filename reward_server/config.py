"""Typed configuration of the reward server and of the reward it computes.

``RewardConfig`` says how backend dimensions become one scalar reward and is
versioned: every response names the version that produced it. ``ServerConfig``
adds the HTTP and batching knobs. Both load from YAML (``configs/reward_server.yaml``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_WEIGHTS: dict[str, float] = {
    "instruction_following": 0.6,
    "preservation": 0.25,
    "temporal_consistency": 0.15,
}


class AggregationError(ValueError):
    """An item's dimensions cannot be turned into a reward (never replaced by a zero)."""


class RewardConfig(BaseModel):
    """How the backend's per-dimension scores become the scalar reward."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    version: str = Field(default="pixel-default-1", min_length=1, max_length=128)
    """Version of this reward definition; echoed in every response as ``reward_config_version``."""
    backend: Literal["pixel"] = "pixel"
    """Name of the backend that produces the dimensions."""
    weights: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    """Dimension name -> non-negative weight in the aggregate; at least one weight must be positive."""
    aggregation: Literal["weighted_mean"] = "weighted_mean"
    """``weighted_mean``: weighted mean over the weighted dimensions that are not None, with
    the weights renormalised over those; an item whose weighted dimensions are all None fails."""

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, weights: dict[str, float]) -> dict[str, float]:
        if not weights:
            raise ValueError("weights must name at least one dimension")
        for name, weight in weights.items():
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"weight of {name!r} must be finite and >= 0, got {weight}")
        if not any(weight > 0 for weight in weights.values()):
            raise ValueError("at least one weight must be > 0")
        return weights

    def aggregate(self, dimensions: dict[str, float | None]) -> float:
        """Weighted mean of the applicable weighted dimensions, 0-10.

        Raises:
            AggregationError: a dimension is NaN or infinite (named in the message),
                a weighted dimension is missing from ``dimensions``, or every
                weighted dimension is None for this item.
        """
        for name, value in dimensions.items():
            if value is not None and not math.isfinite(value):
                raise AggregationError(f"dimension {name!r} is not finite ({value})")
        total = 0.0
        weight_sum = 0.0
        for name, weight in self.weights.items():
            if weight == 0:
                continue
            if name not in dimensions:
                raise AggregationError(f"dimension {name!r} is missing from the backend's output")
            value = dimensions[name]
            if value is None:
                continue
            total += weight * value
            weight_sum += weight
        if weight_sum == 0:
            used = sorted(name for name, weight in self.weights.items() if weight > 0)
            raise AggregationError(f"all weighted dimensions {used} are None (not applicable) for this item")
        return total / weight_sum


class ServerConfig(BaseModel):
    """Reward server process: where it listens, how it batches, what it computes."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    host: str = "127.0.0.1"
    """Interface to listen on."""
    port: int = Field(default=8000, ge=1, le=65535)
    """TCP port to listen on."""
    max_batch_size: int = Field(default=16, ge=1)
    """Most items the backend scores in one call; items of concurrent requests share batches."""
    max_wait_s: float = Field(default=0.01, ge=0.0)
    """Seconds the batcher waits for a batch to fill after its first item arrives."""
    max_request_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    """Largest accepted request body in bytes; larger bodies get HTTP 413."""
    reward: RewardConfig = Field(default_factory=RewardConfig)
    """The reward definition served."""


def load_server_config(path: str | Path) -> ServerConfig:
    """Read a :class:`ServerConfig` from a YAML file (an empty file gives the defaults).

    Raises:
        ValueError: the file is not a YAML mapping or does not validate; the
            message names the file and the offending fields.
    """
    path = Path(path)
    with path.open("r", encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return ServerConfig.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(f"{path}: invalid reward server config:\n{exc}") from exc
