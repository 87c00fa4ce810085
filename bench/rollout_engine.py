"""Item 12: the rollout engine.

* **Encoding off the sampling slot**: one real rollout worker (:class:`RolloutWorker`, driven
  through ``submit``/``collect`` as the Ray actor is) against the real reward server process,
  sampling groups of G videos at a medium size and having them scored. *on the slot*
  (``rollout.encode_threads: 0``): each edit is encoded as mp4 right after decoding, before the
  next group can sample (what workers did); *off the slot* (``encode_threads: 2``): the edits are
  encoded by two threads while the next group samples. Throughput in groups per second over
  ``groups`` groups, the two alternating over ``rounds``.
* **Micro-batched sampling**: :func:`editrl.policy.sampling.sample_trajectories` with all
  2G rows (samples x CFG branches) in one forward against ``rollout.forward_micro_batch`` rows
  per forward: time (interleaved, paired ratios) and peak RSS (each once in a fresh process).
* **Compiled blocks** (``rollout.compile_blocks``): the same sampling with the transformer's
  repeated blocks compiled by ``torch.compile`` against eager, after the compilation (whose
  time is reported apart). The attention backend is not compared here: on a CPU diffusers'
  only backend is PyTorch's SDPA, the default.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.harness import PROJECT_ROOT, interleaved, paired_ratio, probe_memory
from bench.results import BenchResult, Measurement, Stats
from bench.workload import conditioning, corpus, default_train_config

NAME = "rollout_engine"
ITEM = 12
TITLE = "Rollout engine: mp4 encoding beside the sampling slot, and micro-batched sampling"


@dataclass(frozen=True)
class Settings:
    profile: str
    video: tuple[int, int, int]
    """(frames, height, width) of the encoding comparison's videos."""
    group_size: int
    groups: int
    """Groups per throughput measurement."""
    rounds: int
    micro_video: tuple[int, int, int]
    micro_batches: tuple[int, ...]
    repeats: int
    memory_probe: bool = True
    compile: bool = True


SETTINGS = {
    "cpu": Settings("cpu", video=(17, 96, 160), group_size=4, groups=2, rounds=2, micro_video=(17, 96, 160),
                    micro_batches=(4, 2), repeats=3),
    "smoke": Settings("smoke", video=(5, 32, 32), group_size=2, groups=2, rounds=1, micro_video=(5, 32, 32),
                      micro_batches=(2,), repeats=1, memory_probe=False, compile=False),
}


def _policy_config(video: tuple[int, int, int]):
    frames, height, width = video
    return default_train_config(**{"policy.num_frames": frames, "policy.height": height, "policy.width": width}).policy


# ---- encoding off the sampling slot ------------------------------------------
def _throughput(settings: Settings, url: str, clip: str, encode_threads: int) -> tuple[float, dict[str, float]]:
    """Groups per second of one worker sampling and getting ``groups`` groups scored (pipelined),
    and the worker's seconds per phase summed over them."""
    from editrl.policy.adapter import adapter_checksum
    from editrl.protocol.rollout import Group, GroupTask
    from editrl.rollout_workers.engine import RolloutEngine
    from editrl.rollout_workers.worker import RolloutWorker

    worker = RolloutWorker(0, _policy_config(settings.video), list(corpus()), str(PROJECT_ROOT), url, reward_timeout_s=300,
                           engine=RolloutEngine(encode_threads=encode_threads))
    state = worker.policy.adapter_state()
    worker.set_adapter(state, 0, adapter_checksum(state))
    tasks = [GroupTask(f"g{i}", "p0", corpus()[0], clip, seed=i, group_size=settings.group_size) for i in range(settings.groups + 1)]
    worker.submit(tasks[0])  # warm-up group: caches the source and instruction encodings
    while not worker.collect(5.0):
        pass
    start = time.perf_counter()
    for task in tasks[1:]:
        worker.submit(task)
    results = []
    while len(results) < settings.groups:
        results += worker.collect(5.0)
    elapsed = time.perf_counter() - start
    if not all(isinstance(r, Group) for r in results):
        raise RuntimeError(f"a group failed: {[getattr(r, 'reason', '') for r in results if not isinstance(r, Group)]}")
    phases = {k: float(sum(r.timings.get(k, 0.0) for r in results)) for k in ("sample_s", "decode_s", "mp4_s", "reward_s")}
    return settings.groups / elapsed, phases


def _encoding(settings: Settings) -> tuple[list[Measurement], list]:
    from bench.workload import structured_frames
    from editrl.cluster.reward_process import RewardServerProcess
    from editrl.protocol.video import encode_mp4

    frames, height, width = settings.video
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "clip.mp4"
        clip.write_bytes(encode_mp4(structured_frames(frames, height, width)))
        with RewardServerProcess(PROJECT_ROOT / "configs" / "reward_server.yaml", Path(tmp) / "server.log", 120) as url:
            rates: dict[str, list[float]] = {"on the slot": [], "off the slot": []}
            phases: dict[str, dict[str, float]] = {}
            for round_index in range(settings.rounds):
                order = [("on the slot", 0), ("off the slot", 2)]
                for name, threads in order if round_index % 2 == 0 else order[::-1]:
                    rate, phases[name] = _throughput(settings, url, str(clip), threads)
                    rates[name].append(rate)
    measurements = [Measurement(name=name, group="mp4 encoding", params={"encode_threads": 0 if name == "on the slot" else 2,
                                                                         "video": "x".join(map(str, settings.video)), "G": settings.group_size},
                                metrics={"groups_per_s": Stats.of(values), **{f"last_round_{k}": v for k, v in phases[name].items()}})
                    for name, values in rates.items()]
    # groups per second: the ratio of off to on is the speed-up (time ratio inverted)
    ratio = paired_ratio("off / on (groups per second)", "off the slot", "on the slot", rates,
                         "throughput with mp4 encoding beside the sampling slot over encoding on it")
    return measurements, [ratio]


