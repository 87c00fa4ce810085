"""``editrl.cluster.eval_stats`` against arithmetic done by hand on small fixed sets."""
import csv
import json
import math

import numpy as np
import pytest
from scipy import stats

from editrl.cluster.eval_stats import (
    EvalSample, agreement, build_results, paired_difference, prompt_means, sign_test_p, spearman_rows,
    summary_table, write_results,
)

# 2 arms x 3 prompts x 2 seeds. Rewards per (arm, prompt): (seed 0, seed 1) -> mean over seeds
#   base  p1 (colour): (0.1, 0.3) -> 0.2   p2 (colour): (0.3, 0.5) -> 0.4   p3 (""): (0.5, 0.7) -> 0.6
#   lora  p1 (colour): (0.4, 0.6) -> 0.5   p2 (colour): (0.4, 0.4) -> 0.4   p3 (""): (0.8, 1.0) -> 0.9
# Dimension "fidelity" on every sample; "text" is missing on base p3 seed 1.
REWARDS = {
    ("base", "p1"): (0.1, 0.3), ("base", "p2"): (0.3, 0.5), ("base", "p3"): (0.5, 0.7),
    ("lora", "p1"): (0.4, 0.6), ("lora", "p2"): (0.4, 0.4), ("lora", "p3"): (0.8, 1.0),
}
CATEGORY = {"p1": "colour", "p2": "colour", "p3": ""}


def fixed_samples() -> list[EvalSample]:
    samples = []
    for (arm, prompt), rewards in REWARDS.items():
        for seed, reward in enumerate(rewards):
            dims = {"fidelity": 2 * reward, "text": 10.0 * seed + (1.0 if arm == "base" else 2.0)}
            if (arm, prompt, seed) == ("base", "p3", 1):
                del dims["text"]
            samples.append(EvalSample(arm, prompt, CATEGORY[prompt], seed, reward, dims))
    return samples


def row(rows, arm, category, metric):
    (match,) = [r for r in rows if (r.arm, r.category, r.metric) == (arm, category, metric)]
    return match


def test_prompt_means_average_the_seeds_of_each_prompt():
    means = prompt_means([s for s in fixed_samples() if s.arm == "base"])
    assert means == pytest.approx({"p1": 0.2, "p2": 0.4, "p3": 0.6})


def test_summary_sem_is_over_prompt_means_not_samples():
    rows = summary_table(fixed_samples())
    r = row(rows, "base", "all", "reward")
    # prompt means 0.2, 0.4, 0.6 -> mean 0.4; deviations -0.2, 0, 0.2 -> sum of squares 0.08;
    # std (ddof=1) = sqrt(0.08 / 2) = 0.2; SEM = 0.2 / sqrt(3) = 0.11547
    assert r.mean == pytest.approx(0.4)
    assert r.sem == pytest.approx(0.2 / math.sqrt(3))
    assert (r.n_prompts, r.n_samples) == (3, 6)
    # over the six samples it would be std(0.1, 0.3, 0.3, 0.5, 0.5, 0.7) / sqrt(6) = 0.0894, not 0.1155
    assert r.sem != pytest.approx(np.std([0.1, 0.3, 0.3, 0.5, 0.5, 0.7], ddof=1) / math.sqrt(6))
    # lora: prompt means 0.5, 0.4, 0.9 -> mean 0.6; deviations -0.1, -0.2, 0.3 -> squares 0.01 + 0.04 + 0.09 = 0.14;
    # variance 0.14 / 2 = 0.07; SEM = sqrt(0.07 / 3) = 0.15275
    r = row(rows, "lora", "all", "reward")
    assert (r.mean, r.sem) == pytest.approx((0.6, math.sqrt(0.07 / 3)))


def test_summary_per_category_and_the_empty_category():
    rows = summary_table(fixed_samples())
    # base colour: prompt means 0.2, 0.4 -> mean 0.3; for two values SEM = |a - b| / 2 = 0.1
    r = row(rows, "base", "colour", "reward")
    assert (r.mean, r.sem, r.n_prompts, r.n_samples) == (pytest.approx(0.3), pytest.approx(0.1), 2, 4)
    # the empty category is reported as "(none)": one prompt -> mean 0.6, SEM undefined (NaN)
    r = row(rows, "base", "(none)", "reward")
    assert r.mean == pytest.approx(0.6) and math.isnan(r.sem) and (r.n_prompts, r.n_samples) == (1, 2)
    assert {r.category for r in rows} == {"colour", "(none)", "all"}


