"""Item 6: rollout throughput with 1 and 2 workers on this machine, and a
simulated pipeline of up to 64 workers with injected stage latencies.

Measured: the default run's rollout phase (4 groups x 4 samples: encode,
denoise, decode, score on the reward server) through ``bench.loop.run_tasks``
on the first worker only and on both, interleaved, on the same tasks and seeds.
The groups' own phase timings and a few ``Learner.train_step`` calls calibrate
one simulated scenario ("this machine").

Simulated (:mod:`bench.pipeline_sim`, a discrete-event model, not a run):
throughput of the pipelined loop for 1-64 workers under injected latencies, with
each stage's utilisation, to show where the learner or the reward server
becomes the bottleneck.
"""
from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.cluster import default_server_config, ray_session, reward_server, start_workers, wait_ready
from bench.harness import interleaved, paired_ratio
from bench.loop import PromptSampler, make_train_tasks, publish_adapter, run_tasks
from bench.pipeline_sim import PipelineParams, bottleneck, capacities, sequential_step_s, simulate
from bench.results import BenchResult, Measurement, Stats
from bench.workload import PROJECT_ROOT, SMOKE_MODEL, corpus, default_train_config
from editrl.learner.learner import Learner
from editrl.policy.config import LoraSettings
from editrl.policy.policy import EditPolicy
from editrl.protocol.dataset import PromptDataset

NAME = "scaling"
ITEM = 6
TITLE = "Scaling: rollout throughput with 1 and 2 workers; simulated pipeline up to 64 workers"

SCENARIOS: dict[str, dict] = {
    "judge-bound, max_staleness 1": dict(
        group_size=4, groups_per_step=16, sample_s=30.0, reward_call_s=3.0, reward_item_s=0.0, reward_max_batch=1,
        reward_slots=8, learn_group_s=1.0, sync_s=0.5, max_staleness=1),
    "judge-bound, max_staleness 2": dict(
        group_size=4, groups_per_step=16, sample_s=30.0, reward_call_s=3.0, reward_item_s=0.0, reward_max_batch=1,
        reward_slots=8, learn_group_s=1.0, sync_s=0.5, max_staleness=2),
    "learner-bound, max_staleness 1": dict(
        group_size=4, groups_per_step=16, sample_s=30.0, reward_call_s=1.5, reward_item_s=0.0, reward_max_batch=16,
        reward_slots=1, learn_group_s=2.0, sync_s=0.5, max_staleness=1),
}
"""Injected latencies (seconds) of a GPU deployment: 30 s to sample a group; a remote
judge at 3 s per item with 8 calls in flight (2.7 items/s), or a local judge scoring
16 items in 1.5 s; a learner at 1 or 2 s per group; B = 16 groups of G = 4."""


@dataclass(frozen=True)
class Settings:
    profile: str
    worker_counts: tuple[int, ...] = (1, 2)
    repeats: int = 3
    warmup: int = 1
    train_repeats: int = 2
    simulated_workers: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    simulated_seeds: tuple[int, ...] = (0, 1, 2)
    jitter_cv: float = 0.1
    step_overrides: tuple[tuple[str, object], ...] = ()


SETTINGS = {
    "cpu": Settings("cpu"),
    "smoke": Settings("smoke", repeats=1, warmup=0, train_repeats=1, simulated_workers=(1, 4), simulated_seeds=(0,),
                      step_overrides=(("prompts_per_step", 2), ("group_size", 2), ("policy.num_steps", 2),
                                      ("policy.height", 32), ("policy.width", 32), ("policy.tiny", SMOKE_MODEL.model_dump()),
                                      ("policy.lora", LoraSettings(rank=4, alpha=8).model_dump()))),
}


def measure_workers(settings: Settings) -> tuple[dict, dict[str, float], list[Measurement], list]:
    """The real 1-vs-N-worker comparison; returns (times, calibration, rows, ratios)."""
    torch.set_num_threads(1)  # as the workers: 2 shared cores, more threads only spin against each other
    config = default_train_config(**dict(settings.step_overrides))
    pc = config.policy
    dataset = PromptDataset(PROJECT_ROOT / config.data.train_prompts, pc.num_frames, pc.height, pc.width, fps=config.fps)
    tasks = make_train_tasks(config, dataset, PromptSampler(len(dataset), config.seed).next_batch(config.prompts_per_step), step=1)
    groups_seen: dict[int, list] = {n: [] for n in settings.worker_counts}
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp, \
            reward_server(default_server_config(), Path(tmp)) as url, ray_session(num_cpus=max(2, max(settings.worker_counts))):
        workers = start_workers(pc, url, max(settings.worker_counts))
        wait_ready(workers)
        learner = Learner(EditPolicy.from_config(pc, list(corpus()), root=PROJECT_ROOT, seed=config.seed), config.learner)
        publish_adapter(learner, workers)

        def rollout(n: int) -> None:
            groups, failures = run_tasks(workers[:n], tasks)
            if failures:
                raise RuntimeError(f"{len(failures)} groups failed: {failures[0].reason}")
            groups_seen[n].extend(groups)

        names = {n: f"{n} worker{'s' if n > 1 else ''}" for n in settings.worker_counts}
        times = interleaved({names[n]: (lambda n=n: rollout(n)) for n in settings.worker_counts}, settings.repeats, settings.warmup)
        groups = groups_seen[settings.worker_counts[0]][-len(tasks):]
        train_s, sync_s = [], []
        for _ in range(settings.train_repeats):
            start = time.perf_counter()
            learner.train_step(groups)
            train_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            publish_adapter(learner, workers)
            sync_s.append(time.perf_counter() - start)
    samples = len(tasks) * config.group_size
    rows = [Measurement(name=names[n], group="measured on this machine", params={"workers": n, "samples": samples},
                        metrics={"rollout_s": Stats.of(times[names[n]]),
                                 "samples_per_s": Stats.of([samples / t for t in times[names[n]]])})
            for n in settings.worker_counts]
    first, last = names[settings.worker_counts[0]], names[settings.worker_counts[-1]]
    ratios = [paired_ratio(f"{first} / {last} rollout time", first, last, times,
                           f"throughput of {last} over {first} (same tasks and seeds)")]
    alone = groups_seen[settings.worker_counts[0]]  # calibrate on the runs with the fewest workers (least contention)
    phase = {key: statistics.median(g.timings[key] for g in alone) for key in ("encode_s", "sample_s", "decode_s", "reward_s")}
    calibration = {
        "group_size": config.group_size, "groups_per_step": config.prompts_per_step,
        "sample_s": phase["encode_s"] + phase["sample_s"] + phase["decode_s"],
        "reward_s_per_group": phase["reward_s"], "train_step_s": statistics.median(train_s), "sync_s": statistics.median(sync_s),
    }
    return times, calibration, rows, ratios


