"""The sequential training loop's pieces as the benchmarks drive them directly
(actor handles, a plain :class:`editrl.learner.learner.Learner`): the same worker
methods and adapter publication that :class:`editrl.cluster.pool.WorkerPool` uses."""
from __future__ import annotations

import numpy as np
import ray

from editrl.cluster.config import TrainConfig
from editrl.learner.learner import Learner
from editrl.policy.adapter import adapter_checksum
from editrl.protocol.dataset import PromptDataset
from editrl.protocol.rollout import Group, GroupFailure, GroupTask


class PromptSampler:
    """Seeded, epoch-wise shuffled prompt indices."""

    def __init__(self, num_prompts: int, seed: int):
        self.num_prompts = num_prompts
        self.rng = np.random.default_rng(seed)
        self.order: list[int] = []

    def next_batch(self, size: int) -> list[int]:
        batch = []
        while len(batch) < size:
            if not self.order:
                self.order = self.rng.permutation(self.num_prompts).tolist()
            batch.append(self.order.pop(0))
        return batch


def make_train_tasks(config: TrainConfig, dataset: PromptDataset, indices: list[int], step: int) -> list[GroupTask]:
    """One stochastic group per prompt, seeded by (seed, step, slot)."""
    return [
        GroupTask(group_id=f"s{step:05d}-g{slot:03d}-{dataset[i].prompt_id}", prompt_id=dataset[i].prompt_id,
                  instruction=dataset[i].instruction, video_path=dataset[i].video_path,
                  seed=(config.seed * 1_000_003 + step * 1009 + slot) % 2**62, group_size=config.group_size)
        for slot, i in enumerate(indices)
    ]


def publish_adapter(learner: Learner, workers: list) -> None:
    """What :meth:`editrl.learner.actor.LearnerService.publish` and the pool do: pack the
    adapter, checksum it once, put it in the object store once and load it on
    every worker: verify and stage it, then load it (waits for both)."""
    packed = learner.policy.pack_adapter()
    checksum = adapter_checksum(packed)
    ref = ray.put(packed)
    ray.get([w.set_adapter.remote(ref, learner.policy_version, checksum) for w in workers])
    ray.get([w.load_staged_adapter.remote() for w in workers])


def run_tasks(workers: list, tasks: list[GroupTask]) -> tuple[list[Group], list[GroupFailure]]:
    """Tasks round-robin over the workers (sample, decode, score each group in turn)."""
    futures = [w.sample.remote(tasks[i :: len(workers)]) for i, w in enumerate(workers) if tasks[i :: len(workers)]]
    results = [r for batch in ray.get(futures) for r in batch]
    return [r for r in results if isinstance(r, Group)], [r for r in results if isinstance(r, GroupFailure)]
