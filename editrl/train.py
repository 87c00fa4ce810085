"""The Edit-GRPO main loop: rollout workers sample groups and get them scored,
the learner updates the LoRA adapter, the adapter goes back to the workers.

Two schedules share every part but the loop itself:

* ``pipelined``: workers always hold ``prefetch_per_worker`` groups; the learner
  (its own actor) trains on B complete groups whose data is at most
  ``max_staleness`` policy versions old (the oldest first) while the workers keep sampling and
  earlier groups are scored;
* ``sequential``: sample B groups, score them, train, publish, repeat.
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import ray
from ray.exceptions import RayActorError
from tqdm import tqdm

from cluster.ray_cluster import init_ray
from editrl.config import TrainConfig, save_config
from editrl.controller import NAMESPACE, start_controller
from editrl.data.dataset import PromptDataset
from editrl.pool import WorkerPool
from editrl.reward_process import RewardServerProcess
from editrl.run_log import MetricsLog, RolloutLog, paired_gain, plot_rewards, reward_stats, save_side_by_side
from editrl.tasks import TaskSource, eval_tasks
from learner.actor import make_learner_actor
from protocol.rollout import Group, GroupFailure, GroupTask
from rollout_workers.actor import make_rollout_actor
from rollout_workers.reward_client import RewardClient

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LOCAL_SCALE_HEADROOM = 4
"""Rollout workers a local Ray instance can add at runtime beyond the configured ones."""


def resolve(path: str) -> str:
    """A config path: absolute as given, else relative to the project root."""
    return str(path if Path(path).is_absolute() else PROJECT_ROOT / path)


def train(config: TrainConfig, run_dir: Path, resume: bool = False) -> dict:
    """Run Edit-GRPO as configured; write everything under ``run_dir``; return the summary.

    With ``resume``, continue from the newest checkpoint in ``run_dir``.
    """
    started = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    pc = config.policy
    train_set = PromptDataset(resolve(config.data.train_prompts), pc.num_frames, pc.height, pc.width)
    heldout_set = PromptDataset(resolve(config.data.heldout_prompts), pc.num_frames, pc.height, pc.width)
    corpus = [row.instruction for row in train_set.rows + heldout_set.rows]
    logger.info("%d train prompts, %d held-out prompts; %s mode", len(train_set), len(heldout_set), config.runtime.mode)

    with contextlib.ExitStack() as stack:
        reward_url = config.reward_server.url or stack.enter_context(
            RewardServerProcess(resolve(config.reward_server.config), run_dir / "reward_server.log", config.reward_server.startup_timeout_s)
        )
        if config.reward_server.url:  # e.g. a Serve deployment that may still be starting
            with RewardClient(reward_url) as client:
                client.wait_until_healthy(timeout_s=config.reward_server.startup_timeout_s)
        rc, rt = config.rollout, config.runtime
        # Ray CPUs are scheduling tokens: a local instance gets enough for the learner, the
        # workers and room to scale up at runtime, whatever the machine's core count.
        max_workers = max(rc.num_workers, rt.autoscale.max_workers if rt.autoscale else 0) + LOCAL_SCALE_HEADROOM
        local_cpus = math.ceil(max_workers * rc.num_cpus_per_worker + rt.learner_num_cpus)
        init_ray(config.ray_address, num_cpus=None if config.ray_address else local_cpus, project_root=str(PROJECT_ROOT))
        stack.callback(ray.shutdown)
        run = Run(config, run_dir, corpus, reward_url, train_set, heldout_set)
        stack.callback(run.close)
        summary = run.execute(resume)

    summary["wall_time_s"] = time.perf_counter() - started
    plot_rewards(run_dir / "metrics.jsonl", run_dir / "reward_curves.png")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.info("held-out reward %.3f +- %.3f -> %.3f +- %.3f (%.1f combined SEMs); run dir %s",
                summary["reward_heldout_initial"], summary["reward_heldout_initial_sem"],
                summary["reward_heldout_final"], summary["reward_heldout_final_sem"], summary["heldout_gain_in_sem"], run_dir)
    return summary


class Run:
    """One run's actors, logs and counters; :meth:`execute` is the loop."""

    def __init__(self, config: TrainConfig, run_dir: Path, corpus: list[str], reward_url: str,
                 train_set: PromptDataset, heldout_set: PromptDataset):
        self.config, self.run_dir = config, run_dir
        self.train_set, self.heldout_set = train_set, heldout_set
        rc, rt = config.rollout, config.runtime
        self.learner = make_learner_actor(rt.learner_num_cpus, rt.learner_num_gpus, rt.learner_resources).options(
            name=f"{rt.controller_name}-learner", namespace=NAMESPACE
        ).remote(config.policy, config.learner, corpus, str(PROJECT_ROOT), config.seed, "cuda" if rt.learner_num_gpus else "cpu")
        actor_cls = make_rollout_actor(rc.num_cpus_per_worker, rc.num_gpus_per_worker, rc.max_restarts, rc.resources)
        device = "cuda" if rc.num_gpus_per_worker else "cpu"
        self.pool = WorkerPool(
            lambda worker_id: actor_cls.remote(
                worker_id, config.policy, corpus, str(PROJECT_ROOT), reward_url, reward_timeout_s=rc.reward_timeout_s,
                reward_max_attempts=rc.reward_max_attempts, torch_threads=rc.torch_threads, fps=config.fps,
                reward_concurrency=rc.reward_concurrency, device=device, seed=config.seed,
                video_format=rc.reward_video_format,
            ),
            rc.num_workers, prefetch_per_worker=rt.prefetch_per_worker, scoring_per_worker=rc.reward_concurrency,
        )
        self.controller = start_controller(rt.controller_name, rc.num_workers)
        self.tasks = TaskSource(config, train_set)
        self.step = 0
        self.version = 0
        self.trained_ids: set[str] = set()
        self.accepted_ids: set[str] = set()
        self.counters = collections.Counter()
        self.evaluations: list[dict] = []
        self.metrics_log: MetricsLog | None = None
        self.rollout_log: RolloutLog | None = None
        self._last_resize_step = 0

    def close(self) -> None:
        if self.metrics_log is not None:
            self.metrics_log.close()
        self.pool.shutdown()

    # ---- the loop -------------------------------------------------------
    def execute(self, resume: bool) -> dict:
        state = ray.get(self.learner.resume.remote(str(self.run_dir))) if resume else None
        if resume and state is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.run_dir / 'checkpoints'}")
        if state is not None:
            self._load_driver_state(state)
            logger.info("resumed from step %d (policy version %d)", self.step, self.version)
        self.metrics_log = MetricsLog(self.run_dir, resume_step=self.step if state else None)
        self.rollout_log = RolloutLog(self.run_dir / "rollouts", resume_step=self.step if state else None)
        self.version = ray.get(self.learner.ready.remote())
        self._publish(wait=True)

        if state is None:
            self.evaluations.append(self.evaluate("initial"))
        progress = tqdm(total=self.config.steps, initial=self.step, desc="edit-grpo", unit="step", dynamic_ncols=True)
        loop = self._pipelined if self.config.runtime.mode == "pipelined" else self._sequential
        loop(progress)
        progress.close()

        final = self.evaluate("final")
        checkpoint = ray.get(self.learner.save_adapter.remote(str(self.run_dir / "adapter")))
        ray.get(self.learner.save_checkpoint.remote(str(self.run_dir), self.step, self._driver_state()))
        return self._summary(self.evaluations[0], final, checkpoint)

    def _pipelined(self, progress) -> None:
        """Workers keep ``prefetch_per_worker`` groups each; the learner trains as soon
        as B fresh-enough groups are complete, while sampling and scoring go on."""
        cfg, rt = self.config, self.config.runtime
        buffer: list[Group] = []
        reissue: collections.deque[GroupTask] = collections.deque()
        training = None
        waiting_since = time.perf_counter()
        step_started = time.perf_counter()
        busy_before = self.pool.busy_seconds()
        while self.step < cfg.steps:
            self._follow_controller()
            while self.pool.capacity() > 0:
                self.pool.submit(reissue.popleft() if reissue else self.tasks.next())
            results, lost = self.pool.poll(timeout_s=0.05 if training else 0.5)
            reissue.extend(lost)
            self.counters["groups_reissued"] += len(lost)
            buffer += self._accept(results)
            if training is None:
                # Oldest first (stable: completion order within a version): a group one version
                # from expiring is trained now, a fresher one can wait a step, so fewer expire.
                buffer = sorted(self._drop_stale(buffer), key=lambda g: g.policy_version)
                if len(buffer) >= cfg.prompts_per_step:
                    batch, buffer = buffer[: cfg.prompts_per_step], buffer[cfg.prompts_per_step :]
                    wait_data = time.perf_counter() - waiting_since
                    training = (self.learner.train_step.remote(batch), batch, wait_data, self.version)
            elif ray.wait([training[0]], timeout=0)[0]:
                ref, batch, wait_data, trained_at = training
                training = None
                metrics = ray.get(ref)
                waiting_since = time.perf_counter()
                time_sync = self._publish(wait=False)
                busy_now = self.pool.busy_seconds()
                self._finish_step(progress, batch, trained_at, metrics, wait_data, time_sync,
                                  time.perf_counter() - step_started, busy_now - busy_before)
                step_started, busy_before = time.perf_counter(), busy_now

    def _sequential(self, progress) -> None:
        """Sample B groups, score them, train, publish; then the next step."""
        cfg = self.config
        while self.step < cfg.steps:
            self._follow_controller()
            step_started = time.perf_counter()
            busy_before = self.pool.busy_seconds()
            pending = [self.tasks.next() for _ in range(cfg.prompts_per_step)]
            groups: list[Group] = []
            while pending:
                results, lost = self.pool.run_sync(pending)
                self.counters["groups_reissued"] += len(lost)
                groups += self._accept(results)
                pending = lost
            if not groups:
                self._count_empty_step()
                continue
            wait_data = time.perf_counter() - step_started
            trained_at = self.version
            metrics = ray.get(self.learner.train_step.remote(groups))
            time_sync = self._publish(wait=True)
            self._finish_step(progress, groups, trained_at, metrics, wait_data, time_sync,
                              time.perf_counter() - step_started, self.pool.busy_seconds() - busy_before)

    # ---- parts of a step ------------------------------------------------
    def _accept(self, results: list[Group | GroupFailure]) -> list[Group]:
        """Complete groups not trained before; failures are logged and counted."""
        groups = []
        for result in results:
            if isinstance(result, GroupFailure):
                self.counters["groups_failed"] += 1
                self.counters["groups_failed_step"] += 1
                logger.error("group %s (prompt %s) dropped: %s", result.task.group_id, result.task.prompt_id, result.reason)
            elif result.task.group_id in self.accepted_ids:
                logger.warning("group %s came back twice; the copy is ignored", result.task.group_id)
            else:
                self.accepted_ids.add(result.task.group_id)
                groups.append(result)
        return groups

    def _drop_stale(self, buffer: list[Group]) -> list[Group]:
        fresh = [g for g in buffer if self.version - g.policy_version <= self.config.runtime.max_staleness]
        dropped = len(buffer) - len(fresh)
        if dropped:
            self.counters["groups_dropped_stale"] += dropped
            self.counters["groups_dropped_stale_step"] += dropped
            logger.info("dropped %d groups older than %d policy versions", dropped, self.config.runtime.max_staleness)
        return fresh

    def _publish(self, wait: bool) -> float:
        start = time.perf_counter()
        ref, version, checksum = ray.get(self.learner.publish.remote())
        self.version = version
        self.pool.publish(ref, version, checksum, wait=wait)
        return time.perf_counter() - start

    def _count_empty_step(self) -> None:
        self.counters["empty_steps"] += 1
        logger.error("every group of this step failed (%d such steps in a row)", self.counters["empty_steps"])
        if self.counters["empty_steps"] >= self.config.max_failed_steps:
            raise RuntimeError(f"{self.counters['empty_steps']} steps in a row without a single complete group")

    def _finish_step(self, progress, groups: list[Group], trained_at: int, train_metrics: dict,
                     wait_data: float, time_sync: float, wall: float, worker_busy: float) -> None:
        self.step += 1
        self.counters["empty_steps"] = 0
        self.trained_ids.update(g.task.group_id for g in groups)
        self.rollout_log.append(self.step, groups, trained_at)
        staleness = [trained_at - g.policy_version for g in groups]
        samples = sum(g.rewards.numel() for g in groups)
        self.counters["samples"] += samples
        self.counters["time_rollout_s"] += wall
        workers = self.pool.active_count()
        metrics = {
            **reward_stats(groups),
            **train_metrics,
            "reward_config_version": ",".join(sorted({g.reward_config_version for g in groups})),
            "groups_trained": float(len(groups)),
            "groups_failed": float(self.counters.pop("groups_failed_step", 0)),
            "groups_dropped_stale": float(self.counters.pop("groups_dropped_stale_step", 0)),
            "groups_dropped_stale_total": float(self.counters["groups_dropped_stale"]),
            "groups_reissued_total": float(self.counters["groups_reissued"]),
            "worker_restarts_total": float(self.pool.restarts),
            "staleness_mean": float(np.mean(staleness)),
            "staleness_max": float(max(staleness)),
            **{f"staleness_{k}": float(staleness.count(k)) for k in range(self.config.runtime.max_staleness + 1)},
            "rollout_workers": float(workers),
            "time_step_s": wall,
            "time_wait_data_s": wait_data,
            "time_sync_s": time_sync,
            "learner_idle_ratio": max(0.0, 1.0 - train_metrics["time_train_s"] / max(wall, 1e-9)),
            "worker_idle_ratio": max(0.0, 1.0 - worker_busy / max(wall * workers, 1e-9)),
            "samples_per_s": samples / max(wall, 1e-9),
            "denoising_steps_per_s": samples * self.config.policy.num_steps / max(wall, 1e-9),
            **phase_times(groups),
        }
        self.metrics_log.log(self.step, metrics)
        self.metrics_log.histogram(self.step, "train/staleness", staleness)
        progress.update(1)
        progress.set_postfix(reward=f"{metrics['reward_mean']:.2f}", kl=f"{train_metrics['kl']:.1e}", v=self.version,
                             stale=f"{metrics['staleness_mean']:.1f}", idle=f"{metrics['learner_idle_ratio']:.0%}", workers=workers)
        self.controller.report.remote({"step": self.step, "rollout_workers": workers, "policy_version": self.version,
                                       "worker_pids": self._worker_pids()})
        self._autoscale(metrics)
        rt = self.config.runtime
        if rt.checkpoint_every and self.step % rt.checkpoint_every == 0 and self.step < self.config.steps:
            ray.get(self.learner.save_checkpoint.remote(str(self.run_dir), self.step, self._driver_state()))
        every = self.config.eval.every_steps
        if every and self.step % every == 0 and self.step < self.config.steps:
            self.evaluations.append(self.evaluate(None))

    def _worker_pids(self) -> dict[str, int]:
        try:
            return {str(k): v for k, v in self.pool.pids(timeout_s=0.5).items()}
        except RayActorError:
            return {}

    # ---- scaling ----------------------------------------------------------
    def _follow_controller(self) -> None:
        desired = ray.get(self.controller.get_rollout_workers.remote())
        if desired != self.pool.active_count():
            logger.info("resizing the rollout pool from %d to %d workers", self.pool.active_count(), desired)
            self.pool.resize(desired)

    def _autoscale(self, metrics: dict) -> None:
        policy = self.config.runtime.autoscale
        if policy is None or self.step - self._last_resize_step < policy.cooldown_steps:
            return
        current = self.pool.active_count()
        stale_share = metrics["groups_dropped_stale"] / max(1.0, metrics["groups_dropped_stale"] + metrics["groups_trained"])
        target = current
        if stale_share > policy.scale_down_stale and current > policy.min_workers:
            target = current - 1
        elif metrics["time_wait_data_s"] / max(metrics["time_step_s"], 1e-9) > policy.scale_up_learner_idle and current < policy.max_workers:
            target = current + 1
        if target != current:
            logger.info("autoscale: %d -> %d rollout workers", current, target)
            self.controller.set_rollout_workers.remote(target)
            self._last_resize_step = self.step

    # ---- evaluation and state ---------------------------------------------
    def evaluate(self, label: str | None) -> dict:
        """Held-out rewards of deterministic (ODE) edits with fixed seeds; returns the
        metrics (``reward_mean``, ``reward_sem`` over samples, per dimension)."""
        keep = self.config.eval.num_videos_saved if label else 0
        pending = eval_tasks(self.config, self.heldout_set, self.step, keep)
        groups: list[Group] = []
        while pending:
            results, pending = self.pool.run_sync(pending)
            groups += [r for r in results if isinstance(r, Group)]
            for failure in (r for r in results if isinstance(r, GroupFailure)):
                logger.error("held-out group %s failed: %s", failure.task.group_id, failure.reason)
        if not groups:
            raise RuntimeError(f"held-out evaluation at step {self.step}: every group failed")
        rewards = np.concatenate([g.rewards.numpy() for g in groups])
        stats = reward_stats(groups)
        stats["reward_sem"] = float(rewards.std(ddof=1) / math.sqrt(len(rewards))) if len(rewards) > 1 else float("nan")
        stats["samples"] = float(len(rewards))
        by_type: dict[str, list[float]] = collections.defaultdict(list)
        for group in groups:
            by_type[self.heldout_set.by_id(group.task.prompt_id).edit_type] += group.rewards.tolist()
        for edit_type, values in sorted(by_type.items()):
            stats[f"reward_mean/{edit_type}"] = float(np.mean(values))
        for group in groups:
            if group.frames is not None:
                source = self.heldout_set.clip(self.heldout_set.by_id(group.task.prompt_id))
                path = self.run_dir / "samples" / f"heldout_{label}_{group.task.prompt_id}.mp4"
                save_side_by_side(path, source, group.frames[0], self.config.fps)
        logger.info("held-out evaluation at step %d: reward %.3f +- %.3f over %d samples", self.step, stats["reward_mean"], stats["reward_sem"], len(rewards))
        self.metrics_log.log(self.step, stats, kind="heldout")
        # kept for the paired gain in summary.json (and in the resume state), not logged per step
        stats["prompt_means"] = {g.task.prompt_id: float(g.rewards.mean()) for g in groups}
        return stats

    def _driver_state(self) -> dict:
        return {"tasks": self.tasks.state_dict(), "trained_ids": sorted(self.trained_ids),
                "counters": dict(self.counters), "evaluations": self.evaluations}

    def _load_driver_state(self, state: dict) -> None:
        self.step = int(state["step"])
        self.tasks.load_state_dict(state["tasks"])
        self.trained_ids = set(state["trained_ids"])
        self.accepted_ids = set(self.trained_ids)
        self.counters = collections.Counter(state["counters"])
        self.evaluations = list(state["evaluations"])

    def _summary(self, initial: dict, final: dict, checkpoint: str) -> dict:
        combined_sem = math.sqrt(initial["reward_sem"] ** 2 + final["reward_sem"] ** 2)
        return {
            "steps": self.step,
            "policy_version": self.version,
            "mode": self.config.runtime.mode,
            "samples": int(self.counters["samples"]),
            "samples_per_s": self.counters["samples"] / max(self.counters["time_rollout_s"], 1e-9),
            "groups_failed": int(self.counters["groups_failed"]),
            "groups_dropped_stale": int(self.counters["groups_dropped_stale"]),
            "groups_reissued": int(self.counters["groups_reissued"]),
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


def phase_times(groups: list[Group]) -> dict[str, float]:
    """Worker-side seconds per phase (encode, sample, decode, reward wait), summed over groups."""
    keys = sorted({k for g in groups for k in g.timings})
    return {f"time_worker_{k}": float(sum(g.timings.get(k, 0.0) for g in groups)) for k in keys}
