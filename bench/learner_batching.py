"""Item 5: batched-timestep training vs the per-timestep loop.

``Learner.train_step`` on groups of the default run (2 groups x 4 samples, 9
trained steps each, KL to the reference on; the default step has 4 groups) with ``timesteps_per_forward`` = 1
(one forward and backward per trained step, the sampling batch) and k > 1 (k
steps stacked into one forward of batch ``2 k G`` with CFG). Every variant starts
from the same adapter and optimizer state (restored, untimed, before each call).

Equality: from the same state, each k's loss terms and LoRA gradients
(``Learner.accumulate_gradients``) are compared with k = 1's; the largest
absolute differences are reported.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench.harness import interleaved, paired_ratio, probe_memory
from bench.results import BenchResult, Measurement, Stats, Target
from bench.workload import corpus, default_train_config, perturb_adapter, policy_config, sample_groups
from editrl.learner.learner import Learner
from editrl.policy.policy import EditPolicy

NAME = "learner_batching"
ITEM = 5
TITLE = "Learner: batched timesteps vs the per-timestep loop"


@dataclass(frozen=True)
class Settings:
    profile: str
    ks: tuple[int, ...]
    """timesteps_per_forward values; the first must be 1 (the reference)."""
    num_groups: int
    group_size: int
    repeats: int
    warmup: int
    seed: int = 0
    torch_threads: int = 1
    """CPU threads of torch. 1, as the rollout workers use: on a machine whose 2 cores are shared
    with other processes, more threads spin against each other and the timings become noise."""
    device: str = "cpu"
    memory_probe: bool = True
    """Peak RSS of the smallest and the largest k, each in a fresh process."""


SETTINGS = {
    "cpu": Settings("cpu", ks=(1, 3, 9), num_groups=2, group_size=4, repeats=3, warmup=1),
    "smoke": Settings("smoke", ks=(1, 3), num_groups=1, group_size=2, repeats=2, warmup=1, torch_threads=1, memory_probe=False),
    "gpu": Settings("gpu", ks=(1, 2), num_groups=2, group_size=4, repeats=3, warmup=1, device="cuda", memory_probe=False),
}


class Setup:
    """One policy, groups sampled from it, then an adapter moved off the sampling one
    (off-policy ratios, a non-zero KL: every term has a gradient), one learner per k."""

    def __init__(self, settings: Settings) -> None:
        torch.set_num_threads(settings.torch_threads)
        self.settings = settings
        self.policy = EditPolicy.from_config(policy_config(settings.profile), list(corpus()), device=settings.device, seed=settings.seed)
        self.groups = sample_groups(self.policy, settings.num_groups, settings.group_size, settings.seed)
        for group in self.groups:
            group.policy_version = -1  # sampled before the adapter moved: stale, as the on-policy check should know
        perturb_adapter(self.policy, settings.seed)
        base = default_train_config().learner
        self.learners = {k: Learner(self.policy, base.model_copy(update={"timesteps_per_forward": k}), seed=settings.seed)
                         for k in settings.ks}
        self.params = self.learners[settings.ks[0]].params
        self.snapshot = [p.detach().clone() for p in self.params]
        self.optimizer_states = {k: learner.optimizer.state_dict() for k, learner in self.learners.items()}

    def restore(self, k: int) -> None:
        """Adapter, optimizer state and policy version back to the start (untimed)."""
        with torch.no_grad():
            for param, saved in zip(self.params, self.snapshot):
                param.copy_(saved)
        learner = self.learners[k]
        learner.optimizer.load_state_dict(self.optimizer_states[k])
        learner.policy_version = 0
        learner.generator.manual_seed(self.settings.seed)

    def variants(self) -> dict[str, Callable[[], object]]:
        return {f"k={k}": (lambda k=k: self.learners[k].train_step(self.groups)) for k in self.settings.ks}

    def gradients(self, k: int) -> tuple[dict[str, float], list[torch.Tensor]]:
        """Loss sums and LoRA gradients of one accumulation from the start state."""
        self.restore(k)
        learner = self.learners[k]
        learner.optimizer.zero_grad(set_to_none=True)
        advantages = torch.linspace(-1.5, 1.5, self.settings.num_groups * self.settings.group_size).view(self.settings.num_groups, -1)
        stats = learner.accumulate_gradients(self.groups, advantages)
        return dict(stats.sums), [p.grad.detach().clone() for p in self.params]


def memory_variants(settings: dict) -> dict[str, Callable[[], object]]:
    """For :mod:`bench.memprobe`."""
    setup = Setup(Settings(**{**settings, "ks": tuple(settings["ks"])}))
    return setup.variants()


def measure(settings: Settings) -> BenchResult:
    if settings.ks[0] != 1:
        raise ValueError("the first k must be 1, the per-timestep reference")
    setup = Setup(settings)
    reference_sums, reference_grads = setup.gradients(1)
    grad_scale = max(float(g.abs().max()) for g in reference_grads)
    equality = {}
    for k in settings.ks[1:]:
        sums, grads = setup.gradients(k)
        equality[k] = {
            "max_abs_loss_diff": max(abs(sums[key] - reference_sums[key]) for key in ("pg_loss", "kl_ref")),
            "max_abs_grad_diff": max(float((a - b).abs().max()) for a, b in zip(grads, reference_grads)),
        }
    sync = torch.cuda.synchronize if settings.device.startswith("cuda") else None
    names = list(setup.variants())
    times = interleaved(setup.variants(), settings.repeats, settings.warmup,
                        before={f"k={k}": (lambda k=k: setup.restore(k)) for k in settings.ks}, sync=sync)
    memory = probe_memory(NAME, [names[0], names[-1]], dataclasses.asdict(settings)) if settings.memory_probe else {}
    measurements = []
    for k, name in zip(settings.ks, names):
        metrics = {"train_step_s": Stats.of(times[name])}
        metrics.update(equality.get(k, {}))
        metrics.update({key: v for key, v in memory.get(name, {}).items()
                        if key in ("variant_peak_rss_mib", "variant_added_rss_mib", "gpu_peak_mib")})
        measurements.append(Measurement(name=name, params={"timesteps_per_forward": k}, metrics=metrics))
    ratios = [paired_ratio(f"{name} / k=1", name, "k=1", times, "train_step time over the per-timestep loop")
              for name in names[1:]]
    worst = max((e["max_abs_grad_diff"] for e in equality.values()), default=0.0)
    targets = [Target.check(
        "learner_equal_gradients", "batched timesteps give the per-step loop's gradients (max abs difference / max abs gradient)",
        worst / grad_scale if grad_scale else 0.0, "<=", 1e-4, note=f"largest gradient entry {grad_scale:.3e}",
    )]
    trained = int(sum(int(g.sde_mask.sum()) for g in setup.groups))
    return BenchResult(
        name=NAME, item=ITEM, title=TITLE, profile=settings.profile, status="measured",
        settings={**dataclasses.asdict(settings), "trained_terms": trained, "kl_coef": setup.learners[1].config.kl_coef,
                  "num_steps": setup.policy.config.num_steps, "dtype": setup.policy.config.dtype},
        measurements=measurements, ratios=ratios, targets=targets,
        notes=[
            "A ratio below 1 means batched timesteps are faster.",
            f"Loss and gradient differences are between one gradient accumulation with k and with k = 1 from the same "
            f"adapter; float32 rounding only (the batched forward sums in another order).",
            "The target row is the equality check; the issue asks for the speed ratio to be reported, with no target.",
        ],
    )


def run(profile: str) -> BenchResult:
    return measure(SETTINGS[profile])
