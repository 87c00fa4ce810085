"""The clipped importance-ratio objective of Edit-GRPO (VIVA eq. 5-6, Flow-GRPO
eq. 8), written per trained denoising step."""
from __future__ import annotations

import torch


def clipped_policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-style clipped surrogate for one denoising step.

    ``ratio = exp(logp_theta - logp_old)``;
    ``pg_loss = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))``.

    Args:
        log_prob: ``(N,)`` fp32 log-probs under the current policy (with grad).
        old_log_prob: ``(N,)`` fp32 log-probs recorded at sampling time.
        advantages: ``(N,)`` fp32.
        clip_range: eps (Flow-GRPO Wan: 1e-3).

    Returns:
        ``(pg_loss, stats)``; stats (detached scalars): ``ratio_mean``,
        ``clip_frac`` (share of samples with |ratio - 1| > eps) and ``approx_kl``
        (``0.5 * mean((logp - logp_old)^2)``, as in Flow-GRPO and cleanrl).
    """
    log_ratio = log_prob - old_log_prob
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
