"""Sampling groups of denoising trajectories with per-step log-probs, and the one
policy step that sampling and the learner's recomputation share."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from editrl.policy.policy import EditPolicy
from editrl.policy.samplers import sampler_step
from editrl.policy.sde import StepOutput, gaussian_transition
from editrl.protocol.rollout import SamplerSpec, trained_positions


@dataclass
class Trajectories:
    """G trajectories of one prompt; every tensor is fp32 on the CPU."""

    latents: torch.Tensor
    """``(G, K, C, f, h, w)``: x at the positions ``positions`` (position 0 at sigma_0 = 1, the
    noise, ... T at sigma_T = 0, the edit); all K = T + 1 when ``positions`` is None."""
    log_probs: torch.Tensor
    """``(G, T)``: log p(x_{t+1} | x_t) (mean over elements); NaN on deterministic steps."""
    spec: SamplerSpec
    """How they were sampled; its ``stochastic`` flags mark the steps that actually were."""
    means: torch.Tensor | None = None
    """``(G, T, C, f, h, w)`` transition means at sampling time, when asked for
    (GRPO-Guard's ratio normalisation needs them); None otherwise."""
    positions: tuple[int, ...] | None = None
    """The positions ``latents`` holds, increasing; None: all T + 1."""

    def latent(self, position: int) -> torch.Tensor:
        """``(G, C, f, h, w)``: the latents at ``position``.

        Raises:
            ValueError: the trajectories do not hold that position.
        """
        return self.latents[:, position if self.positions is None else self.positions.index(position)]


def policy_steps(
    policy: EditPolicy,
    spec: SamplerSpec,
    steps: list[int],
    xs: list[torch.Tensor],
    source_latents: torch.Tensor,
    text_embeds: torch.Tensor,
    null_embeds: torch.Tensor,
    noises: list[torch.Tensor | None] | None = None,
    x_nexts: list[torch.Tensor | None] | None = None,
    null_grad: bool = True,
    micro_batch: int | None = None,
) -> list[StepOutput]:
    """k guided steps of the policy (possibly at k different sigmas) in one batched
    forward; the one code path of rollout sampling (k = 1) and the learner's
    recomputation, so on-policy ratios are exactly 1 when the batch is the same.

    Args:
        spec: the sampler (rule, eta, CFG scale, schedule, stochastic steps); step
            ``t`` runs ``spec.rule(t)`` from ``spec.sigmas[t]`` to ``spec.sigmas[t + 1]``.
        steps: the k step indices.
        xs: k latents ``(B, C, f, h, w)`` fp32 (the same B for all).
        source_latents, text_embeds, null_embeds: ``(B, ...)`` conditioning, shared by the k steps.
        noises: k standard-normal tensors (or None) to sample stochastic steps.
        x_nexts: k recorded next latents (or None) to score instead of sampling.
        null_grad: gradients through the CFG null branch (:meth:`EditPolicy.velocity`).
        micro_batch: most rows (samples x CFG branches) per transformer forward
            (:meth:`EditPolicy.velocity`); None: all in one.

    Returns:
        k :class:`editrl.policy.sde.StepOutput`, in order.

    Raises:
        ValueError: mismatched list lengths, or a step's own errors.
    """
    k = len(xs)
    noises = noises if noises is not None else [None] * k
    x_nexts = x_nexts if x_nexts is not None else [None] * k
    if not k or len(steps) != k or len(noises) != k or len(x_nexts) != k:
        raise ValueError("steps, xs, noises and x_nexts need the same non-zero length")
    batch = xs[0].shape[0]
    if k == 1:
        sigma = spec.sigmas[steps[0]]
        x = xs[0]
        source, text, null = source_latents, text_embeds, null_embeds
    else:
        sigma = torch.tensor([spec.sigmas[t] for t in steps], dtype=torch.float32).repeat_interleave(batch)
        x = torch.cat(xs, dim=0)
        source, text, null = (t.repeat(k, *([1] * (t.ndim - 1))) for t in (source_latents, text_embeds, null_embeds))
    v = policy.velocity(x, sigma, source, text, null, spec.guidance_scale, null_grad=null_grad, micro_batch=micro_batch)
    outs = []
    for t, x_i, v_i, n, xn in zip(steps, xs, v.split(batch, dim=0), noises, x_nexts):
        sampler, eta = spec.rule(t)
        outs.append(sampler_step(sampler, x_i, v_i, spec.sigmas[t], spec.sigmas[t + 1], eta, noise=n, x_next=xn,
                                 noise_range=spec.noise_range))
    return outs


def policy_step(
    policy: EditPolicy,
    spec: SamplerSpec,
    t: int,
    x: torch.Tensor,
    source_latents: torch.Tensor,
    text_embeds: torch.Tensor,
    null_embeds: torch.Tensor,
    noise: torch.Tensor | None = None,
    x_next: torch.Tensor | None = None,
    micro_batch: int | None = None,
) -> StepOutput:
    """Step ``t`` of the policy: :func:`policy_steps` with k = 1.

    Shapes: every tensor ``(B, ...)`` with B the group's samples; see
    :func:`editrl.policy.samplers.sampler_step` for ``noise``/``x_next``.
    """
    return policy_steps(policy, spec, [t], [x], source_latents, text_embeds, null_embeds, [noise], [x_next],
                        micro_batch=micro_batch)[0]


def _step_noise(shape: tuple[int, ...], generator: torch.Generator, antithetic: bool) -> torch.Tensor:
    """Standard normal noise of ``shape`` (G first); with ``antithetic`` the second
    half of the group is the negated first half."""
    if not antithetic:
        return torch.randn(shape, generator=generator, dtype=torch.float32)
    half = torch.randn((shape[0] // 2, *shape[1:]), generator=generator, dtype=torch.float32)
    return torch.cat([half, -half])


def _expand(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.expand(n, *t.shape[1:])


@torch.no_grad()
def sample_trajectories(
    policy: EditPolicy,
    source_latents: torch.Tensor,
    text_embeds: torch.Tensor,
    null_embeds: torch.Tensor,
    group_size: int,
    spec: SamplerSpec,
    generator: torch.Generator,
    *,
    shared_initial_noise: bool = False,
    antithetic: bool = False,
    record_means: bool = False,
    trajectory_dtype: torch.dtype = torch.float32,
    micro_batch: int | None = None,
    keep: tuple[int, ...] | None = None,
) -> Trajectories:
    """Sample ``group_size`` trajectories for one (source, instruction) prompt.

    Args:
        source_latents: ``(1, C, f, h, w)`` fp32.
        text_embeds, null_embeds: ``(1, L, D)``.
        spec: the sampler: its rule on the steps it marks stochastic, Euler steps elsewhere.
        generator: the group's generator: it draws the initial noise and every
            step's noise, so a group is reproducible from its seed.
        shared_initial_noise: every sample of the group starts from the same
            initial noise; the ODE steps before the first stochastic step are then
            identical for the group and computed once (batch 1), and the samples
            branch at the SDE window (Flow-GRPO-Fast). False draws one initial
            noise per sample.
        antithetic: samples ``i`` and ``i + G/2`` get opposite noises at every
            stochastic step (``group_size`` must be even).
        record_means: also return each step's transition mean.
        trajectory_dtype: the dtype the latents are stored in (``rollout.trajectory_dtype``).
            Every latent the learner reads (:func:`editrl.protocol.rollout.trained_positions`
            of the stochastic steps) is rounded to it *before* it is used: the sampled
            ``x_{t+1}`` is rounded, its log-prob is that of the rounded value, and step
            ``t + 1`` starts from it; so the learner, scoring the stored latents, finds the
            same log-probs (on-policy ratio exactly 1) in any storage dtype.
        micro_batch: most rows (samples x CFG branches) per transformer forward; None: all.
        keep: the latent positions to return (a rollout worker keeps the trained positions and
            the edit's, T: while it samples, host memory holds those, not all T + 1); None: all.

    The LoRA adapter acts only on the steps where ``policy.config.adapter_acts_at``
    says so (``lora.active_steps``); the other steps run the base model.

    Returns:
        :class:`Trajectories`; its spec marks the steps that were actually
        stochastic (a requested step whose std is 0, such as CPS's last step,
        is deterministic and not trained). ``latents`` are fp32 holding values of
        ``trajectory_dtype`` at the trained positions.

    Raises:
        ValueError: a stochastic step at which the adapter does not act (it could
            not be trained), or ``antithetic`` with an odd group size.
    """
    if antithetic and group_size % 2:
        raise ValueError(f"antithetic sampling needs an even group size, got {group_size}")
    g = group_size
    device = source_latents.device
    stochastic = list(spec.stochastic)
    inactive = [t for t, s in enumerate(stochastic) if s and not policy.config.adapter_acts_at(t)]
    if inactive:
        raise ValueError(
            f"steps {inactive} are stochastic but the adapter does not act there "
            f"(lora.active_steps={policy.config.lora.active_steps}); they could not be trained"
        )
    stored = set(trained_positions(stochastic))

    def rounded(position: int, x: torch.Tensor) -> torch.Tensor:
        return x.to(trajectory_dtype).float() if position in stored and trajectory_dtype != torch.float32 else x

    shape = (g, *source_latents.shape[1:])
    if shared_initial_noise:
        x = torch.randn((1, *shape[1:]), generator=generator, dtype=torch.float32).to(device)
        branch = stochastic.index(True) if any(stochastic) else len(stochastic)
    else:
        x = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
        branch = 0
    x = rounded(0, x)
    kept = set(range(len(stochastic) + 1) if keep is None else keep)
    latents = [_expand(x, g).cpu()] if 0 in kept else []
    log_probs = torch.full((g, len(stochastic)), float("nan"))
    means = [] if record_means else None
    taken = []
    adapter_on = True
    with contextlib.ExitStack() as adapter_off:  # the adapter acts on a prefix of the steps: switched off once
        for t, is_stochastic in enumerate(stochastic):
            if t == branch and x.shape[0] != g:
                x = _expand(x, g).contiguous()
            if adapter_on and not policy.config.adapter_acts_at(t):
                adapter_off.enter_context(policy.adapter_disabled())
                adapter_on = False
            n = x.shape[0]
            noise = _step_noise(shape, generator, antithetic).to(device) if is_stochastic else None
            out = policy_step(policy, spec, t, x, _expand(source_latents, n), _expand(text_embeds, n), _expand(null_embeds, n),
                              noise=noise, micro_batch=micro_batch)
            x = rounded(t + 1, out.x_next)
            if out.log_prob is not None and x is not out.x_next:  # the log-prob of what is stored
                out = gaussian_transition(out.mean, out.std, x_next=x)
            if t + 1 in kept:
                latents.append(_expand(x, g).cpu())
            if means is not None:
                means.append(_expand(out.mean, g).cpu())
            taken.append(out.log_prob is not None)
            if out.log_prob is not None:
                log_probs[:, t] = out.log_prob.cpu()
    return Trajectories(
        latents=torch.stack(latents, dim=1),
        log_probs=log_probs,
        spec=spec.with_stochastic(taken),
        means=torch.stack(means, dim=1) if means is not None else None,
        positions=None if keep is None else tuple(sorted(kept)),
    )
