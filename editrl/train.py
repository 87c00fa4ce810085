"""The Edit-GRPO main loop: sample groups on rollout workers, score them on the
reward server, update the LoRA adapter on the learner, push it back. Reads top
to bottom; each phase is a small function below :func:`train`."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import ray
import torch
from tqdm import tqdm

from cluster.ray_cluster import init_ray
from editrl.config import TrainConfig, save_config
from editrl.data.dataset import PromptDataset
from editrl.reward_process import RewardServerProcess
from editrl.run_log import MetricsLog, RolloutLog, plot_rewards, reward_stats, save_side_by_side
from learner.learner import Learner
from policy.policy import EditPolicy, adapter_checksum
from protocol.rollout import Group, GroupFailure, GroupTask
from rollout_workers.actor import make_rollout_actor
from rollout_workers.reward_client import RewardClient

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def resolve(path: str) -> str:
    """A config path: absolute as given, else relative to the project root."""
    return str(path if Path(path).is_absolute() else PROJECT_ROOT / path)


class PromptSampler:
    """Endless, seeded, epoch-wise shuffled order of prompt indices."""

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


def train(config: TrainConfig, run_dir: Path) -> dict:
    """Run Edit-GRPO as configured; write everything under ``run_dir``; return the summary."""
    started = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.learner.torch_threads)

    pc = config.policy
    train_set = PromptDataset(resolve(config.data.train_prompts), pc.num_frames, pc.height, pc.width)
    heldout_set = PromptDataset(resolve(config.data.heldout_prompts), pc.num_frames, pc.height, pc.width)
    corpus = [row.instruction for row in train_set.rows + heldout_set.rows]
    logger.info("%d train prompts, %d held-out prompts", len(train_set), len(heldout_set))

    with contextlib.ExitStack() as stack:
        reward_url = config.reward_server.url or stack.enter_context(
            RewardServerProcess(resolve(config.reward_server.config), run_dir / "reward_server.log", config.reward_server.startup_timeout_s)
        )
        if config.reward_server.url:  # e.g. a Serve deployment that may still be starting
            with RewardClient(reward_url) as client:
                client.wait_until_healthy(timeout_s=config.reward_server.startup_timeout_s)
        init_ray(config.ray_address, num_cpus=None if config.ray_address else max(2, config.rollout.num_workers), project_root=str(PROJECT_ROOT))
        stack.callback(ray.shutdown)

        learner = Learner(EditPolicy.from_config(pc, corpus, root=PROJECT_ROOT, seed=config.seed), config.learner, seed=config.seed)
        workers = start_workers(config, corpus, reward_url)
        publish_adapter(learner, workers)

        metrics_log = MetricsLog(run_dir)
        stack.callback(metrics_log.close)
        rollout_log = RolloutLog(run_dir / "rollouts")

        initial = evaluate(config, workers, heldout_set, step=0, run_dir=run_dir, label="initial")
        metrics_log.log(0, initial["metrics"], kind="heldout")
        evaluations = [initial]

        sampler = PromptSampler(len(train_set), config.seed)
        totals = {"samples": 0, "groups_failed": 0, "time_rollout_s": 0.0}
        consecutive_empty = 0
        progress = tqdm(range(1, config.steps + 1), desc="edit-grpo", unit="step", dynamic_ncols=True)
        for step in progress:
            # 1. Sample and score B groups of G trajectories on the rollout workers.
            tasks = make_train_tasks(config, train_set, sampler.next_batch(config.prompts_per_step), step)
            rollout_start = time.perf_counter()
            groups, failures = run_tasks(workers, tasks)
            time_rollout = time.perf_counter() - rollout_start
            totals["time_rollout_s"] += time_rollout
            totals["groups_failed"] += len(failures)
            if not groups:
                consecutive_empty += 1
                logger.error("step %d: all %d groups failed; no update this step (%d such steps in a row)", step, len(tasks), consecutive_empty)
                if consecutive_empty >= config.max_failed_steps:
                    raise RuntimeError(f"{consecutive_empty} steps in a row without a single complete group; last reason: {failures[-1].reason}")
                continue
            consecutive_empty = 0
            rollout_log.append(step, groups)

            # 2. Group-relative advantages and the clipped-ratio update of the LoRA adapter.
            train_metrics = learner.train_step(groups)

            # 3. Push the new adapter (policy_version + 1) to every worker.
            sync_start = time.perf_counter()
            publish_adapter(learner, workers)
            time_sync = time.perf_counter() - sync_start

            totals["samples"] += sum(g.rewards.numel() for g in groups)
            step_metrics = {
                **reward_stats(groups),
                **train_metrics,
                "groups_ok": float(len(groups)),
                "groups_failed": float(len(failures)),
                "reward_config_version": ",".join(sorted({g.reward_config_version for g in groups})),
                "time_rollout_s": time_rollout,
                "time_sync_s": time_sync,
                **phase_times(groups),
            }
            metrics_log.log(step, step_metrics)
            progress.set_postfix(reward=f"{step_metrics['reward_mean']:.2f}", kl=f"{train_metrics['kl']:.1e}", v=learner.policy_version)
            if config.eval.every_steps and step % config.eval.every_steps == 0 and step < config.steps:
                evaluation = evaluate(config, workers, heldout_set, step=step, run_dir=run_dir, label=None)
                metrics_log.log(step, evaluation["metrics"], kind="heldout")
                evaluations.append(evaluation)

        final = evaluate(config, workers, heldout_set, step=config.steps, run_dir=run_dir, label="final")
        metrics_log.log(config.steps, final["metrics"], kind="heldout")
        checkpoint = learner.save_adapter(run_dir / "adapter")

    plot_rewards(run_dir / "metrics.jsonl", run_dir / "reward_curves.png")
    wall = time.perf_counter() - started
    summary = {
        "steps": config.steps,
        "policy_version": learner.policy_version,
        "wall_time_s": wall,
        "samples": totals["samples"],
        "samples_per_s": totals["samples"] / max(totals["time_rollout_s"], 1e-9),
        "groups_failed": totals["groups_failed"],
        "reward_heldout_initial": initial["metrics"]["reward_mean"],
        "reward_heldout_final": final["metrics"]["reward_mean"],
        "reward_heldout_initial_sem": initial["metrics"]["reward_sem"],
        "reward_heldout_final_sem": final["metrics"]["reward_sem"],
        "heldout_dimensions_initial": {k: v for k, v in initial["metrics"].items() if k.endswith("_mean")},
        "heldout_dimensions_final": {k: v for k, v in final["metrics"].items() if k.endswith("_mean")},
        "checkpoint": str(checkpoint),
    }
    combined_sem = math.sqrt(summary["reward_heldout_initial_sem"] ** 2 + summary["reward_heldout_final_sem"] ** 2)
    summary["heldout_gain_in_sem"] = (summary["reward_heldout_final"] - summary["reward_heldout_initial"]) / max(combined_sem, 1e-12)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.info("held-out reward %.3f +- %.3f -> %.3f +- %.3f (%.1f combined SEMs); run dir %s",
                summary["reward_heldout_initial"], summary["reward_heldout_initial_sem"],
                summary["reward_heldout_final"], summary["reward_heldout_final_sem"], summary["heldout_gain_in_sem"], run_dir)
    return summary


def start_workers(config: TrainConfig, corpus: list[str], reward_url: str) -> list:
    """Start the rollout actors and wait until each has built its policy."""
    rc = config.rollout
    actor_cls = make_rollout_actor(num_cpus=rc.num_cpus_per_worker, num_gpus=rc.num_gpus_per_worker, resources=rc.resources)
    workers = [
        actor_cls.remote(
            i, config.policy, corpus, str(PROJECT_ROOT), reward_url,
            reward_timeout_s=rc.reward_timeout_s, reward_max_attempts=rc.reward_max_attempts,
            torch_threads=rc.torch_threads, fps=config.fps,
        )
        for i in range(rc.num_workers)
    ]
    ray.get([w.ready.remote() for w in workers])
    logger.info("%d rollout workers ready", len(workers))
    return workers


def publish_adapter(learner: Learner, workers: list) -> None:
    """Put the adapter in the object store once and load it on every worker."""
    state = learner.policy.adapter_state()
    ref = ray.put(state)
    ray.get([w.set_adapter.remote(ref, learner.policy_version, adapter_checksum(state)) for w in workers])


def make_train_tasks(config: TrainConfig, dataset: PromptDataset, indices: list[int], step: int) -> list[GroupTask]:
    """One stochastic group per prompt; the group's seed is a function of (seed, step, slot)."""
    tasks = []
    for slot, index in enumerate(indices):
        row = dataset[index]
        tasks.append(
            GroupTask(
                group_id=f"s{step:05d}-g{slot:03d}-{row.prompt_id}",
                prompt_id=row.prompt_id, instruction=row.instruction, video_path=row.video_path,
                seed=(config.seed * 1_000_003 + step * 1009 + slot) % 2**62,
                group_size=config.group_size, eta=config.policy.eta,
                record_means=config.learner.ratio_norm == "grpo_guard",
            )
        )
    return tasks


