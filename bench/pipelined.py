"""Item 1 (slot): the pipelined runtime vs the sequential loop on the same steps.

The runtime option exists (``TrainConfig.runtime``: ``mode: pipelined | sequential``,
``max_staleness``, per-phase timers in ``metrics.jsonl``), but the side-by-side
comparison is not written yet: the suite reports this benchmark as not measured,
and :func:`measure` documents what it will produce.
"""
from __future__ import annotations

from bench.results import BenchResult, Target
from editrl.config import TrainConfig

NAME = "pipelined_vs_sequential"
ITEM = 1
TITLE = "Pipelined vs sequential step"
TARGET_SPEEDUP = 2.0
TARGET_OF_BOUND = 1.10


def runtime_available() -> bool:
    """Whether ``TrainConfig`` has the ``runtime`` option (``mode``, ``max_staleness``)."""
    return "runtime" in TrainConfig.model_fields


def measure(config: TrainConfig, steps: int, reward_latency_s: float, repeats: int, warmup: int) -> BenchResult:
    """The same training steps in ``runtime.mode: sequential`` and ``pipelined``.

    To be written with the runtime. Expected contents of the result:

    * measurements ``sequential`` and ``pipelined``, each with ``step_s`` (:class:`Stats`
      over repeats) and the per-stage seconds per step from ``metrics.jsonl``
      (sample, reward, train, sync), and ``stage_bound_s`` = max(stage) per step;
    * ratio ``sequential / pipelined`` (step time, paired per repeat) and
      ``pipelined / stage bound``;
    * targets ``pipelined_speedup`` (>= :data:`TARGET_SPEEDUP`) and
      ``pipelined_of_bound`` (<= :data:`TARGET_OF_BOUND`).

    Args:
        config: the run (``configs/default.yaml``; model built in code, see
            :mod:`bench.workload`); ``runtime.mode`` is set per variant.
        steps: training steps per repeat.
        reward_latency_s: extra seconds per reward backend call
            (``PixelSpec.latency_s``), about the sampling time of a group.
        repeats, warmup: timed and discarded repeats per variant, interleaved.

    Raises:
        NotImplementedError: until it is written.
    """
    raise NotImplementedError("the side-by-side pipelined-vs-sequential comparison is not written yet")


def not_measured(profile: str, reason: str) -> BenchResult:
    targets = [
        Target.check("pipelined_speedup", "pipelined at least 2x faster than sequential (step time ratio)", None, ">=", TARGET_SPEEDUP),
        Target.check("pipelined_of_bound", "pipelined step within 10% of max(stage) per step", None, "<=", TARGET_OF_BOUND),
    ]
    return BenchResult(name=NAME, item=ITEM, title=TITLE, profile=profile, status="not_measured", reason=reason, targets=targets)


def run(profile: str) -> BenchResult:
    if not runtime_available():
        return not_measured(profile, "not yet measured: editrl.config.TrainConfig has no `runtime` field "
                                     "(the pipelined runtime is not in this tree yet)")
    from bench.workload import default_train_config

    try:
        return measure(default_train_config(), steps=5, reward_latency_s=2.0, repeats=3, warmup=1)
    except NotImplementedError as exc:
        return not_measured(profile, f"not yet measured: {exc}")
