"""Item 1: the pipelined runtime vs the sequential loop on the same training steps.

Both schedules run through the real runtime (:class:`editrl.train.Run`: the
learner actor, two rollout actors, the controller, the reward server process) in
one Ray instance, on the same actors, alternating from repeat to repeat
(:func:`bench.harness.interleaved`). Before every repeat the learner is restored
from one checkpoint taken after setup (adapter, optimizer, RNG, policy version),
the adapter is loaded on the workers, and the task source starts again from the
seed, so both schedules train on the same prompts with the same group seeds from
the same state.

The reward server's pixel backend sleeps ``latency_s`` per backend call
(``PixelSpec.latency_s``), set to the measured time a worker needs for one
group (encode + sample + decode): a judge that is as slow as sampling. Like a
deployment with a slow remote judge, the server keeps several backend calls in
flight (``PixelSpec.max_concurrent_batches``, by default the scoring requests
all workers may have in flight), so calls wait side by side instead of in a queue.

Stages and the bound. Over the steady steps of a repeat (after the first
``fill_steps``, which include filling the pipeline) every stage's busy time per
step is measured: the rollout workers' (encode + denoise + decode of every group
they handed in, per worker, from the pool's accounting), the reward server's
(wall seconds with at least one backend call in flight,
``reward_backend_busy_seconds_total`` of its ``/metrics``; overlapping calls count
once), the learner's update and the adapter publication. A step cannot be
shorter than the busiest stage's time, so ``max(stage)`` is a lower bound of the
step; a pipelined step close to it has no bubbles. The summed durations of the
backend calls are reported too (``reward_calls_s``); over the busy time they give
the mean number of calls in flight. The per-step metrics of the run also give the split of the workers'
time (sampling, decoding) and their wait for scores (``reward_wait``, which is
latency seen by the workers, queueing included, not a stage's occupancy). The
step time is the wall time between two finished updates, bookkeeping included.

Shapes. The whole comparison runs once per :class:`Shape`, each in a Ray instance
and with a reward server of its own: the default run's two rollout workers (three
compute processes on this machine's two cores) and one rollout worker (the worker
and the learner each have a core, as where every stage has a device of its own,
which the 2x target assumes).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import ray
import torch
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from bench.cluster import default_server_config, ray_session, reward_server
from bench.harness import interleaved, paired_ratio
from bench.results import BenchResult, Measurement, Ratio, Stats, Target
from bench.workload import SMOKE_MODEL, corpus, default_train_config
from editrl.config import TrainConfig
from editrl.data.dataset import PromptDataset
from editrl.run_log import MetricsLog, RolloutLog
from editrl.tasks import TaskSource
from editrl.train import Run, resolve
from policy.config import LoraSettings
from protocol.rollout import Group

logger = logging.getLogger(__name__)

NAME = "pipelined_vs_sequential"
ITEM = 1
TITLE = "Pipelined vs sequential step"
TARGET_SPEEDUP = 2.0
TARGET_OF_BOUND = 1.10
MODES = ("sequential", "pipelined")
ADMIN_TOKEN = "bench-pipelined-admin-token"
ADMIN_ENV = "EDITRL_REWARD_ADMIN_TOKEN"
REWARD_WEIGHTS = {"instruction_following": 0.6, "preservation": 0.25, "temporal_consistency": 0.15}


@dataclass(frozen=True)
class Shape:
    """How many processes share the machine: both schedules run in each shape, in a Ray
    instance and with a reward server of its own."""

    label: str
    """Short name, appended to row, ratio and target names (``[2 workers]``)."""
    overrides: tuple[tuple[str, object], ...] = ()
    """Dotted-key overrides on top of :attr:`Settings.overrides`."""
    about: str = ""
    """What the shape stands for, for the page."""


DEFAULT_SHAPE = Shape("2 workers", about="the default run's shape: two rollout workers and the learner, three compute "
                                          "processes on the machine's cores")


@dataclass(frozen=True)
class Settings:
    profile: str
    steps: int = 4
    """Training steps per repeat and schedule."""
    fill_steps: int = 1
    """First steps of each repeat left out of the step time (pipeline fill)."""
    repeats: int = 3
    warmup: int = 0
    """Discarded rounds (each schedule once). None by default: the calibration rounds warm the
    workers up and every repeat's first step, the learner's included, is left out anyway."""
    calibration_groups: int = 4
    """Groups sampled (spread over the workers) to measure the time of one group, which sets the
    reward latency; sampled twice, the first round being a discarded warm-up."""
    reward_latency_s: float | None = None
    """Seconds per reward backend call; None: the measured time of one group."""
    reward_concurrent_batches: int | None = None
    """Backend calls the reward server runs at once (``PixelSpec.max_concurrent_batches``);
    None: rollout workers x their scoring requests in flight (``rollout.reward_concurrency``)."""
    overrides: tuple[tuple[str, object], ...] = ()
    """Dotted-key overrides of ``configs/default.yaml`` (both schedules, every shape)."""
    shapes: tuple[Shape, ...] = (DEFAULT_SHAPE,)
    """Process layouts measured one after the other."""


_COMMON = (("prompts_per_step", 4), ("runtime.checkpoint_every", 0), ("eval.every_steps", 0))
ONE_WORKER = Shape("1 worker", (("rollout.num_workers", 1),),
                   about="one rollout worker and the learner: one core per compute stage, as where every stage has a "
                         "device of its own (the reward server, the driver and Ray's own processes still share them)")

SETTINGS = {
    "cpu": Settings("cpu", overrides=_COMMON, shapes=(DEFAULT_SHAPE, ONE_WORKER)),
    "smoke": Settings("smoke", steps=2, repeats=1, warmup=0, calibration_groups=2, reward_latency_s=0.05, overrides=_COMMON + (
        ("prompts_per_step", 2), ("group_size", 2), ("policy.num_steps", 2), ("policy.height", 32), ("policy.width", 32),
        ("policy.tiny", SMOKE_MODEL.model_dump()), ("policy.lora", LoraSettings(rank=4, alpha=8).model_dump()),
        ("policy.sde_window", None)), shapes=(DEFAULT_SHAPE, ONE_WORKER)),
}


def runtime_available() -> bool:
    """Whether ``TrainConfig`` has the ``runtime`` option (``mode``, ``max_staleness``)."""
    return "runtime" in TrainConfig.model_fields


class _CapturingLog(MetricsLog):
    """The run's metrics log, also keeping every training step's metrics in memory."""

    def __init__(self, run_dir: Path):
        super().__init__(run_dir)
        self.records: list[dict] = []

    def log(self, step: int, metrics: dict[str, float], kind: str = "train") -> None:
        if kind == "train":
            self.records.append(dict(metrics))
        super().log(step, metrics, kind)


class _BenchRun(Run):
    """:class:`editrl.train.Run` whose step ends are time-stamped, and which can be
    put back to the same starting point between repeats."""

    def __init__(self, *args, reward_url: str, fill_steps: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.reward_url = reward_url
        self.fill_steps = fill_steps
        self.step_ends: list[float] = []
        self.marks: list[dict[str, float]] = []

    def _finish_step(self, *args, **kwargs) -> None:
        super()._finish_step(*args, **kwargs)
        self.step_ends.append(time.perf_counter())
        if self.step in (self.fill_steps, self.config.steps):
            self.marks.append({"worker_busy_s": self.pool.busy_seconds(), **reward_server_counters(self.reward_url)})

    def drain(self, timeout_s: float = 300.0) -> int:
        """Wait until no group is in flight (what a pipelined repeat left behind); returns
        how many came back. They are not trained."""
        deadline = time.monotonic() + timeout_s
        returned = 0
        while self.pool.in_flight() and time.monotonic() < deadline:
            results, _ = self.pool.poll(timeout_s=0.5)
            returned += len(results)
        if self.pool.in_flight():
            raise RuntimeError(f"{self.pool.in_flight()} groups still in flight after {timeout_s:.0f} s")
        return returned

    def reset(self, checkpoint_run_dir: Path, log_dir: Path) -> None:
        """Learner restored from the newest checkpoint of ``checkpoint_run_dir``, adapter loaded on every worker, tasks
        from the seed again, fresh logs under ``log_dir``."""
        self.drain()
        if ray.get(self.learner.resume.remote(str(checkpoint_run_dir))) is None:
            raise FileNotFoundError(f"no checkpoint in {checkpoint_run_dir}")
        self._publish(wait=True)
        self.tasks = TaskSource(self.config, self.train_set)
        self.step = 0
        self.trained_ids, self.accepted_ids = set(), set()
        self.counters = collections.Counter()
        if self.metrics_log is not None:
            self.metrics_log.close()
        log_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_log = _CapturingLog(log_dir)
        self.rollout_log = RolloutLog(log_dir / "rollouts")
        self.step_ends = []
        self.marks = []

    def run_steps(self, mode: str) -> float:
        """``config.steps`` steps of ``mode``; returns the seconds from the start to the last update."""
        progress = tqdm(total=self.config.steps, disable=True)
        start = time.perf_counter()
        (self._pipelined if mode == "pipelined" else self._sequential)(progress)
        return time.perf_counter() - start


def reward_server_counters(url: str) -> dict[str, float]:
    """The reward server's cumulative busy wall seconds (at least one backend call in
    flight), summed backend call seconds, backend calls and items scored (all
    backends), from its Prometheus ``/metrics``."""
    response = httpx.get(f"{url}/metrics", timeout=30.0)
    response.raise_for_status()
    out = {"server_busy_s": 0.0, "server_call_s": 0.0, "server_calls": 0.0, "server_items": 0.0}
    names = {"reward_backend_busy_seconds_total": "server_busy_s", "reward_backend_latency_seconds_sum": "server_call_s",
             "reward_backend_latency_seconds_count": "server_calls", "reward_backend_batch_size_sum": "server_items"}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name in names:
                out[names[sample.name]] += sample.value
    return out


def _server_config(latency_s: float, concurrent_batches: int = 1) -> dict:
    backend = {"type": "pixel", "latency_s": latency_s, "max_concurrent_batches": concurrent_batches}
    reward = {"version": f"bench-pixel-latency-{latency_s:g}-c{concurrent_batches}", "backends": {"pixel": backend},
              "aggregation": "weighted_mean", "weights": dict(REWARD_WEIGHTS)}
    return default_server_config(cache={"enabled": False}, admin_token_env=ADMIN_ENV, reward=reward)


def _switch_reward(url: str, latency_s: float, concurrent_batches: int) -> None:
    """Swap the running server's reward config to one whose backend sleeps ``latency_s`` per call
    and runs up to ``concurrent_batches`` calls at once."""
    response = httpx.put(f"{url}/v1/config", json=_server_config(latency_s, concurrent_batches)["reward"],
                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60.0)
    response.raise_for_status()


def _group_seconds(groups: list[Group]) -> float:
    """Median worker seconds per group: encode + sample + decode."""
    return statistics.median(g.timings["encode_s"] + g.timings["sample_s"] + g.timings["decode_s"] for g in groups)


STAGES = ("worker_busy_s", "reward_server_busy_s", "train_s", "sync_s")
"""The stages whose busy time per step bounds the step from below."""


def _repeat_summary(records: list[dict], marks: list[dict[str, float]], step_ends: list[float], start: float,
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


def _actor_peak_rss(run: Run) -> dict[str, float]:
    """Peak RSS (MiB, the kernel's high-water mark) of the learner and each rollout actor process."""
    def peak(_self) -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    out = {"learner": ray.get(run.learner.__ray_call__.remote(peak))}
    for worker_id, worker in sorted(run.pool.workers.items()):
        out[f"worker {worker_id}"] = ray.get(worker.actor.__ray_call__.remote(peak))
    return out


@dataclass
class ShapeRun:
    """Both schedules measured in one :class:`Shape`."""

    shape: Shape
    config: TrainConfig
    latency_s: float
    """Seconds the reward backend slept per call."""
    concurrent: int
    """Backend calls the reward server ran at once."""
    group_s: float
    """Median worker seconds of one group (calibration)."""
    summaries: dict[str, list[dict]]
    """Mode -> one :func:`_repeat_summary` per timed repeat."""
    walls: dict[str, list[float]]
    """Mode -> wall seconds of each repeat."""
    actor_rss: dict[str, float]
    """Process -> peak RSS in MiB."""

    def name(self, text: str) -> str:
        return f"{text} [{self.shape.label}]"


def measure(settings: Settings) -> BenchResult:
    """Run both schedules, interleaved, in every shape, and summarise them (see the module docstring)."""
    if settings.steps - settings.fill_steps < 1:
        raise ValueError("steps must exceed fill_steps")
    if not settings.shapes:
        raise ValueError("settings.shapes is empty")
    torch.set_num_threads(1)  # as the actors: 2 shared cores, more threads only spin against each other
    return _result(settings, [_measure_shape(settings, shape) for shape in settings.shapes])


def _measure_shape(settings: Settings, shape: Shape) -> ShapeRun:
    config = default_train_config(**dict(settings.overrides + shape.overrides)).model_copy(update={"steps": settings.steps})
    pc, rt, rc = config.policy, config.runtime, config.rollout
    train_set = PromptDataset(resolve(config.data.train_prompts), pc.num_frames, pc.height, pc.width)
    heldout_set = PromptDataset(resolve(config.data.heldout_prompts), pc.num_frames, pc.height, pc.width)
    summaries: dict[str, list[dict]] = {mode: [] for mode in MODES}
    concurrent = settings.reward_concurrent_batches or rc.num_workers * rc.reward_concurrency
    with tempfile.TemporaryDirectory(prefix="bench-pipelined-") as tmp, \
            reward_server(_server_config(0.0), Path(tmp), env={ADMIN_ENV: ADMIN_TOKEN}) as url, \
            ray_session(num_cpus=math.ceil(rc.num_workers * rc.num_cpus_per_worker + rt.learner_num_cpus)):
        tmp_dir = Path(tmp)
        run = _BenchRun(config, tmp_dir / "run", list(corpus()), url, train_set, heldout_set,
                        reward_url=url, fill_steps=settings.fill_steps)
        try:
            run.version = ray.get(run.learner.ready.remote())
            run._publish(wait=True)
            start_dir = tmp_dir / "start"
            ray.get(run.learner.save_checkpoint.remote(str(start_dir), 0, run._driver_state()))
            # The time of one group on a worker, with the reward server answering at once.
            # Two rounds; the first (clips loaded, first forwards) is discarded.
            calibration = TaskSource(config.model_copy(update={"seed": config.seed + 1}), train_set)
            for _ in range(2):
                results, _ = run.pool.run_sync([calibration.next() for _ in range(settings.calibration_groups)])
            groups = [r for r in results if isinstance(r, Group)]
            if not groups:
                raise RuntimeError("every calibration group failed")
            group_s = _group_seconds(groups)
            latency_s = settings.reward_latency_s if settings.reward_latency_s is not None else round(group_s, 2)
            _switch_reward(url, latency_s, concurrent)
            logger.info("one group takes %.2f s on a worker; reward latency set to %.2f s per backend call, %d calls at once",
                        group_s, latency_s, concurrent)

            counter = collections.Counter()

            def reset(mode: str) -> None:
                counter[mode] += 1
                run.reset(start_dir, tmp_dir / f"{mode}-{counter[mode]}")
                if settings.fill_steps == 0:
                    run.marks.append({"worker_busy_s": run.pool.busy_seconds(), **reward_server_counters(url)})

            def one_repeat(mode: str) -> None:
                start = time.perf_counter()
                run.run_steps(mode)
                summary = _repeat_summary(run.metrics_log.records, run.marks, run.step_ends, start, settings.fill_steps)
                summaries[mode].append(summary)
                logger.info("%s, %s: %s", shape.label, mode, {k: round(v, 2) if isinstance(v, float) else v for k, v in summary.items()})

            walls = interleaved({mode: (lambda m=mode: one_repeat(m)) for mode in MODES}, settings.repeats, settings.warmup,
                                before={mode: (lambda m=mode: reset(m)) for mode in MODES})
            run.drain()
            actor_rss = _actor_peak_rss(run)
        finally:
            run.close()
    timed = {mode: summaries[mode][settings.warmup :] for mode in MODES}
    return ShapeRun(shape, config, latency_s, concurrent, group_s, timed, walls, actor_rss)


def _stats(summaries: list[dict], key: str) -> Stats:
    return Stats.of([s[key] for s in summaries])


def _result(settings: Settings, runs: list[ShapeRun]) -> BenchResult:
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
            "rollout_workers": config.rollout.num_workers, "max_staleness": config.runtime.max_staleness,
            "prefetch_per_worker": config.runtime.prefetch_per_worker,
            "reward_concurrency": config.rollout.reward_concurrency}


def _shape_rows(settings: Settings, run: ShapeRun) -> tuple[list[Measurement], list[Ratio], list[Target]]:
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


def _explain(summaries: dict[str, list[dict]], settings: Settings, config: TrainConfig) -> list[str]:
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
    workers = config.rollout.num_workers
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


def run(profile: str) -> BenchResult:
    if not runtime_available():
        return not_measured(profile, "not yet measured: editrl.config.TrainConfig has no `runtime` field "
                                     "(the pipelined runtime is not in this tree yet)")
    if profile not in SETTINGS:
        raise ValueError(f"no {profile!r} settings for {NAME}")
    return measure(SETTINGS[profile])
