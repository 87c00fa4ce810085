"""Statistics of ``editrl eval``: per-arm summaries, paired A/B differences between arms
and the agreement of two reward configs, written as ``results.json`` and ``results.csv``.

An *arm* is what produced the edits: ``"base"`` (the base model) or an adapter name.
Each :class:`EvalSample` is one edit (arm, prompt, seed) scored by one reward config.

Standard errors. The seeds of one prompt share the source clip and the instruction,
so their rewards are correlated; treating the samples as independent would understate
the standard error. Every statistic here first averages the seeds of each prompt and
takes the prompts as the independent units. With ``x[p, s]`` the score of prompt ``p``
and seed ``s`` (only the seeds that have the metric), the standard error of the mean
over the ``P`` prompts is::

    xbar[p] = mean_s x[p, s]
    mean    = (1/P) * sum_p xbar[p]
    SEM     = std(xbar, ddof=1) / sqrt(P)        (NaN for P = 1)

Scores are on whatever scale the reward server uses (the presets score 0-10).
"""
from __future__ import annotations

import csv
import itertools
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

logger = logging.getLogger(__name__)

REWARD = "reward"  # metric name of the overall score; every other metric is a reward dimension
ALL = "all"  # category label of the summary over every edit category
NO_CATEGORY = "(none)"  # category label of samples whose edit_category is empty
TIE_TOLERANCE = 1e-12  # a per-prompt difference with |d| <= TIE_TOLERANCE is a tie in the sign test
CSV_FIELDS = ("reward_config", "arm", "category", "metric", "mean", "sem", "n_prompts", "n_samples")


@dataclass(frozen=True)
class EvalSample:
    """One edit scored by one reward config.

    Attributes:
        arm: what produced the edit, ``"base"`` or an adapter name.
        prompt_id: the prompt table's id of the prompt.
        edit_category: the prompt's edit category; ``""`` is reported as ``"(none)"``.
        seed: the sampling seed of the edit.
        reward: the overall score the reward server composed per its config
            (weighted or geometric mean of the dimensions).
        dimensions: score per reward dimension; a dimension may be absent
            (e.g. not applicable to this edit).
        reward_config: name of the reward config that scored the edit.

    Raises:
        ValueError: a non-finite score, a dimension named ``"reward"`` or the category ``"all"``.
    """

    arm: str
    prompt_id: str
    edit_category: str
    seed: int
    reward: float
    dimensions: dict[str, float] = field(default_factory=dict)
    reward_config: str = "default"

    def __post_init__(self) -> None:
        where = f"sample ({self.arm!r}, {self.prompt_id!r}, seed {self.seed}, config {self.reward_config!r})"
        if not math.isfinite(self.reward):
            raise ValueError(f"{where}: reward {self.reward} is not finite; leave failed scores out")
        if REWARD in self.dimensions:
            raise ValueError(f"{where}: a dimension may not be named {REWARD!r}")
        bad = {k: v for k, v in self.dimensions.items() if not math.isfinite(v)}
        if bad:
            raise ValueError(f"{where}: non-finite dimension scores {bad}; leave them out instead")
        if self.edit_category == ALL:
            raise ValueError(f"{where}: the edit category {ALL!r} is reserved for the summary over all categories")

    @classmethod
    def from_dict(cls, record: dict) -> EvalSample:
        """The sample of one entry of ``results.json``'s ``samples`` list."""
        return cls(record["arm"], record["prompt_id"], record["edit_category"], int(record["seed"]),
                   float(record["reward"]), {k: float(v) for k, v in record["dimensions"].items()},
                   record.get("reward_config", "default"))


@dataclass(frozen=True)
class SummaryRow:
    """Mean and SEM over prompts (module docstring) of one metric of one arm in one category
    (or ``"all"``) under one reward config; ``n_samples`` counts the samples with the metric."""

    reward_config: str
    arm: str
    category: str
    metric: str
    mean: float
    sem: float
    n_prompts: int
    n_samples: int


@dataclass(frozen=True)
class PairedDifference:
    """``arm_a - arm_b`` paired by prompt; see :func:`paired_difference`."""

    reward_config: str
    arm_a: str
    arm_b: str
    metric: str
    mean: float
    sem: float
    n: int
    wins: int
    losses: int
    ties: int
    p_value: float


