"""Item 2: rollout sampling with log-probs vs diffusers' own ``WanPipeline``.

Both run the same network (the policy's ``WanTransformer3DModel`` object with its
LoRA adapter attached and non-zero, acting on every step as the pipeline applies
it, whatever ``lora.active_steps`` the run uses), the same FlowMatchEuler sigmas, number of
steps, CFG scale, initial noise and prompt embeddings, and stop at the final
latent (``output_type="latent"``): only denoising is compared. Variants:

* ``diffusers_wan_pipeline``: ``WanPipeline.__call__`` (conditional and
  unconditional branches as two forwards per step, Euler steps);
* ``ode``: :func:`editrl.policy.sampling.sample_trajectories` with every step
  deterministic (what held-out evaluation runs);
* ``sde_logprob``: the same function as rollouts call it: the configured
  stochastic sampler on the trained steps, drawing noise from the group's
  generator, recording every latent on the CPU and each step's log-prob.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

from bench.harness import interleaved, paired_ratio, probe_memory
from bench.results import BenchResult, Measurement, Stats, Target
from bench.workload import conditioning, corpus, count_parameters, latent_shape, perturb_adapter, policy_config
from editrl.policy.policy import EditPolicy
from editrl.policy.sampling import Trajectories, sample_trajectories

NAME = "sampling_overhead"
ITEM = 2
TITLE = "Sampling overhead: rollout sampling with log-probs vs diffusers' WanPipeline"
VARIANTS = ("diffusers_wan_pipeline", "ode", "sde_logprob")
TARGET_RATIO = 1.05


@dataclass(frozen=True)
class Settings:
    """Workload of this benchmark (the model and video size come from the profile)."""

    profile: str
    group_size: int
    """G trajectories sampled together (one batch)."""
    repeats: int
    warmup: int
    seed: int = 0
    torch_threads: int = 1
    """CPU threads torch may use (rollout workers use 1)."""
    device: str = "cpu"
    memory_probe: bool = True
    """Measure the peak RSS of the pipeline and of sampling with log-probs, each in a fresh
    process (the ODE variant stores the same latents as the latter)."""


SETTINGS = {
    "cpu": Settings("cpu", group_size=4, repeats=12, warmup=1),
    "smoke": Settings("smoke", group_size=2, repeats=2, warmup=1, memory_probe=False),
    "gpu": Settings("gpu", group_size=4, repeats=5, warmup=1, device="cuda", memory_probe=False),
}


class Setup:
    """The policy, a WanPipeline on the same modules, the conditioning and the initial noise."""

    def __init__(self, settings: Settings) -> None:
        torch.set_num_threads(settings.torch_threads)
        self.settings = settings
        config = policy_config(settings.profile, kind="t2v")
        # diffusers' pipeline applies a loaded adapter on every step, so ours does here too
        self.config = config.model_copy(update={"lora": config.lora.model_copy(update={"active_steps": None})})
        self.policy = EditPolicy.from_config(self.config, list(corpus()), device=settings.device, seed=settings.seed)
        perturb_adapter(self.policy, settings.seed)
        self.source, self.text, self.null = conditioning(self.policy, 0, settings.seed)
        self.sigmas = self.policy.sigmas()
        self.pipe = WanPipeline(
            tokenizer=self.policy.tokenizer, text_encoder=self.policy.text_encoder, vae=self.policy.vae,
            transformer=self.policy.transformer,
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.policy.scheduler.config),
        )
        self.pipe.set_progress_bar_config(disable=True)
        # the first draw of the group's generator, exactly as sample_trajectories makes it
        shape = (settings.group_size, *latent_shape(self.config))
        self.initial_noise = torch.randn(shape, generator=self._generator(), dtype=torch.float32).to(settings.device)

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.settings.seed)

    def ours(self, stochastic: bool) -> Trajectories:
        """Sample the group with the project's sampler (log-probs on the trained steps when stochastic)."""
        spec = self.policy.sampler_spec(seed=self.settings.seed, deterministic=not stochastic)
        return sample_trajectories(self.policy, self.source, self.text, self.null, self.settings.group_size, spec, self._generator())

    def diffusers(self) -> torch.Tensor:
        """The final latents ``(G, C, f, h, w)`` from diffusers' pipeline."""
        c = self.config
        return self.pipe(
            prompt_embeds=self.text, negative_prompt_embeds=self.null, height=c.height, width=c.width,
            num_frames=c.num_frames, num_inference_steps=c.num_steps, guidance_scale=c.guidance_scale,
            num_videos_per_prompt=self.settings.group_size, latents=self.initial_noise.clone(), output_type="latent",
            max_sequence_length=c.max_text_tokens,
        ).frames

    def variants(self) -> dict[str, Callable[[], object]]:
        return {"diffusers_wan_pipeline": self.diffusers, "ode": lambda: self.ours(False), "sde_logprob": lambda: self.ours(True)}