# ---- micro-batched sampling -----------------------------------------------
class _Sampler:
    def __init__(self, settings: Settings) -> None:
        from editrl.policy.policy import EditPolicy

        torch.set_num_threads(1)
        self.settings = settings
        self.policy = EditPolicy.from_config(_policy_config(settings.micro_video), list(corpus()), seed=0)
        self.source, self.text, self.null = conditioning(self.policy, 0)

    def sample(self, micro_batch: int | None):
        from editrl.policy.sampling import sample_trajectories

        spec = self.policy.sampler_spec(seed=0)
        return sample_trajectories(self.policy, self.source, self.text, self.null, self.settings.group_size, spec,
                                   torch.Generator().manual_seed(0), micro_batch=micro_batch)


def _variant(micro_batch: int | None) -> str:
    return "full batch" if micro_batch is None else f"micro-batch {micro_batch}"


def memory_variants(settings: dict) -> dict:
    s = Settings(**{**settings, "video": tuple(settings["video"]), "micro_video": tuple(settings["micro_video"]),
                    "micro_batches": tuple(settings["micro_batches"])})
    sampler = _Sampler(s)
    return {_variant(m): (lambda m=m: sampler.sample(m)) for m in (None, *s.micro_batches)}


def _micro(settings: Settings) -> tuple[list[Measurement], list]:
    sampler = _Sampler(settings)
    full = sampler.sample(None)
    variants = {_variant(m): (lambda m=m: sampler.sample(m)) for m in (None, *settings.micro_batches)}
    times = interleaved(variants, settings.repeats, warmup=1)
    memory = probe_memory(NAME, list(variants), dataclasses.asdict(settings)) if settings.memory_probe else {}
    rows = 2 * settings.group_size
    measurements = []
    for micro_batch in (None, *settings.micro_batches):
        name = _variant(micro_batch)
        diff = float((sampler.sample(micro_batch).latents - full.latents).abs().max())
        measurements.append(Measurement(
            name=name, group="sampling", params={"rows_per_forward": micro_batch or rows, "video": "x".join(map(str, settings.micro_video))},
            metrics={"time_s": Stats.of(times[name]), "max_latent_diff_vs_full": diff,
                     **{k: memory.get(name, {}).get(k) for k in ("variant_peak_rss_mib", "variant_added_rss_mib")}}))
    ratios = [paired_ratio(f"{_variant(m)} / full batch", _variant(m), "full batch", times, "sampling time ratio")
              for m in settings.micro_batches]
    return measurements, ratios


def _compiled(settings: Settings) -> tuple[list[Measurement], list]:
    from editrl.rollout_workers.engine import RolloutEngine

    eager, compiled = _Sampler(settings), _Sampler(settings)
    RolloutEngine(trajectory_dtype="float32", compile_blocks=True).apply(compiled.policy)
    start = time.perf_counter()
    reference = compiled.sample(None)  # compiles
    compile_s = time.perf_counter() - start
    diff = float((reference.latents - eager.sample(None).latents).abs().max())
    times = interleaved({"eager": lambda: eager.sample(None), "compiled blocks": lambda: compiled.sample(None)},
                        settings.repeats, warmup=1)
    rows = [Measurement(name=name, group="compile", params={"video": "x".join(map(str, settings.micro_video))},
                        metrics={"time_s": Stats.of(times[name]), **({"first_call_s": compile_s, "max_latent_diff_vs_eager": diff}
                                                                    if name == "compiled blocks" else {})})
            for name in ("eager", "compiled blocks")]
    return rows, [paired_ratio("compiled / eager", "compiled blocks", "eager", times, "sampling time with compiled blocks over eager")]


def run(profile: str) -> BenchResult:
    settings = SETTINGS[profile]
    encoding, encoding_ratios = _encoding(settings)
    micro, micro_ratios = _micro(settings)
    if settings.compile:
        compiled, compiled_ratios = _compiled(settings)
        micro, micro_ratios = micro + compiled, micro_ratios + compiled_ratios
    notes = [f"{m.name}: {m.metrics['groups_per_s'].median:.3f} groups/s" for m in encoding]
    notes += [f"{m.name}: peak RSS added {m.metrics['variant_added_rss_mib']:.0f} MiB" for m in micro
              if m.metrics.get("variant_added_rss_mib") is not None]
    assert all(np.isfinite(r.stats.median) for r in encoding_ratios + micro_ratios)
    return BenchResult(name=NAME, item=ITEM, title=TITLE, profile=profile, status="measured", settings=dataclasses.asdict(settings),
                       measurements=encoding + micro, ratios=encoding_ratios + micro_ratios, notes=notes)
