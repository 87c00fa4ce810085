"""What a policy config names and counts without torch: the sampler names, their
default noise scales and how many leading steps a fraction marks.

:mod:`editrl.policy.samplers` and :mod:`editrl.policy.schedule` re-export these, so
that configs validate (and ``editrl train`` checks them) before torch is imported.
"""
from __future__ import annotations

from typing import Literal, get_args

SamplerName = Literal["flow_sde", "flow_sde_wan", "cps", "ode"]
"""``flow_sde``: Flow-GRPO's SDE with ``s = eta sqrt(sigma / (1 - sigma))``;
``flow_sde_wan``: the same SDE with the Wan linear level ``s = eta (s_min + (s_max - s_min) sigma)``;
``cps``: coefficients-preserving sampling; ``ode``: the deterministic Euler step."""

SAMPLERS: tuple[str, ...] = get_args(SamplerName)

DEFAULT_ETA: dict[str, float] = {"flow_sde": 0.7, "flow_sde_wan": 1.0, "cps": 0.7, "ode": 0.0}
"""Noise scale used when the config leaves ``eta`` unset: Flow-GRPO's noise level 0.7
for ``flow_sde`` and ``cps`` (its reference passes the same noise level to both);
1.0 for ``flow_sde_wan``, whose reference has no eta."""


def num_fraction_steps(num_steps: int, fraction: float) -> int:
    """How many leading steps :func:`editrl.policy.schedule.fraction_steps` marks: ``max(1, int(fraction * num_steps))``."""
    return max(1, int(fraction * num_steps))
