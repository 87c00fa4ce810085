"""The pipelined benchmark's result: every repeat's steady steps summarised, then each
shape's rows, ratios, targets and the notes that explain them (see :mod:`bench.pipelined`
for how the repeats are run)."""
from __future__ import annotations

import collections
import dataclasses
import os
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bench.harness import paired_ratio
from bench.results import BenchResult, Measurement, Ratio, Stats, Target
from editrl.cluster.config import TrainConfig

if TYPE_CHECKING:
    from bench.pipelined import Settings, Shape

NAME = "pipelined_vs_sequential"
ITEM = 1
TITLE = "Pipelined vs sequential step"
TARGET_SPEEDUP = 2.0
TARGET_OF_BOUND = 1.10
MODES = ("sequential", "pipelined")

STAGES = ("worker_busy_s", "reward_server_busy_s", "train_s", "sync_s")
"""The stages whose busy time per step bounds the step from below."""


def repeat_summary(records: list[dict], marks: list[dict[str, float]], step_ends: list[float], start: float,
                   fill_steps: int) -> dict[str, float | str]:
    """Seconds per steady step of one repeat: the step, every stage's busy time, the split of
    the workers' time, the bound max(stage) and which stage it is."""
    steady = records[fill_steps:]
    n = len(steady)
    ends = [start, *step_ends]
    workers = statistics.mean(r["rollout_workers"] for r in steady)
    first, last = marks
    calls = last["server_calls"] - first["server_calls"]
    out: dict[str, float | str] = {
        "step_s": (ends[-1] - ends[fill_steps]) / n,
        "first_step_s": ends[fill_steps] - start if fill_steps else float("nan"),
        "worker_busy_s": (last["worker_busy_s"] - first["worker_busy_s"]) / workers / n,
        "reward_server_busy_s": (last["server_busy_s"] - first["server_busy_s"]) / n,
        "reward_calls_s": (last["server_call_s"] - first["server_call_s"]) / n,
        "train_s": statistics.mean(r["time_train_s"] for r in steady),
        "sync_s": statistics.mean(r["time_sync_s"] for r in steady),
        "sample_s": statistics.mean(r.get("time_worker_encode_s", 0.0) + r.get("time_worker_sample_s", 0.0) for r in steady) / workers,
        "decode_s": statistics.mean(r.get("time_worker_decode_s", 0.0) for r in steady) / workers,
        "reward_wait_s": statistics.mean(r.get("time_worker_reward_s", 0.0) for r in steady) / workers,
        "reward_calls": calls / n,
        "items_per_call": (last["server_items"] - first["server_items"]) / calls if calls else float("nan"),
        "staleness_mean": statistics.mean(r["staleness_mean"] for r in steady),
        "groups_dropped_stale": float(sum(r["groups_dropped_stale"] for r in steady)),
    }
    busiest = max(STAGES, key=lambda k: out[k])
    out["bound_s"] = out[busiest]
    out["compute_bound_s"] = max(out[k] for k in STAGES if k != "reward_server_busy_s")
    out["calls_in_flight"] = out["reward_calls_s"] / out["reward_server_busy_s"] if out["reward_server_busy_s"] else float("nan")
    out["bottleneck"] = busiest.removesuffix("_busy_s").removesuffix("_s")
    return out


@dataclass
class ShapeRun:
    """Both schedules measured in one :class:`Shape`."""

    shape: "Shape"
    config: TrainConfig
    latency_s: float
    """Seconds the reward backend slept per call."""
    concurrent: int
    """Backend calls the reward server ran at once."""
    group_s: float
    """Median worker seconds of one group (calibration)."""
    summaries: dict[str, list[dict]]
    """Mode -> one :func:`repeat_summary` per timed repeat."""
    walls: dict[str, list[float]]
    """Mode -> wall seconds of each repeat."""
    actor_rss: dict[str, float]
    """Process -> peak RSS in MiB."""

    def name(self, text: str) -> str:
        return f"{text} [{self.shape.label}]"


def _stats(summaries: list[dict], key: str) -> Stats:
    return Stats.of([s[key] for s in summaries])


