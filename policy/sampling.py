"""Sampling groups of stochastic denoising trajectories with per-step log-probs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from policy.policy import EditPolicy
from policy.sde import StepOutput, flow_sde_step


@dataclass
class Trajectories:
    """G trajectories of one prompt; every tensor is fp32 on the CPU."""

    latents: torch.Tensor
    """``(G, T + 1, C, f, h, w)``: x at sigma_0 = 1 (noise) ... sigma_T = 0 (the edit)."""
    log_probs: torch.Tensor
    """``(G, T)``: log p(x_{t+1} | x_t) (mean over elements); NaN on deterministic steps."""
    sigmas: torch.Tensor
    """``(T + 1,)`` the schedule."""
    sde_mask: torch.Tensor
    """``(T,)`` bool: which steps were stochastic (and are trained)."""


def policy_step(
    policy: EditPolicy,
    x: torch.Tensor,
    sigma: float,
    sigma_next: float,
    source_latents: torch.Tensor,
    text_embeds: torch.Tensor,
    null_embeds: torch.Tensor,
    eta: float,
    guidance_scale: float,
    noise: torch.Tensor | None = None,
    x_next: torch.Tensor | None = None,
) -> StepOutput:
    """One guided Flow-SDE step of the policy; the one code path shared by rollout
    sampling and the learner's recomputation, so on-policy ratios are exactly 1.

    Shapes: every tensor ``(B, ...)`` with B the group's samples; see
    :func:`policy.sde.flow_sde_step` for ``noise``/``x_next``.
    """
    v = policy.velocity(x, sigma, source_latents, text_embeds, null_embeds, guidance_scale)
    return flow_sde_step(x, v, sigma, sigma_next, eta, noise=noise, x_next=x_next)


@torch.no_grad()
def sample_trajectories(
    policy: EditPolicy,
    source_latents: torch.Tensor,
    text_embeds: torch.Tensor,
    null_embeds: torch.Tensor,
    group_size: int,
    sigmas: list[float],
    sde_mask: list[bool],
    eta: float,
    guidance_scale: float,
    generator: torch.Generator,
) -> Trajectories:
    """Sample ``group_size`` trajectories for one (source, instruction) prompt.

    Args:
        source_latents: ``(1, C, f, h, w)``.
        text_embeds, null_embeds: ``(1, L, D)``.
        sigmas: T + 1 decreasing noise levels from 1 to 0.
        sde_mask: T flags; stochastic steps use ``eta``, the others the Euler step.
        eta: Flow-SDE noise scale (0 makes every step deterministic).
        generator: the group's generator: it draws the initial noise and every
            step's noise, so a group is reproducible from its seed.

    Returns:
        :class:`Trajectories`.
    """
    g = group_size
    device = source_latents.device
    source = source_latents.expand(g, *source_latents.shape[1:])
    text = text_embeds.expand(g, *text_embeds.shape[1:])
    null = null_embeds.expand(g, *null_embeds.shape[1:])
    x = torch.randn(source.shape, generator=generator, dtype=torch.float32).to(device)
    latents = [x.cpu()]
    log_probs = torch.full((g, len(sde_mask)), float("nan"))
    for t, stochastic in enumerate(sde_mask):
        step_eta = eta if stochastic else 0.0
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device) if step_eta > 0 else None
        out = policy_step(policy, x, sigmas[t], sigmas[t + 1], source, text, null, step_eta, guidance_scale, noise=noise)
        x = out.x_next
        latents.append(x.cpu())
        if out.log_prob is not None:
            log_probs[:, t] = out.log_prob.cpu()
    return Trajectories(
        latents=torch.stack(latents, dim=1),
        log_probs=log_probs,
        sigmas=torch.tensor(sigmas, dtype=torch.float32),
        sde_mask=torch.tensor(sde_mask, dtype=torch.bool),
    )
