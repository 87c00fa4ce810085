"""The Edit-GRPO objective of one trained denoising step, in one function.

VIVA (Edit-GRPO, eq. 5-6) and Flow-GRPO (Liu et al. 2025, eq. 8): a
PPO-style clipped surrogate on the per-step importance ratio plus a KL term to
the reference policy (the same network with the LoRA adapter disabled), with
GRPO-Guard's ratio normalisation (RatioNorm) as an option.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from editrl.policy.sde import gaussian_kl_same_std


@dataclass(frozen=True)
class ObjectiveStats:
    """What :func:`edit_grpo_objective` measured, detached; every ratio statistic is
    of the surrogate's ratio ``rho`` (see there)."""

    loss: float
    """``pg_loss + kl_coef * kl_ref`` (what is minimised)."""
    pg_loss: float
    """The clipped surrogate ``mean(max(-A rho, -A clip(rho, 1 - eps, 1 + eps)))`` (after reweighting)."""
    kl_ref: float
    """Exact ``KL(policy || reference)`` of the step's Gaussian transitions, element mean, sample mean (0 without reference)."""
    ratio_mean: float
    """Mean of ``rho`` over the samples."""
    ratio_min: float
    ratio_max: float
    clip_frac: float
    """Share of samples with ``|rho - 1| > eps``."""
    approx_kl: float
    """k2 estimator ``0.5 mean((log rho)^2)`` (Schulman 2020, "Approximating KL
    Divergence"; Flow-GRPO logs the same): without ratio normalisation an estimate of
    the KL between the behaviour and the current policy."""
    log_ratio: torch.Tensor
    """``(N,)`` fp32 CPU: the raw ``logp_theta - logp_old`` (the on-policy check reads it)."""

    @classmethod
    def pooled(cls, parts: list["ObjectiveStats"]) -> "ObjectiveStats":
        """The statistics of one step whose N samples were evaluated in parts (micro-batches):
        every mean weighted by its part's sample count (each is a mean over samples, so this
        is the whole step's mean), extremes over the parts, log-ratios concatenated.

        Raises:
            ValueError: no parts.
        """
        if not parts:
            raise ValueError("pooled needs at least one part")
        counts = [len(part.log_ratio) for part in parts]
        total = sum(counts)

        def mean(key: str) -> float:
            return sum(getattr(part, key) * n for part, n in zip(parts, counts)) / total

        return cls(
            loss=mean("loss"), pg_loss=mean("pg_loss"), kl_ref=mean("kl_ref"), ratio_mean=mean("ratio_mean"),
            ratio_min=min(part.ratio_min for part in parts), ratio_max=max(part.ratio_max for part in parts),
            clip_frac=mean("clip_frac"), approx_kl=mean("approx_kl"), log_ratio=torch.cat([part.log_ratio for part in parts]),
        )


def edit_grpo_objective(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mean: torch.Tensor,
    old_mean: torch.Tensor | None,
    ref_mean: torch.Tensor | None,
    std: float,
    dt: float,
    clip_range: float,
    kl_coef: float,
    ratio_norm: bool = False,
    reweight: bool = False,
) -> tuple[torch.Tensor, ObjectiveStats]:
    """Loss of one trained denoising step of N samples, and its statistics.

    With ``log r = logp_theta - logp_old`` (per-element-mean Gaussian log-probs,
    :func:`editrl.policy.sde.gaussian_log_prob`):

    * the surrogate's log-ratio is ``log rho = log r``, or with ``ratio_norm``
      GRPO-Guard's ``(log r + b) * std``, ``b = mean_elements((mean - old_mean)^2) / (2 std^2)``
      (:func:`grpo_guard_log_ratio`);
    * ``pg_loss = mean_i max(-A_i rho_i, -A_i clip(rho_i, 1 - eps, 1 + eps))``
      (VIVA eq. 5, Flow-GRPO eq. 8); with ``reweight`` (GRPO-Guard, only with
      ``ratio_norm``) divided by the step size ``-dt``;
    * ``kl_ref = mean_i mean_elements((mean - ref_mean)^2) / (2 std^2)``, the exact KL of
      two Gaussians with the same std (VIVA eq. 6; ``std`` includes ``sqrt(-dt)``);
    * ``loss = pg_loss + kl_coef * kl_ref``.

    Args:
        log_prob: ``(N,)`` fp32 log-probs of the recorded ``x_{t+1}`` under the current policy (with grad).
        old_log_prob: ``(N,)`` fp32 log-probs recorded at sampling time.
        advantages: ``(N,)`` fp32 group-relative advantages.
        mean: ``(N, ...)`` fp32 transition mean of the current policy (with grad).
        old_mean: ``(N, ...)`` the sampling policy's transition mean (needed with ``ratio_norm``).
        ref_mean: ``(N, ...)`` the reference policy's transition mean (no grad), or None
            when ``kl_coef`` is 0.
        std: the step's transition std (> 0).
        dt: ``sigma_{t+1} - sigma_t`` (< 0).
        clip_range: eps (Flow-GRPO Wan: 1e-3 for per-element-mean log-probs).
        kl_coef: beta.
        ratio_norm: use GRPO-Guard's normalised ratio.
        reweight: divide ``pg_loss`` by ``-dt`` (GRPO-Guard's per-step reweighting).

    Returns:
        ``(loss, stats)``: the scalar loss (with grad) and :class:`ObjectiveStats`.

    Raises:
        ValueError: ``std <= 0``, ``dt >= 0``, ``ratio_norm`` without ``old_mean``,
            ``reweight`` without ``ratio_norm``, or ``kl_coef > 0`` without ``ref_mean``.
    """
    if std <= 0 or dt >= 0:
        raise ValueError(f"need std > 0 and dt < 0, got std={std}, dt={dt}")
    if ratio_norm and old_mean is None:
        raise ValueError("ratio_norm needs the sampling policy's transition means (old_mean)")
    if reweight and not ratio_norm:
        raise ValueError("reweight is GRPO-Guard's and needs ratio_norm")
    if kl_coef > 0 and ref_mean is None:
        raise ValueError("kl_coef > 0 needs the reference policy's transition means (ref_mean)")

    log_r = log_prob - old_log_prob
    log_rho = grpo_guard_log_ratio(log_prob, old_log_prob, mean, old_mean, std) if ratio_norm else log_r
    rho = torch.exp(log_rho)
    clipped = torch.clamp(rho, 1.0 - clip_range, 1.0 + clip_range)
    pg_loss = torch.maximum(-advantages * rho, -advantages * clipped).mean()
    if reweight:
        pg_loss = pg_loss / -dt
    kl_ref = gaussian_kl_same_std(mean, ref_mean, std).mean() if ref_mean is not None else mean.new_zeros(())
    loss = pg_loss + kl_coef * kl_ref

    with torch.no_grad():
        rho_d, log_rho_d = rho.detach(), log_rho.detach()
        stats = ObjectiveStats(
            loss=loss.item(), pg_loss=pg_loss.item(), kl_ref=kl_ref.item(),
            ratio_mean=rho_d.mean().item(), ratio_min=rho_d.min().item(), ratio_max=rho_d.max().item(),
            clip_frac=((rho_d - 1.0).abs() > clip_range).float().mean().item(),
            approx_kl=(0.5 * log_rho_d**2).mean().item(),
            log_ratio=log_r.detach().float().cpu(),
        )
    return loss, stats


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
    :func:`editrl.policy.sde.gaussian_log_prob`; the clip range must be retuned for this
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
