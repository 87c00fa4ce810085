"""``python -m bench``: run the benchmark suite, write ``bench/results/<name>.json``
and ``docs/benchmarks.md``, and print a summary table.

Each benchmark runs in a fresh process (its own peak RSS, no state carried over);
a benchmark that fails or times out is recorded as ``failed`` and the others
still run. ``--report-only`` rewrites the page from the existing result files.
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time

from bench.harness import PROJECT_ROOT, subprocess_env
from bench.report import fmt, write_report
from bench.results import BenchResult, read_results, write_result
from bench.suite import BENCHMARKS, load, run_one

logger = logging.getLogger("bench")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Run the benchmark suite; write bench/results/<name>.json and docs/benchmarks.md.")
    parser.add_argument("--profile", default="cpu", choices=["cpu", "smoke"],
                        help="settings: cpu (make bench) or smoke (seconds, for checks); the GPU section picks its own")
    parser.add_argument("--only", default="", help=f"comma-separated benchmarks among: {', '.join(BENCHMARKS)}")
    parser.add_argument("--results-dir", default=str(PROJECT_ROOT / "bench" / "results"))
    parser.add_argument("--doc", default=str(PROJECT_ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--report-only", action="store_true", help="only rewrite the page from the result files")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per benchmark before it is stopped")
    parser.add_argument("--single", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _run_in_subprocess(name: str, args: argparse.Namespace) -> None:
    """``python -m bench --single <name>``; a crash or timeout becomes a ``failed`` result."""
    module = load(name)
    command = [sys.executable, "-m", "bench", "--single", name, "--profile", args.profile, "--results-dir", args.results_dir]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=PROJECT_ROOT, env=subprocess_env(), timeout=args.timeout)
        reason = None if done.returncode == 0 else f"benchmark process exited with code {done.returncode}"
    except subprocess.TimeoutExpired:
        reason = f"stopped after {args.timeout:.0f} s"
    if reason is not None:
        write_result(BenchResult(name=module.NAME, item=module.ITEM, title=module.TITLE, profile=args.profile,
                                 status="failed", reason=reason, duration_s=time.perf_counter() - started), args.results_dir)


def _summary(results: list[BenchResult], names: set[str]) -> str:
    lines = [f"{'benchmark':<26} {'status':<13} {'time':>7}  targets"]
    for r in results:
        if r.name not in names:
            continue
        targets = "; ".join(f"{t.name}={fmt(t.value) if t.value is not None else '-'}{t.unit} "
                            f"({'met' if t.met else 'not met' if t.met is not None else 'n/a'})" for t in r.targets)
        lines.append(f"{r.name:<26} {r.status:<13} {r.duration_s:>6.0f}s  {targets or (r.reason or '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would load the machine being measured
    if args.single:
        write_result(run_one(args.single, args.profile), args.results_dir)
        return 0
    selected = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    for name in selected:
        load(name)  # unknown names fail before anything runs
    started = time.perf_counter()
    if not args.report_only:
        for name in selected:
            logger.info("benchmark %s (%s profile)", name, args.profile)
            _run_in_subprocess(name, args)
    results = read_results(args.results_dir)
    page = write_report(results, args.doc)
    names = {load(n).NAME for n in selected}
    print(_summary(results, names))
    print(f"\n{page} written from {args.results_dir}; {time.perf_counter() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
