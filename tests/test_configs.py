"""The training presets in configs/ load, and each says truthfully how it differs from the default."""
from pathlib import Path

import pytest

from editrl.cluster.config import load_train_config

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_PRESETS = sorted(p for p in (REPO_ROOT / "configs").glob("*.yaml") if not p.name.startswith(("reward_server", "cluster", "wan21_")))


def _flat(data, prefix=""):
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: data}


@pytest.mark.parametrize("path", TRAIN_PRESETS, ids=lambda p: p.name)
def test_every_training_preset_validates(path):
    config = load_train_config(path)
    assert config.steps >= 1 and config.policy.checkpoint == "assets/warm_checkpoint"


def test_the_viva_adapter_preset_changes_only_what_its_header_names():
    default = _flat(load_train_config(REPO_ROOT / "configs/default.yaml").model_dump())
    preset = _flat(load_train_config(REPO_ROOT / "configs/viva_adapter.yaml").model_dump())
    changed = {k for k in default if default[k] != preset[k]}
    assert changed == {
        "policy.lora.rank", "policy.lora.alpha", "policy.lora.attention", "policy.lora.active_steps",
        "learner.learning_rate", "learner.kl_coef", "learner.adv_std_scope",
    }
    assert preset["policy.lora.attention"] == ["self", "cross"] and preset["policy.lora.active_steps"] is None


def test_the_default_adapter_acts_exactly_on_the_trained_steps():
    policy = load_train_config(REPO_ROOT / "configs/default.yaml").policy
    trained = [t for t in range(policy.num_steps) if t <= policy.last_trainable_step()]
    assert trained == [0, 1, 2] and [t for t in range(policy.num_steps) if policy.adapter_acts_at(t)] == trained


def test_antithetic_pairs_need_an_even_group_size():
    load_train_config(REPO_ROOT / "configs/default.yaml", {"policy.antithetic": True, "group_size": 4})
    with pytest.raises(ValueError, match="group_size must be even, got 5"):
        load_train_config(REPO_ROOT / "configs/default.yaml", {"policy.antithetic": True, "group_size": 5})
