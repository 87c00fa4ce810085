"""One learner rank of the GPU check (``tests/test_gpu_sharded.py``):
``python tests/gpu_rank.py RANK WORLD PORT OUT SEQUENCE_PARALLEL``.

On ``cuda:RANK``, in an NCCL process group: the checkpoint at ``$CHECKPOINT`` loaded sliced
as ``concat`` in bf16, sequences split over ``SEQUENCE_PARALLEL`` ranks, the DiT sharded by
FSDP2 (parameters gathered in bf16), one update on the groups of ``$GROUPS``, then a sharded
checkpoint. Writes the metrics, the gathered adapter, the bytes read and the peak CUDA memory to
``OUT/rank<RANK>.pt``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import CORPUS, tiny_policy_config  # noqa: E402
from data_parallel_setup import local_bytes  # noqa: E402

from editrl.learner.checkpoint import save_checkpoint  # noqa: E402
from editrl.learner.config import LearnerConfig  # noqa: E402
from editrl.learner.data_parallel import DataParallel  # noqa: E402
from editrl.learner.learner import Learner  # noqa: E402
from editrl.policy.policy import EditPolicy  # noqa: E402

GPU_LEARNER = {"learning_rate": 1e-2, "kl_coef": 0.1, "torch_threads": 1}
"""The learner settings of the GPU check (the one-GPU reference uses the same)."""


def main(rank: int, world: int, port: int, out: Path, sequence_parallel: int) -> None:
    cuda = os.environ.get("DEVICE", "cuda") == "cuda"  # DEVICE=cpu runs the same steps on gloo (a dry run)
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        config = tiny_policy_config(checkpoint=os.environ["CHECKPOINT"], kind="concat", dtype="bfloat16")
        policy = EditPolicy.from_config(config, CORPUS, seed=0, device=f"cuda:{rank}" if cuda else "cpu", encoders=False, sliced=True)
        learner = Learner(policy, LearnerConfig(**GPU_LEARNER), seed=0, data_parallel=DataParallel.from_default_group(sequence_parallel))
        if sequence_parallel > 1:
            learner.split_sequences()
        learner.shard()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        metrics = learner.train_step(torch.load(os.environ["GROUPS"], weights_only=False))
        result = {"metrics": metrics, "peak_bytes": torch.cuda.max_memory_allocated() if cuda else 0,
                  "local_bytes": local_bytes(policy.transformer)}
        save_checkpoint(out / "run", 1, learner, {})
        result["adapter"] = policy.adapter_state()
        torch.save(result, out / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5]))
