"""Coefficients-preserving sampling (CPS): a DDIM-like stochastic step for flow
matching whose noise coefficient stays exactly on the schedule; pure functions
on fp32 tensors.

Source: Wang & Yu 2025, "Coefficients-Preserving Sampling for Reinforcement
Learning with Flow Matching" (arXiv 2509.05952), its CPS update
``x_next = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - s^2) x1_hat + s eps``
with ``s = sigma_next sin(eta pi / 2)``, as the ``sde_type="cps"`` option of the
Flow-GRPO reference code implements it. Time convention as in
:mod:`editrl.policy.sde`: sigma = 1 is noise, sigma = 0 is data.
"""
from __future__ import annotations

import math

import torch

from editrl.policy.sde import StepOutput, check_sigmas, gaussian_transition


def cps_noise_level(sigma_next: float, eta: float) -> float:
    """Std of the fresh noise of a CPS step: ``s = sigma_next * sin(eta * pi / 2)``.

    ``eta`` in [0, 1]: 0 is the deterministic Euler step, 1 replaces all of the
    predicted noise by fresh noise. At the last step (``sigma_next = 0``) ``s = 0``:
    the step is deterministic.

    Raises:
        ValueError: ``eta`` outside [0, 1] or ``sigma_next`` outside [0, 1).
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"CPS needs 0 <= eta <= 1, got {eta}")
    if not 0.0 <= sigma_next < 1.0:
        raise ValueError(f"sigma_next must be in [0, 1), got {sigma_next}")
    return sigma_next * math.sin(eta * math.pi / 2.0)


def cps_mean(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float, s: float) -> torch.Tensor:
    """Mean of the CPS transition.

    ``mean = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - s^2) x1_hat`` with the
    clean estimate ``x0_hat = x - sigma v`` and the noise estimate
    ``x1_hat = x + (1 - sigma) v``. Since ``(1 - sigma_next) x0_hat + sigma_next
    x1_hat = x + v dt`` (the Euler step), it is computed as
    ``x + v dt + (sqrt(sigma_next^2 - s^2) - sigma_next) x1_hat``, which is the
    same expression rearranged and equals the Euler step bit for bit when s = 0.

    Args:
        x, v: ``(B, ...)`` fp32 latent and velocity at ``sigma``.
        sigma, sigma_next: current and next noise levels.
        s: fresh-noise std from :func:`cps_noise_level`, ``0 <= s <= sigma_next``.
    """
    x1_hat = x + (1.0 - sigma) * v
    coefficient = math.sqrt(max(sigma_next**2 - s**2, 0.0))
    return x + v * (sigma_next - sigma) + (coefficient - sigma_next) * x1_hat


def cps_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float,
    sigma_next: float,
    eta: float,
    noise: torch.Tensor | None = None,
    x_next: torch.Tensor | None = None,
) -> StepOutput:
    """One CPS step: ``x_next = mean + s * noise`` with ``s`` from :func:`cps_noise_level`.

    The predicted-noise coefficient ``sqrt(sigma_next^2 - s^2)`` and the fresh
    noise ``s`` add up in quadrature to exactly ``sigma_next``, so ``x_next`` has
    the noise level the schedule says (no excess noise, unlike Flow-SDE). The
    log-prob is the exact Gaussian density (:func:`editrl.policy.sde.gaussian_log_prob`,
    constants and the ``1 / (2 s^2)`` factor kept, averaged over elements); the
    reference code drops both, which changes the scale of log-ratios and so the
    clip range.

    Args:
        x: ``(B, ...)`` latent at ``sigma``.
        v: ``(B, ...)`` velocity prediction at ``(x, sigma)``.
        sigma, sigma_next: ``0 <= sigma_next < sigma <= 1``.
        eta: in [0, 1]; 0 is the Euler step.
        noise: standard-normal ``(B, ...)``, required to sample when ``s > 0``.
        x_next: recorded next latent to score instead of sampling.

    Returns:
        :class:`editrl.policy.sde.StepOutput` (fp32; ``std = s``; no log-prob when ``s = 0``).

    Raises:
        ValueError: inconsistent sigmas, eta outside [0, 1], or neither noise nor x_next.
    """
    check_sigmas(sigma, sigma_next)
    s = cps_noise_level(sigma_next, eta)
    mean = cps_mean(x.float(), v.float(), sigma, sigma_next, s)
    return gaussian_transition(mean, s, noise=noise, x_next=x_next)
