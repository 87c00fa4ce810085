"""What the driver logs per step, and the autoscaling rule that reads it."""
from __future__ import annotations

import numpy as np

from editrl.cluster.run_log import reward_stats
from editrl.protocol.rollout import Group


def step_metrics(groups: list[Group], train_metrics: dict, staleness: list[int], counters: dict, worker_restarts: int,
                 workers: int, max_staleness: int, num_denoising_steps: int, *, wall: float, wait_data: float,
                 time_sync: float, worker_busy: float) -> dict:
    """One step's metrics row: rewards per dimension, the learner's metrics, group
    counts (per step and in total), staleness (policy versions between sampling and
    the update), pool size, phase times (seconds) and throughput.

    ``counters`` is the run's counter; its per-step keys (``groups_failed_step``,
    ``groups_dropped_stale_step``, ``budget_stalls_step``) are consumed.

    Data plane: ``data_bytes_per_step`` (the trained groups' tensors, moved worker -> object
    store -> learner), ``data_driver_tensor_bytes_total`` (tensor bytes the driver ever received
    in groups: 0 when the tensors go past it), ``data_inflight_bytes_max`` and ``budget_stalls``.
    """
    samples = sum(g.rewards.numel() for g in groups)
    return {
        **reward_stats(groups),
        **train_metrics,
        "reward_config_version": ",".join(sorted({g.reward_config_version for g in groups})),
        "groups_trained": float(len(groups)),
        "groups_failed": float(counters.pop("groups_failed_step", 0)),
        "groups_dropped_stale": float(counters.pop("groups_dropped_stale_step", 0)),
        "groups_dropped_stale_total": float(counters["groups_dropped_stale"]),
        "groups_reissued_total": float(counters["groups_reissued"]),
        "worker_restarts_total": float(worker_restarts),
        "staleness_mean": float(np.mean(staleness)),
        "staleness_max": float(max(staleness)),
        **{f"staleness_{k}": float(staleness.count(k)) for k in range(max_staleness + 1)},
        "rollout_workers": float(workers),
        "time_step_s": wall,
        "time_wait_data_s": wait_data,
        "time_sync_s": time_sync,
        "learner_idle_ratio": max(0.0, 1.0 - train_metrics["time_train_s"] / max(wall, 1e-9)),
        "worker_idle_ratio": max(0.0, 1.0 - worker_busy / max(wall * workers, 1e-9)),
        "samples_per_s": samples / max(wall, 1e-9),
        "denoising_steps_per_s": samples * num_denoising_steps / max(wall, 1e-9),
        **phase_times(groups),
        "data_bytes_per_step": float(sum(g.bulk_bytes for g in groups)),
        "data_driver_tensor_bytes_total": float(counters["driver_tensor_bytes"]),
        "data_inflight_bytes_max": float(counters["inflight_bytes_max"]),
        "budget_stalls": float(counters.pop("budget_stalls_step", 0)),
        "budget_stalls_total": float(counters["budget_stalls"]),
        "groups_return_failed_total": float(counters["groups_return_failed"]),
    }


def phase_times(groups: list[Group]) -> dict[str, float]:
    """Worker-side seconds per phase (encode, sample, decode, reward wait), summed over groups."""
    keys = sorted({k for g in groups for k in g.timings})
    return {f"time_worker_{k}": float(sum(g.timings.get(k, 0.0) for g in groups)) for k in keys}


def autoscale_target(current: int, dropped_stale: float, trained: float, wait_data_s: float, step_s: float, *,
                     min_workers: int, max_workers: int, scale_down_stale: float, scale_up_learner_idle: float) -> int:
    """The pool size after one step: one worker fewer when more than
    ``scale_down_stale`` of the step's groups expired (more data than the learner
    uses), one more when the learner waited for data more than
    ``scale_up_learner_idle`` of the step; else unchanged; within [min, max]."""
    stale_share = dropped_stale / max(1.0, dropped_stale + trained)
    if stale_share > scale_down_stale and current > min_workers:
        return current - 1
    if wait_data_s / max(step_s, 1e-9) > scale_up_learner_idle and current < max_workers:
        return current + 1
    return current
