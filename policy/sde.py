"""Flow-SDE sampling step, its Gaussian log-probability and the KL between two
steps; pure functions on fp32 tensors.

Time convention (DESIGN.md section 3): ``x_sigma = (1 - sigma) x0 + sigma eps``,
sigma = 1 is noise and sigma = 0 is data; the network predicts the velocity
``v ~ eps - x0``; sampling walks sigma down, so ``dt = sigma_next - sigma < 0``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass
class StepOutput:
    """Result of one sampling step; tensors are fp32 of the latent's shape ``(B, ...)``."""

    x_next: torch.Tensor
    """The next latent ``x_{sigma_next}``."""
    mean: torch.Tensor
    """Mean of the Gaussian transition ``p(x_next | x)``."""
    std: float
    """Standard deviation of the transition (a scalar; 0.0 for a deterministic step)."""
    log_prob: torch.Tensor | None
    """``(B,)`` log-density of ``x_next`` averaged over non-batch dims; None when ``std == 0``."""


def flow_sde_noise_level(sigma: float, sigma_next: float, eta: float) -> float:
    """Noise level ``s = eta * sqrt(sigma / (1 - sigma))`` of the Flow-SDE step.

    Source: Flow-GRPO (Liu et al. 2025), eq. 9 and its reference code. At
    ``sigma = 1`` the denominator would vanish; as in the reference code the
    next sigma is used there instead: ``s = eta * sqrt(1 / (1 - sigma_next))``.

    Args:
        sigma: current noise level in (0, 1].
        sigma_next: next noise level in [0, sigma).
        eta: noise scale (0 gives the deterministic ODE step).

    Raises:
        ValueError: if ``sigma_next >= sigma``, sigma outside (0, 1], or eta < 0.
    """
    if not 0.0 < sigma <= 1.0 or not 0.0 <= sigma_next < sigma:
        raise ValueError(f"need 0 <= sigma_next < sigma <= 1, got sigma={sigma}, sigma_next={sigma_next}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    denominator_sigma = sigma_next if sigma >= 1.0 else sigma
    return eta * math.sqrt(sigma / (1.0 - denominator_sigma))


def flow_sde_mean(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float, s: float) -> torch.Tensor:
    """Mean of the Flow-SDE transition (Flow-GRPO eq. 12, DESIGN.md section 3).

    ``mean = x (1 + s^2 dt / (2 sigma)) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt``
    with ``dt = sigma_next - sigma``. With ``s = 0`` this is the Euler (ODE) step
    ``x + v dt``.

    Args:
        x: ``(B, ...)`` current latent, fp32.
        v: ``(B, ...)`` predicted velocity at ``(x, sigma)``, fp32.
        sigma, sigma_next: current and next noise levels.
        s: noise level from :func:`flow_sde_noise_level`.
    """
    dt = sigma_next - sigma
    return x * (1.0 + s**2 * dt / (2.0 * sigma)) + v * (1.0 + s**2 * (1.0 - sigma) / (2.0 * sigma)) * dt


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """Log-density of an isotropic Gaussian, averaged over all non-batch dims.

    ``log N(x; mean, std^2) = -(x - mean)^2 / (2 std^2) - log std - log sqrt(2 pi)``
    per element, then the mean over dims 1.. (as in the Flow-GRPO reference; the
    clip range is tuned for this per-element average, not a sum).

    Args:
        x, mean: ``(B, ...)`` fp32.
        std: positive scalar.

    Returns:
        ``(B,)`` fp32.
    """
    if std <= 0:
        raise ValueError(f"std must be positive, got {std}")
    elementwise = -((x - mean) ** 2) / (2.0 * std**2) - math.log(std) - LOG_SQRT_2PI
    return elementwise.flatten(1).mean(dim=1)


def gaussian_kl_same_std(mean_p: torch.Tensor, mean_q: torch.Tensor, std: float) -> torch.Tensor:
    """KL(N(mean_p, std^2) || N(mean_q, std^2)) per element, averaged over non-batch dims.

    For two Gaussians with the same std the KL is ``(mean_p - mean_q)^2 / (2 std^2)``
    per element (exact, including the ``dt`` inside ``std = s sqrt(-dt)``); it is
    averaged over elements like :func:`gaussian_log_prob` so that both terms of
    the loss share one normalisation.

    Returns:
        ``(B,)`` fp32, >= 0.
    """
    if std <= 0:
        raise ValueError(f"std must be positive, got {std}")
    return ((mean_p - mean_q) ** 2 / (2.0 * std**2)).flatten(1).mean(dim=1)


def flow_sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float,
    sigma_next: float,
    eta: float,
    noise: torch.Tensor | None = None,
    x_next: torch.Tensor | None = None,
) -> StepOutput:
    """One Flow-SDE step from ``sigma`` to ``sigma_next`` (Flow-GRPO eq. 12).

    ``std = s sqrt(-dt)`` and ``x_next = mean + std * noise``. Pass ``x_next`` to
    evaluate the log-probability of a recorded transition instead of sampling
    (the learner's recomputation); otherwise pass ``noise`` (standard normal,
    shape of ``x``). All math runs in fp32 whatever the input dtype.

    Args:
        x: ``(B, ...)`` latent at ``sigma``.
        v: ``(B, ...)`` velocity prediction at ``(x, sigma)``.
        sigma, sigma_next: noise levels, ``0 <= sigma_next < sigma <= 1``.
        eta: noise scale; 0 gives the deterministic Euler step (log_prob None).
        noise: standard-normal ``(B, ...)``; required when sampling with eta > 0.
        x_next: recorded next latent to score instead of sampling.

    Returns:
        :class:`StepOutput`.

    Raises:
        ValueError: inconsistent sigmas, or neither ``noise`` nor ``x_next`` with eta > 0.
    """
    x = x.float()
    v = v.float()
    s = flow_sde_noise_level(sigma, sigma_next, eta)
    mean = flow_sde_mean(x, v, sigma, sigma_next, s)
    std = s * math.sqrt(sigma - sigma_next)
    if std == 0.0:
        return StepOutput(x_next=mean if x_next is None else x_next.float(), mean=mean, std=0.0, log_prob=None)
    if x_next is None:
        if noise is None:
            raise ValueError("flow_sde_step with eta > 0 needs noise or x_next")
        x_next = mean + std * noise.float()
    else:
        x_next = x_next.float()
    return StepOutput(x_next=x_next, mean=mean, std=std, log_prob=gaussian_log_prob(x_next.detach(), mean, std))