@dataclass(frozen=True)
class Agreement:
    """Spearman's rho of two reward configs and its bootstrap 95% interval; see :func:`agreement`."""

    config_a: str
    config_b: str
    metric: str
    rho: float
    low: float
    high: float
    n: int
    n_boot: int


def category_label(edit_category: str) -> str:
    """The label a category is reported under: ``"(none)"`` for ``""``."""
    return edit_category or NO_CATEGORY


def metric_value(sample: EvalSample, metric: str) -> float | None:
    """``sample.reward`` for ``"reward"``, else the dimension's score (None when absent)."""
    return sample.reward if metric == REWARD else sample.dimensions.get(metric)


def metrics_of(samples: Iterable[EvalSample]) -> list[str]:
    """``"reward"`` followed by every dimension name that occurs, sorted."""
    return [REWARD] + sorted({name for s in samples for name in s.dimensions})


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))  # distinct values in order of first appearance


def prompt_means(samples: Iterable[EvalSample], metric: str = REWARD) -> dict[str, float]:
    """``xbar[p] = mean_s x[p, s]``: the mean of ``metric`` over the seeds of each
    prompt (prompt_id -> mean; prompts with no sample that has the metric are left out).
    The caller selects one arm and one reward config."""
    per_prompt: dict[str, list[float]] = {}
    for s in samples:
        value = metric_value(s, metric)
        if value is not None:
            per_prompt.setdefault(s.prompt_id, []).append(value)
    return {p: float(np.mean(values)) for p, values in per_prompt.items()}


def mean_and_sem(values: Sequence[float]) -> tuple[float, float]:
    """``(mean(x), std(x, ddof=1) / sqrt(n))`` of ``n`` independent values, the standard
    error of the mean; the SEM is NaN for ``n = 1``.

    Raises:
        ValueError: no values.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values to average")
    sem = x.std(ddof=1) / math.sqrt(x.size) if x.size > 1 else math.nan
    return float(x.mean()), float(sem)


def summary_table(samples: Sequence[EvalSample]) -> list[SummaryRow]:
    """Mean and SEM over prompts of ``"reward"`` and of every dimension, per reward
    config, arm (order of first appearance) and edit category (sorted, then ``"all"``).

    Combinations without samples, and metrics no sample of the combination has, get
    no row.
    """
    metrics = metrics_of(samples)
    categories = sorted({category_label(s.edit_category) for s in samples}) + [ALL]
    rows = []
    for config, arm, category in itertools.product(_unique(s.reward_config for s in samples),
                                                   _unique(s.arm for s in samples), categories):
        subset = [s for s in samples if s.reward_config == config and s.arm == arm
                  and category in (ALL, category_label(s.edit_category))]
        for metric in metrics:
            means = prompt_means(subset, metric)
            if not means:
                continue
            mean, sem = mean_and_sem(list(means.values()))
            n_samples = sum(metric_value(s, metric) is not None for s in subset)
            rows.append(SummaryRow(config, arm, category, metric, mean, sem, len(means), n_samples))
    return rows


def _of_config(samples: Sequence[EvalSample], reward_config: str | None) -> tuple[str, list[EvalSample]]:
    """The samples of one reward config (``None``: the only one present)."""
    configs = _unique(s.reward_config for s in samples)
    if reward_config is None and len(configs) != 1:
        raise ValueError(f"the samples hold reward configs {configs}; name one with reward_config=")
    reward_config = configs[0] if reward_config is None else reward_config
    return reward_config, [s for s in samples if s.reward_config == reward_config]


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided sign test (Dixon & Mood 1946): the probability, with wins and
    losses equally likely, of a split at least as uneven as ``wins : losses``;
    ``binomtest(wins, wins + losses, 0.5).pvalue``, 1.0 when both are 0. For
    ``wins = n, losses = 0`` it is ``2 * 0.5**n``."""
    if wins + losses == 0:
        return 1.0
    return float(stats.binomtest(wins, wins + losses, 0.5).pvalue)


