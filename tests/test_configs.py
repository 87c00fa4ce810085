"""The training presets in configs/ load, and each says truthfully how it differs from the default."""
from pathlib import Path

import pytest

from editrl.config import load_train_config

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_PRESETS = sorted(p for p in (REPO_ROOT / "configs").glob("*.yaml") if not p.name.startswith(("reward_server", "cluster")))


def _flat(data, prefix=""):
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: data}


@pytest.mark.parametrize("path", TRAIN_PRESETS, ids=lambda p: p.name)
def test_every_training_preset_validates(path):
    config = load_train_config(path)
    assert config.steps >= 1 and config.policy.checkpoint == "assets/warm_checkpoint"


def test_the_cross_attention_preset_changes_only_what_its_header_names():
    default = _flat(load_train_config(REPO_ROOT / "configs/default.yaml").model_dump())
    preset = _flat(load_train_config(REPO_ROOT / "configs/cross_attention_lora.yaml").model_dump())
    changed = {k for k in default if default[k] != preset[k]}
    assert changed == {
        "steps", "policy.lora.rank", "policy.lora.alpha", "policy.lora.attention", "policy.lora.target_modules",
        "learner.learning_rate", "learner.kl_coef", "learner.adv_std_scope",
        "runtime.checkpoint_every", "eval.seeds_per_prompt", "eval.every_steps",
    }
    assert preset["policy.lora.attention"] == ["cross"] and preset["policy.lora.target_modules"] == ["to_v", "to_out.0"]
