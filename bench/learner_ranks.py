"""Item 9: learner throughput with two data-parallel ranks against one, on this machine.

The same batch of groups (sampled once per process from the same seeded policy) is
trained by one learner process with all the machine's threads, by one with one thread,
and by two gloo ranks of one thread each (``topology.learner.ranks: 2``: each rank trains half the
groups, gradients summed before the optimizer step). Each configuration runs as fresh
processes, the configurations alternate over ``rounds``, and every update of rank 0 is
timed after a barrier; the ratios pair the updates of one round.

On two cores, two ranks of one thread compete with one rank of two threads for the same
cores: the ratio says what data parallelism costs or gains over intra-op threads here,
not what it gains across GPUs (each rank there has its own device).
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from dataclasses import dataclass

from bench.harness import PROJECT_ROOT, paired_ratio, subprocess_env
from bench.results import BenchResult, Measurement, Stats

NAME = "learner_ranks"
ITEM = 9
TITLE = "Learner throughput: two data-parallel ranks vs one"


@dataclass(frozen=True)
class Settings:
    profile: str
    num_groups: int
    group_size: int
    updates: int
    rounds: int
    seed: int = 0


SETTINGS = {
    "cpu": Settings("cpu", num_groups=4, group_size=4, updates=3, rounds=2),
    "smoke": Settings("smoke", num_groups=2, group_size=2, updates=1, rounds=1),
}
VARIANTS = {"1 rank x 2 threads": (1, 2), "1 rank x 1 thread": (1, 1), "2 ranks x 1 thread": (2, 1)}
"""name -> (ranks, threads per rank)."""


def _worker(rank: int, world: int, port: int, threads: int, settings: dict) -> None:
    """One learner rank: build, sample the batch, join the group, time ``updates`` updates (rank 0 prints them)."""
    import torch
    import torch.distributed as dist

    from bench.workload import corpus, policy_config, sample_groups
    from editrl.learner.config import LearnerConfig
    from editrl.learner.data_parallel import DataParallel
    from editrl.learner.learner import Learner
    from editrl.policy.policy import EditPolicy

    torch.set_num_threads(threads)
    s = Settings(**settings)
    torch.manual_seed(s.seed)
    policy = EditPolicy.from_config(policy_config(s.profile), list(corpus()), seed=s.seed)
    groups = sample_groups(policy, s.num_groups, s.group_size, s.seed)
    data_parallel = None
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        data_parallel = DataParallel.from_default_group()
    learner = Learner(policy, LearnerConfig(torch_threads=threads), seed=s.seed, data_parallel=data_parallel)
    learner.train_step(groups)  # warm-up
    times = []
    for _ in range(s.updates):
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        learner.train_step(groups)
        times.append(time.perf_counter() - start)
    if rank == 0:
        print(json.dumps({"update_s": times}))
    if world > 1:
        dist.destroy_process_group()


def _run_variant(ranks: int, threads: int, settings: Settings) -> list[float]:
    from editrl.cluster.reward_process import free_port

    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "bench.learner_ranks", str(rank), str(ranks), str(port), str(threads),
                               json.dumps(dataclasses.asdict(settings))],
                              cwd=PROJECT_ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(ranks)]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=900))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, (_, stderr) in zip(procs, outputs):
        if proc.returncode != 0:
            raise RuntimeError(f"learner rank process failed: {stderr[-2000:]}")
    return json.loads(outputs[0][0].strip().splitlines()[-1])["update_s"]


def measure(settings: Settings) -> BenchResult:
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(settings.rounds):
        for name, (ranks, threads) in VARIANTS.items():
            times[name] += _run_variant(ranks, threads, settings)
    groups_per_update = settings.num_groups
    measurements = [Measurement(name=name, params={"ranks": ranks, "threads_per_rank": threads}, metrics={
        "update_s": Stats.of(times[name]),
        "groups_per_s": Stats.of([groups_per_update / t for t in times[name]]),
    }) for name, (ranks, threads) in VARIANTS.items()]
    return BenchResult(
        name=NAME, item=ITEM, title=TITLE, profile=settings.profile, status="measured",
        settings=dataclasses.asdict(settings), measurements=measurements,
        ratios=[paired_ratio("1 rank x 2 threads / 2 ranks x 1 thread", "1 rank x 2 threads", "2 ranks x 1 thread", times,
                             "update time of one rank with both cores over two ranks with one each (> 1: two ranks are faster)"),
                paired_ratio("1 rank x 1 thread / 2 ranks x 1 thread", "1 rank x 1 thread", "2 ranks x 1 thread", times,
                             "update time of one single-threaded rank over two (the data-parallel speed-up per thread)")],
        notes=["Same groups, same adapter start on every rank (seeded); tests/test_learner_data_parallel.py shows two ranks "
               "give the one-rank adapter.", "Two cores: the ranks share them with each other, not with the rollout workers."],
    )


def run(profile: str) -> BenchResult:
    return measure(SETTINGS[profile])


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5]))
