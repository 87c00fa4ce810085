"""One learner rank of the data-parallel test: ``python tests/data_parallel_rank.py RANK WORLD PORT OUT``.

Builds the tiny policy and the test's groups exactly as the test process does, joins a
gloo process group on 127.0.0.1:PORT, runs one ``Learner.train_step`` with
:class:`editrl.learner.data_parallel.DataParallel` and writes its adapter and metrics
to ``OUT/rank<RANK>.pt``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_parallel_setup import build_learner_and_groups  # noqa: E402

from editrl.learner.data_parallel import DataParallel  # noqa: E402


def main(rank: int, world: int, port: int, out: Path) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        learner, groups = build_learner_and_groups(DataParallel.from_default_group())
        metrics = learner.train_step(groups)
        torch.save({"adapter": learner.policy.adapter_state(), "metrics": metrics}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
