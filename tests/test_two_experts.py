"""Wan2.2 A14B's two experts on a tiny model saved in its layout (``transformer/``,
``transformer_2/``, ``boundary_ratio`` in ``model_index.json``): each row of a batch goes to
the expert of its timestep, the adapter is on both and travels as one, the reference policy
switches both off, and the learner layouts that cannot shard two experts are refused."""
import json
import shutil

import pytest
import torch
from conftest import CORPUS, tiny_policy_config

from editrl.cluster.checkpoint_kind import CheckpointKindError, check_learner_layout, checkpoint_widened
from editrl.policy.experts import TwoExperts
from editrl.policy.lora_export import LORA_WEIGHT_NAME, SECOND_EXPERT_WEIGHT_NAME, export_diffusers_lora
from editrl.policy.model import build_tiny_components, load_components, save_components
from editrl.policy.policy import EditPolicy

BOUNDARY = 0.875  # Wan2.2 T2V-A14B's boundary_ratio: timesteps >= 875 run the high-noise expert


@pytest.fixture
def checkpoints(tmp_path):
    """The two-expert checkpoint, and each expert alone as a single-expert checkpoint."""
    config = tiny_policy_config()
    high = build_tiny_components(config.tiny, CORPUS, shift=config.shift, seed=1, kind="t2v")
    low = build_tiny_components(config.tiny, CORPUS, shift=config.shift, seed=2, kind="t2v")
    save_components(high, tmp_path / "high")
    shutil.copytree(tmp_path / "high", tmp_path / "low")
    shutil.rmtree(tmp_path / "low" / "transformer")
    low.transformer.save_pretrained(tmp_path / "low" / "transformer")
    two = tmp_path / "a14b"
    shutil.copytree(tmp_path / "high", two)
    shutil.copytree(tmp_path / "low" / "transformer", two / "transformer_2")
    index = json.loads((two / "model_index.json").read_text())
    index.update(transformer_2=["diffusers", "WanTransformer3DModel"], boundary_ratio=BOUNDARY)
    (two / "model_index.json").write_text(json.dumps(index))
    return two, tmp_path / "high", tmp_path / "low"


def _policy(path, kind="concat", seed=0):
    return EditPolicy.from_config(tiny_policy_config(kind=kind, checkpoint=str(path)), CORPUS, seed=seed)


def test_each_row_goes_to_the_expert_of_its_timestep(checkpoints):
    two, high, low = (_policy(p, kind="t2v") for p in checkpoints)
    assert isinstance(two.transformer, TwoExperts) and two.transformer.boundary_timestep == 875.0
    torch.manual_seed(0)
    x, source = torch.randn(4, 4, 3, 8, 8), torch.randn(4, 4, 3, 8, 8)
    text, null = two.encode_text(CORPUS[:4]), two.encode_text([""] * 4)
    sigma = torch.tensor([0.95, 0.875, 0.8, 0.3])  # timesteps 950, 875 (high: t >= 875), 800, 300 (low)
    with torch.no_grad():
        mixed = two.velocity(x, sigma, source, text, null, 2.0)
        by_high = high.velocity(x, sigma, source, text, null, 2.0)
        by_low = low.velocity(x, sigma, source, text, null, 2.0)
    torch.testing.assert_close(mixed[:2], by_high[:2])
    torch.testing.assert_close(mixed[2:], by_low[2:])
    assert (by_high[2:] - by_low[2:]).abs().max() > 1e-3  # the experts really differ


def test_the_adapter_is_on_both_experts_and_travels_as_one(checkpoints, tmp_path):
    two = _policy(checkpoints[0])
    # per expert: 2 blocks x 2 attentions x 4 projections, and the widened patch embedding
    assert two.num_lora_modules == 2 * 17 and two.adapts_patch_embedding
    keys = two.adapter_state().keys()
    assert {k.split(".")[0] for k in keys} == {"transformer", "transformer_2"}
    torch.manual_seed(0)
    x, source = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 4, 3, 8, 8)
    text, null = two.encode_text(CORPUS[:2]), two.encode_text(["", ""])
    loss = two.velocity(x, torch.tensor([0.95, 0.3]), source, text, null, 2.0).square().mean()
    loss.backward()
    for expert in ("transformer", "transformer_2"):  # a batch across the boundary trains both
        grads = [p.grad for n, p in two.transformer.named_parameters() if n.startswith(expert + ".") and "lora_B" in n]
        assert any(g is not None and g.abs().max() > 0 for g in grads), expert
    with torch.no_grad():
        for p in two.lora_parameters():
            p.add_(0.05 * torch.randn_like(p))
    other = _policy(checkpoints[0], seed=5)
    other.load_adapter_state(two.pack_adapter())
    with torch.no_grad():
        sigma = torch.tensor([0.95, 0.3])
        torch.testing.assert_close(other.velocity(x, sigma, source, text, null, 2.0), two.velocity(x, sigma, source, text, null, 2.0))
        with two.adapter_disabled(), other.adapter_disabled():  # the reference policy: both experts without adapter
            reference = two.velocity(x, sigma, source, text, null, 2.0)
        base = _policy(checkpoints[0], seed=9)  # a fresh adapter is the identity
        torch.testing.assert_close(reference, base.velocity(x, sigma, source, text, null, 2.0))
    export_diffusers_lora(two, tmp_path / "export")
    assert (tmp_path / "export" / LORA_WEIGHT_NAME).is_file() and (tmp_path / "export" / SECOND_EXPERT_WEIGHT_NAME).is_file()


