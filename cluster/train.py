"""``editrl train``: one Edit-GRPO run from a resolved config to its run directory.

Starts (or joins) the reward server and Ray, builds the :class:`~editrl.cluster.run.Run`
(learner actor, rollout-worker pool, controller), runs the configured schedule
(:mod:`editrl.cluster.schedules`) and writes ``summary.json`` and the reward plot.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from pathlib import Path

import ray

from editrl.cluster.config import TrainConfig, save_config, with_resolved_paths
from editrl.cluster.preflight import latest_checkpoint_name
from editrl.cluster.ray_cluster import init_ray
from editrl.cluster.reward_process import RewardServerProcess
from editrl.cluster.run import Run
from editrl.cluster.run_log import plot_rewards, write_contact_sheet
from editrl.cluster.schedules import SCHEDULES
from editrl.protocol.dataset import PromptDataset
from editrl.resources import checkout_root
from editrl.rollout_workers.reward_client import RewardClient

logger = logging.getLogger(__name__)

LOCAL_SCALE_HEADROOM = 4
"""Rollout workers a local Ray instance can add at runtime beyond the configured ones."""


def load_datasets(config: TrainConfig) -> tuple[PromptDataset, PromptDataset]:
    """The run's training and held-out prompt tables (paths already resolved)."""
    pc = config.policy
    train_set = PromptDataset(config.data.train_prompts, pc.num_frames, pc.height, pc.width, fps=config.fps)
    heldout_set = PromptDataset(config.data.heldout_prompts, pc.num_frames, pc.height, pc.width, fps=config.fps)
    return train_set, heldout_set


def run_corpus(train_set: PromptDataset, heldout_set: PromptDataset) -> list[str]:
    """The instructions a model built in code makes its word vocabulary from: every prompt of
    both tables that survived loading (rows whose clip is missing are not in it). The rollout
    workers, the learner, ``editrl eval`` and ``editrl data cache`` must all use this list,
    or their tokenizers differ."""
    return [row.instruction for row in train_set.rows + heldout_set.rows]


def checkpoint_on_interrupt(run: Run, run_dir: Path, timeout_s: float = 300.0) -> Path | None:
    """After an interrupt: checkpoint the last finished step unless it already is.

    The learner is asked for its policy version first (behind any update still
    running); a checkpoint is written only when that version is the driver's step,
    so learner and driver state match. Failures are logged, never raised: the run
    is being stopped anyway.

    Returns:
        The checkpoint written, or None.
    """
    newest = latest_checkpoint_name(run_dir)
    saved = int(newest.removeprefix("step_")) if newest and newest.removeprefix("step_").isdigit() else 0
    if run.step <= saved:
        logger.info("interrupted at step %d; checkpoint %s already holds it", run.step, newest)
        return None
    try:
        version = ray.get(run.learner.ready.remote(), timeout=timeout_s)
        if version != run.step:
            logger.warning("interrupted during an update (learner at policy version %d, driver at step %d); "
                           "the newest consistent checkpoint is %s", version, run.step, newest)
            return None
        path = Path(ray.get(run.learner.save_checkpoint.remote(str(run_dir), run.step, run.driver_state()), timeout=timeout_s))
    except Exception as exc:  # noqa: BLE001 - e.g. the learner died with the interrupt
        logger.error("interrupted at step %d; could not write its checkpoint: %s: %s", run.step, type(exc).__name__, exc)
        return None
    logger.info("interrupted: checkpoint of step %d written to %s", run.step, path)
    return path


def train(config: TrainConfig, run_dir: Path, resume: bool = False) -> dict:
    """Run Edit-GRPO as configured; write everything under ``run_dir``; return the summary.

    With ``resume``, continue from the newest checkpoint in ``run_dir``. On
    KeyboardInterrupt (``editrl train`` turns SIGTERM into one too) the last finished
    step is checkpointed (:func:`checkpoint_on_interrupt`), everything the run started
    is stopped and the interrupt is re-raised. The config is saved as given; the run
    reads its files through absolute paths (:func:`editrl.cluster.config.with_resolved_paths`).
    """
    started = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    config = with_resolved_paths(config)
    train_set, heldout_set = load_datasets(config)
    corpus = run_corpus(train_set, heldout_set)
    logger.info("%d train prompts, %d held-out prompts; %s mode", len(train_set), len(heldout_set), config.runtime.mode)

    with contextlib.ExitStack() as stack:
        ignored: dict = {}  # signal handlers set aside while an interrupted run stops; restored last
        stack.callback(lambda: [signal.signal(sig, handler) for sig, handler in ignored.items()])
        reward_url = config.reward_server.url or stack.enter_context(
            RewardServerProcess(config.reward_server.config, run_dir / "reward_server.log", config.reward_server.startup_timeout_s)
        )
        if config.reward_server.url:  # e.g. a Serve deployment that may still be starting
            with RewardClient(reward_url) as client:
                client.wait_until_healthy(timeout_s=config.reward_server.startup_timeout_s)
        rt, workers, ranks = config.runtime, config.topology.rollout, config.topology.learner
        # Ray CPUs are scheduling tokens: a local instance gets enough for the learner, the
        # workers and room to scale up at runtime, whatever the machine's core count.
        max_workers = max(workers.workers, rt.autoscale.max_workers if rt.autoscale else 0) + LOCAL_SCALE_HEADROOM
        local_cpus = math.ceil(max_workers * workers.cpus + ranks.cpus * ranks.ranks)
        root = checkout_root()
        init_ray(config.ray_address, num_cpus=None if config.ray_address else local_cpus, project_root=str(root) if root else None)
        stack.callback(ray.shutdown)
        run = Run(config, run_dir, corpus, reward_url, train_set, heldout_set)
        stack.callback(run.close)
        try:
            summary = run.execute(resume, SCHEDULES[config.runtime.mode])
        except KeyboardInterrupt:
            # a second Ctrl-C must not cut the checkpoint or the shutdown of what the run started short
            ignored.update({sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)})
            checkpoint_on_interrupt(run, run_dir)
            raise

    summary["wall_time_s"] = time.perf_counter() - started
    plot_rewards(run_dir / "metrics.jsonl", run_dir / "reward_curves.png")
    write_contact_sheet(run_dir / "samples", run_dir / "contact_sheet.png", {r.prompt_id: r.instruction for r in heldout_set.rows})
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.info("held-out reward %.3f +- %.3f -> %.3f +- %.3f (%.1f combined SEMs); run dir %s",
                summary["reward_heldout_initial"], summary["reward_heldout_initial_sem"],
                summary["reward_heldout_final"], summary["reward_heldout_final_sem"], summary["heldout_gain_in_sem"], run_dir)
    return summary
