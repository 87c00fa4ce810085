"""``bench/algorithms.py`` reads a run's files and aggregates repeats with the arithmetic it claims."""
import json

import pytest

from bench.algorithms import aggregate, summarise_run, write_doc


def _run_dir(tmp_path, name: str, initial: float, final: float):
    run = tmp_path / name
    run.mkdir()
    records = [
        {"kind": "heldout", "step": 0, "reward_mean": initial, "reward_sem": 0.1},
        {"step": 1, "time_train_s": 1.0, "time_step_s": 10.0, "groups_trained": 2.0},
        {"step": 2, "time_train_s": 1.0, "time_step_s": 12.0, "groups_trained": 2.0},
        {"kind": "heldout", "step": 2, "reward_mean": final, "reward_sem": 0.1},
    ]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    dims = {"reward_mean": initial, "detail_preservation_mean": 3.0}
    (run / "summary.json").write_text(json.dumps({
        "samples": 16, "reward_heldout_initial": initial, "reward_heldout_final": final, "heldout_gain_in_sem": final - initial,
        "heldout_dimensions_initial": dims, "heldout_dimensions_final": {**dims, "reward_mean": final}}))
    return run


def test_a_run_is_read_as_rewards_against_training_seconds_and_samples(tmp_path):
    run = summarise_run(_run_dir(tmp_path, "a", 5.0, 6.0), "edit_grpo", 0, 30.0)
    # 4 groups trained over 16 samples: G = 4; after step 2, 10 + 12 = 22 s and 2 * 2 * 4 = 16 samples
    assert run["evals"] == [{"step": 0, "train_s": 0.0, "samples": 0, "reward_mean": 5.0, "reward_sem": 0.1},
                            {"step": 2, "train_s": 22.0, "samples": 16, "reward_mean": 6.0, "reward_sem": 0.1}]
    assert run["gain"] == pytest.approx(1.0)


def test_repeats_are_aggregated_as_mean_and_standard_error(tmp_path):
    runs = [summarise_run(_run_dir(tmp_path, "a", 5.0, 6.0), "awm", 0, 30.0),
            summarise_run(_run_dir(tmp_path, "b", 5.0, 7.0), "awm", 1, 50.0)]
    row = aggregate(runs)["awm"]
    # gains 1 and 2: mean 1.5, sample std 0.7071, SEM 0.7071 / sqrt(2) = 0.5
    assert row["gain"] == pytest.approx((1.5, 0.5))
    assert row["wall_s"] == pytest.approx((40.0, 10.0))
    assert row["dimension_change"]["detail_preservation_mean"] == pytest.approx((0.0, 0.0))
    assert row["curve"][1]["reward"] == pytest.approx((6.5, 0.5))
    write_doc({"awm": row}, tmp_path / "page.md", "a machine", [])
    assert "| awm | 2 | 1.500 ± 0.500 |" in (tmp_path / "page.md").read_text()
