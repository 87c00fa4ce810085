"""``python -m bench.memprobe <module> <variant> '<settings json>'``: peak memory of one variant.

Builds the benchmark's state in this fresh process (``bench.<module>.memory_variants``),
records the RSS after setup, runs the variant once and prints one JSON line with
the setup RSS, the process's RSS high-water mark, the highest RSS seen while the
variant ran (sampled every 2 ms by a thread, so a setup transient cannot hide
it) and the peak CUDA allocation (see :func:`bench.harness.probe_memory`).
"""
from __future__ import annotations

import importlib
import json
import sys
import threading

import psutil

from bench.harness import current_rss_mib, gpu_peak_mib, peak_rss_mib


class RssSampler(threading.Thread):
    """Highest RSS of this process (MiB) seen every ``interval_s`` seconds until stopped."""

    def __init__(self, interval_s: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.highest_mib = current_rss_mib()
        self._stop_event = threading.Event()
        self._process = psutil.Process()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self.highest_mib = max(self.highest_mib, self._process.memory_info().rss / 2**20)

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        self.highest_mib = max(self.highest_mib, current_rss_mib())
        return self.highest_mib


def main(argv: list[str]) -> int:
    module_name, variant, settings = argv[0], argv[1], json.loads(argv[2])
    module = importlib.import_module(f"bench.{module_name}")
    variants = module.memory_variants(settings)
    if variant not in variants:
        print(f"unknown variant {variant!r}; known: {sorted(variants)}", file=sys.stderr)
        return 2
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    setup = current_rss_mib()
    sampler = RssSampler()
    sampler.start()
    variants[variant]()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    during = sampler.stop()
    print(json.dumps({"setup_rss_mib": setup, "peak_rss_mib": peak_rss_mib(), "variant_peak_rss_mib": during,
                      "variant_added_rss_mib": max(0.0, during - setup), "gpu_peak_mib": gpu_peak_mib()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