def test_summary_of_dimensions_uses_the_samples_that_have_them():
    rows = summary_table(fixed_samples())
    # fidelity = 2 * reward -> mean 0.8, SEM 2 * 0.11547
    r = row(rows, "base", "all", "fidelity")
    assert (r.mean, r.sem) == pytest.approx((0.8, 0.4 / math.sqrt(3)))
    # base text: p1 (1, 11) -> 6, p2 (1, 11) -> 6, p3 only seed 0 -> 1 (seed 1 has no "text")
    # mean (6 + 6 + 1) / 3 = 13/3; deviations 5/3, 5/3, -10/3 -> squares 150/9; variance 75/9; SEM = sqrt(75/27)
    r = row(rows, "base", "all", "text")
    assert (r.mean, r.sem) == pytest.approx((13 / 3, math.sqrt(75 / 27)))
    assert (r.n_prompts, r.n_samples) == (3, 5)


def test_paired_difference_by_hand():
    p = paired_difference(fixed_samples(), "lora", "base")
    # d = lora - base per prompt: p1 0.5 - 0.2 = 0.3, p2 0.4 - 0.4 = 0 (a tie), p3 0.9 - 0.6 = 0.3
    # mean 0.2; deviations 0.1, -0.2, 0.1 -> squares 0.06; variance 0.03; SE = sqrt(0.03 / 3) = 0.1
    assert (p.mean, p.sem, p.n) == (pytest.approx(0.2), pytest.approx(0.1), 3)
    assert (p.wins, p.losses, p.ties) == (2, 0, 1)
    # sign test over 2 wins, 0 losses (the tie dropped): 2 * 0.5**2 = 0.5
    assert p.p_value == pytest.approx(0.5)
    reverse = paired_difference(fixed_samples(), "base", "lora")
    assert (reverse.mean, reverse.wins, reverse.losses) == (pytest.approx(-0.2), 0, 2)


def test_paired_difference_of_an_arm_against_itself_is_exactly_zero():
    p = paired_difference(fixed_samples(), "lora", "lora")
    assert (p.mean, p.sem, p.p_value) == (0.0, 0.0, 1.0)
    assert (p.wins, p.losses, p.ties, p.n) == (0, 0, 3, 3)


def test_paired_difference_counts_only_prompts_both_arms_have():
    samples = fixed_samples() + [EvalSample("lora", "p4", "", 0, 5.0)]
    assert paired_difference(samples, "lora", "base").n == 3
    with pytest.raises(ValueError, match="no prompt in common"):
        paired_difference([EvalSample("a", "p1", "", 0, 1.0), EvalSample("b", "p2", "", 0, 1.0)], "a", "b")


def test_paired_difference_needs_a_config_when_there_are_several():
    samples = fixed_samples() + [EvalSample("lora", "p1", "colour", 0, 9.0, reward_config="strict")]
    with pytest.raises(ValueError, match="reward_config"):
        paired_difference(samples, "lora", "base")
    assert paired_difference(samples, "lora", "base", reward_config="default").mean == pytest.approx(0.2)


def test_sign_test_p_values_by_hand():
    # 4 wins, 0 losses: P(all 4 one way) = 2 * 0.5**4 = 0.125
    assert sign_test_p(4, 0) == pytest.approx(0.125)
    # 5 wins, 1 loss: 2 * (C(6,0) + C(6,1)) / 2**6 = 2 * 7 / 64 = 0.21875
    assert sign_test_p(5, 1) == pytest.approx(0.21875)
    assert sign_test_p(0, 0) == 1.0


def test_paired_sign_test_drops_ties():
    # four prompts b wins by 1, one prompt tied (difference 1e-13 counts as a tie)
    samples = [EvalSample("b", f"p{i}", "", 0, 2.0) for i in range(4)] + [EvalSample("a", f"p{i}", "", 0, 1.0) for i in range(4)]
    samples += [EvalSample("a", "p4", "", 0, 1.0), EvalSample("b", "p4", "", 0, 1.0 + 1e-13)]
    p = paired_difference(samples, "b", "a")
    assert (p.wins, p.losses, p.ties) == (4, 0, 1)
    assert p.p_value == pytest.approx(0.125)


def scored(config_scores: dict[str, list[float]]) -> list[EvalSample]:
    """Output i is (arm "base", prompt f"p{i}", seed 0); each config scores every output."""
    return [EvalSample("base", f"p{i}", "", 0, score, reward_config=config)
            for config, scores in config_scores.items() for i, score in enumerate(scores)]


def test_agreement_of_a_monotone_rescoring_is_one():
    # strict = lenient squared: the same ranking -> rho 1; every resample (with two distinct values) also 1
    lenient = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    a = agreement(scored({"lenient": lenient, "strict": [x**2 for x in lenient]}), "lenient", "strict")
    assert (a.rho, a.low, a.high, a.n) == (pytest.approx(1.0), pytest.approx(1.0), pytest.approx(1.0), 6)


