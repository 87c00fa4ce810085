"""The learner and groups of the data-parallel test, built identically in every process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import CORPUS, sample_group, tiny_policy_config

from editrl.learner.config import LearnerConfig
from editrl.learner.learner import Learner
from editrl.policy.policy import EditPolicy

NUM_GROUPS = 3
"""Odd, so that two ranks get unequal shares (2 and 1 groups)."""


def build_learner_and_groups(data_parallel=None, dtype: str = "float32", **config):
    """A fresh tiny policy in ``dtype`` (seeded: the same LoRA initialisation everywhere), 3 groups
    sampled from it (on-policy), and a learner with the KL term on (``config``: more LearnerConfig fields)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    policy = EditPolicy.from_config(tiny_policy_config(dtype=dtype), CORPUS, seed=0)
    groups = [sample_group(policy, seed, torch.tensor([0.0, 1.0, 3.0, 2.0])) for seed in range(NUM_GROUPS)]
    learner = Learner(policy, LearnerConfig(**{"learning_rate": 1e-2, "kl_coef": 0.1, "torch_threads": 1, **config}), seed=0,
                      data_parallel=data_parallel)
    return learner, groups


def train_step_saving(learner, groups) -> tuple[dict, int]:
    """``learner.train_step(groups)`` and the bytes of the activations autograd kept for its
    backwards (parameters are not counted)."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if not isinstance(tensor, torch.nn.Parameter):
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        metrics = learner.train_step(groups)
    return metrics, total


def local_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s parameters this rank holds: its shards, and whole what is not sharded."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in module.parameters())


RANK_SCRIPT = Path(__file__).resolve().parent / "data_parallel_rank.py"


def run_ranks(world: int, out: Path, mode: str = "replicate", timeout_s: float = 240.0, env: dict | None = None,
              script: Path = RANK_SCRIPT) -> None:
    """Run ``world`` processes of ``script`` (``tests/data_parallel_rank.py``) in ``mode`` on a free
    port (with ``env`` added to their environment) and wait for them (killed if still running after
    ``timeout_s``); each must exit 0."""
    from editrl.cluster.reward_process import free_port

    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(world), str(port), str(out), mode],
                              cwd=RANK_SCRIPT.parents[1], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, **(env or {})})
             for rank in range(world)]
    try:
        outputs = [proc.communicate(timeout=timeout_s)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=15)
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} exited with {proc.returncode}:\n{output[-3000:]}"
