"""Item 1: the pipelined runtime vs the sequential loop on the same training steps.

Both schedules run through the real runtime (:class:`editrl.cluster.run.Run`: the
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
import logging
import math
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
from bench.harness import interleaved

# ITEM, NAME, TITLE, MODES, STAGES and the targets are read from this module by the suite and the tests
from bench.pipelined_report import (  # noqa: F401 (re-exported for the suite and the smoke test)
    ITEM, MODES, NAME, STAGES, TARGET_OF_BOUND, TARGET_SPEEDUP, TITLE, ShapeRun, build_result, not_measured, repeat_summary,
)
from bench.results import BenchResult
from bench.workload import SMOKE_MODEL, corpus, default_train_config
from editrl.cluster.config import with_resolved_paths
from editrl.cluster.run import Run
from editrl.cluster.schedules import SCHEDULES
from editrl.cluster.run_log import MetricsLog, RolloutLog
from editrl.cluster.tasks import TaskSource
from editrl.cluster.train import load_datasets
from editrl.policy.config import LoraSettings
from editrl.protocol.rollout import Group

logger = logging.getLogger(__name__)

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
ONE_WORKER = Shape("1 worker", (("topology.rollout.workers", 1),),
                   about="one rollout worker and the learner: one core per compute stage, as where every stage has a "
                         "device of its own (the reward server, the driver and Ray's own processes still share them)")

SETTINGS = {
    "cpu": Settings("cpu", overrides=_COMMON, shapes=(DEFAULT_SHAPE, ONE_WORKER)),
    "smoke": Settings("smoke", steps=2, repeats=1, warmup=0, calibration_groups=2, reward_latency_s=0.05, overrides=_COMMON + (
        ("prompts_per_step", 2), ("group_size", 2), ("policy.num_steps", 2), ("policy.height", 32), ("policy.width", 32),
        ("policy.tiny", SMOKE_MODEL.model_dump()), ("policy.lora", LoraSettings(rank=4, alpha=8).model_dump()),
        ("policy.sde_window", None)), shapes=(DEFAULT_SHAPE, ONE_WORKER)),
}


class _CapturingLog(MetricsLog):
    """The run's metrics log, also keeping every training step's metrics in memory."""

    def __init__(self, run_dir: Path):
        super().__init__(run_dir)
        self.records: list[dict] = []

    def log(self, step: int, metrics: dict[str, float], kind: str = "train") -> None:
        if kind == "train":
            self.records.append(dict(metrics))
        super().log(step, metrics, kind)


class _BenchRun:
    """A :class:`editrl.cluster.run.Run` whose step ends are time-stamped (an
    ``on_step_end`` callback), and which can be put back to the same starting point
    between repeats."""

    def __init__(self, run: Run, reward_url: str, fill_steps: int):
        self.run = run
        self.reward_url = reward_url
        self.fill_steps = fill_steps
        self.step_ends: list[float] = []
        self.marks: list[dict[str, float]] = []
        run.on_step_end.append(self._mark)

    def _mark(self, run: Run) -> None:
        self.step_ends.append(time.perf_counter())
        if run.step in (self.fill_steps, run.config.steps):
            self.marks.append({"worker_busy_s": run.pool.busy_seconds(), **reward_server_counters(self.reward_url)})

    def drain(self, timeout_s: float = 300.0) -> int:
        """Wait until no group is in flight (what a pipelined repeat left behind); returns
        how many came back. They are not trained."""
        pool = self.run.pool
        deadline = time.monotonic() + timeout_s
        returned = 0
        while pool.in_flight() and time.monotonic() < deadline:
            results, _ = pool.poll(timeout_s=0.5)
            returned += len(results)
        if pool.in_flight():
            raise RuntimeError(f"{pool.in_flight()} groups still in flight after {timeout_s:.0f} s")
        return returned

    def reset(self, checkpoint_run_dir: Path, log_dir: Path) -> None:
        """Learner restored from the newest checkpoint of ``checkpoint_run_dir``, adapter loaded on every worker, tasks
        from the seed again, fresh logs under ``log_dir``."""
        self.drain()
        if ray.get(self.run.learner.resume.remote(str(checkpoint_run_dir))) is None:
            raise FileNotFoundError(f"no checkpoint in {checkpoint_run_dir}")
        self.run.publish(wait=True)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.run.reset(_CapturingLog(log_dir), RolloutLog(log_dir / "rollouts"))
        self.step_ends = []
        self.marks = []

    def run_steps(self, mode: str) -> float:
        """``config.steps`` steps of ``mode``; returns the seconds from the start to the last update."""
        start = time.perf_counter()
        SCHEDULES[mode](self.run, tqdm(total=self.run.config.steps, disable=True))
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


def _actor_peak_rss(run: Run) -> dict[str, float]:
    """Peak RSS (MiB, the kernel's high-water mark) of the learner and each rollout actor process."""
    def peak(_self) -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    out = {"learner": ray.get(run.learner.__ray_call__.remote(peak))}
    for worker_id, worker in sorted(run.pool.workers.items()):
        out[f"worker {worker_id}"] = ray.get(worker.actor.__ray_call__.remote(peak))
    return out


def measure(settings: Settings) -> BenchResult:
    """Run both schedules, interleaved, in every shape, and summarise them (see the module docstring)."""
    if settings.steps - settings.fill_steps < 1:
        raise ValueError("steps must exceed fill_steps")
    if not settings.shapes:
        raise ValueError("settings.shapes is empty")
    torch.set_num_threads(1)  # as the actors: 2 shared cores, more threads only spin against each other
    return build_result(settings, [_measure_shape(settings, shape) for shape in settings.shapes])


def _measure_shape(settings: Settings, shape: Shape) -> ShapeRun:
    config = default_train_config(**dict(settings.overrides + shape.overrides)).model_copy(update={"steps": settings.steps})
    config = with_resolved_paths(config)
    rc, workers, ranks = config.rollout, config.topology.rollout, config.topology.learner
    train_set, heldout_set = load_datasets(config)
    summaries: dict[str, list[dict]] = {mode: [] for mode in MODES}
    concurrent = settings.reward_concurrent_batches or workers.workers * rc.reward_concurrency
    with tempfile.TemporaryDirectory(prefix="bench-pipelined-") as tmp, \
            reward_server(_server_config(0.0), Path(tmp), env={ADMIN_ENV: ADMIN_TOKEN}) as url, \
            ray_session(num_cpus=math.ceil(workers.workers * workers.cpus + ranks.cpus)):
        tmp_dir = Path(tmp)
        run = Run(config, tmp_dir / "run", list(corpus()), url, train_set, heldout_set)
        bench_run = _BenchRun(run, reward_url=url, fill_steps=settings.fill_steps)
        try:
            run.policy_version = ray.get(run.learner.ready.remote())
            run.publish(wait=True)
            start_dir = tmp_dir / "start"
            ray.get(run.learner.save_checkpoint.remote(str(start_dir), 0, run.driver_state()))
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
                bench_run.reset(start_dir, tmp_dir / f"{mode}-{counter[mode]}")
                if settings.fill_steps == 0:
                    bench_run.marks.append({"worker_busy_s": run.pool.busy_seconds(), **reward_server_counters(url)})

            def one_repeat(mode: str) -> None:
                start = time.perf_counter()
                bench_run.run_steps(mode)
                summary = repeat_summary(run.metrics_log.records, bench_run.marks, bench_run.step_ends, start, settings.fill_steps)
                summaries[mode].append(summary)
                logger.info("%s, %s: %s", shape.label, mode, {k: round(v, 2) if isinstance(v, float) else v for k, v in summary.items()})

            walls = interleaved({mode: (lambda m=mode: one_repeat(m)) for mode in MODES}, settings.repeats, settings.warmup,
                                before={mode: (lambda m=mode: reset(m)) for mode in MODES})
            bench_run.drain()
            actor_rss = _actor_peak_rss(run)
        finally:
            run.close()
    timed = {mode: summaries[mode][settings.warmup :] for mode in MODES}
    return ShapeRun(shape, config, latency_s, concurrent, group_s, timed, walls, actor_rss)


def run(profile: str) -> BenchResult:
    if profile not in SETTINGS:
        raise ValueError(f"no {profile!r} settings for {NAME}")
    return measure(SETTINGS[profile])