def paired_difference(samples: Sequence[EvalSample], arm_a: str, arm_b: str, metric: str = REWARD,
                      reward_config: str | None = None) -> PairedDifference:
    """``arm_a - arm_b`` paired by prompt.

    Over the ``n`` prompts both arms have ``metric`` for, ``d[p] = xbar_a[p] - xbar_b[p]``
    (each prompt's mean over its seeds, see :func:`prompt_means`), and::

        mean = (1/n) * sum_p d[p]
        sem  = std(d, ddof=1) / sqrt(n)          (NaN for n = 1)

    ``wins``/``losses``/``ties`` count ``d > 1e-12``, ``d < -1e-12`` and the rest; the
    p-value is the two-sided sign test over wins and losses (ties dropped), see
    :func:`sign_test_p`. An arm against itself gives ``d = 0`` exactly: mean 0, sem 0
    (for n > 1), all ties, p = 1.

    Args:
        reward_config: the config whose scores are compared; ``None`` when the samples
            hold one config only.

    Raises:
        ValueError: the samples hold several reward configs and none is named, or the
            two arms have no prompt in common with ``metric``.
    """
    reward_config, samples = _of_config(samples, reward_config)
    a, b = (prompt_means([s for s in samples if s.arm == arm], metric) for arm in (arm_a, arm_b))
    common = sorted(a.keys() & b.keys())
    if not common:
        raise ValueError(f"arms {arm_a!r} and {arm_b!r} have no prompt in common with {metric!r} "
                         f"under reward config {reward_config!r}")
    d = np.array([a[p] - b[p] for p in common], dtype=np.float64)
    mean, sem = mean_and_sem(d)
    wins, losses = int(np.sum(d > TIE_TOLERANCE)), int(np.sum(d < -TIE_TOLERANCE))
    return PairedDifference(reward_config, arm_a, arm_b, metric, mean, sem, len(d), wins, losses,
                            len(d) - wins - losses, sign_test_p(wins, losses))


