"""Held-out evaluation and the run's summary (``summary.json``)."""
from __future__ import annotations

import collections
import logging
import math
from pathlib import Path

import numpy as np

from editrl.cluster.config import TrainConfig
from editrl.cluster.pool import WorkerPool
from editrl.cluster.run_log import paired_gain, reward_stats, save_side_by_side
from editrl.cluster.tasks import eval_tasks
from editrl.protocol.dataset import PromptDataset
from editrl.protocol.rollout import Group, GroupFailure

logger = logging.getLogger(__name__)


def evaluate_heldout(pool: WorkerPool, config: TrainConfig, heldout_set: PromptDataset, step: int,
                     run_dir: Path, label: str | None) -> dict:
    """Held-out rewards of deterministic (ODE) edits with fixed seeds.

    Returns:
        ``reward_mean``, ``reward_sem`` (standard error over samples), per-dimension
        means, ``reward_mean/<edit type>``, ``samples``, and ``prompt_means``
        (prompt id -> mean reward, for the paired gain). With ``label``, the first
        ``eval.num_videos_saved`` edits are written to ``samples/heldout_<label>_<prompt>.mp4``.

    Raises:
        RuntimeError: every held-out group failed.
    """
    keep = config.eval.num_videos_saved if label else 0
    pending = eval_tasks(config, heldout_set, step, keep)
    groups: list[Group] = []
    while pending:
        results, pending = pool.run_sync(pending)
        groups += [r for r in results if isinstance(r, Group)]
        for failure in (r for r in results if isinstance(r, GroupFailure)):
            logger.error("held-out group %s failed: %s", failure.task.group_id, failure.reason)
    if not groups:
        raise RuntimeError(f"held-out evaluation at step {step}: every group failed")
    rewards = np.concatenate([g.rewards.numpy() for g in groups])
    stats = reward_stats(groups)
    stats["reward_sem"] = float(rewards.std(ddof=1) / math.sqrt(len(rewards))) if len(rewards) > 1 else float("nan")
    stats["samples"] = float(len(rewards))
    by_type: dict[str, list[float]] = collections.defaultdict(list)
    for group in groups:
        by_type[heldout_set.by_id(group.task.prompt_id).edit_type] += group.rewards.tolist()
    for edit_type, values in sorted(by_type.items()):
        stats[f"reward_mean/{edit_type}"] = float(np.mean(values))
    for group in groups:
        if group.frames is not None:
            path = run_dir / "samples" / f"heldout_{label}_{group.task.prompt_id}.mp4"
            save_side_by_side(path, group.frames[0], group.frames[1], config.fps)
    logger.info("held-out evaluation at step %d: reward %.3f +- %.3f over %d samples", step, stats["reward_mean"], stats["reward_sem"], len(rewards))
    stats["prompt_means"] = {g.task.prompt_id: float(g.rewards.mean()) for g in groups}
    return stats


def run_summary(step: int, policy_version: int, mode: str, counters: dict, initial: dict, final: dict, checkpoint: str) -> dict:
    """``summary.json`` of a run (without ``wall_time_s``): counts, the held-out
    reward before and after with their standard errors, the gain in combined
    standard errors and paired by prompt, per-dimension means, the checkpoint."""
    combined_sem = math.sqrt(initial["reward_sem"] ** 2 + final["reward_sem"] ** 2)
    return {
        "steps": step,
        "policy_version": policy_version,
        "mode": mode,
        "samples": int(counters["samples"]),
        "samples_per_s": counters["samples"] / max(counters["time_rollout_s"], 1e-9),
        "groups_failed": int(counters["groups_failed"]),
        "groups_dropped_stale": int(counters["groups_dropped_stale"]),
        "groups_reissued": int(counters["groups_reissued"]),
        "groups_lost": int(counters["groups_lost"]),
        "groups_return_failed": int(counters["groups_return_failed"]),
        "data_bytes_moved": int(counters["data_bytes_moved"]),
        "data_driver_tensor_bytes": int(counters["driver_tensor_bytes"]),
        "data_inflight_bytes_max": int(counters["inflight_bytes_max"]),
        "budget_stalls": int(counters["budget_stalls"]),
        "reward_heldout_initial": initial["reward_mean"],
        "reward_heldout_final": final["reward_mean"],
        "reward_heldout_initial_sem": initial["reward_sem"],
        "reward_heldout_final_sem": final["reward_sem"],
        "heldout_gain_in_sem": (final["reward_mean"] - initial["reward_mean"]) / max(combined_sem, 1e-12),
        **_paired(initial, final),
        "heldout_dimensions_initial": {k: v for k, v in initial.items() if k.endswith("_mean")},
        "heldout_dimensions_final": {k: v for k, v in final.items() if k.endswith("_mean")},
        "checkpoint": checkpoint,
    }


def _paired(initial: dict, final: dict) -> dict[str, float]:
    """:func:`paired_gain` of two evaluations, or nothing (with a warning) when one of
    them has no per-prompt means (resumed from an older run) or fewer than two prompts."""
    try:
        return paired_gain(initial["prompt_means"], final["prompt_means"])
    except (KeyError, ValueError) as exc:
        logger.warning("no paired held-out gain in summary.json: %s", exc)
        return {}
