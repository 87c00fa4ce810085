"""One run's actors, logs and counters, and the parts of a step that both schedules
share. The loops themselves are in :mod:`editrl.cluster.schedules`.

Public interface (what ``editrl train``, the schedules and the benchmarks use):
:meth:`Run.execute` (the whole run with one schedule), the parts of a step
(:meth:`Run.accept`, :meth:`Run.take_reissues`, :meth:`Run.drop_stale`, :meth:`Run.publish`,
:meth:`Run.finish_step`, ...), :meth:`Run.evaluate`, :meth:`Run.driver_state`,
:meth:`Run.reset` and the ``on_step_end`` callbacks.
"""
from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from pathlib import Path

import ray
from ray.exceptions import RayActorError
from tqdm import tqdm

from editrl.cluster.config import TrainConfig
from editrl.cluster.controller import NAMESPACE, start_controller
from editrl.cluster.evaluation import evaluate_heldout, run_summary
from editrl.cluster.inflight import InflightBudget, rollout_engine
from editrl.cluster.learner_group import start_learner
from editrl.cluster.pool import WorkerPool
from editrl.cluster.run_log import MetricsLog, RolloutLog
from editrl.cluster.step_metrics import autoscale_target, step_metrics
from editrl.cluster.tasks import TaskSource
from editrl.protocol.dataset import PromptDataset
from editrl.protocol.rollout import Group, GroupFailure, GroupTask, ScoreFailure, tensor_bytes
from editrl.resources import bundled_root
from editrl.rollout_workers.actor import make_rollout_actor

logger = logging.getLogger(__name__)


