"""Item 8: the learner's activation memory per sequence, with and without per-block
activation checkpointing, at a medium model and video size.

One forward and backward of one sample's CFG pair (``micro_batch_samples: 1``, two
sequences) on a random-init Wan-architecture DiT, once with every block's activations
kept and once with blocks checkpointed (recomputed in the backward). Each variant runs
in a fresh process (:func:`bench.harness.probe_memory`): the memory reported is the RSS
it adds over its setup (model, adapter, optimizer and the sampled group already in
memory). Each is probed twice: with glibc's defaults, whose dynamic mmap threshold
keeps freed activation buffers in the heap (RSS then tracks the most the allocator
ever held, not what is live), and with ``MALLOC_MMAP_THRESHOLD_=65536``, which hands
every buffer of 64 KiB or more back when it is freed, so RSS follows the live
tensors; the target is on the second. Times are interleaved in this process. Both give the same gradients
(``tests/test_learner_memory.py``); the price of checkpointing is the recomputation.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench.harness import interleaved, paired_ratio, probe_memory
from bench.results import BenchResult, Measurement, Stats, Target
from bench.workload import corpus, perturb_adapter, sample_groups
from editrl.learner.config import LearnerConfig
from editrl.learner.learner import Learner
from editrl.policy.config import LoraSettings, PolicyConfig, TinyModelConfig
from editrl.policy.policy import EditPolicy

NAME = "learner_memory"
ITEM = 8
TITLE = "Learner memory: activation checkpointing per sequence"

MODES = ("off", "on")
LIVE_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}
"""glibc: buffers of 64 KiB or more are mmapped and returned to the kernel when freed."""


@dataclass(frozen=True)
class Settings:
    profile: str
    dit_heads: int
    dit_head_dim: int
    dit_layers: int
    dit_ffn_dim: int
    height: int
    width: int
    num_frames: int
    repeats: int
    warmup: int
    memory_probe: bool = True
    seed: int = 0
    torch_threads: int = 1


SETTINGS = {
    # Wan's VAE factors (8x spatial, 4x temporal): 240x416 x 17 frames are latents (5, 30, 52), 1950 tokens
    # 16 blocks (Wan2.1 has 30 and 40): what checkpointing saves grows with the depth
    "cpu": Settings("cpu", dit_heads=4, dit_head_dim=64, dit_layers=16, dit_ffn_dim=1024, height=240, width=416,
                    num_frames=17, repeats=2, warmup=1),
    "smoke": Settings("smoke", dit_heads=2, dit_head_dim=16, dit_layers=2, dit_ffn_dim=64, height=64, width=64,
                      num_frames=5, repeats=2, warmup=1, memory_probe=False),
}


def policy_config(settings: Settings) -> PolicyConfig:
    tiny = TinyModelConfig(
        latent_channels=16, vae_base_dim=8, vae_dim_mult=[1, 2, 4, 4], vae_temporal_downsample=[False, True, True],
        dit_heads=settings.dit_heads, dit_head_dim=settings.dit_head_dim, dit_layers=settings.dit_layers,
        dit_ffn_dim=settings.dit_ffn_dim, text_dim=64, text_layers=1,
    )
    return PolicyConfig(checkpoint=None, tiny=tiny, height=settings.height, width=settings.width,
                        num_frames=settings.num_frames, num_steps=2, sde_fraction=0.5, max_text_tokens=16,
                        lora=LoraSettings(rank=8, alpha=16))


class Setup:
    """The policy, one group of one sample (sampled, then the adapter moved off it), one learner per mode."""

    def __init__(self, settings: Settings) -> None:
        torch.set_num_threads(settings.torch_threads)
        self.settings = settings
        self.policy = EditPolicy.from_config(policy_config(settings), list(corpus()), seed=settings.seed)
        self.groups = sample_groups(self.policy, 1, 1, settings.seed)
        perturb_adapter(self.policy, settings.seed)
        self.tokens = self.policy.tokens_per_sequence(self.groups[0].latents.shape[-3:])
        self.learners = {mode: Learner(self.policy, LearnerConfig(micro_batch_samples=1, activation_checkpointing=mode,
                                                                  kl_coef=0.0)) for mode in MODES}
        self.advantages = torch.ones(1, 1)

    def variants(self) -> dict[str, Callable[[], object]]:
        def step(mode: str) -> None:
            learner = self.learners[mode]
            learner.optimizer.zero_grad(set_to_none=True)
            learner.accumulate_gradients(self.groups, self.advantages)
        return {f"checkpointing {mode}": (lambda mode=mode: step(mode)) for mode in MODES}


def memory_variants(settings: dict) -> dict[str, Callable[[], object]]:
    """For :mod:`bench.memprobe`."""
    return Setup(Settings(**settings)).variants()


def measure(settings: Settings) -> BenchResult:
    setup = Setup(settings)
    names = list(setup.variants())
    times = interleaved(setup.variants(), settings.repeats, settings.warmup)
    probes = {}
    if settings.memory_probe:
        probes = {"glibc": probe_memory(NAME, names, dataclasses.asdict(settings)),  # glibc's defaults
                  "live": probe_memory(NAME, names, dataclasses.asdict(settings), env=LIVE_MALLOC)}
    measurements = [Measurement(name=name, params={"activation_checkpointing": mode}, metrics={
        "forward_backward_s": Stats.of(times[name]),
        **{f"added_rss_mib_{malloc}": probe[name]["variant_added_rss_mib"] for malloc, probe in probes.items()},
    }) for name, mode in zip(names, MODES)]
    live = probes.get("live", {})
    kept = live.get(names[0], {}).get("variant_added_rss_mib")
    checkpointed = live.get(names[1], {}).get("variant_added_rss_mib")
    reduction = kept / checkpointed if kept and checkpointed else None
    return BenchResult(
        name=NAME, item=ITEM, title=TITLE, profile=settings.profile, status="measured",
        settings={**dataclasses.asdict(settings), "tokens_per_sequence": setup.tokens, "sequences": 2},
        measurements=measurements,
        ratios=[paired_ratio("checkpointing on / off", names[1], names[0], times,
                             "forward and backward time with blocks recomputed over blocks kept")],
        targets=[Target.check(
            "checkpointing_memory_reduction", "activation memory of one CFG pair, kept over checkpointed "
            "(RSS added over the setup, fresh processes, 64 KiB mmap threshold)", reduction, ">=", 3.0, unit="x",
            note=f"{kept} MiB kept, {checkpointed} MiB checkpointed" if reduction else "memory not probed in this profile",
        )],
        notes=["The gradients are the same (tests/test_learner_memory.py); a time ratio above 1 is the recomputation's cost.",
               "added_rss_mib_live: probed with MALLOC_MMAP_THRESHOLD_=65536 (freed buffers go back to the kernel, RSS "
               "follows live tensors); added_rss_mib_glibc: glibc's defaults (RSS keeps what the heap once held)."],
    )


def run(profile: str) -> BenchResult:
    return measure(SETTINGS[profile])
