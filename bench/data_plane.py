"""Item 11: what a group carries and where it goes.

* **Bytes per group and per update**, computed from shapes by the plan
  (:func:`editrl.cluster.plan.group_bytes`) for four storages: all T + 1 latents in fp32 (what
  groups carried before), the trained window in fp32, the window in bf16 (``rollout.trajectory_dtype``),
  at the default run and at Wan2.1-14B 480p x 81 frames with T = 20 (``configs/wan21_14b_480p.yaml``);
  and **measured**: a group sampled by the real sampler at a medium video size, stored as a
  rollout worker stores it, its bytes counted by :func:`editrl.protocol.rollout.split_bulk`,
  against the plan's number for the same config.
* **Driver peak RSS over a run, before vs after**: a Ray producer actor returns groups of the
  480p x 33-frame shape (G = 8, a window of two steps, bf16) to the driver, which hands each
  update's B = 4 groups to a consumer actor that reads their tensors as the learner does
  (:func:`editrl.learner.actor.fetch_bulk`). *before*: the groups come back whole (tensors
  pickled through the driver, as they did); *after*: they come back split, each group's tensors
  a return value of their own that the driver only references
  (:func:`editrl.rollout_workers.actor.split_results`). Each variant runs once in a fresh
  driver process; its RSS is sampled every 2 ms.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from bench.harness import probe_memory
from bench.results import BenchResult, Measurement
from bench.workload import PROJECT_ROOT, conditioning, corpus, default_train_config
from editrl.cluster.config import load_train_config
from editrl.cluster.plan import factors, group_bytes, stored_positions
from editrl.policy.memory import architecture, model_sizes

NAME = "data_plane"
ITEM = 11
TITLE = "Data plane: bytes per group and update, and the driver's memory with tensors past it"
MIB = 2**20
STORAGES = {"all latents, fp32": (None, "float32"), "window, fp32": ("window", "float32"), "window, bf16": ("window", "bfloat16")}


@dataclass(frozen=True)
class Settings:
    profile: str
    measured_size: tuple[int, int, int]
    """(frames, height, width) of the measured group."""
    steps: int
    """Updates the driver runs in the RSS comparison."""
    groups_per_update: int = 4
    group_size: int = 8
    latent: tuple[int, int, int, int] = (16, 9, 60, 104)
    """(C, f, h, w) of the groups in the RSS comparison: 480p x 33 frames under Wan's VAE."""
    positions: int = 3
    memory_probe: bool = True


SETTINGS = {
    "cpu": Settings("cpu", measured_size=(17, 96, 160), steps=4),
    "smoke": Settings("smoke", measured_size=(5, 32, 32), steps=2, groups_per_update=2, group_size=2,
                      latent=(4, 2, 8, 8), memory_probe=False),
}


def _computed(config, label: str) -> list[Measurement]:
    """The plan's bytes of one group and one update of ``config`` for each storage."""
    arch = architecture(config.policy, PROJECT_ROOT)
    sizes = model_sizes(arch, config.policy.lora, config.policy.kind)
    latent = _latent_size(config, arch, sizes)
    out = []
    for name, (positions, dtype) in STORAGES.items():
        cfg = config.model_copy(update={"rollout": config.rollout.model_copy(update={"trajectory_dtype": dtype})})
        kept = stored_positions(cfg) if positions else config.policy.num_steps + 1
        # the old storage (positions None): every latent in fp32, whatever is trained
        stored = group_bytes(cfg, sizes, latent, kept if positions else None)
        out.append(Measurement(name=name, group=label, params={"positions": kept, "dtype": dtype, "G": config.group_size,
                                                                "B": config.prompts_per_step},
                               metrics={"group_mib": stored / MIB, "update_mib": stored * config.prompts_per_step / MIB}))
    return out


def _latent_size(config, arch, sizes) -> tuple[int, int, int]:
    return factors(arch, tuple(sizes.patch)).latent_size(config.policy)


def _measured(settings: Settings) -> list[Measurement]:
    """A real group at a medium size, stored as the workers store it, against the plan."""
    from editrl.policy.policy import EditPolicy
    from editrl.policy.sampling import sample_trajectories
    from editrl.protocol.rollout import Group, GroupTask, split_bulk, trained_positions

    frames, height, width = settings.measured_size
    config = default_train_config(**{"policy.num_frames": frames, "policy.height": height, "policy.width": width,
                                     "group_size": settings.group_size})
    policy = EditPolicy.from_config(config.policy, list(corpus()), seed=0)
    source, text, null = conditioning(policy, 0)
    out = []
    arch = architecture(config.policy, PROJECT_ROOT)
    sizes = model_sizes(arch, config.policy.lora, config.policy.kind)
    latent = _latent_size(config, arch, sizes)
    for name, (positions, dtype) in STORAGES.items():
        torch_dtype = getattr(torch, dtype)
        traj = sample_trajectories(policy, source, text, null, settings.group_size, policy.sampler_spec(seed=1),
                                   torch.Generator().manual_seed(1), trajectory_dtype=torch_dtype)
        keep = trained_positions(traj.spec.stochastic) if positions else tuple(range(traj.latents.shape[1]))
        task = GroupTask("bench", "p0", corpus()[0], "unused.mp4", 1, settings.group_size)
        group = Group(task, 0, 0, traj.latents[:, list(keep)].to(torch_dtype), traj.log_probs, traj.spec, source, text, null,
                      torch.zeros(settings.group_size), {}, "bench", latent_steps=keep)
        light, _ = split_bulk(group)
        cfg = config.model_copy(update={"rollout": config.rollout.model_copy(update={"trajectory_dtype": dtype})})
        planned = group_bytes(cfg, sizes, latent, len(keep)) if positions else group_bytes(cfg, sizes, latent)
        planned -= group.log_probs.numel() * 4  # the log-probs travel with the metadata, not as bulk
        out.append(Measurement(name=name, group=f"measured {frames}x{height}x{width}", params={"positions": len(keep), "dtype": dtype},
                               metrics={"group_mib": light.bulk_bytes / MIB, "plan_group_mib": planned / MIB,
                                        "plan_error": light.bulk_bytes / planned - 1.0}))
    return out


