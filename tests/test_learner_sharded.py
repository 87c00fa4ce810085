"""The learner sharded with FSDP2 over two gloo ranks trains like one unsharded rank, and its
checkpoints (the adapter gathered, the AdamW state as per-rank shards) resume exactly; whole
runs with two replicated or sharded learner ranks (Ray, a reward server) end with the
one-rank adapter, resumed or not, also after a rank is killed mid-update; a sliced load
gives each rank the whole load's shards. Real processes, real torch.distributed (gloo over TCP on
127.0.0.1), real FSDP2."""
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from data_parallel_rank import FSDP_CONFIG
from data_parallel_setup import build_learner_and_groups, run_ranks, train_step_saving

from editrl.learner.checkpoint import SHARDED, load_learner_state
from editrl.learner.config import LearnerConfig
from editrl.learner.data_parallel import DataParallel
from editrl.learner.work import items_per_rank, pool_steps, work_items


def _relative_error(result: dict, expected: dict) -> float:
    """||result - expected|| / ||expected|| over the whole adapter (an entry whose gradient is
    tiny takes AdamW's first step g / (|g| + eps) with a large relative rounding error, so
    single entries are not compared)."""
    diff = sum(float((result[k] - v).pow(2).sum()) for k, v in expected.items())
    return (diff / sum(float(v.pow(2).sum()) for v in expected.values())) ** 0.5


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("world", "mode"), [(2, "fsdp"), (2, "fsdp_bf16"), (2, "sp"), (4, "fsdp_sp")],
                         ids=["fsdp", "fsdp_bf16", "sequence_parallel", "fsdp_and_sequence_parallel"])
