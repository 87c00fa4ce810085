"""The two schedules of a run: a producer-consumer loop over the rollout-worker pool
(producers: workers sampling and getting groups scored) and the learner (consumer).

* ``pipelined``: workers always hold ``prefetch_per_worker`` groups (fewer while the groups
  in flight would exceed ``runtime.max_inflight_mib``); the learner
  (its own actor) trains on B complete groups whose data is at most
  ``max_staleness`` policy versions old (the oldest first) while the workers keep
  sampling and earlier groups are scored;
* ``sequential``: sample B groups, score them, train, publish, repeat.

In both, the groups of a dead worker and, under ``runtime.on_score_failure:
reissue``, the groups whose scoring failed are handed out again before new tasks.

Both drive a :class:`editrl.cluster.run.Run` through its public methods only.
"""
from __future__ import annotations

import collections
import time

import ray
from tqdm import tqdm

from editrl.cluster.run import Run
from editrl.protocol.rollout import Group, GroupTask


def pipelined(run: Run, progress: tqdm) -> None:
    """Workers keep ``prefetch_per_worker`` groups each; the learner trains as soon
    as B fresh-enough groups are complete, while sampling and scoring go on."""
    cfg = run.config
    buffer: list[Group] = []
    reissue: collections.deque[GroupTask] = collections.deque()
    training = None
    waiting_since = time.perf_counter()
    step_started = time.perf_counter()
    busy_before = run.pool.busy_seconds()
    while run.step < cfg.steps:
        run.follow_controller()
        held = buffer + (training[1] if training else [])
        while run.pool.capacity() > 0 and run.may_submit(held):
            run.pool.submit(reissue.popleft() if reissue else run.tasks.next())
        results, lost = run.pool.poll(timeout_s=0.05 if training else 0.5)
        reissue.extend(lost)
        run.counters["groups_reissued"] += len(lost)
        buffer += run.accept(results)
        reissue.extend(run.take_reissues())
        if training is None:
            # Oldest first (stable: completion order within a version): a group one version
            # from expiring is trained now, a fresher one can wait a step, so fewer expire.
            buffer = sorted(run.drop_stale(buffer), key=lambda g: g.policy_version)
            if len(buffer) >= cfg.prompts_per_step:
                batch, buffer = buffer[: cfg.prompts_per_step], buffer[cfg.prompts_per_step :]
                wait_data = time.perf_counter() - waiting_since
                training = (run.learner.train_step.remote(batch), batch, wait_data, run.policy_version)
        elif ray.wait([training[0]], timeout=0)[0]:
            ref, batch, wait_data, trained_at = training
            training = None
            metrics = ray.get(ref)
            waiting_since = time.perf_counter()
            batch = run.settle(batch, metrics)
            if batch is None:
                continue
            time_sync = run.publish(wait=False)
            busy_now = run.pool.busy_seconds()
            run.finish_step(progress, batch, trained_at, metrics, wait_data, time_sync,
                            time.perf_counter() - step_started, busy_now - busy_before)
            step_started, busy_before = time.perf_counter(), busy_now


def sequential(run: Run, progress: tqdm) -> None:
    """Sample B groups, score them, train, publish; then the next step."""
    cfg = run.config
    while run.step < cfg.steps:
        run.follow_controller()
        step_started = time.perf_counter()
        busy_before = run.pool.busy_seconds()
        pending = [run.tasks.next() for _ in range(cfg.prompts_per_step)]
        groups: list[Group] = []
        while pending:
            results, lost = run.pool.run_sync(pending)
            run.counters["groups_reissued"] += len(lost)
            groups += run.accept(results)
            pending = lost + run.take_reissues()
        if not groups:
            run.count_empty_step()
            continue
        wait_data = time.perf_counter() - step_started
        trained_at = run.policy_version
        metrics = ray.get(run.learner.train_step.remote(groups))
        groups = run.settle(groups, metrics)
        if groups is None:
            continue
        time_sync = run.publish(wait=True)
        run.finish_step(progress, groups, trained_at, metrics, wait_data, time_sync,
                        time.perf_counter() - step_started, run.pool.busy_seconds() - busy_before)


SCHEDULES = {"pipelined": pipelined, "sequential": sequential}
"""``runtime.mode`` -> loop."""