def memory_variants(settings: dict) -> dict[str, Callable[[], object]]:
    """For :mod:`bench.memprobe`: the variants, set up in this process."""
    return Setup(Settings(**settings)).variants()


def measure(settings: Settings) -> BenchResult:
    """Check that the variants do the same work, time them interleaved, and compare."""
    setup = Setup(settings)
    c = setup.config
    reference = setup.diffusers().float().cpu()
    ode, sde = setup.ours(False), setup.ours(True)
    same_output = float((ode.latents[:, -1] - reference).abs().max())
    sync = torch.cuda.synchronize if settings.device.startswith("cuda") else None
    times = interleaved(setup.variants(), settings.repeats, settings.warmup, sync=sync)
    memory = probe_memory(NAME, ["diffusers_wan_pipeline", "sde_logprob"], dataclasses.asdict(settings)) if settings.memory_probe else {}
    measurements = []
    for name in VARIANTS:
        stats = Stats.of(times[name]).scaled(1e3)
        metrics = {"time_ms": stats, "per_step_ms": stats.median / c.num_steps}
        metrics.update({k: v for k, v in memory.get(name, {}).items() if k in ("variant_peak_rss_mib", "variant_added_rss_mib", "gpu_peak_mib")})
        measurements.append(Measurement(name=name, metrics=metrics))
    ratios = [
        paired_ratio("sde_logprob / diffusers", "sde_logprob", "diffusers_wan_pipeline", times,
                     "rollout sampling with log-probs over diffusers' pipeline"),
        paired_ratio("ode / diffusers", "ode", "diffusers_wan_pipeline", times, "deterministic sampling over diffusers' pipeline"),
    ]
    value = ratios[0].stats.median
    targets = [Target.check(
        "sampling_overhead", "rollout sampling with log-probs at most 5% slower than diffusers' WanPipeline (time ratio)",
        value, "<=", TARGET_RATIO, note=f"median of {settings.repeats} paired ratios, IQR {ratios[0].stats.q1:.3f}-{ratios[0].stats.q3:.3f}",
    )]
    return BenchResult(
        name=NAME, item=ITEM, title=TITLE, profile=settings.profile, status="measured",
        settings={**dataclasses.asdict(settings), "latent_shape": [settings.group_size, *latent_shape(c)],
                  "num_steps": c.num_steps, "guidance_scale": c.guidance_scale, "sampler": c.sampler, "eta": c.eta,
                  "trained_steps": sum(sde.spec.stochastic), "dtype": c.dtype, "lora_rank": c.lora.rank,
                  "dit_parameters": count_parameters(setup.policy.transformer, lora=False)},
        measurements=measurements, ratios=ratios, targets=targets,
        notes=[
            f"Same work: the ODE variant's final latents equal the pipeline's within {same_output:.1e} (max abs).",
            "The pipeline runs the conditional and unconditional branches as two forwards per step; the project's "
            "sampler runs them as one forward of batch 2G, draws the step noise, keeps all T+1 latents on the CPU "
            "and computes log-probs.",
            "Memory: each variant once in a fresh process; variant_added_rss_mib is the highest RSS while it ran minus the RSS after setup.",
        ],
    )


def run(profile: str) -> BenchResult:
    return measure(SETTINGS[profile])
