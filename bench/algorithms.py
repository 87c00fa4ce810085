"""Edit-GRPO, DiffusionNFT and AWM side by side on the embedded default (``make bench-learning``).

    PYTHONPATH=. python -m bench.algorithms [--repeats 2] [--algorithms edit_grpo,diffusion_nft,awm]

Every run is the real main job, ``editrl train --config configs/default.yaml``, with only
``learner.algorithm`` (and that algorithm's options, :data:`OVERRIDES`) changed: the same
prompts, group seeds, held-out evaluation (8 seeds per prompt), reward server config and step
budget. Repeat r runs every algorithm with ``seed = r``, one run after the other (2 cores: never
two at once), repeat by repeat, so a change in the machine's load falls on all of them alike.

From each run's ``metrics.jsonl`` and ``summary.json``: the held-out reward (mean +- SEM) at
every evaluation against the wall-clock seconds of training before it and the samples trained
before it, the gain in combined SEMs, and every reward dimension's initial and final mean (to
catch a reward hacked at the cost of detail or temporal consistency). Writes
``bench/results/algorithms.json`` and ``docs/algorithms_measured.md``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.harness import PROJECT_ROOT, subprocess_env

logger = logging.getLogger("bench.algorithms")

OVERRIDES: dict[str, list[str]] = {
    "edit_grpo": [],
    "diffusion_nft": ["learner.algorithm=diffusion_nft", "learner.kl_coef=1.0e-4"],
    "awm": ["learner.algorithm=awm", "learner.kl_coef=1.0e-3"],
}
"""``--set`` overrides per algorithm on top of ``configs/default.yaml``: the algorithm, and its
regulariser's coefficient as its public implementation sets it (the preset's 0.01 is Edit-GRPO's);
everything else (learning rate, sampler, adapter, advantages) is the preset's."""


def run_once(algorithm: str, seed: int, run_dir: Path, extra: list[str], timeout_s: float) -> dict:
    """One ``editrl train`` run; its evaluations, gain and dimensions.

    Raises:
        RuntimeError: the run failed (its log's tail in the message).
    """
    sets = [*OVERRIDES[algorithm], f"seed={seed}", *extra]
    command = [sys.executable, "-m", "editrl", "train", "--config", "configs/default.yaml", "--run-dir", str(run_dir)]
    for item in sets:
        command += ["--set", item]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=PROJECT_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"{algorithm} seed {seed} exited {done.returncode}: {done.stderr[-2000:]}")
    return summarise_run(run_dir, algorithm, seed, time.perf_counter() - started)


def summarise_run(run_dir: Path, algorithm: str, seed: int, wall_s: float) -> dict:
    """The run's evaluations against training seconds and samples, from its files."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((run_dir / "summary.json").read_text())
    group_size = summary["samples"] / max(sum(r.get("groups_trained", 0) for r in records if "time_train_s" in r), 1)
    seconds, samples, elapsed, trained = {0: 0.0}, {0: 0}, 0.0, 0
    for record in records:
        if "time_train_s" in record:
            elapsed += record["time_step_s"]
            trained += int(record["groups_trained"] * group_size)
            seconds[record["step"]], samples[record["step"]] = elapsed, trained
    evals = [{"step": r["step"], "train_s": seconds.get(r["step"], elapsed), "samples": samples.get(r["step"], trained),
              "reward_mean": r["reward_mean"], "reward_sem": r["reward_sem"]}
             for r in records if r.get("kind") == "heldout"]
    return {
        "algorithm": algorithm, "seed": seed, "wall_s": wall_s, "evals": evals,
        "gain": summary["reward_heldout_final"] - summary["reward_heldout_initial"],
        "gain_in_sem": summary["heldout_gain_in_sem"],
        "dimensions_initial": summary["heldout_dimensions_initial"],
        "dimensions_final": summary["heldout_dimensions_final"],
    }


def _mean_sem(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    sem = float(array.std(ddof=1) / math.sqrt(array.size)) if array.size > 1 else float("nan")
    return float(array.mean()), sem


def aggregate(runs: list[dict]) -> dict[str, dict]:
    """Per algorithm: mean and SEM over repeats of the gain, the gain in SEMs, the wall time and
    each dimension's change, and the mean curve (reward against seconds and samples)."""
    table = {}
    for algorithm in dict.fromkeys(run["algorithm"] for run in runs):
        mine = [run for run in runs if run["algorithm"] == algorithm]
        dims = sorted(set(mine[0]["dimensions_final"]))
        steps = sorted({e["step"] for run in mine for e in run["evals"]})
        curve = []
        for step in steps:
            points = [e for run in mine for e in run["evals"] if e["step"] == step]
            curve.append({"step": step, "train_s": _mean_sem([p["train_s"] for p in points])[0],
                          "samples": points[0]["samples"], "reward": _mean_sem([p["reward_mean"] for p in points])})
        table[algorithm] = {
            "repeats": len(mine),
            "gain": _mean_sem([run["gain"] for run in mine]),
            "gain_in_sem": _mean_sem([run["gain_in_sem"] for run in mine]),
            "gain_in_sem_each": [round(run["gain_in_sem"], 2) for run in mine],
            "wall_s": _mean_sem([run["wall_s"] for run in mine]),
            "dimension_change": {d: _mean_sem([run["dimensions_final"][d] - run["dimensions_initial"][d] for run in mine])
                                 for d in dims},
            "curve": curve,
        }
    return table


