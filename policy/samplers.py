"""The sampler choice: one function that takes a step with the configured rule.

Every sampler returns the next latent, the transition mean and std and the
log-prob (fp32, :class:`editrl.policy.sde.StepOutput`); the rule is chosen by name so
that sampling and the learner's recomputation call the same function.
"""
from __future__ import annotations

import torch

from editrl.policy.cps import cps_step
from editrl.policy.sampler_names import DEFAULT_ETA, SAMPLERS, SamplerName  # noqa: F401 (re-exported)
from editrl.policy.sde import StepOutput, flow_sde_step, flow_sde_step_at_level, ode_step, wan_noise_level


def wan_noise_range(sigmas: list[float]) -> tuple[float, float]:
    """``(s_max, s_min) = (sigma_1, sigma_T)`` of a schedule ``sigma_0 = 1 > ... > sigma_T``
    for :func:`editrl.policy.sde.wan_noise_level` (Flow-GRPO's Wan sampler).

    Raises:
        ValueError: fewer than two sigmas.
    """
    if len(sigmas) < 2:
        raise ValueError("a schedule needs at least two sigmas")
    return float(sigmas[1]), float(sigmas[-1])


def sampler_step(
    sampler: str,
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float,
    sigma_next: float,
    eta: float,
    noise: torch.Tensor | None = None,
    x_next: torch.Tensor | None = None,
    noise_range: tuple[float, float] | None = None,
) -> StepOutput:
    """One step of the named sampler from ``sigma`` to ``sigma_next``.

    Args:
        sampler: one of :data:`SAMPLERS`.
        x, v: ``(B, ...)`` latent and velocity at ``sigma`` (any float dtype; math in fp32).
        sigma, sigma_next: ``0 <= sigma_next < sigma <= 1``.
        eta: the sampler's noise scale (ignored by ``ode``; 0 makes every sampler the Euler step).
        noise: standard-normal ``(B, ...)`` for sampling a stochastic step.
        x_next: a recorded next latent to score instead of sampling.
        noise_range: ``(s_max, s_min)`` of ``flow_sde_wan`` (see :func:`wan_noise_range`).

    Returns:
        :class:`editrl.policy.sde.StepOutput`.

    Raises:
        ValueError: unknown sampler, ``flow_sde_wan`` without ``noise_range``, or the
            step's own errors (inconsistent sigmas, missing noise).
    """
    if sampler == "flow_sde":
        return flow_sde_step(x, v, sigma, sigma_next, eta, noise=noise, x_next=x_next)
    if sampler == "flow_sde_wan":
        if noise_range is None:
            raise ValueError("flow_sde_wan needs noise_range = (sigma_1, sigma_T) of the schedule")
        s = wan_noise_level(sigma, noise_range[0], noise_range[1], eta)
        return flow_sde_step_at_level(x, v, sigma, sigma_next, s, noise=noise, x_next=x_next)
    if sampler == "cps":
        return cps_step(x, v, sigma, sigma_next, eta, noise=noise, x_next=x_next)
    if sampler == "ode":
        return ode_step(x, v, sigma, sigma_next, x_next=x_next)
    raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
