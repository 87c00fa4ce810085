"""Build the bundled source clips and prompt tables (deterministic).

Usage::

    python scripts/build_dataset.py --out assets/clips [--seed N]
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from editrl.tools.dataset.build import DEFAULT_SEED, build_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="assets/clips", help="output directory (default: assets/clips)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed for the prompt choices")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    start = time.perf_counter()
    summary = build_dataset(args.out, seed=args.seed)
    elapsed = time.perf_counter() - start
    print(f"wrote {summary.out_dir} in {elapsed:.1f} s ({summary.total_bytes / 1024:.0f} KiB)")
    print(f"clips: {summary.num_clips}")
    for split, count in summary.prompts_per_split.items():
        print(f"{split}: {count} prompts; edit types {summary.edit_type_counts[split]}")
    print(f"categories: {summary.category_counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
