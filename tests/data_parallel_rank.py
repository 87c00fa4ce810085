"""One learner rank of the data-parallel tests:
``python tests/data_parallel_rank.py RANK WORLD PORT OUT [MODE]``.

Builds the tiny policy and the test's groups exactly as the test process does, joins a
gloo process group on 127.0.0.1:PORT and, by MODE:

- ``replicate`` (default): one ``Learner.train_step`` with
  :class:`editrl.learner.data_parallel.DataParallel`;
- ``fsdp``: the same with the DiT sharded by FSDP2 (``Learner.shard``) and the gradient
  clipped (``FSDP_CONFIG``); ``fsdp_bf16`` with the policy in bf16;
- ``fsdp_resume``: sharded, one update, a checkpoint, a second update; then a fresh
  sharded learner restored from the checkpoint takes the second update again (written as
  ``resumed``);
- ``sp``: one update with Ulysses sequence parallelism over all the ranks (replicated);
- ``fsdp_sp``: one update sharded, with sequences split over pairs of ranks;
- ``fsdp_memory``: a wider DiT (``SHARD_MEMORY_MODEL``) sharded; writes its weight bytes
  and how much this process's resident memory fell when it was sharded.
- ``load_whole`` / ``load_sliced``: the checkpoint at ``$CHECKPOINT`` (a t2v DiT, loaded as
  ``concat`` in bf16) loaded whole and then sharded, or sliced (``sliced=True``: each rank
  reads its rows after sharding); writes every parameter gathered (the adapter too), the
  bytes read and the peak resident memory (VmHWM) above the one before loading.

Writes the adapter (gathered) and metrics to ``OUT/rank<RANK>.pt``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_parallel_setup import build_learner_and_groups, local_bytes, train_step_saving  # noqa: E402

from editrl.learner.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from editrl.learner.data_parallel import DataParallel  # noqa: E402

FSDP_CONFIG = {"max_grad_norm": 2e-3}
"""The sharded runs' learner settings (the one-rank reference uses the same): a clip that the
gradient norm exceeds. 3 groups x 3 trained steps are 9 work items: ranks run 5 and 4 (+ 1
zero-weight repeat), and the steps of one group land on both ranks."""


def _parallel(sharding: str = "fsdp", sequence_parallel: int = 1, dtype: str = "float32"):
    """The test's learner and groups on these ranks, sequences split and the DiT sharded as asked."""
    learner, groups = build_learner_and_groups(DataParallel.from_default_group(sequence_parallel), dtype=dtype, **FSDP_CONFIG)
    if sequence_parallel > 1:
        learner.split_sequences()
    if sharding == "fsdp":
        learner.shard()
    return learner, groups


SHARD_MEMORY_MODEL = {"latent_channels": 4, "vae_base_dim": 8, "dit_heads": 8, "dit_head_dim": 64, "dit_layers": 8,
                      "dit_ffn_dim": 2048, "text_dim": 16, "text_layers": 1}
"""Width 512, 8 blocks of 8 x 512 x 512 attention and 2 x 512 x 2048 FFN weights (33.6 M) and
the embeddings and norms: 36.1 M parameters, 144 MB in fp32 (no text encoder or VAE loaded)."""


def _shard_memory() -> dict:
    import gc

    from conftest import CORPUS, tiny_policy_config

    from editrl.learner.config import LearnerConfig
    from editrl.learner.learner import Learner
    from editrl.policy.config import TinyModelConfig
    from editrl.policy.policy import EditPolicy

    def rss() -> int:
        gc.collect()
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    policy = EditPolicy.from_config(tiny_policy_config(tiny=TinyModelConfig(**SHARD_MEMORY_MODEL)), CORPUS, seed=0, encoders=False)
    weights = sum(p.numel() * p.element_size() for p in policy.transformer.parameters())
    learner = Learner(policy, LearnerConfig(torch_threads=1), data_parallel=DataParallel.from_default_group())
    before = rss()
    learner.shard()
    return {"weights": weights, "freed": before - rss(),
            "local": local_bytes(policy.transformer)}


def _load_checkpoint(sliced: bool) -> dict:
    from conftest import CORPUS, tiny_policy_config

    from editrl.learner.config import LearnerConfig
    from editrl.learner.learner import Learner
    from editrl.policy.adapter import full_value
    from editrl.policy.policy import EditPolicy

    def status(field: str) -> int:
        with open("/proc/self/status") as lines:
            return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field + ":"))

    before = status("VmRSS")
    config = tiny_policy_config(checkpoint=os.environ["CHECKPOINT"], kind="concat", dtype="bfloat16")
    policy = EditPolicy.from_config(config, CORPUS, seed=0, encoders=False, sliced=sliced)
    learner = Learner(policy, LearnerConfig(torch_threads=1), data_parallel=DataParallel.from_default_group())
    learner.shard()
    peak = status("VmHWM") - before
    params = {name: full_value(param).cpu() for name, param in policy.transformer.named_parameters()}
    local = local_bytes(policy.transformer)
    return {"params": params, "peak": peak, "local": local,
            "buffers": {name: b.cpu() for name, b in policy.transformer.named_buffers()}}


MODES = {"fsdp": {}, "fsdp_bf16": {"dtype": "bfloat16"}, "fsdp_resume": {}, "sp": {"sharding": "replicate", "sequence_parallel": 2}, "fsdp_sp": {"sequence_parallel": 2}}


def main(rank: int, world: int, port: int, out: Path, mode: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = {}
        if mode in ("fsdp_memory", "load_whole", "load_sliced"):
            result = _shard_memory() if mode == "fsdp_memory" else _load_checkpoint(mode == "load_sliced")
            torch.save(result, out / f"rank{rank}.pt")
            dist.barrier()
            return
        if mode == "replicate":
            learner, groups = build_learner_and_groups(DataParallel.from_default_group())
            result["metrics"] = learner.train_step(groups)
        else:
            learner, groups = _parallel(**MODES[mode])
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
            resumed, _ = _parallel()
            load_checkpoint(latest_checkpoint(run_dir), resumed)
            result.update(second=second, resumed_metrics=resumed.train_step(groups), resumed=resumed.policy.adapter_state())
        result["adapter"] = learner.policy.adapter_state()
        torch.save(result, out / f"rank{rank}.pt")
        dist.barrier()  # leave together: a gloo peer torn down while another still talks to it can abort
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), sys.argv[5] if len(sys.argv) > 5 else "replicate")
