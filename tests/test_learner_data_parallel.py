"""Two gloo ranks train like one: the same adapter after an update (fp32, relative error
<= 1e-5), on-policy ratios exactly 1 on both ranks, and the same statistics. Real
processes, real torch.distributed (gloo over TCP on 127.0.0.1)."""
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from data_parallel_setup import build_learner_and_groups, run_ranks

from editrl.learner.data_parallel import DataParallel



def test_two_gloo_ranks_give_the_one_rank_adapter(tmp_path):
    run_ranks(2, tmp_path)
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
    # sequence parallelism of 2 over 4 ranks: ranks 2 and 3 are group 1 and run the same share
    assert DataParallel(rank=2, world_size=4, sequence_parallel=2).shard([5, 6, 7]) == [6]
    assert DataParallel(rank=3, world_size=4, sequence_parallel=2).shard([5, 6, 7]) == [6]
    assert not DataParallel(rank=3, world_size=4, sequence_parallel=2).reports
    with pytest.raises(ValueError, match="sequence_parallel=3 must divide the 4 ranks"):
        DataParallel(rank=0, world_size=4, sequence_parallel=3)
    with pytest.raises(RuntimeError, match="not initialised"):
        DataParallel.from_default_group()


def test_ranks_the_cluster_cannot_place_are_refused_with_the_numbers(monkeypatch):
    import ray

    from editrl.cluster.config import TrainConfig
    from editrl.cluster.learner_group import check_placement
    from editrl.cluster.topology import LearnerTopology, TopologyConfig

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 4.0})
    fits = TrainConfig(topology=TopologyConfig(learner=LearnerTopology(ranks=4, cpus=2, gpus=1)))
    check_placement(fits)
    too_many = TrainConfig(topology=TopologyConfig(learner=LearnerTopology(ranks=8, cpus=2, gpus=1)))
    with pytest.raises(ValueError, match=r"topology.learner.ranks=8 needs 8 GPU \(1 per rank.*the Ray cluster has 4$"):
        check_placement(too_many)


@pytest.fixture()
def two_learner_ranks():
    """Two learner ranks of the tiny policy started as a run starts them, on a local Ray; the
    groups of the data-parallel test."""
    import ray
    from data_parallel_setup import build_learner_and_groups

    from conftest import CORPUS, tiny_policy_config
    from editrl.cluster.config import TrainConfig
    from editrl.cluster.learner_group import start_learner
    from editrl.cluster.topology import LearnerTopology, TopologyConfig
    from editrl.learner.config import LearnerConfig

    root = Path(__file__).resolve().parent.parent
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{root}{os.pathsep}{root / 'tests'}"}})
    try:
        config = TrainConfig(policy=tiny_policy_config(), learner=LearnerConfig(torch_threads=1, collective_timeout_s=10),
                             topology=TopologyConfig(learner=LearnerTopology(ranks=2, cpus=0.5)))
        group = start_learner(config, "test-learner", "editrl-test", (config.policy, config.learner, CORPUS, str(root), 0, "cpu"))
        ray.get(group.ready.remote())
        yield ray, group, build_learner_and_groups()[1]
    finally:
        ray.shutdown()


def _rank_pid(ray, handle) -> int:
    return ray.get(handle.__ray_call__.remote(lambda actor: os.getpid()))


def _failure_message(exc: BaseException) -> str:
    """The learner's own message (Ray wraps an exception raised in a task with its traceback; ``cause`` is the original)."""
    return str(getattr(exc, "cause", None) or exc)


@pytest.mark.timeout(300)
def test_a_learner_rank_killed_mid_update_fails_the_step_at_once_naming_it(two_learner_ranks):
    from editrl.cluster.learner_group import LearnerRankError

    ray, group, groups = two_learner_ranks
    ray.get(group.train_step.remote(groups))  # both ranks train
    pid = _rank_pid(ray, group.handles[1])
    os.kill(pid, signal.SIGSTOP)  # hold rank 1 so that rank 0 is inside the update, waiting for its gradients
    start = time.monotonic()
    call = group.train_step.remote(groups)
    time.sleep(2.0)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(LearnerRankError) as failure:
        ray.get(call, timeout=120)
    message = _failure_message(failure.value)
    assert message.startswith("train_step: learner rank 1 died (its actor is gone)"), message
    assert time.monotonic() - start < 30, message  # at once: not after the collective timeout (10 s) plus the grace


@pytest.mark.timeout(300)
def test_a_hung_learner_rank_fails_the_step_after_the_collective_timeout_naming_it(two_learner_ranks):
    from editrl.cluster.learner_group import LearnerRankError

    ray, group, groups = two_learner_ranks
    pid = _rank_pid(ray, group.handles[1])
    os.kill(pid, signal.SIGSTOP)  # rank 1 stops answering; rank 0 waits in its gradient all-reduce
    try:
        start = time.monotonic()
        with pytest.raises(LearnerRankError) as failure:
            ray.get(group.train_step.remote(groups), timeout=120)
        elapsed = time.monotonic() - start
    finally:
        os.kill(pid, signal.SIGCONT)
    message = _failure_message(failure.value)
    assert message.startswith("train_step: learner rank 0 failed:") and message.endswith("learner rank(s) [1] did not answer"), message
    assert 10 <= elapsed < 40, message  # learner.collective_timeout_s = 10, then the failure grace