def _pm(pair: tuple[float, float], digits: int = 2) -> str:
    mean, sem = pair
    return f"{mean:.{digits}f}" if math.isnan(sem) else f"{mean:.{digits}f} ± {sem:.{digits}f}"


def write_doc(table: dict[str, dict], path: Path, machine: str, extra: list[str]) -> None:
    """The measured comparison as a markdown page."""
    lines = ["# Edit-GRPO, DiffusionNFT and AWM measured side by side", "",
             f"Written by `make bench-learning` (`bench/algorithms.py`) on {machine}. Every run is `editrl train --config "
             "configs/default.yaml` with only `learner.algorithm` changed" + (f" and `{' '.join(extra)}`" if extra else "")
             + "; repeat r uses `seed = r` for every algorithm. Means ± SEM over repeats.", "",
             "| algorithm | repeats | held-out gain | gain in combined SEMs (each run) | wall s |", "|---|---|---|---|---|"]
    for algorithm, row in table.items():
        lines.append(f"| {algorithm} | {row['repeats']} | {_pm(row['gain'], 3)} | {_pm(row['gain_in_sem'])} "
                     f"({', '.join(str(g) for g in row['gain_in_sem_each'])}) | {_pm(row['wall_s'], 0)} |")
    lines += ["", "Change of each held-out dimension (final - initial, 0-10 scale):", ""]
    dims = sorted({d for row in table.values() for d in row["dimension_change"]})
    lines += ["| algorithm | " + " | ".join(d.removesuffix("_mean") for d in dims) + " |", "|---|" + "---|" * len(dims)]
    for algorithm, row in table.items():
        lines.append(f"| {algorithm} | " + " | ".join(_pm(row["dimension_change"][d], 3) for d in dims) + " |")
    lines += ["", "Held-out reward against training seconds and samples (mean over repeats):", "",
              "| algorithm | step | train s | samples | held-out reward |", "|---|---|---|---|---|"]
    for algorithm, row in table.items():
        for point in row["curve"]:
            lines.append(f"| {algorithm} | {point['step']} | {point['train_s']:.0f} | {point['samples']} | {_pm(point['reward'], 3)} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--algorithms", default=",".join(OVERRIDES))
    parser.add_argument("--set", action="append", default=[], help="more --set overrides for every run (e.g. steps=20)")
    parser.add_argument("--runs-dir", default="runs/bench-learning")
    parser.add_argument("--out", default=str(PROJECT_ROOT / "bench" / "results" / "algorithms.json"))
    parser.add_argument("--doc", default=str(PROJECT_ROOT / "docs" / "algorithms_measured.md"))
    parser.add_argument("--timeout", type=float, default=1500.0, help="seconds per run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    algorithms = [a for a in args.algorithms.split(",") if a]
    unknown = [a for a in algorithms if a not in OVERRIDES]
    if unknown or args.repeats < 1:
        parser.error(f"unknown algorithms {unknown}; known: {', '.join(OVERRIDES)}" if unknown else "--repeats must be >= 1")
    from bench.environment import capture

    runs = []
    for seed in range(args.repeats):
        for algorithm in algorithms:
            run_dir = Path(args.runs_dir) / f"{algorithm}-seed{seed}"
            runs.append(run_once(algorithm, seed, run_dir, args.set, args.timeout))
            logger.info("%s seed %d: gain %.3f (%.1f SEMs) in %.0f s", algorithm, seed, runs[-1]["gain"],
                        runs[-1]["gain_in_sem"], runs[-1]["wall_s"])
    table = aggregate(runs)
    env = capture()
    machine = f"{env['cpu_model']}, {env['usable_cpus']} cores, {env['memory_gib']} GiB, commit {(env['git_commit'] or '?')[:7]}"
    Path(args.out).write_text(json.dumps({"runs": runs, "table": table, "extra_overrides": args.set, "environment": env},
                                         indent=2))
    write_doc(table, Path(args.doc), machine, args.set)
    for algorithm, row in table.items():
        logger.info("%s: gain %s (%s SEMs), wall %s s", algorithm, _pm(row["gain"], 3), _pm(row["gain_in_sem"]),
                    _pm(row["wall_s"], 0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
