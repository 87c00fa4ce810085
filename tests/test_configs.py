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


def test_a_field_that_moved_into_topology_is_refused_with_its_new_place():
    from pydantic import ValidationError

    from editrl.cluster.config import TrainConfig

    with pytest.raises(ValidationError, match=r"rollout.num_workers is now topology.rollout.workers; "
                                              r"learner.ranks is now topology.learner.ranks"):
        TrainConfig.model_validate({"rollout": {"num_workers": 4}, "learner": {"ranks": 2}})
    config = TrainConfig.model_validate({"topology": {"rollout": {"workers": 4}, "learner": {"ranks": 2, "gpus": 1}}})
    assert config.topology.rollout.workers == 4 and config.topology.learner.ask() == {"CPU": 1.0, "GPU": 1.0}


def test_several_reward_replicas_need_a_reward_server_the_run_does_not_start():
    from pydantic import ValidationError

    from editrl.cluster.config import TrainConfig

    with pytest.raises(ValidationError, match=r"topology.reward.replicas=2: a run starts one reward server itself"):
        TrainConfig.model_validate({"topology": {"reward": {"replicas": 2}}})
    served = TrainConfig.model_validate({"topology": {"reward": {"replicas": 2}}, "reward_server": {"url": "http://r:8000"}})
    assert served.topology.reward.replicas == 2


def test_the_plan_counts_and_places_every_process_kind_as_the_topology_says():
    from editrl.cluster.config import TrainConfig
    from editrl.cluster.plan import plan_run

    config = TrainConfig.model_validate({"topology": {"rollout": {"workers": 3}, "learner": {"ranks": 2, "gpus": 1},
                                                      "reward": {"replicas": 4, "gpus": 1}},
                                         "reward_server": {"url": "http://r:8000"}, "runtime": {"device_memory_gib": 80}})
    processes = {p.kind: (p.count, p.device, p.limit) for p in plan_run(config).processes}
    gib = 2**30
    assert processes == {"rollout worker": (3, "cpu", None), "learner rank": (2, "cuda", 80 * gib), "reward replica": (4, "cuda", 80 * gib)}
