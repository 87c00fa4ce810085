"""The distributed runtime on a local Ray: a rollout worker killed from outside
mid-run, scaling 2 -> 3 -> 1 during a run, stale groups rejected under
max_staleness = 0, and a resumed run that reproduces an uninterrupted one."""
import json
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import torch
from conftest import tiny_policy_config
from safetensors.torch import load_file

from editrl.cluster.topology import RolloutTopology, TopologyConfig
from editrl.cluster.config import EvalConfig, RolloutConfig, RuntimeConfig, TrainConfig
from editrl.cluster.controller import DEFAULT_NAME, NAMESPACE
from editrl.cluster.train import train
from editrl.learner.checkpoint import load_learner_state
from editrl.learner.config import LearnerConfig

pytestmark = pytest.mark.slow


def _config(**runtime) -> TrainConfig:
    return TrainConfig(
        steps=runtime.pop("steps", 8),
        prompts_per_step=2,
        group_size=2,
        policy=tiny_policy_config(),
        learner=LearnerConfig(learning_rate=1e-2, torch_threads=1),
        topology=TopologyConfig(rollout=RolloutTopology(workers=2)), rollout=RolloutConfig(reward_timeout_s=30, max_restarts=2),
        runtime=RuntimeConfig(**runtime),
        eval=EvalConfig(seeds_per_prompt=1, max_prompts=1, num_videos_saved=0),
    )


def _controller(timeout_s=120):
    """The running job's controller, once the run has started Ray and created it."""
    deadline = time.monotonic() + timeout_s
    while not ray.is_initialized():
        if time.monotonic() > deadline:
            raise AssertionError(f"the run did not start Ray within {timeout_s} s")
        time.sleep(0.05)  # poll interval
    while True:
        try:
            return ray.get_actor(DEFAULT_NAME, namespace=NAMESPACE)
        except (ValueError, Exception) as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"the run did not create its controller actor {DEFAULT_NAME!r} within {timeout_s} s") from exc
            time.sleep(0.1)  # poll interval


def _wait_status(controller, what, predicate, timeout_s=300):
    """The controller's status once ``predicate`` holds for it; ``what`` names that state in the failure."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = ray.get(controller.get_status.remote())
        if status and predicate(status):
            return status
        time.sleep(0.05)  # poll interval
    raise AssertionError(f"the run did not reach '{what}' within {timeout_s} s")


@pytest.fixture(scope="module")
def disturbed_run(tmp_path_factory):
    """A pipelined run (max_staleness = 0) during which an operator kills a rollout
    worker with SIGKILL, then scales the pool to 3 and back to 1 worker."""
    run_dir = tmp_path_factory.mktemp("pipelined") / "run"
    events = {}

    def operator():
        try:
            controller = _controller()
            status = _wait_status(controller, "step 1 with worker pids", lambda s: s["step"] >= 1 and s["worker_pids"])
            victim = int(next(iter(status["worker_pids"].values())))
            os.kill(victim, signal.SIGKILL)
            events["killed"] = victim
            _wait_status(controller, "step 3", lambda s: s["step"] >= 3)
            ray.get(controller.set_rollout_workers.remote(3))
            events["scaled_to_3"] = _wait_status(controller, "3 rollout workers", lambda s: s["rollout_workers"] == 3)["step"]
            _wait_status(controller, "a step after scaling to 3", lambda s: s["step"] >= events["scaled_to_3"] + 1)
            ray.get(controller.set_rollout_workers.remote(1))
            events["scaled_to_1"] = True
        except BaseException as exc:  # a thread's exception fails no test: the tests report it from events
            events["error"] = repr(exc)
            raise

    thread = threading.Thread(target=operator, daemon=True)
    thread.start()
    summary = train(_config(mode="pipelined", max_staleness=0, steps=9, checkpoint_every=0), run_dir)
    thread.join(timeout=5)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rollouts = pq.read_table(run_dir / "rollouts").to_pylist()
    return summary, [r for r in records if r["kind"] == "train"], rollouts, events


def test_killed_worker_loses_no_group_and_trains_none_twice(disturbed_run):
    summary, train_records, rollouts, events = disturbed_run
    assert "killed" in events, events.get("error")
    assert train_records[-1]["worker_restarts_total"] >= 1
    assert summary["groups_reissued"] >= 1  # the dead worker's groups were handed out again
    group_ids = [r["group_id"] for r in rollouts if r["sample"] == 0]
    assert len(group_ids) == len(set(group_ids)) == 9 * 2  # every step trained B distinct groups


def test_pool_scales_from_2_to_3_to_1_during_the_run(disturbed_run):
    _, train_records, _, events = disturbed_run
    sizes = [int(r["rollout_workers"]) for r in train_records]
    assert events.get("scaled_to_1"), events.get("error")
    assert sizes[0] == 2 and 3 in sizes and sizes[-1] == 1
    assert sizes.index(3) < len(sizes) - 1 - sizes[::-1].index(3) + 1  # 3 comes before the final 1


def test_stale_groups_are_rejected_under_max_staleness_0(disturbed_run):
    summary, train_records, rollouts, _ = disturbed_run
    assert summary["groups_dropped_stale"] > 0  # workers kept sampling with old adapters
    assert {r["staleness"] for r in rollouts} == {0}
    assert all(r["staleness_max"] == 0 for r in train_records)


TIMING_PREFIXES = ("time_", "learner_idle", "worker_idle", "samples_per_s", "denoising_steps_per_s", "wall_time")
"""Metrics that measure time or throughput; every other metric is a function of the run's data."""


