"""One learner rank of the data-parallel tests:
``python tests/data_parallel_rank.py RANK WORLD PORT OUT [MODE]``.

Builds the tiny policy and the test's groups exactly as the test process does, joins a
gloo process group on 127.0.0.1:PORT and, by MODE:

- ``replicate`` (default): one ``Learner.train_step`` with
  :class:`editrl.learner.data_parallel.DataParallel`;
- ``fsdp``: the same with the DiT sharded by FSDP2 (``Learner.shard``) and the gradient
  clipped (``FSDP_CONFIG``);
- ``fsdp_resume``: sharded, one update, a checkpoint, a second update; then a fresh
  sharded learner restored from the checkpoint takes the second update again (written as
  ``resumed``);
- ``sp``: one update with Ulysses sequence parallelism over all the ranks (replicated);
- ``fsdp_sp``: one update sharded, with sequences split over pairs of ranks.

Writes the adapter (gathered) and metrics to ``OUT/rank<RANK>.pt``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_parallel_setup import build_learner_and_groups, train_step_saving  # noqa: E402

from editrl.learner.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from editrl.learner.data_parallel import DataParallel  # noqa: E402

FSDP_CONFIG = {"max_grad_norm": 2e-3}
"""The sharded runs' learner settings (the one-rank reference uses the same): a clip that the
gradient norm exceeds. 3 groups x 3 trained steps are 9 work items: ranks run 5 and 4 (+ 1
zero-weight repeat), and the steps of one group land on both ranks."""


def _parallel(world: int, sharding: str = "fsdp", sequence_parallel: int = 1):
    """The test's learner and groups on these ranks, sequences split and the DiT sharded as asked."""
    learner, groups = build_learner_and_groups(DataParallel.from_default_group(sequence_parallel), ranks=world,
                                               sharding=sharding, sequence_parallel=sequence_parallel, **FSDP_CONFIG)
    if sequence_parallel > 1:
        learner.split_sequences()
    if sharding == "fsdp":
        learner.shard()
    return learner, groups


MODES = {"fsdp": {}, "fsdp_resume": {}, "sp": {"sharding": "replicate", "sequence_parallel": 2}, "fsdp_sp": {"sequence_parallel": 2}}


def main(rank: int, world: int, port: int, out: Path, mode: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = {}
        if mode == "replicate":
            learner, groups = build_learner_and_groups(DataParallel.from_default_group())
            result["metrics"] = learner.train_step(groups)
        else:
            learner, groups = _parallel(world, **MODES[mode])
            seen = []  # tokens per sequence inside the first block (its FFN's input: batch, tokens, width)
            hook = learner.policy.transformer.blocks[0].ffn.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[1]))
            result["metrics"], result["saved_bytes"] = train_step_saving(learner, groups)
            hook.remove()
            result["block_tokens"] = sorted(set(seen))
        if mode == "fsdp_resume":
            run_dir = out / "run"
            save_checkpoint(run_dir, 1, learner, {})
            dist.barrier()
            second = learner.train_step(groups)
            resumed, _ = _parallel(world)
            load_checkpoint(latest_checkpoint(run_dir), resumed)
            result.update(second=second, resumed_metrics=resumed.train_step(groups), resumed=resumed.policy.adapter_state())
        result["adapter"] = learner.policy.adapter_state()
        torch.save(result, out / f"rank{rank}.pt")
        dist.barrier()  # leave together: a gloo peer torn down while another still talks to it can abort
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), sys.argv[5] if len(sys.argv) > 5 else "replicate")
