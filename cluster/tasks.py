"""Where groups come from: the seeded prompt order, unique group ids and seeds,
and the held-out evaluation tasks."""
from __future__ import annotations

import numpy as np

from editrl.cluster.config import TrainConfig
from editrl.protocol.dataset import PromptDataset
from editrl.protocol.rollout import GroupTask


class TaskSource:
    """Endless, seeded, epoch-wise shuffled training tasks (optionally round-robin over
    edit-type buckets, see ``DataConfig.balance``).

    The i-th task ever issued has id ``g<i>-<prompt_id>`` and seed ``f(seed, i)``,
    so a run (and a resumed run) issues the same groups in the same order. The
    state (:meth:`state_dict`) is the data cursor saved with checkpoints.
    """

    def __init__(self, config: TrainConfig, dataset: PromptDataset):
        self.config = config
        self.dataset = dataset
        self.rng = np.random.default_rng(config.seed)
        self.order: list[int] = []
        self.issued = 0
        buckets: dict[str, list[int]] = {}
        for index, row in enumerate(dataset.rows):
            key = row.edit_type if (config.data.balance == "edit_type" and row.checkable) else "other"
            buckets.setdefault(key, []).append(index)
        self.buckets = [buckets[k] for k in sorted(buckets)]
        self.queues: list[list[int]] = [[] for _ in self.buckets]

    def _next_index(self) -> int:
        if len(self.buckets) == 1:
            if not self.order:
                self.order = self.rng.permutation(len(self.dataset)).tolist()
            return self.order.pop(0)
        bucket = self.issued % len(self.buckets)
        if not self.queues[bucket]:
            self.queues[bucket] = [self.buckets[bucket][i] for i in self.rng.permutation(len(self.buckets[bucket]))]
        return self.queues[bucket].pop(0)

    def next(self) -> GroupTask:
        row = self.dataset[self._next_index()]
        index = self.issued
        self.issued += 1
        return GroupTask(
            group_id=f"g{index:07d}-{row.prompt_id}",
            prompt_id=row.prompt_id,
            instruction=row.instruction,
            video_path=row.video_path,
            seed=(self.config.seed * 1_000_003 + index * 7919) % 2**62,
            group_size=self.config.group_size,
            record_means=self.config.learner.ratio_norm == "grpo_guard",
            final_latent=self.config.learner.forward_process,
            start_s=row.start_s,
            end_s=row.end_s,
        )

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "order": list(self.order), "issued": self.issued,
                "queues": [list(q) for q in self.queues]}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.order = list(state["order"])
        self.issued = int(state["issued"])
        self.queues = [list(q) for q in state["queues"]]


def eval_tasks(config: TrainConfig, dataset: PromptDataset, step: int, keep_frames: int) -> list[GroupTask]:
    """Deterministic (ODE) edits of the held-out prompts with fixed seeds: the same
    noises at every evaluation, so evaluations are comparable."""
    return [
        GroupTask(
            group_id=f"eval-{step:06d}-{row.prompt_id}", prompt_id=row.prompt_id, instruction=row.instruction,
            video_path=row.video_path, seed=config.seed * 7919 + i, group_size=config.eval.seeds_per_prompt,
            deterministic=True, keep_frames=i < keep_frames, start_s=row.start_s, end_s=row.end_s,
        )
        for i, row in enumerate(dataset.rows[: config.eval.max_prompts])
    ]