# ---- the driver's memory -------------------------------------------------
def memory_variants(settings: dict) -> dict:
    """For :mod:`bench.memprobe`: a short run of updates through Ray, groups whole or split."""
    s = Settings(**{**settings, "measured_size": tuple(settings["measured_size"]), "latent": tuple(settings["latent"])})
    return {"before: tensors through the driver": lambda: _drive(s, split=False),
            "after: tensors past the driver": lambda: _drive(s, split=True)}


def _drive(settings: Settings, split: bool) -> None:
    import ray

    from editrl.cluster.pool import with_bulk
    from editrl.learner.actor import fetch_bulk
    from editrl.protocol.rollout import Group, GroupTask, SamplerSpec
    from editrl.rollout_workers.actor import split_results

    @ray.remote(num_cpus=0)
    class Producer:
        def groups(self, step: int, split: bool) -> tuple:
            g, (c, f, h, w) = settings.group_size, settings.latent
            spec = SamplerSpec.build("flow_sde", 0.7, 4.5, [1.0, 0.75, 0.5, 0.25, 0.0], [False, True, True, False])
            out = []
            for i in range(settings.groups_per_update):
                task = GroupTask(f"s{step}-g{i}", f"p{i}", "x", "unused.mp4", i, g)
                group = Group(task, step, 0, torch.randn(g, settings.positions, c, f, h, w).bfloat16(), torch.zeros(g, 4), spec,
                              torch.randn(1, c, f, h, w), torch.randn(1, 512, 64), torch.zeros(1, 512, 64), torch.arange(g).float(),
                              {}, "bench", latent_steps=tuple(range(1, 1 + settings.positions)))
                out.append(group)
            return split_results(out, len(out)) if split else out

    @ray.remote(num_cpus=0)
    class Consumer:
        def train_step(self, groups: list) -> int:
            groups, lost, read = fetch_bulk(groups)
            return sum(int(g.latents.float().sum().isfinite()) for g in groups) + read

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        producer, consumer = Producer.remote(), Consumer.remote()
        returns = 1 + settings.groups_per_update if split else 1
        for step in range(settings.steps):
            refs = producer.groups.options(num_returns=returns).remote(step, split)
            refs = refs if split else [refs]
            batch = with_bulk(ray.get(refs[0]), refs[1:])  # what the driver receives
            ray.get(consumer.train_step.remote(batch))
            del batch, refs
    finally:
        ray.shutdown()


def run(profile: str) -> BenchResult:
    settings = SETTINGS[profile]
    measurements = _computed(default_train_config(), "default run")
    big = load_train_config(PROJECT_ROOT / "configs" / "wan21_14b_480p.yaml")
    measurements += _computed(big, "Wan2.1-14B 480p x 81, T = 20")
    measurements += _measured(settings)
    notes = []
    if settings.memory_probe:
        memory = probe_memory(NAME, list(memory_variants(dataclasses.asdict(settings))), dataclasses.asdict(settings))
        g, (c, f, h, w) = settings.group_size, settings.latent
        per_update = settings.groups_per_update * g * settings.positions * c * f * h * w * 2 / MIB
        for name, values in memory.items():
            measurements.append(Measurement(name=name, group="driver RSS over a run", params={
                "updates": settings.steps, "update_mib": round(per_update, 1)},
                metrics={k: values[k] for k in ("setup_rss_mib", "variant_peak_rss_mib", "variant_added_rss_mib")}))
        before, after = (memory[n]["variant_added_rss_mib"] for n in memory_variants(dataclasses.asdict(settings)))
        notes.append(f"driver RSS added by the run: {before:.0f} MiB with the tensors through it, {after:.0f} MiB past it "
                     f"(one update's tensors: {per_update:.0f} MiB)")
    window = {m.group: m.metrics["update_mib"] for m in measurements if m.name == "window, bf16" and "update_mib" in m.metrics}
    full = {m.group: m.metrics["update_mib"] for m in measurements if m.name == "all latents, fp32" and "update_mib" in m.metrics}
    for label in window:
        notes.append(f"{label}: {full[label]:.1f} MiB per update with every latent in fp32, {window[label]:.1f} MiB with the "
                     f"window in bf16 ({full[label] / window[label]:.1f}x less)")
    assert all(math.isfinite(m.metrics.get("plan_error", 0.0)) for m in measurements)
    return BenchResult(name=NAME, item=ITEM, title=TITLE, profile=profile, status="measured", settings=dataclasses.asdict(settings),
                       measurements=measurements, notes=notes)
