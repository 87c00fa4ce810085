"""The distributed runtime on a local Ray: a rollout worker killed from outside
mid-run, scaling 2 -> 3 -> 1 during a run, stale groups rejected under
max_staleness = 0, and a resumed run that reproduces an uninterrupted one."""
import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
from conftest import tiny_policy_config

from editrl.config import EvalConfig, RolloutConfig, RuntimeConfig, TrainConfig
from editrl.controller import DEFAULT_NAME, NAMESPACE
from editrl.train import train
from learner.config import LearnerConfig

pytestmark = pytest.mark.slow


def _config(**runtime) -> TrainConfig:
    return TrainConfig(
        steps=runtime.pop("steps", 8),
        prompts_per_step=2,
        group_size=2,
        policy=tiny_policy_config(),
        learner=LearnerConfig(learning_rate=1e-2, torch_threads=1),
        rollout=RolloutConfig(num_workers=2, reward_timeout_s=30, max_restarts=2),
        runtime=RuntimeConfig(**runtime),
        eval=EvalConfig(seeds_per_prompt=1, max_prompts=1, num_videos_saved=0),
    )


def _controller():
    """The running job's controller, once the run has started Ray and created it."""
    while not ray.is_initialized():
        time.sleep(0.05)
    while True:
        try:
            return ray.get_actor(DEFAULT_NAME, namespace=NAMESPACE)
        except (ValueError, Exception):
            time.sleep(0.1)


def _wait_status(controller, predicate, timeout_s=300):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = ray.get(controller.get_status.remote())
        if status and predicate(status):
            return status
        time.sleep(0.05)
    raise TimeoutError("the run never reached the awaited state")


@pytest.fixture(scope="module")
def disturbed_run(tmp_path_factory):
    """A pipelined run (max_staleness = 0) during which an operator kills a rollout
    worker with SIGKILL, then scales the pool to 3 and back to 1 worker."""
    run_dir = tmp_path_factory.mktemp("pipelined") / "run"
    events = {}

    def operator():
        controller = _controller()
        status = _wait_status(controller, lambda s: s["step"] >= 1 and s["worker_pids"])
        victim = int(next(iter(status["worker_pids"].values())))
        os.kill(victim, signal.SIGKILL)
        events["killed"] = victim
        _wait_status(controller, lambda s: s["step"] >= 3)
        ray.get(controller.set_rollout_workers.remote(3))
        events["scaled_to_3"] = _wait_status(controller, lambda s: s["rollout_workers"] == 3)["step"]
        _wait_status(controller, lambda s: s["step"] >= events["scaled_to_3"] + 1)
        ray.get(controller.set_rollout_workers.remote(1))
        events["scaled_to_1"] = True

    thread = threading.Thread(target=operator, daemon=True)
    thread.start()
    summary = train(_config(mode="pipelined", max_staleness=0, steps=9, checkpoint_every=0), run_dir)
    thread.join(timeout=5)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rollouts = pq.read_table(run_dir / "rollouts").to_pylist()
    return summary, [r for r in records if r["kind"] == "train"], rollouts, events


def test_killed_worker_loses_no_group_and_trains_none_twice(disturbed_run):
    summary, train_records, rollouts, events = disturbed_run
    assert "killed" in events
    assert train_records[-1]["worker_restarts_total"] >= 1
    assert summary["groups_reissued"] >= 1  # the dead worker's groups were handed out again
    group_ids = [r["group_id"] for r in rollouts if r["sample"] == 0]
    assert len(group_ids) == len(set(group_ids)) == 9 * 2  # every step trained B distinct groups


def test_pool_scales_from_2_to_3_to_1_during_the_run(disturbed_run):
    _, train_records, _, events = disturbed_run
    sizes = [int(r["rollout_workers"]) for r in train_records]
    assert events.get("scaled_to_1")
    assert sizes[0] == 2 and 3 in sizes and sizes[-1] == 1
    assert sizes.index(3) < len(sizes) - 1 - sizes[::-1].index(3) + 1  # 3 comes before the final 1


def test_stale_groups_are_rejected_under_max_staleness_0(disturbed_run):
    summary, train_records, rollouts, _ = disturbed_run
    assert summary["groups_dropped_stale"] > 0  # workers kept sampling with old adapters
    assert {r["staleness"] for r in rollouts} == {0}
    assert all(r["staleness_max"] == 0 for r in train_records)


DETERMINISTIC_PREFIXES = ("time_", "learner_idle", "worker_idle", "samples_per_s", "denoising_steps_per_s")


def _train_metrics(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(DETERMINISTIC_PREFIXES)} for r in records if r["kind"] == "train"]


def test_resume_after_killing_the_learner_continues_the_uninterrupted_run(tmp_path):
    config = _config(mode="sequential", steps=4, checkpoint_every=2)
    train(config, tmp_path / "uninterrupted")

    run_dir = tmp_path / "interrupted"

    def kill_learner_after_first_checkpoint():
        pointer = run_dir / "checkpoints" / "latest"
        while not (pointer.is_file() and pointer.read_text() == "step_000002"):
            time.sleep(0.02)
        ray.kill(ray.get_actor(f"{DEFAULT_NAME}-learner", namespace=NAMESPACE))

    killer = threading.Thread(target=kill_learner_after_first_checkpoint, daemon=True)
    killer.start()
    with pytest.raises(ray.exceptions.RayActorError):
        train(config, run_dir)
    killer.join(timeout=5)
    summary = train(config, run_dir, resume=True)

    assert summary["steps"] == 4
    resumed, uninterrupted = _train_metrics(run_dir), _train_metrics(tmp_path / "uninterrupted")
    assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted] == [1, 2, 3, 4]
    for a, b in zip(resumed, uninterrupted):
        # same groups, same seeds, same restored adapter and optimizer; a residual
        # run-to-run difference in the scored videos moves reward statistics slightly
        assert a["policy_version"] == b["policy_version"] and a["groups_trained"] == b["groups_trained"]
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], rel=2e-2, abs=0.02), a["step"]
    ids = lambda d: [(r["step"], r["group_id"], r["sample"]) for r in pq.read_table(d / "rollouts").to_pylist()]
    assert ids(run_dir) == ids(tmp_path / "uninterrupted")  # the resumed run trained the same groups in order
