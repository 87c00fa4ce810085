"""Two gloo ranks train like one: the same adapter after an update (fp32, relative error
<= 1e-5), on-policy ratios exactly 1 on both ranks, and the same statistics. Real
processes, real torch.distributed (gloo over TCP on 127.0.0.1)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from data_parallel_setup import build_learner_and_groups

from editrl.cluster.reward_process import free_port
from editrl.learner.data_parallel import DataParallel

RANK_SCRIPT = Path(__file__).resolve().parent / "data_parallel_rank.py"
REPO_ROOT = Path(__file__).resolve().parents[1]


def _run_ranks(world: int, out: Path) -> None:
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(RANK_SCRIPT), str(rank), str(world), str(port), str(out)],
                              cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(world)]
    try:
        outputs = [proc.communicate(timeout=240)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=15)
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} exited with {proc.returncode}:\n{output[-3000:]}"


def test_two_gloo_ranks_give_the_one_rank_adapter(tmp_path):
    _run_ranks(2, tmp_path)
    learner, groups = build_learner_and_groups()
    expected_metrics = learner.train_step(groups)
    expected = learner.policy.adapter_state()
    before, _ = build_learner_and_groups()
    start = before.policy.adapter_state()
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    for result in ranks:
        moved = sum(float((expected[k] - start[k]).abs().max()) for k in expected)
        assert moved > 0  # the update did something
        for key, value in expected.items():
            scale = float(value.abs().max()) or 1.0
            assert float((result["adapter"][key] - value).abs().max()) <= 1e-5 * scale, key
        metrics = result["metrics"]
        assert metrics["onpolicy_ratio_error"] == 0.0 and metrics["ratio_min"] == metrics["ratio_max"] == 1.0
        assert metrics["train_terms"] == expected_metrics["train_terms"] == 9.0  # 3 groups x 3 trained steps, all ranks
        for key in ("loss", "pg_loss", "kl_ref", "adv_mean", "adv_std", "grad_norm"):
            assert metrics[key] == pytest.approx(expected_metrics[key], rel=1e-5, abs=1e-7), key
    # both ranks hold the same adapter
    assert all(torch.equal(ranks[0]["adapter"][k], ranks[1]["adapter"][k]) for k in expected)


def test_each_rank_takes_every_world_sizeth_item():
    assert DataParallel(rank=0, world_size=2).shard([5, 6, 7]) == [5, 7]
    assert DataParallel(rank=1, world_size=2).shard([5, 6, 7]) == [6]
    assert DataParallel(rank=2, world_size=3).shard([5, 6]) == []
    with pytest.raises(RuntimeError, match="not initialised"):
        DataParallel.from_default_group()