def test_agreement_with_one_swap_by_hand_and_bootstrap():
    # eight outputs, the last two swapped: rank differences 0,0,0,0,0,0,1,-1 -> sum d^2 = 2;
    # rho = 1 - 6 * 2 / (8 * (8^2 - 1)) = 1 - 12 / 504 = 0.97619
    samples = scored({"a": [1, 2, 3, 4, 5, 6, 7, 8], "b": [1, 2, 3, 4, 5, 6, 8, 7]})
    result = agreement(samples, "a", "b", n_boot=500, seed=3)
    assert result.rho == pytest.approx(1 - 12 / 504)
    assert result.low <= result.rho <= result.high <= 1.0
    assert result.low < result.high  # some resamples hold the swapped pair, some do not
    assert agreement(samples, "a", "b", n_boot=500, seed=3) == result
    assert agreement(samples, "a", "b", n_boot=500, seed=4) != result
    # the interval is the 2.5/97.5 percentiles of spearmanr over resamples of the matched pairs
    x, y = np.arange(1.0, 9.0), np.array([1, 2, 3, 4, 5, 6, 8, 7], dtype=float)
    idx = np.random.default_rng(3).integers(0, 8, size=(500, 8))
    rhos = np.array([stats.spearmanr(x[i], y[i]).statistic for i in idx])
    assert (result.low, result.high) == pytest.approx(tuple(np.nanpercentile(rhos, [2.5, 97.5])))


def test_spearman_rows_matches_spearmanr_with_ties():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 4, size=(20, 7)).astype(float), rng.integers(0, 4, size=(20, 7)).astype(float)
    expected = [stats.spearmanr(a, b).statistic for a, b in zip(x, y)]
    np.testing.assert_allclose(spearman_rows(x, y), expected, equal_nan=True)


def test_agreement_matches_on_arm_prompt_and_seed_and_needs_three():
    samples = scored({"a": [1.0, 2.0, 3.0], "b": [3.0, 2.0, 1.0]})
    # reversed ranking -> -1; an output only config a scored does not count
    assert agreement(samples + [EvalSample("lora", "p0", "", 0, 9.0, reward_config="a")], "a", "b").n == 3
    assert agreement(samples, "a", "b").rho == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="at least 3"):
        agreement(samples[:2] + samples[3:5], "a", "b")


def test_samples_reject_non_finite_scores():
    with pytest.raises(ValueError, match="not finite"):
        EvalSample("base", "p1", "", 0, math.nan)
    with pytest.raises(ValueError, match="non-finite"):
        EvalSample("base", "p1", "", 0, 1.0, {"fidelity": math.inf})


def test_write_results(tmp_path):
    samples = fixed_samples() + [EvalSample(s.arm, s.prompt_id, s.edit_category, s.seed, 10 * s.reward, {},
                                            reward_config="strict") for s in fixed_samples()]
    json_path, csv_path = write_results(tmp_path / "out", samples, arms=["base", "lora"], n_boot=200)
    results = json.loads(json_path.read_text())  # strict JSON: NaN written as null
    assert results["arms"] == ["base", "lora"] and results["reward_configs"] == ["default", "strict"]
    assert results["categories"] == ["(none)", "colour", "all"]
    assert [EvalSample.from_dict(s) for s in results["samples"]] == samples
    pairs = {(p["reward_config"], p["arm_a"], p["arm_b"], p["metric"]): p for p in results["paired_differences"]}
    assert pairs["default", "lora", "base", "reward"]["mean"] == pytest.approx(0.2)
    assert pairs["strict", "base", "lora", "reward"]["mean"] == pytest.approx(-2.0)
    assert ("default", "base", "lora", "fidelity") in pairs
    # the strict config is 10 x the default one on the same outputs: rank correlation 1 over 12 outputs
    (agree,) = results["agreement"]
    assert (agree["config_a"], agree["config_b"], agree["rho"], agree["n"]) == ("default", "strict", pytest.approx(1.0), 12)
    none_row = [r for r in results["summary"] if (r["reward_config"], r["arm"], r["category"], r["metric"])
                == ("default", "base", "(none)", "reward")][0]
    assert none_row["sem"] is None
    with csv_path.open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(results["summary"])
    (r,) = [r for r in table if (r["reward_config"], r["arm"], r["category"], r["metric"]) == ("default", "base", "all", "reward")]
    assert (float(r["mean"]), float(r["sem"]), r["n_prompts"], r["n_samples"]) == (
        pytest.approx(0.4), pytest.approx(0.2 / math.sqrt(3)), "3", "6")


def test_build_results_checks_arms():
    with pytest.raises(ValueError, match="no samples"):
        build_results(fixed_samples(), arms=["base", "missing"])
    assert build_results(fixed_samples(), arms=["lora"])["arms"] == ["lora", "base"]