def _matched_scores(samples: Sequence[EvalSample], config_a: str, config_b: str,
                    metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Scores of the outputs (arm, prompt_id, seed) both configs scored with ``metric``."""
    by_config: dict[str, dict[tuple[str, str, int], float]] = {config_a: {}, config_b: {}}
    for s in samples:
        value = metric_value(s, metric)
        if s.reward_config not in by_config or value is None:
            continue
        key = (s.arm, s.prompt_id, s.seed)
        if key in by_config[s.reward_config]:
            raise ValueError(f"reward config {s.reward_config!r} scored {key} twice")
        by_config[s.reward_config][key] = value
    keys = sorted(by_config[config_a].keys() & by_config[config_b].keys())
    return (np.array([by_config[config_a][k] for k in keys], dtype=np.float64),
            np.array([by_config[config_b][k] for k in keys], dtype=np.float64))


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row pair of ``x, y`` ``(B, n)``: the Pearson correlation
    of the ranks (ties get their average rank), as ``scipy.stats.spearmanr`` of each
    row; NaN for a row whose ranks are all equal. Returns ``(B,)``."""
    rx, ry = stats.rankdata(x, axis=1), stats.rankdata(y, axis=1)
    rx, ry = rx - rx.mean(axis=1, keepdims=True), ry - ry.mean(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sum(rx * ry, axis=1) / np.sqrt(np.sum(rx**2, axis=1) * np.sum(ry**2, axis=1))


def agreement(samples: Sequence[EvalSample], config_a: str, config_b: str, metric: str = REWARD,
              n_boot: int = 2000, seed: int = 0) -> Agreement:
    """How well two reward configs agree on the same outputs.

    The samples of the two configs are matched on (arm, prompt_id, seed); over the
    ``n`` matched outputs, ``rho`` is Spearman's rank correlation (Spearman 1904;
    ``scipy.stats.spearmanr``; NaN when one config's scores are all equal). The 95%
    interval is the percentile bootstrap (Efron & Tibshirani 1993, ch. 13): draw
    ``idx = default_rng(seed).integers(0, n, size=(n_boot, n))`` (matched pairs with
    replacement), take rho of each resample (:func:`spearman_rows`), drop the
    undefined ones (all ranks equal), and report their 2.5th and 97.5th percentiles
    (NaN when none is defined). The same ``seed`` gives the same interval.

    Raises:
        ValueError: fewer than 3 matched outputs, ``n_boot < 1``, or one config scored
            an output twice.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    x, y = _matched_scores(samples, config_a, config_b, metric)
    n = len(x)
    if n < 3:
        raise ValueError(f"agreement of reward configs {config_a!r} and {config_b!r} on {metric!r} needs "
                         f"at least 3 outputs scored by both (matched on arm, prompt_id, seed), got {n}")
    rho = float(stats.spearmanr(x, y).statistic)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    boot = spearman_rows(x[idx], y[idx])
    boot = boot[np.isfinite(boot)]
    low, high = np.percentile(boot, [2.5, 97.5]) if boot.size else (math.nan, math.nan)
    return Agreement(config_a, config_b, metric, rho, float(low), float(high), n, n_boot)


def _json_safe(value):
    """``value`` with NaN and infinities replaced by None (strict JSON)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def build_results(samples: Sequence[EvalSample], arms: Sequence[str] | None = None,
                  n_boot: int = 2000, seed: int = 0) -> dict:
    """Everything ``results.json`` holds, as JSON-ready values (NaN becomes None).

    Keys: ``arms`` (``arms`` first, then any other arm in order of appearance),
    ``reward_configs``, ``categories`` (sorted labels, then ``"all"``), ``metrics``,
    ``summary`` (:func:`summary_table` rows), ``paired_differences``
    (:func:`paired_difference` of every ordered pair of distinct arms, per reward config
    and metric, where the arms share a prompt), ``agreement`` (:func:`agreement` of
    every pair of reward configs per metric, where at least 3 outputs match), and
    ``samples``.

    Raises:
        ValueError: no samples, or an arm in ``arms`` that no sample has.
    """
    if not samples:
        raise ValueError("no samples to summarise")
    present = _unique(s.arm for s in samples)
    missing = [a for a in (arms or []) if a not in present]
    if missing:
        raise ValueError(f"arms {missing} have no samples (arms present: {present})")
    arms = _unique([*(arms or []), *present])
    configs = _unique(s.reward_config for s in samples)
    metrics = metrics_of(samples)
    paired = []
    for config, metric, (a, b) in itertools.product(configs, metrics, itertools.permutations(arms, 2)):
        try:
            paired.append(paired_difference(samples, a, b, metric, reward_config=config))
        except ValueError as error:
            logger.info("no paired difference: %s", error)
    agreements = []
    for (config_a, config_b), metric in itertools.product(itertools.combinations(configs, 2), metrics):
        try:
            agreements.append(agreement(samples, config_a, config_b, metric, n_boot=n_boot, seed=seed))
        except ValueError as error:
            logger.warning("no agreement: %s", error)
    return _json_safe({
        "arms": arms,
        "reward_configs": configs,
        "categories": sorted({category_label(s.edit_category) for s in samples}) + [ALL],
        "metrics": metrics,
        "summary": [asdict(row) for row in summary_table(samples)],
        "paired_differences": [asdict(p) for p in paired],
        "agreement": [asdict(a) for a in agreements],
        "samples": [asdict(s) for s in samples],
    })


def write_results(directory: str | Path, samples: Sequence[EvalSample], arms: Sequence[str] | None = None,
                  n_boot: int = 2000, seed: int = 0) -> tuple[Path, Path]:
    """Write ``results.json`` (:func:`build_results`, strict JSON: NaN as null) and
    ``results.csv`` (the summary table, one row per reward config, arm, category and
    metric; columns :data:`CSV_FIELDS`, NaN written as ``nan``) into ``directory``
    (created if missing).

    Returns:
        the paths of ``results.json`` and ``results.csv``.

    Raises:
        ValueError: as :func:`build_results`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    results = build_results(samples, arms, n_boot=n_boot, seed=seed)
    json_path, csv_path = directory / "results.json", directory / "results.csv"
    json_path.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in summary_table(samples):
            writer.writerow(asdict(row))
    logger.info("wrote %s and %s (%d samples, %d arms)", json_path, csv_path, len(samples), len(results["arms"]))
    return json_path, csv_path
