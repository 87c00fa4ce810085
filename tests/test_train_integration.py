"""Two Edit-GRPO steps end to end: a local Ray with two rollout actors, the reward
server as its own process, the learner, and every output of a run."""
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import tiny_policy_config

from editrl.cluster.topology import RolloutTopology, TopologyConfig
from editrl.cluster.config import EvalConfig, RolloutConfig, RuntimeConfig, TrainConfig
from editrl.cluster.run_log import paired_gain
from editrl.cluster.train import train
from editrl.learner.config import LearnerConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_two_training_steps_through_ray_and_the_reward_server(tmp_path):
    config = TrainConfig(
        steps=2,
        prompts_per_step=2,
        group_size=2,
        policy=tiny_policy_config(),
        learner=LearnerConfig(learning_rate=1e-2, torch_threads=1),
        topology=TopologyConfig(rollout=RolloutTopology(workers=2)), rollout=RolloutConfig(reward_timeout_s=30),
        runtime=RuntimeConfig(mode="sequential", checkpoint_every=1),
        eval=EvalConfig(seeds_per_prompt=2, max_prompts=3, num_videos_saved=2),
    )
    run_dir = tmp_path / "run"
    summary = train(config, run_dir)

    # the summary has every field the run promises, with consistent values
    for key in ("steps", "wall_time_s", "samples_per_s", "reward_heldout_initial", "reward_heldout_final",
                "reward_heldout_initial_sem", "reward_heldout_final_sem", "checkpoint"):
        assert key in summary, key
    assert summary == json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["policy_version"] == 2 and summary["groups_failed"] == 0
    assert summary["samples"] == 2 * 2 * 2
    assert summary["heldout_paired_prompts"] == 3  # eval.max_prompts, evaluated at both ends
    # with one prompt per group, the paired gain's mean equals the difference of the overall means
    gain = summary["reward_heldout_final"] - summary["reward_heldout_initial"]
    assert summary["heldout_paired_gain"] == pytest.approx(gain, abs=1e-5)

    # metrics: one train record per step with the learner's statistics, held-out at start and end
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2]
    assert [r["policy_version"] for r in train_records] == [1.0, 2.0]
    for key in ("reward_mean", "reward_std", "adv_mean", "clip_frac", "approx_kl", "ratio_mean", "time_train_s", "time_step_s",
                "time_wait_data_s", "time_sync_s", "learner_idle_ratio", "worker_idle_ratio", "samples_per_s", "staleness_mean"):
        assert key in train_records[0], key
    assert train_records[0]["ratio_min"] == pytest.approx(1.0, abs=1e-4)  # first update is on-policy
    assert [r["step"] for r in records if r["kind"] == "heldout"] == [0, 2]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))

    # every trajectory is in the rollout log, tagged with the policy version it was sampled with
    rollouts = pq.read_table(run_dir / "rollouts").to_pylist()
    assert len(rollouts) == 8
    assert sorted({(r["step"], r["policy_version"]) for r in rollouts}) == [(1, 0), (2, 1)]
    assert {r["staleness"] for r in rollouts} == {0}  # sequential mode is on-policy
    assert len({r["group_id"] for r in rollouts}) == 4  # each group trained once
    # ... and with how it was sampled: the configured sampler on the first int(0.75 * 4) = 3 steps
    assert {(r["sampler"], r["eta"], r["guidance_scale"], tuple(r["stochastic_steps"])) for r in rollouts} == {
        ("flow_sde", 0.7, 2.0, (0, 1, 2))}

    # adapter in peft format, plot, held-out sample videos, resolved config
    adapter = Path(summary["checkpoint"])
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    assert (run_dir / "reward_curves.png").stat().st_size > 1000
    assert len(list((run_dir / "samples").glob("heldout_initial_*.mp4"))) == 2
    assert len(list((run_dir / "samples").glob("heldout_final_*.mp4"))) == 2
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_000002"


def test_paired_gain_by_prompt_against_hand_arithmetic():
    initial = {"a": 5.0, "b": 6.0, "c": 7.0}
    final = {"a": 6.0, "b": 6.5, "c": 6.5, "only_final": 9.0}  # prompts missing at one end are left out
    stats = paired_gain(initial, final)
    # d = [1, 0.5, -0.5]: mean 1/3; deviations (2/3, 1/6, -5/6), squares sum 42/36,
    # sample variance 7/12, sem = sqrt(7/12) / sqrt(3) = 0.440959
    assert stats["heldout_paired_gain"] == pytest.approx(1 / 3)
    assert stats["heldout_paired_gain_sem"] == pytest.approx(0.440959, abs=1e-6)
    assert stats["heldout_prompts_improved"] == pytest.approx(2 / 3)
    assert stats["heldout_paired_prompts"] == 3
    with pytest.raises(ValueError, match="at least two prompts"):
        paired_gain({"a": 1.0}, {"a": 2.0, "b": 3.0})
