"""A pipelined run whose groups' tensors go worker -> object store -> learner: the driver
receives none of them, and a byte budget of one update's groups stalls the workers and lets
them go on without losing a group."""
import json
from pathlib import Path

import pytest
from conftest import tiny_policy_config

from editrl.cluster.config import EvalConfig, RolloutConfig, RuntimeConfig, TrainConfig
from editrl.cluster.inflight import InflightBudget
from editrl.cluster.topology import RolloutTopology, TopologyConfig
from editrl.cluster.train import train
from editrl.learner.config import LearnerConfig

STEPS, B = 3, 2


def _config(**runtime) -> TrainConfig:
    return TrainConfig(
        steps=STEPS, prompts_per_step=B, group_size=2, policy=tiny_policy_config(),
        learner=LearnerConfig(learning_rate=1e-2, torch_threads=1),
        topology=TopologyConfig(rollout=RolloutTopology(workers=2)),
        rollout=RolloutConfig(reward_timeout_s=30, trajectory_dtype="bfloat16", forward_micro_batch=2),
        runtime=RuntimeConfig(mode="pipelined", checkpoint_every=0, max_staleness=STEPS, prefetch_per_worker=2, **runtime),
        eval=EvalConfig(seeds_per_prompt=1, max_prompts=2, num_videos_saved=1),
    )


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory):
    group_bytes = InflightBudget.of(_config(max_inflight_mib=1024)).group_bytes
    budget_mib = B * group_bytes / 2**20  # exactly one update's groups: the workers must wait
    run_dir = tmp_path_factory.mktemp("data_plane") / "run"
    summary = train(_config(max_inflight_mib=budget_mib), run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, [r for r in records if r["kind"] == "train"], group_bytes, budget_mib, run_dir


@pytest.mark.slow
def test_the_driver_never_holds_a_groups_tensors(budget_run):
    summary, records, group_bytes, _, _ = budget_run
    assert summary["steps"] == STEPS
    # every trained group's tensors went past the driver: it received 0 bytes of them, the
    # learner read them all from the object store
    assert summary["data_driver_tensor_bytes"] == 0
    assert summary["data_bytes_moved"] == sum(r["data_bytes_per_step"] for r in records) > 0
    # the plan's group is what travels plus the (G, T) fp32 log-probs that stay with the metadata:
    # 2 samples x 4 steps x 4 bytes = 32 bytes
    assert all(r["data_bytes_read"] == r["data_bytes_per_step"] == B * (group_bytes - 32) for r in records)


@pytest.mark.slow
def test_a_byte_budget_stalls_and_resumes_the_workers_without_losing_a_group(budget_run):
    summary, records, group_bytes, budget_mib, _ = budget_run
    assert summary["budget_stalls"] >= 1  # the workers waited at least once ...
    assert summary["data_inflight_bytes_max"] <= budget_mib * 2**20  # ... and the store never held more
    # ... and went on: every step trained B groups, none failed, was lost or expired
    assert [r["groups_trained"] for r in records] == [B] * STEPS
    assert summary["groups_failed"] == summary["groups_lost"] == summary["groups_dropped_stale"] == 0


def test_a_budget_below_one_update_is_refused_with_the_numbers():
    group_bytes = InflightBudget.of(_config(max_inflight_mib=1024)).group_bytes
    # 2 groups of a 2-sample group: the plan's bytes, exactly as the workers produce them
    too_small = 1.5 * group_bytes / 2**20
    with pytest.raises(ValueError, match=rf"holds fewer groups than one update: 2 groups of {group_bytes / 2**20:.2f} MiB"):
        InflightBudget.of(_config(max_inflight_mib=too_small))


def test_a_micro_batch_that_does_not_divide_the_rows_is_refused():
    with pytest.raises(ValueError, match=r"forward_micro_batch=3 does not divide the 4 rows .* divisors: \[1, 2, 4\]"):
        TrainConfig(group_size=2, policy=tiny_policy_config(), rollout=RolloutConfig(forward_micro_batch=3))