class Run:
    """The learner actor, the rollout-worker pool and the controller of one run,
    with its task source, logs and counters."""

    def __init__(self, config: TrainConfig, run_dir: Path, corpus: list[str], reward_url: str,
                 train_set: PromptDataset, heldout_set: PromptDataset):
        self.config, self.run_dir = config, run_dir
        self.train_set, self.heldout_set = train_set, heldout_set
        rc, rt, workers, ranks = config.rollout, config.runtime, config.topology.rollout, config.topology.learner
        root = str(bundled_root())
        self.learner = start_learner(config, f"{rt.controller_name}-learner", NAMESPACE, (
            config.policy, config.learner, corpus, root, config.seed, "cuda" if ranks.gpus else "cpu", ranks.sharding))
        actor_cls = make_rollout_actor(workers.cpus, workers.gpus, rc.max_restarts, workers.resources)
        device = "cuda" if workers.gpus else "cpu"
        self.controller = start_controller(rt.controller_name, workers.workers)
        engine = rollout_engine(rc)
        self.pool = WorkerPool(
            lambda worker_id: actor_cls.remote(
                worker_id, config.policy, corpus, root, reward_url, reward_timeout_s=rc.reward_timeout_s,
                reward_max_attempts=rc.reward_max_attempts, torch_threads=rc.torch_threads, fps=config.fps,
                reward_concurrency=rc.reward_concurrency, device=device, seed=config.seed,
                video_format=rc.reward_video_format, engine=engine, encode_cache=config.data.encode_cache,
            ),
            workers.workers, prefetch_per_worker=rt.prefetch_per_worker, scoring_per_worker=rc.reward_concurrency,
        )
        self._returns_seen = 0  # the pool's return failures already counted
        self.budget = InflightBudget.of(config)
        """The byte budget of groups in flight (``runtime.max_inflight_mib``)."""
        self.on_step_end: list[Callable[["Run"], None]] = []
        """Called with the run after every finished step (its metrics are logged by then)."""
        self.evaluations: list[dict] = []
        self.metrics_log: MetricsLog | None = None
        self.rollout_log: RolloutLog | None = None
        self.policy_version = 0
        """The newest policy version published to the workers."""
        self._last_resize_step = 0
        self.reset()

    def reset(self, metrics_log: MetricsLog | None = None, rollout_log: RolloutLog | None = None) -> None:
        """Tasks from the seed again, step 0, no group accepted, counters cleared, and
        these logs (the old metrics log is closed). The learner is not touched."""
        self.tasks = TaskSource(self.config, self.train_set)
        self.step = 0
        self.trained_ids: set[str] = set()
        self.accepted_ids: set[str] = set()
        self.counters: collections.Counter = collections.Counter()
        self._reissues: list[GroupTask] = []
        self._stalled = False
        self._score_reissues: collections.Counter = collections.Counter()  # group id -> re-issues after failed scoring
        if self.metrics_log is not None and metrics_log is not None:
            self.metrics_log.close()
        if metrics_log is not None:
            self.metrics_log = metrics_log
        if rollout_log is not None:
            self.rollout_log = rollout_log

    def close(self) -> None:
        if self.metrics_log is not None:
            self.metrics_log.close()
        self.pool.shutdown()

    # ---- the whole run ---------------------------------------------------
    def execute(self, resume: bool, schedule: Callable[["Run", tqdm], None]) -> dict:
        """Evaluate, train until ``config.steps`` steps are done with ``schedule`` (one of
        :data:`editrl.cluster.schedules.SCHEDULES`), evaluate, save the adapter and a
        checkpoint; return the summary (see ``summary.json``).

        Raises:
            FileNotFoundError: ``resume`` without a checkpoint in the run directory.
        """
        state = ray.get(self.learner.resume.remote(str(self.run_dir))) if resume else None
        if resume and state is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.run_dir / 'checkpoints'}")
        if state is not None:
            self._load_driver_state(state)
        self.metrics_log = MetricsLog(self.run_dir, resume_step=self.step if state else None)
        self.rollout_log = RolloutLog(self.run_dir / "rollouts", resume_step=self.step if state else None)
        self.policy_version = ray.get(self.learner.ready.remote())
        if state is not None:
            logger.info("resumed from step %d (policy version %d)", self.step, self.policy_version)
        self.publish(wait=True)

        if state is None:
            self.evaluations.append(self.evaluate("initial"))
        progress = tqdm(total=self.config.steps, initial=self.step, desc="edit-grpo", unit="step", dynamic_ncols=True)
        schedule(self, progress)
        progress.close()

        final = self.evaluate("final")
        checkpoint = ray.get(self.learner.save_adapter.remote(str(self.run_dir / "adapter")))
        ray.get(self.learner.save_checkpoint.remote(str(self.run_dir), self.step, self.driver_state()))
        return run_summary(self.step, self.policy_version, self.config.runtime.mode, self.counters,
                           self.evaluations[0], final, checkpoint)

    # ---- parts of a step ------------------------------------------------
    def accept(self, results: list[Group | GroupFailure]) -> list[Group]:
        """Complete groups not trained before; failures are logged and counted
        (``groups_failed``). A group whose scoring failed (:class:`ScoreFailure`) is
        queued for re-issue (:meth:`take_reissues`, counted in ``groups_reissued``)
        under ``runtime.on_score_failure: reissue`` until it has been re-issued
        ``runtime.max_score_reissues`` times; any other failure is dropped."""
        groups = []
        for result in results:
            if isinstance(result, GroupFailure):
                self.counters["groups_failed"] += 1
                self.counters["groups_failed_step"] += 1
                self._failed(result)
            elif result.task.group_id in self.accepted_ids:
                logger.warning("group %s came back twice; the copy is ignored", result.task.group_id)
            else:
                self.accepted_ids.add(result.task.group_id)
                self.counters["driver_tensor_bytes"] += tensor_bytes(result)
                self.budget.observe(result.bulk_bytes)
                groups.append(result)
        return groups

    def may_submit(self, held: list[Group]) -> bool:
        """Whether one more task fits the byte budget beside the groups ``held`` (sampled, not yet
        trained) and those being sampled; a refusal after an allowance counts one stall
        (``budget_stalls``) and the workers wait until an update frees room."""
        allowed, inflight = self.budget.allows(sum(g.bulk_bytes for g in held), self.pool.in_flight())
        self.counters["inflight_bytes_max"] = max(self.counters["inflight_bytes_max"], inflight)
        if not allowed and not self._stalled:
            self.counters["budget_stalls"] += 1
            self.counters["budget_stalls_step"] += 1
            logger.info("byte budget: %.1f MiB of groups in flight; no new task until an update frees room", inflight / 2**20)
        self._stalled = not allowed
        return allowed

    def _failed(self, failure: GroupFailure) -> None:
        task, rt = failure.task, self.config.runtime
        done = self._score_reissues[task.group_id]
        if task.group_id in self.accepted_ids:
            logger.warning("group %s failed on a second copy after it was accepted; ignored: %s", task.group_id, failure.reason)
        elif isinstance(failure, ScoreFailure) and rt.on_score_failure == "reissue" and done < rt.max_score_reissues:
            self._score_reissues[task.group_id] += 1
            self.counters["groups_reissued"] += 1
            self._reissues.append(task)
            logger.warning("group %s (prompt %s) not scored, re-issued (%d of at most %d): %s", task.group_id,
                           task.prompt_id, done + 1, rt.max_score_reissues, failure.reason)
        else:
            after = f" after {done} re-issues" if done else ""
            logger.error("group %s (prompt %s) dropped%s: %s", task.group_id, task.prompt_id, after, failure.reason)

    def settle(self, batch: list[Group], metrics: dict) -> list[Group] | None:
        """The groups an update trained, from the learner's answer. Groups whose tensors were lost
        before the learner read them (the node holding them died) are counted (``groups_lost``),
        logged by id and re-issued (same id and seed; ``groups_reissued``); None when the learner
        had nothing left to train (the step did not happen)."""
        lost = set(metrics.pop("lost_group_ids", []))
        if lost:
            self.counters["groups_lost"] += len(lost)
            self.counters["groups_reissued"] += len(lost)
            for group in batch:
                if group.task.group_id in lost:
                    self.accepted_ids.discard(group.task.group_id)
                    self._reissues.append(group.task)
            logger.error("%d groups lost their tensors before the update read them; re-issued: %s", len(lost),
                         ", ".join(sorted(lost)))
        if not metrics.pop("updated", 1.0):
            self.count_empty_step()
            return None
        return [g for g in batch if g.task.group_id not in lost]

    def take_reissues(self) -> list[GroupTask]:
        """Tasks whose scoring failed and that are to be handed out again (same id and
        seed), oldest first; the queue is emptied."""
        tasks, self._reissues = self._reissues, []
        return tasks

    def drop_stale(self, buffer: list[Group]) -> list[Group]:
        """The groups at most ``runtime.max_staleness`` policy versions old; the others are counted and logged."""
        fresh = [g for g in buffer if self.policy_version - g.policy_version <= self.config.runtime.max_staleness]
        dropped = len(buffer) - len(fresh)
        if dropped:
            self.counters["groups_dropped_stale"] += dropped
            self.counters["groups_dropped_stale_step"] += dropped
            logger.info("dropped %d groups older than %d policy versions", dropped, self.config.runtime.max_staleness)
        return fresh

    def publish(self, wait: bool) -> float:
        """Send the learner's adapter to every worker; returns the seconds it took."""
        start = time.perf_counter()
        ref, policy_version, checksum = ray.get(self.learner.publish.remote())
        self.policy_version = policy_version
        self.pool.publish(ref, policy_version, checksum, wait=wait)
        return time.perf_counter() - start

    def count_empty_step(self) -> None:
        """A step in which every group failed.

        Raises:
            RuntimeError: ``max_failed_steps`` such steps in a row.
        """
        self.counters["empty_steps"] += 1
        logger.error("every group of this step failed (%d such steps in a row)", self.counters["empty_steps"])
        if self.counters["empty_steps"] >= self.config.max_failed_steps:
            raise RuntimeError(f"{self.counters['empty_steps']} steps in a row without a single complete group")

    def finish_step(self, progress: tqdm, groups: list[Group], trained_at: int, train_metrics: dict,
                    wait_data: float, time_sync: float, wall: float, worker_busy: float) -> None:
        """Book-keeping after an update on ``groups`` sampled for policy version
        ``trained_at``: logs, progress, controller report, autoscaling, periodic
        checkpoint and evaluation, then the ``on_step_end`` callbacks."""
        self.step += 1
        self.counters["empty_steps"] = 0
        self.trained_ids.update(g.task.group_id for g in groups)
        self.rollout_log.append(self.step, groups, trained_at)
        staleness = [trained_at - g.policy_version for g in groups]
        samples = sum(g.rewards.numel() for g in groups)
        self.counters["samples"] += samples
        self.counters["data_bytes_moved"] += sum(g.bulk_bytes for g in groups)
        self.counters["time_rollout_s"] += wall
        workers = self.pool.active_count()
        self.counters["groups_return_failed"] += self.pool.return_failures - self._returns_seen
        self._returns_seen = self.pool.return_failures
        metrics = step_metrics(
            groups, train_metrics, staleness, self.counters, self.pool.restarts, workers, self.config.runtime.max_staleness,
            self.config.policy.num_steps, wall=wall, wait_data=wait_data, time_sync=time_sync, worker_busy=worker_busy,
        )
        self.metrics_log.log(self.step, metrics)
        self.metrics_log.histogram(self.step, "train/staleness", staleness)
        progress.update(1)
        progress.set_postfix(reward=f"{metrics['reward_mean']:.2f}", kl_ref=f"{train_metrics['kl_ref']:.1e}", v=self.policy_version,
                             stale=f"{metrics['staleness_mean']:.1f}", idle=f"{metrics['learner_idle_ratio']:.0%}", workers=workers)
        self.controller.report.remote({"step": self.step, "rollout_workers": workers, "policy_version": self.policy_version,
                                       "worker_pids": self._worker_pids()})
        self._autoscale(metrics)
        rt = self.config.runtime
        if rt.checkpoint_every and self.step % rt.checkpoint_every == 0 and self.step < self.config.steps:
            ray.get(self.learner.save_checkpoint.remote(str(self.run_dir), self.step, self.driver_state()))
        every = self.config.eval.every_steps
        if every and self.step % every == 0 and self.step < self.config.steps:
            self.evaluations.append(self.evaluate(None))
        for callback in self.on_step_end:
            callback(self)

    def _worker_pids(self) -> dict[str, int]:
        try:
            return {str(k): v for k, v in self.pool.pids(timeout_s=0.5).items()}
        except RayActorError:
            return {}

    # ---- scaling ----------------------------------------------------------
    def follow_controller(self) -> None:
        """Resize the pool to the controller's desired size (``editrl scale``, autoscaling)."""
        desired = ray.get(self.controller.get_rollout_workers.remote())
        if desired != self.pool.active_count():
            logger.info("resizing the rollout pool from %d to %d workers", self.pool.active_count(), desired)
            self.pool.resize(desired)

    def _autoscale(self, metrics: dict) -> None:
        policy = self.config.runtime.autoscale
        if policy is None or self.step - self._last_resize_step < policy.cooldown_steps:
            return
        current = self.pool.active_count()
        target = autoscale_target(
            current, metrics["groups_dropped_stale"], metrics["groups_trained"], metrics["time_wait_data_s"], metrics["time_step_s"],
            min_workers=policy.min_workers, max_workers=policy.max_workers,
            scale_down_stale=policy.scale_down_stale, scale_up_learner_idle=policy.scale_up_learner_idle,
        )
        if target != current:
            logger.info("autoscale: %d -> %d rollout workers", current, target)
            self.controller.set_rollout_workers.remote(target)
            self._last_resize_step = self.step

    # ---- evaluation and state ---------------------------------------------
    def evaluate(self, label: str | None) -> dict:
        """Held-out rewards of deterministic (ODE) edits with fixed seeds, logged as
        ``heldout`` metrics; with ``label``, edits are saved as mp4 under ``samples/``.
        See :func:`editrl.cluster.evaluation.evaluate_heldout`."""
        stats = evaluate_heldout(self.pool, self.config, self.heldout_set, self.step, self.run_dir, label)
        self.metrics_log.log(self.step, {k: v for k, v in stats.items() if k != "prompt_means"}, kind="heldout")
        return stats

    def driver_state(self) -> dict:
        """What a checkpoint keeps of the driver: task cursor, trained group ids, counters, evaluations,
        and the learner's rank count (``--resume`` refuses another)."""
        return {"tasks": self.tasks.state_dict(), "trained_ids": sorted(self.trained_ids),
                "counters": dict(self.counters), "evaluations": self.evaluations,
                "learner_ranks": self.config.topology.learner.ranks, "learner_sharding": self.config.topology.learner.sharding}

    def _load_driver_state(self, state: dict) -> None:
        self.step = int(state["step"])
        self.tasks.load_state_dict(state["tasks"])
        self.trained_ids = set(state["trained_ids"])
        self.accepted_ids = set(self.trained_ids)
        self.counters = collections.Counter(state["counters"])
        self.evaluations = list(state["evaluations"])