def build_result(settings: "Settings", runs: list[ShapeRun]) -> BenchResult:
    measurements, ratios, targets, notes = [], [], [], []
    for run in runs:
        m, r, t = _shape_rows(settings, run)
        measurements += m
        ratios += r
        targets += t
        notes += [f"{run.shape.label} ({run.shape.about}): {note}" for note in _explain(run.summaries, settings, run.config)]
        notes.append(f"{run.shape.label}: reward latency: the pixel backend sleeps {run.latency_s:.2f} s per call, the "
                     f"measured median time of one group on a worker ({run.group_s:.2f} s for encode + sample + decode, "
                     f"reward server answering at once, after a warm-up round); the server runs up to {run.concurrent} "
                     "backend calls at once.")
    return BenchResult(
        name=NAME, item=ITEM, title=TITLE, profile=settings.profile, status="measured",
        settings={**dataclasses.asdict(settings), "cpus": os.cpu_count(),
                  "per_shape": {run.shape.label: _shape_settings(run) for run in runs}},
        measurements=measurements, ratios=ratios, targets=targets,
        notes=notes + [
            "Shapes: every shape runs both schedules in a Ray instance and with a reward server of its own. The 2x "
            "target assumes that sampling, scoring and training each have their own device; on this machine that "
            "holds for the 1-worker shape (the worker and the learner each get a core), not for the default run's "
            "2-worker shape, where three compute processes share 2 cores, so overlapping them mostly shares the "
            "cores (its CPU budget note gives the bound).",
            "Both schedules run in one Ray instance on the same learner and rollout actors, alternating per round; every "
            "repeat starts from the same learner checkpoint with the same tasks and seeds.",
            "Reward latency: set to the measured time of one group on a worker, a judge as slow as sampling. The server "
            "runs up to max_concurrent_batches = rollout workers x rollout.reward_concurrency backend calls at once (as "
            "for a remote judge) and batches the items queued while all are busy (up to 16 = 4 groups per call); both "
            "schedules use the same server.",
            "Stages per steady step: worker_busy = encode + sample + decode of the groups the workers handed in, per "
            "worker; reward_server_busy = wall seconds with at least one backend call in flight (server /metrics "
            "reward_backend_busy_seconds_total; overlapping calls count once); train = the learner's update; sync = "
            "publishing the adapter. bound_s = the largest of the four; bottleneck names it; compute_bound_s = the "
            "largest of the other three. reward_calls_s = the summed durations of the backend calls, calls_in_flight "
            "= reward_calls_s / reward_server_busy_s (mean calls in flight while busy). A judge whose calls wait side "
            "by side is occupied, not saturated: with groups arriving all the time its busy wall time approaches the "
            "step itself, so a bound set by it says the server always had a group to score, not that it limited "
            "throughput. sample_s, decode_s and reward_wait_s split the trained groups' worker time per worker "
            "(reward_wait_s is latency seen by the workers, queueing included).",
            "step_s = wall time between finished updates, bookkeeping included, over the steps after the first of "
            "each repeat; first_step_s = the first step (the pipelined schedule starts empty; it also absorbs what is "
            "slow the first time, so no round is discarded); repeat_s = the whole repeat.",
        ],
    )


def _shape_settings(run: ShapeRun) -> dict:
    config = run.config
    return {"about": run.shape.about, "overrides": [list(o) for o in run.shape.overrides],
            "reward_latency_s": run.latency_s, "reward_concurrent_batches": run.concurrent,
            "group_worker_s": round(run.group_s, 4), "prompts_per_step": config.prompts_per_step,
            "group_size": config.group_size, "num_steps": config.policy.num_steps,
            "rollout_workers": config.topology.rollout.workers, "max_staleness": config.runtime.max_staleness,
            "prefetch_per_worker": config.runtime.prefetch_per_worker,
            "reward_concurrency": config.rollout.reward_concurrency}


