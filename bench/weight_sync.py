"""Item 3: publishing the adapter to every rollout worker, as a share of a training step.

``publish`` is :func:`bench.loop.publish_adapter` itself, the same steps as
:meth:`editrl.learner.actor.LearnerService.publish` plus the pool's loads: the learner's
adapter packed into one flat fp32 buffer, its checksum (CRC-32), one ``ray.put``,
``set_adapter`` on every RolloutWorker actor (layout and checksum checks, staging)
and ``load_staged_adapter`` (the in-place copy into the LoRA parameters that a
worker otherwise does when its next group starts), both waited for. It is timed for
two model widths and two LoRA ranks, all at once in one Ray instance and
interleaved; the wide model at rank 8 has exactly as many adapter values as the
default model at rank 64, which separates adapter size from model size.

The step it is compared with is the default run's step (``configs/default.yaml``:
4 prompts x 4 samples, 10 steps, 2 workers, pixel reward server) through the
same worker methods the run uses (:mod:`bench.loop`): ``run_tasks`` (sample, decode, score),
``Learner.train_step``, ``publish_adapter``.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch

from bench.cluster import default_server_config, ray_session, reward_server, start_workers, wait_ready
from bench.harness import interleaved, paired_ratio
from bench.loop import PromptSampler, make_train_tasks, publish_adapter, run_tasks
from bench.results import BenchResult, Measurement, Stats, Target
from bench.workload import PROJECT_ROOT, SMOKE_MODEL, WIDE_MODEL, corpus, count_parameters, default_train_config
from editrl.learner.learner import Learner
from editrl.policy.adapter import adapter_checksum
from editrl.policy.config import LoraSettings, TinyModelConfig
from editrl.policy.policy import EditPolicy
from editrl.protocol.dataset import PromptDataset

NAME = "weight_sync"
ITEM = 3
TITLE = "Weight sync: publishing the adapter to all workers, as a share of a step"
TARGET_SHARE_PCT = 0.5


@dataclass(frozen=True)
class Settings:
    profile: str
    models: tuple[str, ...]
    """Names in :data:`MODELS`; the first is the default run's model."""
    ranks: tuple[int, ...]
    """LoRA ranks (alpha = 2 rank); the last is the default run's."""
    num_workers: int = 2
    publish_repeats: int = 10
    publish_warmup: int = 2
    step_repeats: int = 3
    step_warmup: int = 1
    step_overrides: tuple[tuple[str, object], ...] = ()
    """Dotted-key overrides of the default run's config for the timed steps."""


MODELS: dict[str, TinyModelConfig] = {
    "default": TinyModelConfig(), "wide": WIDE_MODEL, "smoke": SMOKE_MODEL,
    "smoke_wide": SMOKE_MODEL.model_copy(update={"dit_heads": 4, "dit_head_dim": 16, "dit_ffn_dim": 64}),
}

SETTINGS = {
    "cpu": Settings("cpu", models=("default", "wide"), ranks=(8, 64)),
    "smoke": Settings("smoke", models=("smoke", "smoke_wide"), ranks=(1, 4), publish_repeats=2, publish_warmup=1, step_repeats=1,
                      step_warmup=0, step_overrides=(("prompts_per_step", 2), ("group_size", 2), ("policy.num_steps", 2),
                                                     ("policy.height", 32), ("policy.width", 32), ("policy.sde_window", None))),
}


def _step_config(settings: Settings):
    overrides = dict(settings.step_overrides)
    if settings.profile == "smoke":
        overrides["policy.tiny"] = SMOKE_MODEL.model_dump()
        overrides["policy.lora"] = LoraSettings(rank=settings.ranks[-1], alpha=2 * settings.ranks[-1]).model_dump()
    return default_train_config(**overrides)


