"""Flow-SDE sampling steps (Flow-GRPO's noise level and the Wan linear one), the
deterministic Euler (ODE) step, the Gaussian log-probability of a transition and
the KL between two transitions; pure functions on fp32 tensors.

Time convention (docs/policy_and_objective.md, "Conventions"):
``x_sigma = (1 - sigma) x0 + sigma eps``, sigma = 1 is noise and sigma = 0 is
data; the network predicts the velocity ``v ~ eps - x0``; sampling walks sigma
down, so ``dt = sigma_next - sigma < 0``.
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


def check_sigmas(sigma: float, sigma_next: float) -> None:
    """Raise ValueError unless ``0 <= sigma_next < sigma <= 1`` (one step down the schedule)."""
    if not 0.0 < sigma <= 1.0 or not 0.0 <= sigma_next < sigma:
        raise ValueError(f"need 0 <= sigma_next < sigma <= 1, got sigma={sigma}, sigma_next={sigma_next}")


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
    check_sigmas(sigma, sigma_next)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    denominator_sigma = sigma_next if sigma >= 1.0 else sigma
    return eta * math.sqrt(sigma / (1.0 - denominator_sigma))


def wan_noise_level(sigma: float, s_max: float, s_min: float, eta: float = 1.0) -> float:
    """Linear noise level ``s = eta * (s_min + (s_max - s_min) * sigma)`` of the Wan
    variant of the Flow-SDE step.

    Source: the Wan2.1 sampler of the Flow-GRPO reference code, which uses
    ``s_max = sigma_1`` (the first sigma below 1) and ``s_min = sigma_T`` (the
    last entry of the schedule) and no eta; ``eta = 1`` reproduces it, ``eta = 0``
    gives the ODE step. Schedules end at ``sigma_T = 0``, so in practice
    ``s_min = 0`` and ``s = eta * sigma_1 * sigma``: proportional to sigma, finite
    at sigma = 1 (no division), and small but positive on the last step (whose
    current sigma is ``sigma_{T-1} > 0``).

    Args:
        sigma: current noise level in (0, 1].
        s_max, s_min: the level at sigma = 1 and at sigma = 0, ``0 <= s_min <= s_max``.
        eta: multiplier (1.0 is the reference).

    Raises:
        ValueError: sigma outside (0, 1], ``s_min > s_max``, negative levels or eta.
    """
    if not 0.0 < sigma <= 1.0:
        raise ValueError(f"sigma must be in (0, 1], got {sigma}")
    if not 0.0 <= s_min <= s_max or eta < 0:
        raise ValueError(f"need 0 <= s_min <= s_max and eta >= 0, got s_min={s_min}, s_max={s_max}, eta={eta}")
    return eta * (s_min + (s_max - s_min) * sigma)


def flow_sde_mean(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float, s: float) -> torch.Tensor:
    """Mean of the Flow-SDE transition (Flow-GRPO, Liu et al. 2025, arXiv 2505.05470, eq. 12;
    docs/policy_and_objective.md, "Samplers").

    ``mean = x (1 + s^2 dt / (2 sigma)) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt``
    with ``dt = sigma_next - sigma``. With ``s = 0`` this is the Euler (ODE) step
    ``x + v dt``, bit for bit.

    Args:
        x: ``(B, ...)`` current latent, fp32.
        v: ``(B, ...)`` predicted velocity at ``(x, sigma)``, fp32.
        sigma, sigma_next: current and next noise levels.
        s: noise level from :func:`flow_sde_noise_level` or :func:`wan_noise_level`.
    """
    dt = sigma_next - sigma
    return x * (1.0 + s**2 * dt / (2.0 * sigma)) + v * (1.0 + s**2 * (1.0 - sigma) / (2.0 * sigma)) * dt


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """Log-density of an isotropic Gaussian, averaged over all non-batch dims.

    ``log N(x; mean, std^2) = -(x - mean)^2 / (2 std^2) - log std - log sqrt(2 pi)``
    per element, then the mean over dims 1.. (as in the Flow-GRPO reference; the
    clip range is tuned for this per-element average, not a sum). Every sampler
    uses this exact density, constants included.

    Args:
        x, mean: ``(B, ...)`` fp32.
        std: positive scalar.

    Returns:
        ``(B,)`` fp32.

    Raises:
        ValueError: ``std <= 0``.
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

    Raises:
        ValueError: ``std <= 0``.
    """
    if std <= 0:
        raise ValueError(f"std must be positive, got {std}")
    return ((mean_p - mean_q) ** 2 / (2.0 * std**2)).flatten(1).mean(dim=1)


def gaussian_transition(
    mean: torch.Tensor, std: float, noise: torch.Tensor | None = None, x_next: torch.Tensor | None = None
) -> StepOutput:
    """Sample ``x_next = mean + std * noise`` or score a recorded ``x_next``.

    A step with ``std == 0`` is deterministic: ``x_next = mean`` (unless given)
    and no log-prob. The log-prob is taken of ``x_next.detach()`` so gradients
    flow only through the mean.

    Raises:
        ValueError: ``std > 0`` with neither ``noise`` nor ``x_next``, or ``std < 0``.
    """
    if std < 0:
        raise ValueError(f"std must be >= 0, got {std}")
    if std == 0.0:
        return StepOutput(x_next=mean if x_next is None else x_next.float(), mean=mean, std=0.0, log_prob=None)
    if x_next is None:
        if noise is None:
            raise ValueError("a stochastic step needs noise or x_next")
        x_next = mean + std * noise.float()
    else:
        x_next = x_next.float()
    return StepOutput(x_next=x_next, mean=mean, std=std, log_prob=gaussian_log_prob(x_next.detach(), mean, std))


def flow_sde_step_at_level(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float,
    sigma_next: float,
    s: float,
    noise: torch.Tensor | None = None,
    x_next: torch.Tensor | None = None,
) -> StepOutput:
    """One Flow-SDE step with a given noise level ``s`` (Flow-GRPO eq. 12).

    ``std = s sqrt(-dt)``; see :func:`flow_sde_step` for the arguments.

    Raises:
        ValueError: inconsistent sigmas, ``s < 0``, or neither ``noise`` nor ``x_next`` with ``s > 0``.
    """
    check_sigmas(sigma, sigma_next)
    if s < 0:
        raise ValueError(f"noise level must be >= 0, got {s}")
    x = x.float()
    v = v.float()
    mean = flow_sde_mean(x, v, sigma, sigma_next, s)
    return gaussian_transition(mean, s * math.sqrt(sigma - sigma_next), noise=noise, x_next=x_next)


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
    shape of ``x``). All math runs in fp32 whatever the input dtype. A step to
    ``sigma_next = 0`` is stochastic too (``std = s sqrt(sigma) > 0``) and leaves
    noise in the final latent: the default schedules keep it deterministic.

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
    s = flow_sde_noise_level(sigma, sigma_next, eta)
    return flow_sde_step_at_level(x, v, sigma, sigma_next, s, noise=noise, x_next=x_next)


def ode_step(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float, x_next: torch.Tensor | None = None) -> StepOutput:
    """The deterministic Euler step of the probability-flow ODE: ``x_next = x + v dt``.

    Source: flow matching (Lipman et al. 2023) sampled with Euler, as diffusers'
    ``FlowMatchEulerDiscreteScheduler.step``. ``std = 0`` and no log-prob.

    Raises:
        ValueError: inconsistent sigmas.
    """
    check_sigmas(sigma, sigma_next)
    mean = x.float() + v.float() * (sigma_next - sigma)
    return gaussian_transition(mean, 0.0, x_next=x_next)
