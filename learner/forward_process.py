"""The learner's side of the forward-process algorithms (DiffusionNFT, AWM): what a group is
trained on and how its gradient is accumulated.

A group carries each sample's final latent ``x0`` (position T of its trajectory, whatever
sampler made it) and its conditioning. For one update, every sample gets K fresh noisy
copies ``x_sigma = (1 - sigma) x0 + sigma eps`` at K distinct noise levels drawn from the
group's own schedule, among the steps the LoRA adapter acts on (the adapter is trained
where it is used). The policy's guided velocity at those inputs (the group's CFG scale,
as it sampled) enters the algorithm's loss (:mod:`editrl.learner.forward_loss`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from editrl.learner.config import LearnerConfig
from editrl.learner.forward_loss import ForwardStats, awm_objective, diffusion_nft_objective, nft_optimality
from editrl.learner.work import WorkItem
from editrl.policy.policy import EditPolicy
from editrl.protocol.rollout import Group


@dataclass
class ForwardDraws:
    """One group's noisy copies for one update; CPU fp32."""

    sigmas: torch.Tensor
    """``(G, K)``: the noise level of each copy (distinct per sample)."""
    noise: torch.Tensor
    """``(G, K, C, f, h, w)``: the eps of each copy."""
    old_velocity: torch.Tensor | None = None
    """``(G, K, C, f, h, w)``: the policy's velocity before the update's first optimizer step, when
    the update has several minibatches (with one it is the current velocity, detached)."""


def acting_steps(policy: EditPolicy) -> list[int]:
    """The denoising steps the LoRA adapter acts on (``policy.lora.active_steps``; all without it)."""
    return [t for t in range(policy.config.num_steps) if policy.config.adapter_acts_at(t)]


def draw(group: Group, steps: list[int], k: int | None, generator: torch.Generator) -> ForwardDraws:
    """K noise levels per sample (``spec.sigmas[t]`` of K distinct ``steps``, uniformly without
    replacement) and their noise.

    Args:
        group: a group holding its final latent.
        steps: the eligible steps (:func:`acting_steps`).
        k: copies per sample; None: all of ``steps``.
        generator: the learner's generator (the draws are reproducible from its seed).

    Raises:
        ValueError: ``k`` larger than ``len(steps)``.
        KeyError: the group does not hold its final latent.
    """
    k = len(steps) if k is None else k
    if not 1 <= k <= len(steps):
        raise ValueError(f"{k} noise levels per sample out of {len(steps)} eligible steps")
    x0 = group.latent(group.sampler.num_steps)
    g = x0.shape[0]
    picks = torch.stack([torch.randperm(len(steps), generator=generator)[:k] for _ in range(g)])
    sigmas = torch.tensor([group.sampler.sigmas[t] for t in steps], dtype=torch.float32)[picks]
    noise = torch.randn((g, k, *x0.shape[1:]), generator=generator)
    return ForwardDraws(sigmas=sigmas, noise=noise)


def forward_items(groups: list[Group], micro_batch_samples: int | None) -> list[WorkItem]:
    """One item per group and slice of ``micro_batch_samples`` samples (None: the whole group),
    weighted by its share of the group."""
    items = []
    for index, group in enumerate(groups):
        g = group.rewards.numel()
        micro = micro_batch_samples or g
        for start in range(0, g, micro):
            stop = min(start + micro, g)
            items.append(WorkItem(index, (), (start, stop), (stop - start) / g))
    return items


def _inputs(policy: EditPolicy, group: Group, draws: ForwardDraws, rows: slice):
    """The item's K x rows noisy copies (sample-major), their sigmas and targets, and the
    conditioning expanded to them, on the policy's device."""
    device = policy.device
    x0 = group.latent(group.sampler.num_steps)[rows]
    noise, sigmas = draws.noise[rows], draws.sigmas[rows]
    n, k = sigmas.shape
    x0 = x0.unsqueeze(1).expand_as(noise)
    sigma = sigmas.view(n, k, *([1] * (noise.ndim - 2)))
    x = ((1.0 - sigma) * x0 + sigma * noise).flatten(0, 1).to(device)
    target = (noise - x0).flatten(0, 1).to(device)
    cond = [t.to(device).expand(n * k, *t.shape[1:]) for t in (group.source_latents, group.text_embeds, group.null_embeds)]
    return x, sigmas.flatten().to(device), target, cond


def _velocity(policy: EditPolicy, group: Group, x, sigma, cond, null_grad: bool) -> torch.Tensor:
    return policy.velocity(x, sigma, *cond, group.sampler.guidance_scale, null_grad=null_grad)


@torch.no_grad()
def record_old_velocities(policy: EditPolicy, groups: list[Group], draws: list[ForwardDraws],
                          micro_batch_samples: int | None) -> None:
    """Fill each draw's ``old_velocity`` with the policy's velocity now (before any optimizer step)."""
    for item in forward_items(groups, micro_batch_samples):
        group, group_draws = groups[item.group], draws[item.group]
        rows = slice(*item.rows)
        x, sigma, _, cond = _inputs(policy, group, group_draws, rows)
        v = _velocity(policy, group, x, sigma, cond, True).float().cpu()
        if group_draws.old_velocity is None:
            group_draws.old_velocity = torch.empty_like(group_draws.noise)
        group_draws.old_velocity[rows] = v.view_as(group_draws.noise[rows])


def run_forward_items(policy: EditPolicy, config: LearnerConfig, groups: list[Group], advantages: torch.Tensor,
                      draws: list[ForwardDraws], items: list[WorkItem]) -> list[ForwardStats]:
    """Forward and backward of each item: the algorithm's loss (``config.algorithm``) over the
    item's copies, times its share of its group, over the number of groups, so the items'
    gradients add up to the gradient of the mean over groups of each group's mean loss.

    Args:
        advantages: ``(len(groups), G)`` fp32 group-relative advantages.
        draws: one :class:`ForwardDraws` per group.
        items: :func:`forward_items` (or a data-parallel rank's share of them).

    Returns:
        Each item's :class:`editrl.learner.forward_loss.ForwardStats`.
    """
    stats = []
    for item in items:
        group, group_draws = groups[item.group], draws[item.group]
        rows = slice(*item.rows)
        x, sigma, target, cond = _inputs(policy, group, group_draws, rows)
        k = group_draws.sigmas.shape[1]
        v = _velocity(policy, group, x, sigma, cond, config.cfg_null_grad).float()
        ref = None
        if config.kl_coef > 0:
            with torch.no_grad(), policy.adapter_disabled():
                ref = _velocity(policy, group, x, sigma, cond, True).float()
        adv = advantages[item.group, rows].repeat_interleave(k).to(v.device)
        if config.algorithm == "diffusion_nft":
            old = v.detach() if group_draws.old_velocity is None else group_draws.old_velocity[rows].flatten(0, 1).to(v.device)
            loss, term = diffusion_nft_objective(v, old, ref, target, sigma, nft_optimality(adv, config.nft_reward_scale),
                                                 config.nft_beta, config.nft_reward_scale, config.kl_coef,
                                                 config.nft_adaptive_weighting)
        elif config.algorithm == "awm":
            loss, term = awm_objective(v, ref, target, sigma, adv / config.awm_advantage_scale, config.kl_coef,
                                       config.awm_weighting, config.awm_ghuber_power)
        else:
            raise ValueError(f"{config.algorithm!r} is not a forward-process algorithm")
        (loss * (item.share / len(groups))).backward()
        stats.append(term)
    return stats