def measure(settings: Settings) -> BenchResult:
    torch.set_num_threads(1)  # as the workers: 2 shared cores, more threads only spin against each other
    train_config = _step_config(settings)
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as tmp, \
            reward_server(default_server_config(), Path(tmp)) as url, ray_session(num_cpus=2):
        learners, workers = {}, {}
        for model in settings.models:
            for rank in settings.ranks:
                key = f"{model}/r{rank}"
                pc = train_config.policy.model_copy(update={"tiny": MODELS[model], "lora": LoraSettings(rank=rank, alpha=2 * rank)})
                learners[key] = Learner(EditPolicy.from_config(pc, list(corpus()), root=PROJECT_ROOT), train_config.learner)
                workers[key] = start_workers(pc, url, settings.num_workers, num_cpus=0.1, first_id=len(workers) * settings.num_workers)
        for group in workers.values():
            wait_ready(group)
        for key in learners:
            publish_adapter(learners[key], workers[key])
        default_key = f"{settings.models[0]}/r{settings.ranks[-1]}"
        variants = {key: (lambda k=key: publish_adapter(learners[k], workers[k])) for key in learners}
        variants.update(_publish_parts(learners[default_key], workers[default_key]))
        times = interleaved(variants, settings.publish_repeats, settings.publish_warmup)
        phases = _time_steps(train_config, learners[default_key], workers[default_key], settings)
    matched = _same_adapter_pair({k: _adapter_mib(v) for k, v in learners.items()}, settings)
    load_times = {}
    if matched:  # what set_adapter and load_staged_adapter do on a worker, step by step, for the two equal-sized adapters
        parts = {f"{key}: {name}": fn for key in matched for name, fn in _load_parts(learners[key].policy).items()}
        load_times = interleaved(parts, settings.publish_repeats * 2, settings.publish_warmup)

    step = Stats.of(phases["step_s"])
    measurements = [Measurement(name="default step", group="the default run's step", params={"workers": settings.num_workers},
                                metrics={name: Stats.of(values) for name, values in phases.items()})]
    sizes = {}
    for key, learner in learners.items():
        model, rank = key.split("/r")
        adapter_mib = _adapter_mib(learner)
        sizes[key] = adapter_mib
        publish = Stats.of(times[key]).scaled(1e3)
        measurements.append(Measurement(
            name=key, group="publish_adapter (all workers)",
            params={"model": model, "rank": int(rank), "workers": settings.num_workers,
                    "lora_modules": learner.policy.num_lora_modules,
                    "dit_parameters_m": round(count_parameters(learner.policy.transformer, lora=False) / 1e6, 3),
                    "adapter_mib": round(adapter_mib, 4)},
            metrics={"publish_ms": publish, "share_of_default_step_pct": 100 * publish.median / 1e3 / step.median},
        ))
    measurements += [Measurement(name=part, group=f"parts of publishing {default_key}", metrics={"time_ms": Stats.of(times[part]).scaled(1e3)})
                     for part in PARTS]
    measurements += [Measurement(name=name, group="load_adapter_state parts in one process (same adapter size)",
                                 metrics={"time_ms": Stats.of(values).scaled(1e3)}) for name, values in load_times.items()]
    ratios = []
    for model in settings.models:
        low, high = f"{model}/r{settings.ranks[0]}", f"{model}/r{settings.ranks[-1]}"
        ratios.append(paired_ratio(f"{high} / {low}", high, low, times,
                                   f"{sizes[high] / sizes[low]:.0f}x the adapter values, same model"))
    if matched:
        big, small = matched
        ratios.append(paired_ratio(f"{big} / {small}", big, small, times, "same adapter size, larger model"))
    slope, intercept = np.polyfit([sizes[k] for k in learners], [np.median(times[k]) * 1e3 for k in learners], 1)
    share = 100 * float(np.median(times[default_key])) / step.median
    targets = [Target.check("weight_sync_share", "publish + load on all workers, share of the default step",
                            share, "<=", TARGET_SHARE_PCT, unit="%", note=f"{default_key}, {settings.num_workers} workers")]
    if matched:
        r = ratios[-1].stats.median
        dit = {key: count_parameters(learners[key].policy.transformer, lora=False) for key in matched}
        targets.append(Target.check(
            "weight_sync_model_size",
            f"same adapter size on a {dit[matched[0]] / dit[matched[1]]:.0f}x larger DiT: publish time ratio within 1.25x either way",
            max(r, 1 / r), "<=", 1.25, note=f"{matched[0]} / {matched[1]} = {r:.3f}"))
    notes = []
    for key in matched or ():
        part = {name.split(": ", 1)[1]: float(np.median(values)) * 1e3 for name, values in load_times.items() if name.startswith(key + ": ")}
        notes.append(
            f"load_adapter_state on {key} ({learners[key].policy.num_lora_modules} adapted modules, "
            f"{_adapter_mib(learners[key]):.2f} MiB): {part[LOAD_PARTS[2]]:.2f} ms, of which the in-place copy "
            f"{part[LOAD_PARTS[1]]:.2f} ms and the checksum {part[LOAD_PARTS[0]]:.2f} ms; the rest is the layout "
            "check against the index built once at start.")
    return BenchResult(
        name=NAME, item=ITEM, title=TITLE, profile=settings.profile, status="measured",
        settings={**dataclasses.asdict(settings), "default_config": "configs/default.yaml (model built in code)",
                  "prompts_per_step": train_config.prompts_per_step, "group_size": train_config.group_size,
                  "num_steps": train_config.policy.num_steps},
        measurements=measurements, ratios=ratios, targets=targets,
        notes=notes + [
            f"Least-squares fit over the {len(learners)} configurations: publish_ms = {intercept:.2f} + {slope:.2f} x adapter_mib.",
            "The publish times are taken with all configurations' actors alive in one Ray instance, interleaved; "
            "the default step is timed afterwards with the default configuration's two actors.",
            "The parts are timed separately (ray.get of a no-op actor method is the bare call latency); their sum "
            "is close to, not exactly, one publish.",
            "step_s = rollout_s (sample, decode, score on the workers) + train_s + sync_s, as in the sequential schedule (editrl.cluster.schedules).",
        ],
    )


