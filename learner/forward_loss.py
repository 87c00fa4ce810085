"""The forward-process objectives: DiffusionNFT and Advantage Weighted Matching, each in one function.

Both train on freshly noised copies of a sample's clean latent instead of its
denoising trajectory (no log-probs, any sampler). In the project's time convention
(``sigma = 1`` is noise, ``0`` data; ``docs/algorithms.md``, eq. F1-F2):

    x_sigma = (1 - sigma) x0 + sigma eps,        v* = eps - x0,

so ``x_sigma - sigma v* = x0``: a velocity ``v`` predicts the clean latent
``x0_hat = x_sigma - sigma v``, off by ``sigma (v* - v)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ForwardStats:
    """What a forward-process objective measured, detached; each a mean over its N samples."""

    loss: float
    """``policy_loss + kl_coef * kl_ref`` (what is minimised)."""
    policy_loss: float
    """The algorithm's reward-weighted matching term."""
    kl_ref: float
    """``mean_elements((v_theta - v_ref)^2)``, the velocity-space regulariser to the reference policy (0 without)."""
    fm_error: float
    """``mean_elements((v_theta - v*)^2)``: the flow-matching error, the likelihood proxy (lower is likelier)."""
    samples: int
    """N."""

    @classmethod
    def pooled(cls, parts: list["ForwardStats"]) -> "ForwardStats":
        """One statistic from parts evaluated apart: means weighted by sample counts.

        Raises:
            ValueError: no parts.
        """
        if not parts:
            raise ValueError("pooled needs at least one part")
        total = sum(part.samples for part in parts)

        def mean(key: str) -> float:
            return sum(getattr(part, key) * part.samples for part in parts) / total

        return cls(loss=mean("loss"), policy_loss=mean("policy_loss"), kl_ref=mean("kl_ref"), fm_error=mean("fm_error"),
                   samples=total)


def _per_sample(x: torch.Tensor) -> torch.Tensor:
    """``(N, ...)`` -> ``(N,)``: the mean over every element of each sample."""
    return x.flatten(1).mean(dim=1)


