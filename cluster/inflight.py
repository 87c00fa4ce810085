"""The data plane's settings as the driver applies them: the rollout engine each worker
gets, and the byte budget of groups in flight (``runtime.max_inflight_mib``).

A group's tensors travel worker -> object store -> learner; the driver holds only their
references and sizes, so it can bound what the store holds: groups sampled and not yet
trained count their own bytes, groups still being sampled the largest group seen (at start
the plan's size of one group, :func:`editrl.cluster.plan.group_bytes`).
"""
from __future__ import annotations

from dataclasses import dataclass

from editrl.cluster.config import RolloutConfig, TrainConfig
from editrl.rollout_workers.engine import RolloutEngine

MIB = 2**20


def rollout_engine(rollout: RolloutConfig) -> RolloutEngine:
    """The engine settings of ``rollout.*`` as the workers take them."""
    return RolloutEngine(
        trajectory_dtype=rollout.trajectory_dtype, forward_micro_batch=rollout.forward_micro_batch,
        encode_threads=rollout.encode_threads, text_encoder=rollout.text_encoder, vae_decode=rollout.vae_decode,
        attention_backend=rollout.attention_backend, compile_blocks=rollout.compile_blocks,
    )


@dataclass
class InflightBudget:
    """Bytes of groups the object store may hold at once (None: no limit), and the size a group
    being sampled is counted at."""

    limit: float | None
    group_bytes: float

    @classmethod
    def of(cls, config: TrainConfig) -> "InflightBudget":
        """The budget of ``config``; with one, a group's size comes from the plan (a few seconds).

        Raises:
            ValueError: the budget holds fewer groups than one update (they could never all be
                sampled: the run would wait forever), with the numbers.
        """
        budget = config.runtime.max_inflight_mib
        if budget is None:
            return cls(None, 0.0)
        from editrl.cluster.plan import plan_run

        group = plan_run(config).group_bytes
        need = config.prompts_per_step * group
        if budget * MIB < need:
            raise ValueError(f"runtime.max_inflight_mib={budget:g} MiB holds fewer groups than one update: "
                             f"{config.prompts_per_step} groups of {group / MIB:.2f} MiB need {need / MIB:.2f} MiB")
        return cls(budget * MIB, group)

    def observe(self, group_bytes: int) -> None:
        """A group came back with ``group_bytes`` bytes: groups being sampled count at least that."""
        self.group_bytes = max(self.group_bytes, float(group_bytes))

    def allows(self, held_bytes: float, sampling: int) -> tuple[bool, float]:
        """Whether one more task fits beside ``held_bytes`` of sampled groups and ``sampling`` tasks
        being sampled or scored; and the bytes in flight now."""
        inflight = held_bytes + sampling * self.group_bytes
        return self.limit is None or inflight + self.group_bytes <= self.limit, inflight
