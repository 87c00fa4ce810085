"""Item 7: the suite's model-side benchmarks on a GPU at realistic sizes.

With CUDA present: sampling overhead (item 2), batched-timestep training
(item 5) and the adapter's publish-and-load round trip (item 3 without Ray: on
one GPU the learner and the worker share a device) with the medium random-init
Wan DiT of :data:`bench.workload.MEDIUM_MODEL` at (16, 9, 30, 52) latents (240x416,
33 frames), bf16 weights; and the sharded learner of :mod:`bench.gpu_learner` (one rollout
group and one FSDP2 update at 480p x 33 frames, its peak next to ``editrl plan``'s).
Without CUDA the result says it was skipped and why.
The reward server and the Ray benchmarks are CPU-side and are not repeated here.
"""
from __future__ import annotations

import logging

import torch

from bench import gpu_learner, learner_batching, sampling_overhead
from bench.harness import interleaved
from bench.results import BenchResult, Measurement, Stats, Target
from bench.workload import corpus, latent_shape, policy_config
from editrl.policy.adapter import adapter_checksum
from editrl.policy.policy import EditPolicy

logger = logging.getLogger(__name__)

NAME = "gpu"
ITEM = 7
TITLE = "GPU section: the suite at realistic latent sizes with a medium model"


def _adapter_round_trip(profile: str, device: str, repeats: int) -> tuple[Measurement, float]:
    """Adapter state to CPU + checksum + load back (checksum checked): the per-worker
    part of publishing, on the GPU policy. Returns the row and the median in seconds."""
    policy = EditPolicy.from_config(policy_config(profile), list(corpus()), device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None

    def round_trip() -> None:
        state = policy.adapter_state()
        policy.load_adapter_state(state, checksum=adapter_checksum(state))

    times = interleaved({"round trip": round_trip}, repeats, warmup=1, sync=sync)["round trip"]
    adapter_mib = sum(v.numel() for v in policy.adapter_state().values()) * 4 / 2**20
    row = Measurement(name="adapter publish + load", group="weight sync (one process)",
                      params={"adapter_mib": round(adapter_mib, 3), "rank": policy.config.lora.rank},
                      metrics={"round_trip_ms": Stats.of(times).scaled(1e3)})
    return row, float(torch.tensor(times).median())


def measure(sampling: sampling_overhead.Settings, learner: learner_batching.Settings, profile: str) -> BenchResult:
    """Run the sub-benchmarks with these settings and merge their results (a failing
    one is noted, the others still run)."""
    device = sampling.device
    merged = BenchResult(name=NAME, item=ITEM, title=TITLE, profile=profile, status="measured")
    medians: dict[str, float] = {}
    for module, settings in ((sampling_overhead, sampling), (learner_batching, learner)):
        try:
            sub = module.measure(settings)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: report it, keep the rest
            logger.exception("GPU %s failed", module.NAME)
            merged.notes.append(f"{module.NAME} failed: {type(exc).__name__}: {exc}")
            continue
        merged.settings[module.NAME] = sub.settings
        for row in sub.measurements:
            merged.measurements.append(row.model_copy(update={"group": module.TITLE}))
            for key in ("time_ms", "train_step_s"):
                value = row.metrics.get(key)
                if isinstance(value, Stats):
                    medians[f"{module.NAME}/{row.name}"] = value.median / (1e3 if key == "time_ms" else 1.0)
        merged.ratios += [r.model_copy(update={"name": f"{module.NAME}: {r.name}"}) for r in sub.ratios]
        merged.targets += [t.model_copy(update={"name": f"gpu.{t.name}"}) for t in sub.targets]
        merged.notes += [f"{module.NAME}: {note}" for note in sub.notes]
    try:
        row, round_trip_s = _adapter_round_trip(profile, device, repeats=sampling.repeats)
        merged.measurements.append(row)
        sample_s, train_s = medians.get("sampling_overhead/sde_logprob"), medians.get("learner_batching/k=1")
        if sample_s is not None and train_s is not None:
            step_s = learner.num_groups * sample_s + train_s
            share = 100 * round_trip_s / step_s
            row.metrics["share_of_step_pct"] = share
            merged.targets.append(Target.check(
                "gpu.weight_sync_share", "adapter round trip, share of one GPU step", share, "<=", 0.5, unit="%",
                note=f"step = {learner.num_groups} groups sampled + train_step = {step_s:.2f} s"))
    except Exception as exc:  # noqa: BLE001
        logger.exception("GPU adapter round trip failed")
        merged.notes.append(f"adapter round trip failed: {type(exc).__name__}: {exc}")
    try:  # the sharded learner at 480p x 33 frames (bench/gpu_learner.py)
        rows, targets = gpu_learner.measure_on_gpu()
        merged.measurements += rows
        merged.targets += targets
    except Exception as exc:  # noqa: BLE001
        logger.exception("GPU sharded learner failed")
        merged.notes.append(f"{gpu_learner.NAME} failed: {type(exc).__name__}: {exc}")
    config = policy_config(profile)
    merged.settings.update(latent_shape=list(latent_shape(config)), dit=config.tiny.model_dump(), dtype=config.dtype, device=device)
    if not merged.measurements:
        merged.status, merged.reason = "failed", "every GPU sub-benchmark failed (see notes)"
    return merged


def run(profile: str) -> BenchResult:
    if profile == "gpu" or torch.cuda.is_available():
        if not torch.cuda.is_available():
            raise RuntimeError("the gpu profile needs CUDA")
        return measure(sampling_overhead.SETTINGS["gpu"], learner_batching.SETTINGS["gpu"], "gpu")
    return BenchResult(
        name=NAME, item=ITEM, title=TITLE, profile=profile, status="skipped",
        reason="skipped: no CUDA device on this machine (torch.cuda.is_available() is False)",
        notes=["With a GPU, `make bench` runs items 2, 5 and the adapter round trip of item 3 with a medium Wan DiT "
               "(8 layers of Wan2.1-1.3B's width) at (16, 9, 30, 52) latents in bf16, and one sharded (FSDP2, NCCL) "
               "update of it at 480p x 33 frames with its peak GPU memory next to editrl plan's estimate."],
    )
