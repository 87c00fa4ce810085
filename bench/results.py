"""The machine-readable result of one benchmark (``bench/results/<name>.json``).

Every benchmark writes one :class:`BenchResult`. Timings are :class:`Stats`
over repeats (after warm-up repeats that are discarded); comparisons are
:class:`Ratio` objects computed per repeat from variants run side by side in the
same process on identical work and seeds; targets of the issue are
:class:`Target` objects with the measured value and whether it is met.

Units are part of every metric's name (``_s`` seconds, ``_ms`` milliseconds,
``_mib`` MiB, ``_per_s`` per second); the report prints them as they are.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1

Scalar = str | int | float | bool | None


class Stats(BaseModel):
    """Summary of repeated measurements (warm-up repeats excluded)."""

    model_config = ConfigDict(extra="forbid")

    n: int
    """Number of samples."""
    median: float
    q1: float
    """25th percentile (linear interpolation)."""
    q3: float
    """75th percentile."""
    iqr: float
    """q3 - q1."""
    mean: float
    std: float
    """Population standard deviation."""
    min: float
    max: float
    samples: list[float]
    """Every sample, in the order taken."""

    @classmethod
    def of(cls, samples: list[float] | np.ndarray) -> "Stats":
        """Summarise ``samples`` (at least one)."""
        values = np.asarray(list(samples), dtype=np.float64)
        if values.size == 0:
            raise ValueError("Stats.of needs at least one sample")
        q1, median, q3 = np.percentile(values, [25, 50, 75])
        return cls(
            n=int(values.size), median=float(median), q1=float(q1), q3=float(q3), iqr=float(q3 - q1),
            mean=float(values.mean()), std=float(values.std()), min=float(values.min()), max=float(values.max()),
            samples=[float(v) for v in values],
        )

    def scaled(self, factor: float) -> "Stats":
        """The same summary in another unit (every sample multiplied by ``factor``)."""
        return Stats.of([v * factor for v in self.samples])


Metric = Stats | float | int | str | None


class Measurement(BaseModel):
    """One variant or cell of a benchmark: its parameters and what was measured."""

    model_config = ConfigDict(extra="forbid")

    name: str
    group: str = ""
    """Rows of one group share a table in the report (e.g. ``measured`` and ``simulated``)."""
    params: dict[str, Scalar] = Field(default_factory=dict)
    """What distinguishes this row (e.g. concurrency, rank)."""
    metrics: dict[str, Metric] = Field(default_factory=dict)
    """Metric name (with its unit) -> value or :class:`Stats` over repeats."""


class Ratio(BaseModel):
    """``numerator / denominator`` of two variants, computed per repeat (paired)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    numerator: str
    denominator: str
    description: str = ""
    stats: Stats


class Target(BaseModel):
    """A target of the issue and the measured value it is judged on."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str
    value: float | None
    """The measured value (None when it could not be measured)."""
    threshold: float
    comparison: Literal["<=", ">="]
    unit: str = ""
    met: bool | None
    """None when not measured."""
    note: str = ""

    @classmethod
    def check(
        cls, name: str, description: str, value: float | None, comparison: Literal["<=", ">="], threshold: float,
        unit: str = "", note: str = "",
    ) -> "Target":
        """A target whose ``met`` is computed from ``value``."""
        met = None if value is None else (value <= threshold if comparison == "<=" else value >= threshold)
        return cls(name=name, description=description, value=value, threshold=threshold, comparison=comparison,
                   unit=unit, met=met, note=note)


Status = Literal["measured", "not_measured", "skipped", "failed"]


class BenchResult(BaseModel):
    """Everything one benchmark measured, with the machine it ran on."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    name: str
    """File stem under ``bench/results/``."""
    item: int
    """Number of the measurement in the benchmark issue (1-7)."""
    title: str
    profile: str
    """Settings profile: ``cpu`` (``make bench``), ``gpu`` or ``smoke`` (tests)."""
    status: Status
    reason: str | None = None
    """Why it was not measured, skipped or failed."""
    settings: dict[str, Any] = Field(default_factory=dict)
    """The workload (sizes, steps, seeds, repeats) as run."""
    measurements: list[Measurement] = Field(default_factory=list)
    ratios: list[Ratio] = Field(default_factory=list)
    targets: list[Target] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    """How to read the numbers; what is simulated; caveats."""
    environment: dict[str, Any] = Field(default_factory=dict)
    """Machine, versions, date, load (see :mod:`bench.environment`)."""
    duration_s: float = 0.0
    """Wall time of the whole benchmark, seconds."""
    peak_rss_mib: float | None = None
    """Peak resident set size of the benchmark's process (this process only), MiB."""
    gpu_peak_mib: float | None = None
    """Peak CUDA memory allocated by torch in the benchmark's process, MiB (None without a GPU)."""

    def measurement(self, name: str) -> Measurement:
        """The measurement called ``name``.

        Raises:
            KeyError: no such measurement.
        """
        for m in self.measurements:
            if m.name == name:
                return m
        raise KeyError(name)


def write_result(result: BenchResult, directory: str | Path) -> Path:
    """Write ``<directory>/<name>.json`` (pretty-printed, stable key order); return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{result.name}.json"
    path.write_text(json.dumps(result.model_dump(mode="json"), indent=1) + "\n")
    return path


def read_results(directory: str | Path) -> list[BenchResult]:
    """Every ``*.json`` result in ``directory``, ordered by issue item then name."""
    results = [BenchResult.model_validate_json(p.read_text()) for p in sorted(Path(directory).glob("*.json"))]
    return sorted(results, key=lambda r: (r.item, r.name))
