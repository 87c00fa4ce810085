"""The versioned reward config: which backends, which dimensions, how they become one reward.

Dimension names: in a config with one backend they are the backend's own names
(``preservation``); with several backends every name is qualified by the
backend's key in ``backends`` (``judge.edit_quality``, ``pixel.preservation``),
and the same rule names the backends in responses and metrics (the backend's
``name`` alone, or its key). Weights use those names.

Aggregations, both on 0-10 dimensions and giving a 0-10 reward:

* ``weighted_mean``: sum_i w_i s_i / sum_i w_i over the weighted dimensions that
  are not None (the weights are renormalised over the applicable ones);
* ``geometric_mean``: sqrt(S * P) with S the semantic and P the perceptual
  sub-score (RVE-Bench's overall score; VIEScore, Ku et al. 2024, section 3,
  defines O = sqrt(SC * PQ) with SC and PQ the minimum over their sub-scores,
  which ``subscore: min`` reproduces). Each sub-score is the weighted mean
  (renormalised) or the minimum of its applicable dimensions.

An item whose dimensions cannot give a reward (non-finite, missing, or all
inapplicable) fails explicitly with :class:`AggregationError`, never as a zero.
"""
from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from editrl.reward_server.backends.specs import BackendSpec, PixelSpec

DEFAULT_WEIGHTS: dict[str, float] = {
    "instruction_following": 0.6,
    "preservation": 0.25,
    "temporal_consistency": 0.15,
}
_KEY_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"


class AggregationError(ValueError):
    """An item's dimensions cannot be turned into a reward (never replaced by a zero)."""


class DimensionError(ValueError):
    """A reward config names a dimension its backends do not produce.

    Attributes:
        loc: where in the config, e.g. ``("weights", "aesthetics")``.
    """

    def __init__(self, loc: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


def _check_weight_map(name: str, weights: dict[str, float]) -> dict[str, float]:
    for key, weight in weights.items():
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"{name}: weight of {key!r} must be finite and >= 0, got {weight}")
    if weights and not any(weight > 0 for weight in weights.values()):
        raise ValueError(f"{name}: at least one weight must be > 0")
    return weights