PARTS = ("part: pack_adapter + checksum", "part: ray.put", "part: no-op call on all workers", "part: set_adapter + load_staged_adapter on all workers")


def _publish_parts(learner: Learner, workers: list) -> dict[str, Callable[[], object]]:
    """The steps of ``publish_adapter`` timed one by one (each with its own inputs ready)."""
    packed = learner.policy.pack_adapter()
    checksum = adapter_checksum(packed)
    ref = ray.put(packed)
    version = learner.policy_version
    return {
        PARTS[0]: lambda: adapter_checksum(learner.policy.pack_adapter()),
        PARTS[1]: lambda: ray.put(packed),
        PARTS[2]: lambda: ray.get([w.ready.remote() for w in workers]),
        PARTS[3]: lambda: (ray.get([w.set_adapter.remote(ref, version, checksum) for w in workers]),
                           ray.get([w.load_staged_adapter.remote() for w in workers])),
    }


def _adapter_mib(learner: Learner) -> float:
    return count_parameters(learner.policy.transformer, lora=True) * 4 / 2**20


LOAD_PARTS = ("checksum", "in-place copy", "load_adapter_state (all of it)")


def _load_parts(policy: EditPolicy) -> dict[str, Callable[[], object]]:
    """What ``set_adapter`` and ``load_staged_adapter`` do on a worker, one process: the checksum, the in-place
    copy into the LoRA parameters, and the whole ``load_adapter_state`` (layout
    checks, checksum, copy) of a packed adapter held read-only, as Ray hands it over."""
    packed = policy.pack_adapter()
    packed.values.flags.writeable = False
    checksum = adapter_checksum(packed)

    def copy() -> None:
        with torch.no_grad():
            policy._copy_packed(packed.values)

    return {
        LOAD_PARTS[0]: lambda: adapter_checksum(packed),
        LOAD_PARTS[1]: copy,
        LOAD_PARTS[2]: lambda: policy.load_adapter_state(packed, checksum=checksum),
    }


def _same_adapter_pair(sizes: dict[str, float], settings: Settings) -> tuple[str, str] | None:
    """(larger model's key, default model's key) with equal adapter sizes, if any."""
    if len(settings.models) < 2:
        return None
    for big in (k for k in sizes if not k.startswith(settings.models[0] + "/")):
        for small in (k for k in sizes if k.startswith(settings.models[0] + "/")):
            if abs(sizes[big] - sizes[small]) < 1e-9:
                return big, small
    return None


def _time_steps(config, learner: Learner, workers: list, settings: Settings) -> dict[str, list[float]]:
    """Seconds per phase of ``step_warmup + step_repeats`` steps of the sequential loop
    (warm-up steps dropped)."""
    pc = config.policy
    dataset = PromptDataset(PROJECT_ROOT / config.data.train_prompts, pc.num_frames, pc.height, pc.width, fps=config.fps)
    sampler = PromptSampler(len(dataset), config.seed)
    phases: dict[str, list[float]] = {"rollout_s": [], "train_s": [], "sync_s": [], "step_s": []}
    for step in range(1, settings.step_warmup + settings.step_repeats + 1):
        tasks = make_train_tasks(config, dataset, sampler.next_batch(config.prompts_per_step), step)
        start = time.perf_counter()
        groups, failures = run_tasks(workers, tasks)
        rollout = time.perf_counter() - start
        if failures or not groups:
            raise RuntimeError(f"{len(failures)} groups failed in a timed step: {failures[0].reason if failures else ''}")
        start = time.perf_counter()
        learner.train_step(groups)
        train = time.perf_counter() - start
        start = time.perf_counter()
        publish_adapter(learner, workers)
        sync = time.perf_counter() - start
        if step > settings.step_warmup:
            for name, value in (("rollout_s", rollout), ("train_s", train), ("sync_s", sync), ("step_s", rollout + train + sync)):
                phases[name].append(value)
    return phases


def run(profile: str) -> BenchResult:
    if profile not in SETTINGS:
        raise ValueError(f"no {profile!r} settings for {NAME}")
    return measure(SETTINGS[profile])