def calibrated_scenario(calibration: dict[str, float]) -> dict:
    """Simulation parameters from this machine's measured stage times, as if every
    worker had its own core: the pixel reward server scores one request's items per
    call (its batcher runs one call at a time)."""
    g = calibration["group_size"]
    return dict(
        group_size=g, groups_per_step=calibration["groups_per_step"], sample_s=calibration["sample_s"],
        reward_call_s=0.0, reward_item_s=calibration["reward_s_per_group"] / g, reward_max_batch=16, reward_slots=1,
        learn_group_s=calibration["train_step_s"] / calibration["groups_per_step"], sync_s=calibration["sync_s"], max_staleness=1,
    )


def simulated_rows(scenarios: dict[str, dict], settings: Settings) -> list[Measurement]:
    """One row per (scenario, worker count): simulated throughput over seeds, the stage
    capacities' bound, utilisations, the bottleneck and the sequential loop's throughput."""
    rows = []
    for scenario, base in scenarios.items():
        for n in settings.simulated_workers:
            params = PipelineParams(num_workers=n, jitter_cv=settings.jitter_cv, **base)
            results = [simulate(params, seed=seed) for seed in settings.simulated_seeds]
            throughput = Stats.of([r.samples_per_s for r in results])
            caps = capacities(params)
            sequential = params.groups_per_step * params.group_size / sequential_step_s(params)
            utilization = {k: statistics.mean(r.utilization[k] for r in results) for k in results[0].utilization}
            rows.append(Measurement(
                name=f"{n} worker{'s' if n > 1 else ''}", group=f"simulated: {scenario}", params={"workers": n},
                metrics={
                    "samples_per_s": throughput, "bound_samples_per_s": min(caps.values()),
                    "of_bound": throughput.median / min(caps.values()),
                    "sequential_samples_per_s": sequential, "pipelined_over_sequential": throughput.median / sequential,
                    **{f"util_{k}": v for k, v in utilization.items()},
                    "stale_dropped": float(sum(r.stale_dropped for r in results)),
                    "bottleneck": bottleneck(params, results[0]),
                },
            ))
    return rows


def measure(settings: Settings) -> BenchResult:
    _, calibration, rows, ratios = measure_workers(settings)
    scenarios = {"this machine (calibrated), max_staleness 1": calibrated_scenario(calibration), **SCENARIOS}
    rows += simulated_rows(scenarios, settings)
    return BenchResult(
        name=NAME, item=ITEM, title=TITLE, profile=settings.profile, status="measured",
        settings={**dataclasses.asdict(settings), "calibration": calibration,
                  "scenarios": {k: v for k, v in scenarios.items()}},
        measurements=rows, ratios=ratios,
        notes=[
            "Measured rows: wall time of run_tasks for the default run's 4 groups x 4 samples; the ratio is the "
            "speed-up of 2 workers over 1 (2 CPU cores, shared with the reward server and this process).",
            "Simulated rows are a discrete-event model (bench/pipeline_sim.py), not measurements: workers, reward "
            "server and learner with injected latencies, jitter (cv 0.1) over "
            f"{len(settings.simulated_seeds)} seeds. bound = the slowest stage's capacity; util_* = busy fractions; "
            "'staleness window' = no stage saturated, the number of groups in flight allowed by max_staleness limits.",
            "sequential_samples_per_s models the sequential reference loop with the same latencies (each worker samples "
            "and scores its groups in turn, then the learner trains and publishes).",
            "The calibrated scenario takes this machine's per-group sampling and scoring times with one worker, "
            "and the learner's train_step and publish times, as if each worker had its own core.",
        ],
    )


def run(profile: str) -> BenchResult:
    return measure(SETTINGS[profile])
