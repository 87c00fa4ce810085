"""The clipped importance-ratio objective of Edit-GRPO (VIVA eq. 5-6, Flow-GRPO
eq. 8), written per trained denoising step, and GRPO-Guard's ratio normalisation."""
from __future__ import annotations

import torch


def clipped_ratio_loss(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-style clipped surrogate from log importance ratios.

    ``ratio = exp(log_ratio)``;
    ``pg_loss = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))``.

    Args:
        log_ratio: ``(N,)`` fp32 ``logp_theta - logp_old`` (with grad), or a
            normalised log-ratio (:func:`grpo_guard_log_ratio`).
        advantages: ``(N,)`` fp32.
        clip_range: eps (Flow-GRPO Wan: 1e-3).

    Returns:
        ``(pg_loss, stats)``; stats (detached scalars): ``ratio_mean``,
        ``clip_frac`` (share of samples with |ratio - 1| > eps) and ``approx_kl``
        (``0.5 * mean(log_ratio^2)``, as in Flow-GRPO and cleanrl).
    """
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    pg_loss = torch.maximum(pg_loss1, pg_loss2).mean()
    with torch.no_grad():
        stats = {
            "ratio_mean": ratio.mean(),
            "clip_frac": ((ratio - 1.0).abs() > clip_range).float().mean(),
            "approx_kl": 0.5 * (log_ratio**2).mean(),
        }
    return pg_loss, stats


def clipped_policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`clipped_ratio_loss` of ``log_prob - old_log_prob``.

    Args:
        log_prob: ``(N,)`` fp32 log-probs under the current policy (with grad).
        old_log_prob: ``(N,)`` fp32 log-probs recorded at sampling time.
        advantages: ``(N,)`` fp32.
        clip_range: eps (Flow-GRPO Wan: 1e-3).
    """
    return clipped_ratio_loss(log_prob - old_log_prob, advantages, clip_range)


def grpo_guard_log_ratio(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    mean: torch.Tensor,
    old_mean: torch.Tensor,
    std: float,
) -> torch.Tensor:
    """GRPO-Guard's normalised log-ratio (RatioNorm) of one denoising step.

    With ``x = mean_old + std * eps`` the per-element log-ratio is
    ``(mean - mean_old) * eps / std - (mean - mean_old)^2 / (2 std^2)``: its mean
    is negative (the ratio sits below 1) and its spread grows as ``1 / std``, so
    low-noise steps dominate clipping. RatioNorm adds back the bias and rescales
    by the step's std:

    ``log_ratio_norm = (logp - logp_old + b) * std``,
    ``b = mean_elements((mean - mean_old)^2) / (2 std^2)``,

    i.e. ``mean_elements((mean - mean_old) * eps)``: centred at 0 and on one
    scale for every step. ``b`` keeps its gradient. Source: Wang et al. 2025,
    "GRPO-Guard: Mitigating Implicit Over-Optimization in Flow Matching via
    Regulated Clipping" (arXiv 2510.22319), RatioNorm; the formula as in the
    public ``grpo_guard`` loss of verl-omni. Log-probs are element means, as
    :func:`policy.sde.gaussian_log_prob`; the clip range must be retuned for this
    scale.

    Args:
        log_prob, old_log_prob: ``(N,)`` fp32 per-element-mean log-probs.
        mean, old_mean: ``(N, ...)`` fp32 transition means of the current policy
            (with grad) and of the sampling policy.
        std: the step's transition std (> 0).

    Returns:
        ``(N,)`` fp32.

    Raises:
        ValueError: ``std <= 0``.
    """
    if std <= 0:
        raise ValueError(f"std must be positive, got {std}")
    bias = ((mean - old_mean) ** 2).flatten(1).mean(dim=1) / (2.0 * std**2)
    return (log_prob - old_log_prob + bias) * std