def test_a_saved_two_expert_model_loads_back(checkpoints, tmp_path):
    loaded = load_components(checkpoints[0], kind="t2v")
    save_components(loaded, tmp_path / "again")
    again = load_components(tmp_path / "again", kind="t2v")
    assert isinstance(again.transformer, TwoExperts) and again.transformer.boundary_timestep == 875.0
    torch.testing.assert_close(again.transformer.transformer_2.patch_embedding.weight,
                               loaded.transformer.transformer_2.patch_embedding.weight)


def test_what_two_experts_cannot_do_is_refused_before_loading(checkpoints):
    two = checkpoints[0]
    assert checkpoint_widened(tiny_policy_config(kind="concat", checkpoint=str(two)), two) is True
    with pytest.raises(CheckpointKindError, match="topology.learner.sharding=fsdp is not supported for a two-expert"):
        check_learner_layout(two, "fsdp", 1)
    with pytest.raises(CheckpointKindError, match="topology.learner.sequence_parallel=2"):
        check_learner_layout(two, "replicate", 2)
    check_learner_layout(two, "replicate", 1)
    check_learner_layout(checkpoints[1], "fsdp", 2)  # one expert: no limit from here
    index = json.loads((two / "model_index.json").read_text())
    (two / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": None}))
    with pytest.raises(CheckpointKindError, match="needs transformer_2/ and a boundary_ratio in"):
        checkpoint_widened(tiny_policy_config(kind="t2v", checkpoint=str(two)), two)
    with pytest.raises(ValueError, match="boundary_ratio"):
        load_components(two, kind="t2v")


def test_a_learner_step_trains_both_experts_and_checkpoints(checkpoints, tmp_path):
    from conftest import sample_group

    from editrl.learner.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from editrl.learner.config import LearnerConfig
    from editrl.learner.learner import Learner

    # 4 steps from sigma 1: the trained steps' timesteps lie on both sides of 875
    policy = _policy(checkpoints[0], kind="t2v")
    sigmas = policy.sigmas()[:3]
    assert max(sigmas) * 1000 >= 875 > min(sigmas) * 1000
    before = {k: v.clone() for k, v in policy.adapter_state().items()}
    learner = Learner(policy, LearnerConfig(learning_rate=1e-2))
    learner.train_step([sample_group(policy, seed, torch.tensor([0.0, 1.0])) for seed in range(2)])
    after = policy.adapter_state()
    for expert in ("transformer", "transformer_2"):
        moved = [k for k in after if k.startswith(expert + ".") and not torch.equal(after[k], before[k])]
        assert moved, f"{expert}: no LoRA matrix moved"
    save_checkpoint(tmp_path, 1, learner, {})
    fresh = Learner(_policy(checkpoints[0], kind="t2v"), LearnerConfig(learning_rate=1e-2))
    load_checkpoint(latest_checkpoint(tmp_path), fresh)
    assert all(torch.equal(fresh.policy.adapter_state()[k], v) for k, v in after.items())


def test_the_plan_counts_both_experts_and_the_patch_embedding_adapter():
    from editrl.cluster.config import load_train_config
    from editrl.policy.memory import architecture, model_sizes

    def sizes(checkpoint, patch_embedding=None):
        policy = load_train_config("configs/wan21_14b_480p.yaml", {"policy.checkpoint": checkpoint}).policy
        lora = policy.lora.model_copy(update={"patch_embedding": patch_embedding})
        return model_sizes(architecture(policy), lora, policy.kind)

    one, two = sizes("/nowhere/Wan2.1-T2V-14B-Diffusers"), sizes("/nowhere/Wan2.2-T2V-A14B-Diffusers")
    assert two.dit == 2 * one.dit and two.lora == 2 * one.lora and two.dit_fp32 == 2 * one.dit_fp32
    # the widened 14B patch embedding: Conv3d(32 -> 5120, kernel 1x2x2), rank 64: 64 x (32 x 4 + 5120) = 335,872
    assert one.lora - sizes("/nowhere/Wan2.1-T2V-14B-Diffusers", patch_embedding=False).lora == 335_872
