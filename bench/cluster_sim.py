"""Item 10: where the bottleneck of a GPU cluster run sits, rollout GPUs against learner
ranks (simulated with :mod:`bench.pipeline_sim`, not measured).

Stage times come from ``editrl plan``'s FLOP counts of the presets
(``configs/wan21_1.3b_480p.yaml``, ``configs/wan21_14b_480p.yaml``: 480p x 81 frames,
32,760 tokens per sequence, T = 20 steps, G = 8, two trained steps per trajectory) at an
assumed effective GPU throughput:

* sampling a group: T steps x 2G sequences (the CFG pair of every sample) x one forward;
* training a group: k trained steps x 2G sequences x (forward + backward = 3 forwards, +1
  for the recomputation of checkpointed blocks) plus the reference policy's forward for the
  KL term: 5 forwards a sequence; a step's B groups spread over the learner ranks (each
  trains ``ceil(B / ranks)`` groups);
* one group per rollout GPU per step (B = the worker count), a remote judge at
  ``JUDGE_CALL_S`` per item with ``JUDGE_SLOTS`` calls in flight, publishing the adapter in
  ``SYNC_S``.

The text encoder and the VAE decode are left out of the sampling time (a few percent of
it at this size); the learner ranks are ideal data parallelism (no FSDP gathers).
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass

from bench.pipeline_sim import PipelineParams, bottleneck, capacities, simulate
from bench.results import BenchResult, Measurement, Stats

NAME = "cluster_sim"
ITEM = 10
TITLE = "Cluster pipeline: rollout GPUs vs learner ranks (simulated from editrl plan's FLOPs)"

EFFECTIVE_TFLOPS = 0.4 * 989.0
"""Assumed: 40 % of an H100/H200's dense bf16 peak (989 TFLOP/s)."""
JUDGE_CALL_S, JUDGE_SLOTS = 5.0, 64
"""Assumed remote judge: 5 s per item, 64 calls in flight."""
SYNC_S = 2.0
"""Assumed: publishing a rank-64 adapter (0.2-0.8 GB fp32) and loading it on the workers."""
PRESETS = {"Wan2.1-1.3B": "configs/wan21_1.3b_480p.yaml", "Wan2.1-14B": "configs/wan21_14b_480p.yaml"}


@dataclass(frozen=True)
class Settings:
    profile: str
    workers: tuple[int, ...] = (8, 16, 32, 64)
    ranks: tuple[int, ...] = (8, 16, 32)
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 12
    jitter_cv: float = 0.1


SETTINGS = {"cpu": Settings("cpu"), "smoke": Settings("smoke", workers=(8,), ranks=(8,), seeds=(0,), steps=4)}


def stage_seconds(preset: str) -> dict[str, float]:
    """Seconds to sample and to train one group of ``preset`` at :data:`EFFECTIVE_TFLOPS`, from its plan."""
    from editrl.cluster.config import load_train_config
    from editrl.cluster.plan import factors, forward_tflop
    from editrl.policy.memory import architecture, model_sizes

    config = load_train_config(preset)
    policy = config.policy
    arch = architecture(policy)
    sizes = model_sizes(arch, policy.lora, policy.kind)
    forward = forward_tflop(sizes, factors(arch, tuple(sizes.patch)).tokens(policy), policy.max_text_tokens)
    sequences = 2 * config.group_size
    trained = policy.sde_window.size if policy.sde_window else policy.num_steps
    return {"forward_tflop": forward, "group_size": config.group_size,
            "sample_s": policy.num_steps * sequences * forward / EFFECTIVE_TFLOPS,
            "train_group_s": trained * sequences * 5 * forward / EFFECTIVE_TFLOPS}


def measure(settings: Settings) -> BenchResult:
    rows, stages = [], {}
    for model, preset in PRESETS.items():
        stage = stages[model] = stage_seconds(preset)
        for workers in settings.workers:
            for ranks in settings.ranks:
                groups = workers
                params = PipelineParams(
                    num_workers=workers, group_size=int(stage["group_size"]), groups_per_step=groups,
                    sample_s=stage["sample_s"], reward_call_s=JUDGE_CALL_S, reward_item_s=0.0, reward_max_batch=1,
                    reward_slots=JUDGE_SLOTS, learn_group_s=math.ceil(groups / ranks) * stage["train_group_s"] / groups,
                    sync_s=SYNC_S, max_staleness=1, jitter_cv=settings.jitter_cv)
                results = [simulate(params, steps=settings.steps, warmup_steps=2, seed=seed) for seed in settings.seeds]
                rows.append(Measurement(
                    name=f"{model}: {workers} rollout GPUs, {ranks} learner ranks", group=model,
                    params={"rollout_gpus": workers, "learner_ranks": ranks},
                    metrics={"samples_per_s": Stats.of([r.samples_per_s for r in results]),
                             "step_s": statistics.median(r.step_s for r in results),
                             "bound_samples_per_s": min(capacities(params).values()),
                             **{f"util_{k}": statistics.mean(r.utilization[k] for r in results) for k in results[0].utilization},
                             "bottleneck": bottleneck(params, results[0])}))
    return BenchResult(
        name=NAME, item=ITEM, title=TITLE, profile=settings.profile, status="measured",
        settings={**dataclasses.asdict(settings), "stages": stages, "effective_tflops": EFFECTIVE_TFLOPS,
                  "judge_call_s": JUDGE_CALL_S, "judge_slots": JUDGE_SLOTS, "sync_s": SYNC_S},
        measurements=rows,
        notes=["Simulated, not measured: a discrete-event model with the stage times above (see the module docstring "
               "for the assumptions); the FLOPs are editrl plan's."] + [
            f"{model}: one forward {s['forward_tflop']:.0f} TFLOP; sampling a group {s['sample_s']:.0f} s on one GPU, "
            f"training it {s['train_group_s']:.0f} s on one rank." for model, s in stages.items()],
    )


def run(profile: str) -> BenchResult:
    return measure(SETTINGS[profile])