def run_tasks(workers: list, tasks: list[GroupTask]) -> tuple[list[Group], list[GroupFailure]]:
    """Spread tasks round-robin over the workers, wait for all, split successes from failures."""
    futures = [w.sample.remote(tasks[i :: len(workers)]) for i, w in enumerate(workers) if tasks[i :: len(workers)]]
    results = [r for batch in ray.get(futures) for r in batch]
    groups = [r for r in results if isinstance(r, Group)]
    failures = [r for r in results if isinstance(r, GroupFailure)]
    for failure in failures:
        logger.error("group %s (prompt %s) dropped: %s", failure.task.group_id, failure.task.prompt_id, failure.reason)
    if failures:
        logger.error("%d of %d groups failed this round", len(failures), len(tasks))
    return groups, failures


def phase_times(groups: list[Group]) -> dict[str, float]:
    """Worker-side seconds per phase, summed over the step's groups."""
    keys = sorted({k for g in groups for k in g.timings})
    return {f"time_worker_{k}": float(sum(g.timings.get(k, 0.0) for g in groups)) for k in keys}


def evaluate(config: TrainConfig, workers: list, dataset: PromptDataset, step: int, run_dir: Path, label: str | None) -> dict:
    """Deterministic (ODE) edits of every held-out prompt with fixed seeds.

    Returns ``{"metrics": {...}}`` with the reward mean, its standard error over
    samples (``reward_sem``) and per-dimension means; with a ``label``, the first
    ``num_videos_saved`` edits are written to ``samples/heldout_<label>_<prompt>.mp4``.
    """
    keep = config.eval.num_videos_saved if label else 0
    tasks = [
        GroupTask(
            group_id=f"eval-{step:05d}-{row.prompt_id}", prompt_id=row.prompt_id, instruction=row.instruction,
            video_path=row.video_path, seed=config.seed * 7919 + i, group_size=config.eval.seeds_per_prompt,
            eta=0.0, keep_frames=i < keep,
        )
        for i, row in enumerate(dataset.rows[: config.eval.max_prompts])
    ]
    groups, failures = run_tasks(workers, tasks)
    if not groups:
        raise RuntimeError(f"held-out evaluation at step {step}: every group failed")
    rewards = np.concatenate([g.rewards.numpy() for g in groups])
    stats = reward_stats(groups)
    stats["reward_sem"] = float(rewards.std(ddof=1) / math.sqrt(len(rewards))) if len(rewards) > 1 else float("nan")
    stats["samples"] = float(len(rewards))
    stats["groups_failed"] = float(len(failures))
    for group in groups:
        if group.frames is not None and label:
            source = dataset.clip(dataset.by_id(group.task.prompt_id))
            save_side_by_side(run_dir / "samples" / f"heldout_{label}_{group.task.prompt_id}.mp4", source, group.frames[0], config.fps)
    logger.info("held-out evaluation at step %d: reward %.3f +- %.3f over %d samples", step, stats["reward_mean"], stats["reward_sem"], len(rewards))
    return {"metrics": stats}
