"""``editrl eval`` end to end on the embedded default: the base model and two copies of one
adapter edit held-out prompts with the same seeds, a real reward server scores them, and the
results and the report come out; an adapter against itself differs by exactly zero."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from editrl.cli import main
from editrl.cluster.config import load_train_config
from editrl.policy.policy import EditPolicy

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "configs" / "default.yaml")


def _adapter(tmp_path: Path) -> Path:
    """An adapter of the default policy with every LoRA matrix moved off its initial value."""
    policy = EditPolicy.from_config(load_train_config(DEFAULT).policy, [], root=ROOT)
    generator = torch.Generator().manual_seed(0)
    state = {k: v + 0.3 * torch.randn(v.shape, generator=generator) for k, v in policy.adapter_state().items()}
    folder = tmp_path / "one" / "adapter"
    folder.mkdir(parents=True)
    save_file(state, str(folder / "adapter_model.safetensors"))
    shutil.copytree(folder, tmp_path / "two" / "adapter")
    return folder


def test_eval_scores_arms_with_the_same_seeds_and_writes_the_report(tmp_path, capsys):
    adapter = _adapter(tmp_path)
    out = tmp_path / "eval"
    code = main(["eval", "--config", DEFAULT, "--adapter", str(adapter), "--adapter", str(tmp_path / "two" / "adapter"),
                 "--max-prompts", "3", "--seeds", "2", "--videos", "2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["arms"] == ["base", "one/adapter", "two/adapter"]
    assert len(results["samples"]) == 3 * 3 * 2
    diffs = {(d["arm_a"], d["arm_b"]): d for d in results["paired_differences"] if d["metric"] == "reward"}
    same = diffs[("one/adapter", "two/adapter")]
    assert same["mean"] == 0.0 and same["sem"] == 0.0 and same["n"] == 3 and same["p_value"] == 1.0
    assert diffs[("base", "one/adapter")]["mean"] != 0.0  # the adapter changes the edits
    rows = [r for r in results["summary"] if r["category"] == "all" and r["metric"] == "reward"]
    assert {r["arm"] for r in rows} == {"base", "one/adapter", "two/adapter"} and all(r["n_prompts"] == 3 for r in rows)
    html = (out / "report.html").read_text()
    assert html.count("<video") == 2 * 4  # two prompts: the source and three edits each
    for ref in ("media/", "plots/category_reward.png"):
        assert ref in html
    assert (out / "results.csv").read_text().startswith("reward_config,")


def test_eval_refuses_a_missing_adapter_before_starting_anything(tmp_path, capsys):
    code = main(["eval", "--config", DEFAULT, "--adapter", str(tmp_path / "nothing"), "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert code == 1 and f"--adapter {tmp_path / 'nothing'}: no adapter_model.safetensors" in err
    assert not (tmp_path / "e").exists()


def test_two_reward_configs_score_the_same_edits(tmp_path, capsys):
    first, second = tmp_path / "pixel_a.yaml", tmp_path / "pixel_b.yaml"
    for path in (first, second):
        shutil.copy(ROOT / "configs" / "reward_server.yaml", path)
    out = tmp_path / "eval"
    code = main(["eval", "--config", DEFAULT, "--reward-config", str(first), "--reward-config", str(second),
                 "--max-prompts", "4", "--seeds", "2", "--videos", "1", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    scores = {}
    for s in results["samples"]:
        scores.setdefault((s["arm"], s["prompt_id"], s["seed"]), {})[s["reward_config"]] = s["reward"]
    assert len(scores) == 8 and all(v["pixel_a"] == v["pixel_b"] for v in scores.values())  # one edit, two servers
    agreement = next(a for a in results["agreement"] if a["metric"] == "reward")
    assert (agreement["config_a"], agreement["config_b"], agreement["n"]) == ("pixel_a", "pixel_b", 8)
    assert agreement["rho"] == pytest.approx(1.0) and agreement["low"] == pytest.approx(1.0)