def test_sharded_or_sequence_parallel_ranks_give_the_one_rank_adapter(tmp_path, world, mode):
    run_ranks(world, tmp_path, mode)
    # bf16: each parameter computes in its own dtype when sharded (the fp32 adapter and norms beside
    # the bf16 weights), exactly as one unsharded rank does, so the same ratios and the same update
    dtype = "bfloat16" if mode.endswith("bf16") else "float32"
    learner, groups = build_learner_and_groups(dtype=dtype, **FSDP_CONFIG)
    start = learner.policy.adapter_state()
    expected_metrics, saved_bytes = train_step_saving(learner, groups)
    expected = learner.policy.adapter_state()
    assert expected_metrics["grad_norm"] > FSDP_CONFIG["max_grad_norm"]  # the clip acts, on the sharded norm too
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(world)]
    for result in ranks:
        assert sum(float((expected[k] - start[k]).abs().max()) for k in expected) > 0  # the update did something
        error = _relative_error(result["adapter"], expected)
        print(f"relative error of the sharded adapter: {error:.2e}")
        assert error <= 1e-5
        metrics = result["metrics"]
        for key in ("onpolicy_ratio_error", "ratio_min", "ratio_max"):
            assert metrics[key] == expected_metrics[key], key
        assert metrics["onpolicy_ratio_error"] == 0.0 and metrics["ratio_min"] == metrics["ratio_max"] == 1.0
        assert metrics["train_terms"] == expected_metrics["train_terms"] == 9.0
        for key in ("loss", "pg_loss", "kl_ref", "adv_mean", "adv_std", "grad_norm", "log_ratio_std"):
            assert metrics[key] == pytest.approx(expected_metrics[key], rel=1e-5, abs=1e-7), key
    assert all(torch.equal(ranks[0]["adapter"][k], other["adapter"][k]) for other in ranks[1:] for k in expected)
    # the tiny policy's sequences: latent 3 x 8 x 8 over patch 1 x 2 x 2 = 48 tokens; split in two with Ulysses
    tokens = learner.policy.tokens_per_sequence(groups[0].latents.shape[-3:])
    assert tuple(groups[0].latents.shape[-3:]) == (3, 8, 8) and tokens == 48 and all(r["block_tokens"] == [tokens // 2 if "sp" in mode else tokens] for r in ranks)
    # activations kept per forward: 9 work items on one rank; ceil(9 / 2) = 5 forwards on each rank when two
    # groups of ranks split them (FSDP pads the shorter share), all 9 when both ranks of a pair run them all
    forwards = {"fsdp": 5, "fsdp_bf16": 5, "sp": 9, "fsdp_sp": 5}[mode]
    for r in ranks:
        ratio = (r["saved_bytes"] / forwards) / (saved_bytes / 9)
        print(f"{mode}: activations kept per forward {ratio:.3f}x the one-rank learner's")
        # Ulysses halves every block's tensors; the embeddings, the gathered output and the loss stay whole
        assert ratio <= 0.65 if "sp" in mode else ratio == pytest.approx(1.0, rel=1e-3)


@pytest.mark.timeout(300)
def test_a_sharded_learner_resumes_its_checkpoint_exactly(tmp_path):
    run_ranks(2, tmp_path, "fsdp_resume")
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000001"
    assert load_learner_state(checkpoint / "learner.pt")["optimizer"] == SHARDED
    shards = sorted(p.name for p in (checkpoint / "optimizer_shards").iterdir())
    assert ".metadata" in shards and len([s for s in shards if s.endswith(".distcp")]) == 2, shards  # one file per rank
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        # the second update of the resumed learner is the uninterrupted one's, bit for bit: the AdamW
        # moments, the step count and the minibatch RNG all came back from the shards
        for key, value in result["adapter"].items():
            assert torch.equal(result["resumed"][key], value), key
        assert result["resumed_metrics"]["loss"] == result["second"]["loss"]
        assert result["second"]["ratio_max"] != 1.0 or result["second"]["ratio_min"] != 1.0  # step 2 is off-policy


@pytest.mark.timeout(300)
def test_a_sharded_rank_gives_back_the_weights_it_does_not_hold(tmp_path):
    # glibc hands freed buffers of 64 KiB or more back to the kernel, so resident memory follows the tensors
    run_ranks(2, tmp_path, "fsdp_memory", env={"MALLOC_MMAP_THRESHOLD_": "65536"})
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        # 36.1 M fp32 parameters (144 MB): each rank keeps half of every one and frees the other half
        assert 140e6 < result["weights"] < 150e6 and result["local"] == pytest.approx(result["weights"] / 2, rel=0.01)
        print(f"rank {rank}: sharding freed {result['freed'] / 2**20:.1f} MiB of {result['weights'] / 2**20:.1f} MiB of weights")
        assert result["freed"] == pytest.approx(result["weights"] / 2, rel=0.25)


@pytest.mark.timeout(300)
def test_a_sliced_load_gives_each_rank_the_whole_load_s_shards_at_a_fraction_of_its_peak(tmp_path):
    from conftest import CORPUS
    from data_parallel_rank import SHARD_MEMORY_MODEL

    from editrl.policy.config import TinyModelConfig
    from editrl.policy.model import build_tiny_components, save_components

    # a text-to-video DiT of 36 M parameters saved in fp32 (144 MB, 8 files and their index), loaded as concat in bf16 (72 MB)
    components = build_tiny_components(TinyModelConfig(**SHARD_MEMORY_MODEL), CORPUS, kind="t2v")
    save_components(components, tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "ckpt" / "transformer")
    components.transformer.save_pretrained(tmp_path / "ckpt" / "transformer", max_shard_size="20MB")
    assert len(list((tmp_path / "ckpt" / "transformer").glob("*.safetensors"))) >= 7
    env = {"CHECKPOINT": str(tmp_path / "ckpt"), "MALLOC_MMAP_THRESHOLD_": "65536"}
    results = {}
    for mode in ("load_whole", "load_sliced"):
        (tmp_path / mode).mkdir()
        run_ranks(2, tmp_path / mode, mode, env=env)
        results[mode] = [torch.load(tmp_path / mode / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    whole, sliced = results["load_whole"], results["load_sliced"]
    params = whole[0]["params"]
    # widened from 4 latent channels to 4 + 4, and adapted (its LoRA reads the source channels)
    patch = params["patch_embedding.base_layer.weight"]
    assert patch.shape[1] == 8 and float(patch[:, 4:].abs().max()) == 0.0
    assert "patch_embedding.lora_B.default.weight" in params
    bf16 = sum(p.numel() * p.element_size() for p in params.values())
    for rank in range(2):
        assert set(sliced[rank]["params"]) == set(params)
        for name, value in params.items():  # the same weights, adapter and dtypes, bit for bit
            assert sliced[rank]["params"][name].dtype == value.dtype and torch.equal(sliced[rank]["params"][name], value), name
        assert all(torch.equal(sliced[rank]["buffers"][k], v) for k, v in whole[rank]["buffers"].items())
        assert sliced[rank]["local"] == whole[rank]["local"] == pytest.approx(bf16 / 2, rel=0.01)
        print(f"rank {rank}: load peak {whole[rank]['peak'] / 2**20:.1f} MiB whole, {sliced[rank]['peak'] / 2**20:.1f} MiB "
              f"sliced ({bf16 / 2**20:.1f} MiB of bf16 weights and adapter)")
        # whole: the bf16 model (70 MiB) and the fp32 file pages it was read from (138 MiB), then half dropped;
        # sliced: half the bf16 model (35 MiB) and the pages of one tensor's rows at a time (measured: 57 of 215 MiB)
        assert whole[rank]["peak"] > 1.5 * bf16
        assert sliced[rank]["peak"] < min(bf16, 0.35 * whole[rank]["peak"])


def test_a_sliced_policy_refuses_to_run_before_its_weights_are_read(tmp_path):
    from conftest import CORPUS, tiny_policy_config

    from editrl.policy.model import build_tiny_components, save_components
    from editrl.policy.policy import EditPolicy

    save_components(build_tiny_components(tiny_policy_config().tiny, CORPUS, kind="t2v"), tmp_path / "ckpt")
    policy = EditPolicy.from_config(tiny_policy_config(checkpoint=str(tmp_path / "ckpt"), kind="concat"), CORPUS,
                                    encoders=False, sliced=True)
    assert all(p.untyped_storage().nbytes() <= 4 for n, p in policy.transformer.named_parameters()
               if "lora_" not in n and "patch_embedding" not in n)  # placeholders hold no weights
    x = torch.zeros(1, 4, 2, 8, 8)
    with pytest.raises(RuntimeError, match="not read yet"):
        policy.velocity(x, 0.5, x, torch.zeros(1, 8, 16), torch.zeros(1, 8, 16), guidance_scale=1.0)


def test_work_items_cover_every_sample_and_step_once_whatever_the_split():
    # 2 groups: steps 0 and 2 stochastic (G = 5), step 1 only (G = 5); 2 steps per forward, 2 samples per forward
    items = work_items([[True, False, True], [False, True, False]], [5, 5], timesteps_per_forward=2, micro_batch_samples=2)
    # group 0: one chunk (0, 2) x rows (0,2) (2,4) (4,5); group 1: chunk (1,) x the same rows
    assert [(i.group, i.steps, i.rows) for i in items] == [
        (0, (0, 2), (0, 2)), (0, (0, 2), (2, 4)), (0, (0, 2), (4, 5)),
        (1, (1,), (0, 2)), (1, (1,), (2, 4)), (1, (1,), (4, 5))]
    assert [i.share for i in items[:3]] == [0.4, 0.4, 0.2]  # 2/5, 2/5, 1/5: sums to one group
    for world in (1, 2, 4, 7):
        split = [DataParallel(rank=r, world_size=world).shard(items) for r in range(world)]
        assert sorted((i for part in split for i in part), key=items.index) == items
        assert max(map(len, split)) == items_per_rank(len(items), world)  # 6 items: 6, 3, 2, 1 per rank


def test_pooled_statistics_do_not_depend_on_which_rank_ran_which_samples():
    from editrl.learner.loss import ObjectiveStats

    def part(values):
        log_ratio = torch.tensor(values)
        return ObjectiveStats(loss=float(log_ratio.mean()), pg_loss=0.0, kl_ref=0.0, ratio_mean=1.0, ratio_min=1.0,
                              ratio_max=1.0, clip_frac=0.0, approx_kl=0.0, log_ratio=log_ratio)

    # samples 0-1 (loss mean 0.5) and 2 (loss 3.0) of one step: pooled loss (2 x 0.5 + 1 x 3) / 3 = 4/3
    one_order = {(0, 0): [(0, part([0.0, 1.0])), (2, part([3.0]))]}
    other_order = {(0, 0): [(2, part([3.0])), (0, part([0.0, 1.0]))]}  # rank 1's range merged first
    for parts in (one_order, other_order):
        terms, errors = pool_steps(parts)
        assert terms[(0, 0)].loss == pytest.approx(4 / 3)
        assert terms[(0, 0)].log_ratio.tolist() == [0.0, 1.0, 3.0]  # sample order
        assert errors[0] == pytest.approx(torch.tensor(3.0).exp().item() - 1.0)


def test_fsdp_needs_more_than_one_rank_and_sequence_parallelism_a_divisor_of_the_ranks():
    from editrl.cluster.topology import LearnerTopology

    with pytest.raises(ValueError, match="topology.learner.sharding=fsdp .* needs topology.learner.ranks >= 2, got 1"):
        LearnerTopology(sharding="fsdp")
    with pytest.raises(ValueError, match="topology.learner.sequence_parallel=2 must divide topology.learner.ranks=3"):
        LearnerTopology(ranks=3, sequence_parallel=2)
    assert LearnerTopology(ranks=2, sharding="fsdp").sharding == "fsdp"


def _kill_rank_one_in_its_second_update(run_dir: Path, killed: dict) -> None:
    """Once the run in ``run_dir`` has checkpointed step 1, SIGKILL learner rank 1 as soon as its
    process title says it runs ``train_step`` (Ray titles a worker ``ray::<class>.<method>``)."""
    import ray

    from editrl.cluster.controller import NAMESPACE

    deadline, pid = time.monotonic() + 600, None
    while pid is None and time.monotonic() < deadline:
        time.sleep(0.05)
        if ray.is_initialized() and (run_dir / "checkpoints" / "step_000001").is_dir():
            rank1 = ray.get_actor("editrl-controller-learner-1", namespace=NAMESPACE)
            pid = ray.get(rank1.__ray_call__.remote(lambda actor: os.getpid()))
    while pid is not None and time.monotonic() < deadline:
        if b"train_step" in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGKILL)
            killed["pid"] = pid
            return
        time.sleep(0.002)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_runs_with_two_replicated_sharded_resumed_or_killed_and_resumed_ranks_train_the_one_rank_adapter(tmp_path, caplog):
    # sequential mode on CPU is deterministic: the same groups reach the learner in every run
    import logging

    from safetensors.torch import load_file

    from conftest import tiny_policy_config
    from editrl.cluster.config import EvalConfig, RolloutConfig, RuntimeConfig, TrainConfig
    from editrl.cluster.topology import LearnerTopology, RolloutTopology, TopologyConfig
    from editrl.cluster.train import train

    def config(steps: int, **ranks) -> TrainConfig:
        return TrainConfig(
            steps=steps, prompts_per_step=3, group_size=2, policy=tiny_policy_config(),
            learner=LearnerConfig(learning_rate=1e-2, torch_threads=1, collective_timeout_s=120),
            rollout=RolloutConfig(reward_timeout_s=30),
            topology=TopologyConfig(rollout=RolloutTopology(workers=1), learner=LearnerTopology(cpus=0.5, **ranks)),
            runtime=RuntimeConfig(mode="sequential", checkpoint_every=1),
            eval=EvalConfig(seeds_per_prompt=1, max_prompts=1, num_videos_saved=0),
        )

    sharded = {"ranks": 2, "sharding": "fsdp"}
    with caplog.at_level(logging.INFO, logger="editrl"):
        train(config(2), tmp_path / "one")
        train(config(2, ranks=2), tmp_path / "replicated")
        train(config(2, **sharded), tmp_path / "sharded")
        train(config(1, **sharded), tmp_path / "resumed")
        summary = train(config(2, **sharded), tmp_path / "resumed", resume=True)
        # a rank killed in the middle of step 2's update: the run fails naming it, and resumes from step 1
        killed: dict = {}
        killer = threading.Thread(target=_kill_rank_one_in_its_second_update, args=(tmp_path / "killed", killed), daemon=True)
        killer.start()
        with pytest.raises(Exception, match="learner rank 1 died") as failure:
            train(config(2, **sharded), tmp_path / "killed")
        killer.join(timeout=5)
        assert killed, "rank 1 was never seen in its second update"
        assert not (tmp_path / "killed" / "checkpoints" / "step_000002").exists()
        killed_summary = train(config(2, **sharded), tmp_path / "killed", resume=True)
    for sharding in ("replicate", "fsdp"):
        assert any(m.startswith(f"learner: 2 ranks data-parallel ({sharding}), process group at tcp://") for m in caplog.messages)
    cause = str(getattr(failure.value, "cause", None) or failure.value)
    print(f"the killed run failed with: {cause.splitlines()[0][:200]}")
    assert summary["policy_version"] == killed_summary["policy_version"] == 2
    assert caplog.messages.count("resumed from step 1 (policy version 1)") == 2
    checkpoint = tmp_path / "resumed" / "checkpoints" / "step_000002"
    assert len(list((checkpoint / "optimizer_shards").glob("*.distcp"))) == 2
    adapters = {name: load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))
                for name in ("one", "replicated", "sharded", "resumed", "killed")}
    assert _relative_error(adapters["replicated"], adapters["one"]) <= 1e-5
    assert _relative_error(adapters["sharded"], adapters["one"]) <= 1e-5
    assert _relative_error(adapters["resumed"], adapters["sharded"]) <= 1e-6
    assert _relative_error(adapters["killed"], adapters["sharded"]) <= 1e-6