def _sigma(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.to(like).view(-1, *([1] * (like.ndim - 1)))


def nft_optimality(advantages: torch.Tensor, reward_scale: float) -> torch.Tensor:
    """DiffusionNFT's optimality probability of each sample (Zheng et al. 2025, arXiv 2509.16117,
    section 3; ``docs/algorithms.md`` eq. N1):

        r = 1/2 + 1/2 clip(A / Z, -1, 1)

    with ``A`` the group-relative advantage (reward minus the group mean, over the std) and
    ``Z = reward_scale`` in units of that std (the public implementation: 5, its advantage clip).

    Args:
        advantages: ``(N,)`` fp32.
        reward_scale: Z > 0.

    Returns:
        ``(N,)`` fp32 in [0, 1]; 1/2 for a sample at its group's mean.

    Raises:
        ValueError: ``reward_scale <= 0``.
    """
    if reward_scale <= 0:
        raise ValueError(f"reward_scale must be positive, got {reward_scale}")
    return 0.5 + 0.5 * torch.clamp(advantages / reward_scale, -1.0, 1.0)


def diffusion_nft_objective(
    velocity: torch.Tensor,
    old_velocity: torch.Tensor,
    ref_velocity: torch.Tensor | None,
    target: torch.Tensor,
    sigma: torch.Tensor,
    optimality: torch.Tensor,
    beta: float,
    reward_scale: float,
    kl_coef: float,
    adaptive_weighting: bool = True,
) -> tuple[torch.Tensor, ForwardStats]:
    """DiffusionNFT's loss on N noised samples (Zheng et al. 2025, section 3.2; ``docs/algorithms.md``
    eq. N2-N5), and its statistics.

    * implicit positive and negative policies (eq. N2):
      ``v+ = (1 - beta) v_old + beta v_theta``, ``v- = (1 + beta) v_old - beta v_theta``;
    * their matching errors (eq. N3): ``L+- = mean_elements((v+- - v*)^2)``, or with
      ``adaptive_weighting`` the public implementation's self-normalised clean-latent error
      ``mean(d^2) / sg(mean|d|)`` with ``d = sigma (v+- - v*)`` (= ``x0_hat - x0``);
    * ``policy_loss = mean_i (Z / beta) (r_i L+_i + (1 - r_i) L-_i)`` (eq. N4; the factor
      ``Z / beta`` as the public implementation, so the gradient at ``v_theta = v_old`` is
      ``2 clip(A, -Z, Z) (v_old - v*)`` per element mean, whatever beta);
    * ``kl_ref = mean_i mean_elements((v_theta - v_ref)^2)``; ``loss = policy_loss + kl_coef kl_ref`` (eq. N5).

    With ``r = 1`` and ``beta = 1`` (and no adaptive weighting) it is ``Z`` times plain flow
    matching on the sample (``v+ = v_theta``).

    Args:
        velocity: ``(N, ...)`` fp32 ``v_theta`` (with grad).
        old_velocity: ``(N, ...)`` the sampling policy's velocity at the same inputs (no grad).
        ref_velocity: ``(N, ...)`` the reference policy's (adapter off), or None when ``kl_coef`` is 0.
        target: ``(N, ...)`` ``v* = eps - x0``.
        sigma: ``(N,)`` noise levels of the inputs, in [0, 1].
        optimality: ``(N,)`` r in [0, 1] (:func:`nft_optimality`).
        beta: guidance strength > 0 (paper: 1; 0.1 for its OCR runs).
        reward_scale: Z > 0, as given to :func:`nft_optimality`.
        kl_coef: coefficient of ``kl_ref``.
        adaptive_weighting: the clean-latent, self-normalised error (the public implementation's).

    Returns:
        ``(loss, stats)``: the scalar loss (with grad) and :class:`ForwardStats`.

    Raises:
        ValueError: ``beta <= 0`` or ``reward_scale <= 0``, or ``kl_coef > 0`` without ``ref_velocity``.
    """
    if beta <= 0 or reward_scale <= 0:
        raise ValueError(f"need beta > 0 and reward_scale > 0, got beta={beta}, reward_scale={reward_scale}")
    if kl_coef > 0 and ref_velocity is None:
        raise ValueError("kl_coef > 0 needs the reference policy's velocity (ref_velocity)")
    old_velocity = old_velocity.detach()
    positive = (1.0 - beta) * old_velocity + beta * velocity
    negative = (1.0 + beta) * old_velocity - beta * velocity

    def matching_error(v: torch.Tensor) -> torch.Tensor:
        if not adaptive_weighting:
            return _per_sample((v - target) ** 2)
        d = _sigma(sigma, v) * (v - target)
        return _per_sample(d**2) / _per_sample(d.abs()).detach().clamp_min(1e-5)

    policy_loss = ((reward_scale / beta) * (optimality * matching_error(positive)
                                            + (1.0 - optimality) * matching_error(negative))).mean()
    return _finish(velocity, ref_velocity, target, policy_loss, kl_coef)


def awm_objective(
    velocity: torch.Tensor,
    ref_velocity: torch.Tensor | None,
    target: torch.Tensor,
    sigma: torch.Tensor,
    advantages: torch.Tensor,
    kl_coef: float,
    weighting: str = "ghuber",
    ghuber_power: float = 0.25,
) -> tuple[torch.Tensor, ForwardStats]:
    """Advantage Weighted Matching's loss on N noised samples (Xue et al. 2025, arXiv 2509.25050,
    section 4; ``docs/algorithms.md`` eq. A1-A3), and its statistics.

    * the flow-matching error ``l_i = mean_elements((v_theta - v*)^2)`` (eq. A1), weighted
      (eq. A2) as ``w(l) = l`` (``uniform``, the paper's loss) or
      ``w(l) = (sigma / p) ((l + e)^p - e^p)``, ``e = 1e-10`` (``ghuber``, the public
      implementation's default, ``p = 0.25``: large errors count less);
    * ``policy_loss = mean_i A_i w(l_i)`` (eq. A3: the policy gradient with ``-w(l)`` as the
      log-likelihood, at ratio 1; a positive advantage lowers the sample's error);
    * ``kl_ref`` and ``loss`` as in :func:`diffusion_nft_objective`.

    With every advantage 0 (a group whose rewards are equal) the policy term and its
    gradient are exactly 0.

    Args:
        velocity: ``(N, ...)`` fp32 ``v_theta`` (with grad).
        ref_velocity: ``(N, ...)`` the reference policy's velocity, or None when ``kl_coef`` is 0.
        target: ``(N, ...)`` ``v* = eps - x0``.
        sigma: ``(N,)`` noise levels in [0, 1].
        advantages: ``(N,)`` fp32, already scaled (the public implementation: ``clip(A, -5, 5) / 5``).
        kl_coef: coefficient of ``kl_ref``.
        weighting: ``uniform`` or ``ghuber``.
        ghuber_power: p in (0, 1] of ``ghuber``.

    Returns:
        ``(loss, stats)``.

    Raises:
        ValueError: an unknown weighting, ``ghuber_power`` outside (0, 1], or ``kl_coef > 0``
            without ``ref_velocity``.
    """
    if weighting not in ("uniform", "ghuber"):
        raise ValueError(f"weighting must be 'uniform' or 'ghuber', got {weighting!r}")
    if not 0 < ghuber_power <= 1:
        raise ValueError(f"ghuber_power must be in (0, 1], got {ghuber_power}")
    if kl_coef > 0 and ref_velocity is None:
        raise ValueError("kl_coef > 0 needs the reference policy's velocity (ref_velocity)")
    error = _per_sample((velocity - target) ** 2)
    if weighting == "ghuber":
        e = 1e-10
        error = sigma.to(error) / ghuber_power * ((error + e) ** ghuber_power - e**ghuber_power)
    policy_loss = (advantages.to(error) * error).mean()
    return _finish(velocity, ref_velocity, target, policy_loss, kl_coef)


def _finish(velocity: torch.Tensor, ref_velocity: torch.Tensor | None, target: torch.Tensor, policy_loss: torch.Tensor,
            kl_coef: float) -> tuple[torch.Tensor, ForwardStats]:
    """Add the regulariser to the reference and measure."""
    kl_ref = _per_sample((velocity - ref_velocity) ** 2).mean() if ref_velocity is not None else velocity.new_zeros(())
    loss = policy_loss + kl_coef * kl_ref
    with torch.no_grad():
        stats = ForwardStats(loss=loss.item(), policy_loss=policy_loss.item(), kl_ref=kl_ref.item(),
                             fm_error=_per_sample((velocity - target) ** 2).mean().item(), samples=velocity.shape[0])
    return loss, stats