def _shape_rows(settings: "Settings", run: ShapeRun) -> tuple[list[Measurement], list[Ratio], list[Target]]:
    """One shape's rows (names carry the shape's label), ratios and targets."""
    summaries, label = run.summaries, run.shape.label
    measurements = []
    for mode in MODES:
        rows = summaries[mode]
        bottlenecks = collections.Counter(s["bottleneck"] for s in rows)
        measurements.append(Measurement(
            name=mode, group=f"per steady step, {label}", params={"steps": settings.steps},
            metrics={"step_s": _stats(rows, "step_s"), "bound_s": _stats(rows, "bound_s"),
                     "compute_bound_s": _stats(rows, "compute_bound_s"),
                     "bottleneck": ", ".join(f"{k} x{v}" for k, v in bottlenecks.most_common()),
                     "first_step_s": _stats(rows, "first_step_s") if settings.fill_steps else None,
                     "repeat_s": Stats.of(run.walls[mode]), "staleness_mean": statistics.mean(s["staleness_mean"] for s in rows),
                     "groups_dropped_stale": float(sum(s["groups_dropped_stale"] for s in rows))}))
    for mode in MODES:
        rows = summaries[mode]
        measurements.append(Measurement(
            name=mode, group=f"stages per steady step, {label} (busy seconds; the bound is the largest of the first four)",
            metrics={**{key: _stats(rows, key) for key in STAGES},
                     **{key: _stats(rows, key) for key in ("sample_s", "decode_s", "reward_wait_s", "reward_calls_s")},
                     "calls_in_flight": statistics.mean(s["calls_in_flight"] for s in rows),
                     "reward_calls": statistics.mean(s["reward_calls"] for s in rows),
                     "items_per_call": statistics.mean(s["items_per_call"] for s in rows)}))
    measurements.append(Measurement(name=label, group="peak RSS of the runtime's processes (whole benchmark, both schedules)",
                                    metrics={f"{name.replace(' ', '_')}_rss_mib": value for name, value in run.actor_rss.items()}))
    step_times = {mode: [s["step_s"] for s in summaries[mode]] for mode in MODES}
    seq, pipe = summaries["sequential"], summaries["pipelined"]
    ratios = [
        paired_ratio(run.name("sequential / pipelined"), "sequential", "pipelined", step_times,
                     "step time of the sequential loop over the pipelined runtime (same steps, paired per round)"),
        Ratio(name=run.name("pipelined / max(stage)"), numerator="pipelined", denominator="pipelined max(stage)",
              description="pipelined step over its busiest stage's time per step (1 = no bubble)",
              stats=Stats.of([s["step_s"] / s["bound_s"] for s in pipe])),
        Ratio(name=run.name("pipelined / sequential's max(stage)"), numerator="pipelined", denominator="sequential max(stage)",
              description="pipelined step over the busiest stage of the sequential repeat of the same round",
              stats=Stats.of([p["step_s"] / s["bound_s"] for p, s in zip(pipe, seq)])),
        Ratio(name=run.name("sequential / max(stage)"), numerator="sequential", denominator="sequential max(stage)",
              description="the sequential loop over its own busiest stage (stages do not overlap)",
              stats=Stats.of([s["step_s"] / s["bound_s"] for s in seq])),
    ]
    speedup, of_bound = ratios[0].stats, ratios[1].stats
    targets = [
        Target.check(f"pipelined_speedup[{label}]", "pipelined at least 2x faster than sequential (step time ratio)",
                     speedup.median, ">=", TARGET_SPEEDUP,
                     note=f"{run.shape.about}; IQR {speedup.q1:.2f}-{speedup.q3:.2f} over {speedup.n} paired rounds"),
        Target.check(f"pipelined_of_bound[{label}]", "pipelined step within 10% of max(stage) per step", of_bound.median, "<=",
                     TARGET_OF_BOUND, note=f"IQR {of_bound.q1:.2f}-{of_bound.q3:.2f}; max(stage) measured in the same repeats"),
    ]
    return measurements, ratios, targets