class RewardConfig(BaseModel):
    """How backend dimensions become the scalar reward; versioned and echoed in every response."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    version: str = Field(default="pixel-default-1", min_length=1, max_length=128)
    """Version of this reward definition; echoed in every response as ``reward_config_version``."""
    backends: dict[str, BackendSpec] = Field(default_factory=lambda: {"pixel": PixelSpec()}, min_length=1, max_length=8)
    """Backend key -> spec. Keys are lowercase identifiers (they qualify dimension names when
    there are several backends). The shorthand ``backend: <type>`` means ``{<type>: {type: <type>}}``."""
    weights: dict[str, float] = Field(default_factory=dict)
    """``weighted_mean``: dimension name -> non-negative weight (at least one positive).
    Defaults to 0.6 / 0.25 / 0.15 on the pixel dimensions when the only backend is ``pixel``."""
    aggregation: Literal["weighted_mean", "geometric_mean"] = "weighted_mean"
    """``weighted_mean`` of ``weights``, or ``geometric_mean`` sqrt(S * P) of the ``semantic``
    and ``perceptual`` sub-scores."""
    semantic: dict[str, float] = Field(default_factory=dict)
    """``geometric_mean``: dimensions (with weights) of the semantic sub-score S."""
    perceptual: dict[str, float] = Field(default_factory=dict)
    """``geometric_mean``: dimensions (with weights) of the perceptual sub-score P."""
    subscore: Literal["weighted_mean", "min"] = "weighted_mean"
    """``geometric_mean``: each sub-score is the weighted mean of its applicable dimensions or their minimum."""
    allow_partial: bool = False
    """False: an item fails when any backend fails on it. True: a failed backend's dimensions
    are dropped (None) and the reward uses the others (as averaging two judges where one
    failed); the item fails only when nothing usable remains."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand_and_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "backend" in data:
            backend = data.pop("backend")
            if "backends" in data:
                raise ValueError("give either 'backend' (shorthand) or 'backends', not both")
            if not isinstance(backend, str):
                raise ValueError(f"'backend' must be a backend type name, got {type(backend).__name__}")
            data["backends"] = {backend: {"type": backend}}
        aggregation = data.get("aggregation", "weighted_mean")
        backends = data.get("backends")
        only_pixel = backends is None or (
            isinstance(backends, dict) and len(backends) == 1
            and all((spec.get("type") if isinstance(spec, dict) else getattr(spec, "type", None)) == "pixel"
                    for spec in backends.values())
        )
        if aggregation == "weighted_mean" and "weights" not in data and only_pixel:
            data["weights"] = dict(DEFAULT_WEIGHTS)
        return data

    @field_validator("backends")
    @classmethod
    def _check_keys(cls, backends: dict[str, Any]) -> dict[str, Any]:
        for key in backends:
            if not re.match(_KEY_PATTERN, key):
                raise ValueError(f"backend key {key!r} must match {_KEY_PATTERN} (lowercase, digits, underscores)")
        return backends

    @model_validator(mode="after")
    def _check_aggregation(self) -> "RewardConfig":
        _check_weight_map("weights", self.weights)
        _check_weight_map("semantic", self.semantic)
        _check_weight_map("perceptual", self.perceptual)
        if self.aggregation == "weighted_mean":
            if not self.weights:
                raise ValueError("weighted_mean needs 'weights' naming at least one dimension")
            if self.semantic or self.perceptual:
                raise ValueError("'semantic' and 'perceptual' are only used by geometric_mean")
        else:
            if not self.semantic or not self.perceptual:
                raise ValueError("geometric_mean needs both 'semantic' and 'perceptual' dimensions")
            if self.weights:
                raise ValueError("'weights' is only used by weighted_mean; use 'semantic' and 'perceptual'")
        return self

    # ------------------------------------------------------------------ names
    @property
    def qualified(self) -> bool:
        """Whether dimension and backend names are qualified by backend keys (several backends)."""
        return len(self.backends) > 1

    def dimension_name(self, backend_key: str, dimension: str) -> str:
        """The name of ``dimension`` of backend ``backend_key`` in weights, responses and logs."""
        return f"{backend_key}.{dimension}" if self.qualified else dimension

    def weight_maps(self) -> dict[str, dict[str, float]]:
        """The aggregation's weight maps by field name (``weights``, or ``semantic`` and ``perceptual``)."""
        if self.aggregation == "weighted_mean":
            return {"weights": self.weights}
        return {"semantic": self.semantic, "perceptual": self.perceptual}

    def check_dimensions(self, produced: dict[str, tuple[str, ...]]) -> None:
        """Check that every weighted name is a dimension some backend produces.

        Args:
            produced: backend key -> the backend's dimension names (unqualified).

        Raises:
            DimensionError: a weighted name is unknown; ``loc`` is e.g.
                ``("weights", "aesthetics")`` and the message lists the known names.
        """
        known = {self.dimension_name(key, dim) for key, dims in produced.items() for dim in dims}
        for field, weights in self.weight_maps().items():
            for name in weights:
                if name not in known:
                    raise DimensionError(
                        (field, name),
                        f"{field} names dimension {name!r} that the backends do not produce "
                        f"(they produce {sorted(known)})",
                    )

    # ------------------------------------------------------------------ aggregation
    def aggregate(self, dimensions: dict[str, float | None]) -> float:
        """The 0-10 reward of one item from its 0-10 ``dimensions`` (None = not applicable).

        Raises:
            AggregationError: a dimension is NaN or infinite (named in the message),
                a weighted dimension is missing from ``dimensions``, or every
                dimension of the weighted mean (or of a sub-score) is None.
        """
        for name, value in dimensions.items():
            if value is not None and not math.isfinite(value):
                raise AggregationError(f"dimension {name!r} is not finite ({value})")
        if self.aggregation == "weighted_mean":
            return _weighted_mean(self.weights, dimensions, "all weighted dimensions")
        reduce = _weighted_mean if self.subscore == "weighted_mean" else _minimum
        semantic = reduce(self.semantic, dimensions, "all semantic dimensions")
        perceptual = reduce(self.perceptual, dimensions, "all perceptual dimensions")
        return math.sqrt(max(semantic, 0.0) * max(perceptual, 0.0))


def _applicable(weights: dict[str, float], dimensions: dict[str, float | None], what: str) -> list[tuple[float, float]]:
    pairs = []
    for name, weight in weights.items():
        if weight == 0:
            continue
        if name not in dimensions:
            raise AggregationError(f"dimension {name!r} is missing from the backends' output")
        value = dimensions[name]
        if value is not None:
            pairs.append((weight, value))
    if not pairs:
        used = sorted(name for name, weight in weights.items() if weight > 0)
        raise AggregationError(f"{what} {used} are None (not applicable) for this item")
    return pairs


def _weighted_mean(weights: dict[str, float], dimensions: dict[str, float | None], what: str) -> float:
    pairs = _applicable(weights, dimensions, what)
    return sum(w * v for w, v in pairs) / sum(w for w, _ in pairs)


def _minimum(weights: dict[str, float], dimensions: dict[str, float | None], what: str) -> float:
    return min(v for _, v in _applicable(weights, dimensions, what))
