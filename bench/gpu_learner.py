"""GPU section, the sharded learner: one rollout group and one FSDP2 update at 480p x 33 frames.

The medium random-init Wan (:data:`bench.workload.MEDIUM_MODEL`, Wan2.1-1.3B's width at 8
of its layers), or the checkpoint at ``$EDITRL_GPU_CHECKPOINT``, is saved and loaded the
way a run does: a rollout policy in bf16 samples one group (G = 2, 832 x 480, 33 frames:
latent (16, 9, 60, 104), 14,040 tokens per sequence) and is dropped; a learner rank in a
one-rank process group (NCCL) loads the DiT sliced, shards it with FSDP2, checkpoints every
block and trains one sample's CFG pair per micro-batch, for one update. Before the update the
rollout policy samples the group again with bf16 trajectories, all 2G rows per forward and
one row per forward (``rollout.forward_micro_batch``): time, samples per second and peak
memory of each. Reported: sampling
and update times, the update's peak GPU memory next to ``editrl plan``'s estimate of the
learner rank (without the CUDA context), and the on-policy ratio error against the bf16
tolerance. Without CUDA the GPU section is skipped (``bench/gpu.py``).
"""
from __future__ import annotations

import gc
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bench.results import Measurement, Target
from bench.workload import MEDIUM_MODEL, conditioning, corpus, sample_groups
from editrl.cluster.config import TrainConfig
from editrl.cluster.plan import plan_run
from editrl.cluster.reward_process import free_port
from editrl.learner.config import LearnerConfig
from editrl.learner.data_parallel import DataParallel
from editrl.learner.learner import ONPOLICY_RATIO_TOLERANCE, Learner
from editrl.policy.config import LoraSettings, PolicyConfig
from editrl.policy.model import build_tiny_components, save_components
from editrl.policy.policy import EditPolicy
from editrl.policy.sampling import sample_trajectories

NAME = "gpu_learner"
TITLE = "sharded learner on one GPU: a rollout group and an FSDP2 update at 480p x 33 frames"
CHECKPOINT_ENV = "EDITRL_GPU_CHECKPOINT"


def run_config(checkpoint: str, height: int = 480, width: int = 832, num_frames: int = 33, group_size: int = 2,
               gpus: int = 1) -> TrainConfig:
    """The run this benchmark stands for: one group of ``group_size``, the learner on ``gpus``,
    every block checkpointed, one sample's CFG pair per micro-batch."""
    policy = PolicyConfig(checkpoint=checkpoint, height=height, width=width, num_frames=num_frames, num_steps=4,
                          sde_fraction=0.5, max_text_tokens=512, dtype="bfloat16", lora=LoraSettings(rank=64, alpha=128))
    return TrainConfig(policy=policy, group_size=group_size, prompts_per_step=1, topology={"learner": {"gpus": gpus}},
                       learner={"micro_batch_samples": 1, "activation_checkpointing": "on", "kl_coef": 0.004})


def measure(config: TrainConfig, device: str) -> tuple[list[Measurement], list[Target]]:
    """Sample one group and take one sharded update of ``config`` on ``device`` (``cuda`` or, as
    a dry run, ``cpu`` with gloo); the rows and the on-policy target.

    Raises:
        RuntimeError: a process group is already initialised in this process.
    """
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    words = list(corpus())
    sampler = EditPolicy.from_config(config.policy, words, device=device, seed=config.seed)
    start = time.perf_counter()
    groups = sample_groups(sampler, 1, config.group_size)
    sync()
    sample_s = time.perf_counter() - start
    engine_rows = rollout_engine_rows(sampler, config.group_size, cuda)
    del sampler
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        policy = EditPolicy.from_config(config.policy, words, device=device, seed=config.seed, encoders=False, sliced=True)
        learner = Learner(policy, config.learner, seed=config.seed, data_parallel=DataParallel.from_default_group())
        learner.shard()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        metrics = learner.train_step(groups)
        sync()
        update_s = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() if cuda else 0
    finally:
        dist.destroy_process_group()
    plan = next(p for p in plan_run(config).processes if p.kind == "learner rank")
    estimate = plan.peak - next(i.bytes for i in plan.items if i.name == "runtime")
    tokens = policy.tokens_per_sequence(groups[0].latents.shape[-3:])
    params = {"latent": " x ".join(map(str, groups[0].latents.shape[-4:])), "tokens": tokens, "group_size": config.group_size}
    rows = [
        Measurement(name="rollout group", group=TITLE, params=params, metrics={"sample_s": sample_s}),
        *engine_rows,
        Measurement(name="sharded update", group=TITLE, params=params, metrics={
            "update_s": update_s, "peak_gib": peak / 2**30, "plan_gib": estimate / 2**30,
            "peak_over_plan": peak / estimate if peak else 0.0,
            "onpolicy_ratio_error": metrics["onpolicy_ratio_error"]}),
    ]
    tolerance = ONPOLICY_RATIO_TOLERANCE[config.policy.dtype]
    targets = [Target.check("gpu.sharded_onpolicy_ratio", "on-policy ratio error of the sharded bf16 learner",
                            metrics["onpolicy_ratio_error"], "<=", tolerance, note=f"{tokens} tokens per sequence")]
    if peak:
        targets.append(Target.check("gpu.sharded_peak_vs_plan", "peak GPU memory of the update / editrl plan's estimate",
                                    peak / estimate, "<=", 1.25, note=f"{peak / 2**30:.2f} GiB measured, {estimate / 2**30:.2f} GiB planned"))
    return rows, targets


def rollout_engine_rows(policy: EditPolicy, group_size: int, cuda: bool) -> list[Measurement]:
    """One group sampled with bf16 trajectories, all ``2G`` rows per forward and then one row per
    forward (``rollout.forward_micro_batch: 1``): time, samples per second, peak GPU memory of
    sampling (0 on CPU) and the largest latent difference between the two."""
    source, text, null = conditioning(policy, 0)
    out, latents = [], {}
    for micro_batch in (None, 1):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else 0
        start = time.perf_counter()
        traj = sample_trajectories(policy, source, text, null, group_size, policy.sampler_spec(seed=0),
                                   torch.Generator().manual_seed(0), trajectory_dtype=torch.bfloat16, micro_batch=micro_batch)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        latents[micro_batch] = traj.latents
        out.append(Measurement(name=f"rollout, {'all rows' if micro_batch is None else 'one row'} per forward", group=TITLE,
                               params={"rows_per_forward": micro_batch or 2 * group_size, "trajectory_dtype": "bfloat16"},
                               metrics={"sample_s": elapsed, "samples_per_s": group_size / elapsed,
                                        "peak_gib": ((torch.cuda.max_memory_allocated() - base) / 2**30) if cuda else 0.0}))
    out[-1].metrics["max_latent_diff_vs_all_rows"] = float((latents[1] - latents[None]).abs().max())
    return out


def measure_on_gpu() -> tuple[list[Measurement], list[Target]]:
    """:func:`measure` on ``cuda`` with ``$EDITRL_GPU_CHECKPOINT``, or with the medium model saved to a temporary folder."""
    given = os.environ.get(CHECKPOINT_ENV)
    if given:
        return measure(run_config(given), "cuda")
    with tempfile.TemporaryDirectory(prefix="bench-gpu-learner-") as tmp:
        save_components(build_tiny_components(MEDIUM_MODEL, list(corpus()), kind="concat"), Path(tmp) / "medium")
        return measure(run_config(str(Path(tmp) / "medium")), "cuda")