def _without_timings(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith(TIMING_PREFIXES)}


def _metrics(run_dir: Path) -> list[dict]:
    """Every record of ``metrics.jsonl`` (train and held-out) without timings."""
    return [_without_timings(json.loads(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _same(a, b) -> bool:
    """Exact equality, where NaN equals NaN (e.g. the SEM of a single held-out sample)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _differences(a: dict, b: dict) -> dict:
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if not _same(a.get(k), b.get(k))}


@pytest.mark.timeout(600)  # three runs; on two busy cores they can pass the default 300 s
def test_resume_after_killing_the_learner_continues_the_uninterrupted_run(tmp_path, caplog):
    config = _config(mode="sequential", steps=4, checkpoint_every=2)
    uninterrupted = tmp_path / "uninterrupted"
    expected_summary = train(config, uninterrupted)

    run_dir = tmp_path / "interrupted"
    killer_error = []

    def kill_learner_after_first_checkpoint(timeout_s=300):
        pointer = run_dir / "checkpoints" / "latest"
        deadline = time.monotonic() + timeout_s
        while not (pointer.is_file() and pointer.read_text() == "step_000002"):
            if time.monotonic() > deadline:
                killer_error.append(f"checkpoints/latest did not name step_000002 within {timeout_s} s")
                return
            time.sleep(0.02)  # poll interval: the checkpoint is written by the learner actor, out of reach
        ray.kill(ray.get_actor(f"{DEFAULT_NAME}-learner", namespace=NAMESPACE))

    killer = threading.Thread(target=kill_learner_after_first_checkpoint, daemon=True)
    killer.start()
    with pytest.raises(ray.exceptions.RayActorError):
        train(config, run_dir)
    killer.join(timeout=5)
    assert not killer_error, killer_error
    with caplog.at_level(logging.INFO, logger="editrl.cluster.run"):
        summary = train(config, run_dir, resume=True)
    assert "resumed from step 2 (policy version 2)" in caplog.messages  # the checkpoint's version, not 0

    # on CPU in sequential mode the resumed run is the uninterrupted run, bit for bit:
    # every record of metrics.jsonl (rewards and each reward dimension, advantages,
    # losses, KL, ratios, clip fraction, grad norm, policy versions, counters, held-out
    # evaluations) except timings and throughput
    resumed, expected = _metrics(run_dir), _metrics(uninterrupted)
    assert [(r["kind"], r["step"]) for r in resumed] == [(r["kind"], r["step"]) for r in expected]
    assert [r["step"] for r in expected if r["kind"] == "train"] == [1, 2, 3, 4]
    for a, b in zip(resumed, expected):
        assert _same(a, b), (a["kind"], a["step"], _differences(a, b))
    # every trajectory: group ids, seeds, workers, versions, rewards and dimensions, log-probs
    rows = lambda d: pq.read_table(d / "rollouts").to_pylist()
    for a, b in zip(rows(run_dir), rows(uninterrupted), strict=True):
        assert _same(a, b), (a["step"], a["group_id"], a["sample"], _differences(a, b))
    assert _same(_without_timings(summary), {**_without_timings(expected_summary), "checkpoint": summary["checkpoint"]})
    # the trained adapter and the optimizer state end up identical
    final_adapter = lambda d: load_file(str(d / "adapter" / "adapter_model.safetensors"))
    resumed_adapter, expected_adapter = final_adapter(run_dir), final_adapter(uninterrupted)
    assert resumed_adapter.keys() == expected_adapter.keys()
    assert all(torch.equal(resumed_adapter[k], expected_adapter[k]) for k in expected_adapter)
    optimizer = lambda d: load_learner_state(d / "checkpoints" / "step_000004" / "learner.pt")["optimizer"]
    resumed_state, expected_state = optimizer(run_dir)["state"], optimizer(uninterrupted)["state"]
    assert resumed_state.keys() == expected_state.keys()
    for key in expected_state:
        for name, value in expected_state[key].items():
            assert torch.equal(resumed_state[key][name], value), (key, name)
