"""The learner and groups of the data-parallel test, built identically in every process."""
from __future__ import annotations

import torch
from conftest import CORPUS, sample_group, tiny_policy_config

from editrl.learner.config import LearnerConfig
from editrl.learner.learner import Learner
from editrl.policy.policy import EditPolicy

NUM_GROUPS = 3
"""Odd, so that two ranks get unequal shares (2 and 1 groups)."""


def build_learner_and_groups(data_parallel=None):
    """A fresh tiny policy (seeded: the same LoRA initialisation everywhere), 3 groups sampled
    from it (on-policy), and a learner with the KL term on."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    policy = EditPolicy.from_config(tiny_policy_config(), CORPUS, seed=0)
    groups = [sample_group(policy, seed, torch.tensor([0.0, 1.0, 3.0, 2.0])) for seed in range(NUM_GROUPS)]
    learner = Learner(policy, LearnerConfig(learning_rate=1e-2, kl_coef=0.1, torch_threads=1), seed=0,
                      data_parallel=data_parallel)
    return learner, groups