def _explain(summaries: dict[str, list[dict]], settings: "Settings", config: TrainConfig) -> list[str]:
    """What the measured stages say about each schedule's step (medians over the repeats)."""
    def med(mode: str, key: str) -> float:
        return statistics.median(s[key] for s in summaries[mode])

    g = config.group_size
    concurrent_note = (f" (wall time with a call in flight; the calls summed {med('pipelined', 'reward_calls_s'):.2f} s, "
                       f"{statistics.median(s['calls_in_flight'] for s in summaries['pipelined']):.1f} in flight on average)")
    seq_sum = sum(med("sequential", k) for k in ("worker_busy_s", "reward_wait_s", "train_s", "sync_s"))
    bottlenecks = collections.Counter(s["bottleneck"] for s in summaries["pipelined"])
    steps = len(summaries["pipelined"]) * (settings.steps - settings.fill_steps)
    dropped = sum(s["groups_dropped_stale"] for s in summaries["pipelined"])
    workers = config.topology.rollout.workers
    cores = os.cpu_count() or 1
    # Core-seconds of one sequential step (nothing overlaps there): every worker's compute on
    # its one torch thread, plus the update (at least one core while it runs).
    seq_core_s = workers * med("sequential", "worker_busy_s") + med("sequential", "train_s") + med("sequential", "sync_s")
    seq_step_compute = med("sequential", "sample_s") + med("sequential", "decode_s")
    pipe_step_compute = med("pipelined", "sample_s") + med("pipelined", "decode_s")
    # No schedule beats the larger of the step's core-seconds spread over every core and the
    # busiest single-threaded stage (one worker's compute, the update).
    floor_s = max(seq_core_s / cores, med("sequential", "worker_busy_s"), med("sequential", "train_s"))
    floor_why = (f"the core-seconds over {cores} cores" if floor_s == seq_core_s / cores
                 else "one worker's compute on its one thread" if floor_s == med("sequential", "worker_busy_s")
                 else "the update")
    cpu_note = (
        f"CPU budget: a sequential step needs {seq_core_s:.2f} core-seconds ({workers} worker{'s' if workers != 1 else ''} x "
        f"{med('sequential', 'worker_busy_s'):.2f} s + {med('sequential', 'train_s'):.2f} s of update + sync); on "
        f"{cores} cores no schedule can take less than {floor_s:.2f} s per step ({floor_why}), i.e. at most "
        f"{med('sequential', 'step_s') / floor_s:.2f}x the sequential {med('sequential', 'step_s'):.2f} s, "
        "and only if overlapping costs nothing. What it cost here: in the pipelined schedule the workers' compute "
        f"for a step's trained groups (sample + decode, per worker) is {pipe_step_compute:.2f} s against {seq_step_compute:.2f} s "
        "sequential (the learner, the reward server and the driver run on the same cores at the same time), and "
        f"groups dropped as stale ({dropped:.0f} in {steps} steady steps of {config.prompts_per_step} groups) were "
        "sampled for nothing; in all the workers compute "
        f"{med('pipelined', 'worker_busy_s'):.2f} s per step instead of {med('sequential', 'worker_busy_s'):.2f} s "
        f"(pipelined step: {med('pipelined', 'step_s'):.2f} s)."
    )
    return [
        f"Why the sequential step is long: its stages follow each other. Per step the workers compute "
        f"{med('sequential', 'worker_busy_s'):.2f} s and then wait {med('sequential', 'reward_wait_s'):.2f} s for "
        f"scores, then the learner trains {med('sequential', 'train_s'):.2f} s and publishes "
        f"{med('sequential', 'sync_s'):.2f} s: {seq_sum:.2f} s in all against a {med('sequential', 'step_s'):.2f} s step. "
        f"Reward calls carry {med('sequential', 'items_per_call'):.1f} items ({med('sequential', 'items_per_call') / g:.1f} "
        f"groups of {g}: a worker waits for its group's scores before sampling the next), so the server is busy "
        f"{med('sequential', 'reward_server_busy_s'):.2f} s per step.",
        "Pipelined: the busiest stage is " + ", ".join(f"{k} in {v} of {len(summaries['pipelined'])} repeats" for k, v in bottlenecks.most_common())
        + f"; groups reach the server while others are being scored, so calls carry "
        f"{med('pipelined', 'items_per_call'):.1f} items and the server is busy {med('pipelined', 'reward_server_busy_s'):.2f} s "
        f"per step{concurrent_note}; the step is {med('pipelined', 'step_s'):.2f} s against a compute bound (workers, "
        f"learner, sync) of {med('pipelined', 'compute_bound_s'):.2f} s; the workers compute {med('pipelined', 'worker_busy_s'):.2f} s per step (sequential: "
        f"{med('sequential', 'worker_busy_s'):.2f} s; the learner, the reward server and the driver share the cores with "
        f"them); {dropped:.0f} groups were dropped as stale in {steps} steady steps (max_staleness "
        f"{config.runtime.max_staleness}, prefetch_per_worker {config.runtime.prefetch_per_worker}).",
        cpu_note,
    ]


def not_measured(profile: str, reason: str) -> BenchResult:
    targets = [
        Target.check("pipelined_speedup", "pipelined at least 2x faster than sequential (step time ratio)", None, ">=", TARGET_SPEEDUP),
        Target.check("pipelined_of_bound", "pipelined step within 10% of max(stage) per step", None, "<=", TARGET_OF_BOUND),
    ]
    return BenchResult(name=NAME, item=ITEM, title=TITLE, profile=profile, status="not_measured", reason=reason, targets=targets)
