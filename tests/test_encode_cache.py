"""``editrl data cache`` through a local Ray (2 CPUs): the manifest and shards it writes, that the
cached tensors are the policy's own encodings, and rollout workers reading the cache
(``encode_cache``): the same groups as without it, refused for another policy, a miss encoded here."""
from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CORPUS, structured_clip, tiny_policy_config
from safetensors import safe_open

from editrl.cli import main
from editrl.cluster.reward_process import RewardServerProcess
from editrl.policy.adapter import adapter_checksum
from editrl.policy.policy import EditPolicy
from editrl.protocol.dataset import load_clip
from editrl.protocol.rollout import Group, GroupTask
from editrl.protocol.video import encode_mp4
from editrl.rollout_workers.encode_cache import source_key, text_key
from editrl.rollout_workers.worker import RolloutWorker

ROOT = Path(__file__).resolve().parent.parent
FPS = 8
"""The config's fps, and the rate a worker samples at by default."""
GOOD = ("p0", "p1", "p2")
"""The rows of the first table that can be cached: p3's clip is too short, p4's is missing, p5 has no instruction."""


@pytest.fixture(scope="module")
def reward_url(tmp_path_factory):
    with RewardServerProcess(ROOT / "configs/reward_server.yaml", tmp_path_factory.mktemp("rs") / "server.log", 60) as url:
        yield url


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> dict:
    """A 6-row table (two rows share a clip, one starts at 0.125 s, three are bad), a second table of
    one row, and a config of the tests' tiny policy whose train and held-out tables they are (so the
    model built in code has CORPUS's vocabulary)."""
    folder = tmp_path_factory.mktemp("table")
    (folder / "clips").mkdir()
    for name, frames, seed in (("a", 9, 0), ("b", 9, 1), ("c", 9, 3), ("short", 3, 2)):
        (folder / "clips" / f"{name}.mp4").write_bytes(encode_mp4(structured_clip(frames, 48, seed=seed), fps=FPS))
    rows = [
        {"prompt_id": "p0", "video_path": "clips/a.mp4", "instruction": CORPUS[0]},
        {"prompt_id": "p1", "video_path": "clips/a.mp4", "instruction": CORPUS[1]},
        {"prompt_id": "p2", "video_path": "clips/b.mp4", "instruction": CORPUS[2], "start_s": 0.125},
        {"prompt_id": "p3", "video_path": "clips/short.mp4", "instruction": CORPUS[3]},
        {"prompt_id": "p4", "video_path": "clips/missing.mp4", "instruction": CORPUS[0]},
        {"prompt_id": "p5", "video_path": "clips/a.mp4", "instruction": " "},
    ]
    path, heldout = folder / "prompts.jsonl", folder / "heldout.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    heldout.write_text(json.dumps({"prompt_id": "p0", "video_path": "clips/c.mp4", "instruction": CORPUS[3]}) + "\n")
    config = {"fps": FPS, "policy": tiny_policy_config().model_dump(mode="json"),
              "data": {"train_prompts": str(path), "heldout_prompts": str(heldout)}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return {"path": path, "heldout": heldout, "config": folder / "config.yaml", "clips": folder / "clips"}


@pytest.fixture(scope="module")
def built(ray_session, table, tmp_path_factory) -> dict:
    """The cache the real command builds of both tables (2 encoding actors, batches of 2): exit code,
    stdout, folder, manifest."""
    out = tmp_path_factory.mktemp("cache") / "cache"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["data", "cache", str(table["path"]), str(table["heldout"]), "--config", str(table["config"]), "--out", str(out),
                     "--batch-size", "2", "--workers", "2"])
    return {"code": code, "stdout": stdout.getvalue(), "out": out, "manifest": json.loads((out / "manifest.json").read_text())}


def _tensor(out: Path, shard: str, name: str) -> torch.Tensor:
    with safe_open(str(out / shard), framework="pt") as handle:
        return handle.get_tensor(name)


def _worker(url: str, **kwargs) -> RolloutWorker:
    worker = RolloutWorker(0, kwargs.pop("config", tiny_policy_config()), CORPUS, str(ROOT), url, reward_timeout_s=10,
                           reward_max_attempts=2, fps=FPS, **kwargs)
    state = worker.policy.adapter_state()
    worker.set_adapter(state, 0, adapter_checksum(state))
    return worker


def _tasks(clips: Path) -> list[GroupTask]:
    return [GroupTask("g0", "p0", CORPUS[0], str(clips / "a.mp4"), seed=5, group_size=2),
            GroupTask("g2", "p2", CORPUS[2], str(clips / "b.mp4"), seed=6, group_size=2, start_s=0.125)]


def test_the_command_writes_shards_and_a_manifest_keying_every_row(built, table):
    out, manifest = built["out"], built["manifest"]
    assert manifest["format"] == 1 and manifest["fingerprint"]["height"] == 32 and manifest["fingerprint"]["fps"] == FPS
    clips = table["clips"].resolve()
    tables = [str(table["path"].resolve()), str(table["heldout"].resolve())]
    assert manifest["tables"] == tables
    assert [(r["table"], r["prompt_id"]) for r in manifest["rows"]] == [(tables[0], p) for p in GOOD] + [(tables[1], "p0")]
    row = {r["prompt_id"]: r for r in manifest["rows"] if r["table"] == tables[0]}
    assert row["p0"]["source"] == row["p1"]["source"] == source_key(str(clips / "a.mp4"), None, None)
    assert row["p2"]["source"] == source_key(str(clips / "b.mp4"), 0.125, None)
    assert [row[p]["text"] for p in GOOD] == [text_key(CORPUS[i]) for i in range(3)]
    # three clips (the short one failed) and five instructions (the empty one, the CFG null condition, too)
    assert set(manifest["sources"]) == {row["p0"]["source"], row["p2"]["source"], source_key(str(clips / "c.mp4"), None, None)}
    assert set(manifest["texts"]) == {text_key(t) for t in ["", *CORPUS]}
    shards = {e["shard"] for e in [*manifest["sources"].values(), *manifest["texts"].values()]}
    assert len(shards) >= 4  # 9 items (one failing), batches of 2
    assert sorted(p.name for p in out.glob("shard-*.safetensors")) == sorted(shards)
    for key, entry in manifest["sources"].items():
        with safe_open(str(out / entry["shard"]), framework="pt") as handle:
            assert {f"source/{key}", f"payload/{key}"} <= set(handle.keys())


def test_cached_tensors_equal_the_policys_own_encodings(built):
    out, manifest = built["out"], built["manifest"]
    policy = EditPolicy.from_config(tiny_policy_config(), CORPUS, root=str(ROOT))
    c = policy.config
    for key, entry in manifest["sources"].items():
        frames = load_clip(entry["video_path"], c.num_frames, c.height, c.width, fps=FPS,
                           start_s=entry["start_s"], end_s=entry["end_s"])
        latents = _tensor(out, entry["shard"], f"source/{key}")
        assert latents.dtype == torch.float32 and latents.shape == (1, 4, 3, 8, 8)
        assert torch.equal(latents, policy.encode_video(frames[None]))
        assert _tensor(out, entry["shard"], f"payload/{key}").numpy().tobytes() == encode_mp4(frames, fps=FPS)
    for key, entry in manifest["texts"].items():
        embeds = _tensor(out, entry["shard"], f"text/{key}")
        assert embeds.shape == (1, 8, 16) and torch.equal(embeds, policy.encode_text([entry["instruction"]]))


def test_a_worker_reading_the_cache_samples_the_same_groups(built, table, reward_url):
    cached, plain = _worker(reward_url, encode_cache=str(built["out"])), _worker(reward_url)
    with_cache, without = cached.sample(_tasks(table["clips"])), plain.sample(_tasks(table["clips"]))
    for a, b in zip(with_cache, without):
        assert isinstance(a, Group) and isinstance(b, Group)
        assert torch.equal(a.source_latents, b.source_latents) and torch.equal(a.text_embeds, b.text_embeds)
        assert torch.equal(a.null_embeds, b.null_embeds) and torch.equal(a.latents, b.latents)
        assert torch.equal(a.rewards, b.rewards)  # the cached mp4 is the source the reward server gets
    # the null instruction, two clips and two instructions: all from the cache
    assert cached.cache_stats() == {"hits": 5, "misses": 0}
    assert plain.cache_stats() == {"hits": 0, "misses": 0}


def test_a_cache_built_for_another_policy_is_refused_naming_the_field(built, reward_url):
    with pytest.raises(ValueError, match="height: 32 in the cache, 48 here") as refused:
        _worker(reward_url, config=tiny_policy_config(height=48), encode_cache=str(built["out"]))
    assert "width" not in str(refused.value)
    with pytest.raises(ValueError, match="seed: 0 in the cache, 1 here"):
        _worker(reward_url, seed=1, encode_cache=str(built["out"]))


def test_a_miss_is_encoded_here_with_one_warning(built, reward_url, tmp_path, caplog):
    clip = tmp_path / "new.mp4"
    clip.write_bytes(encode_mp4(structured_clip(9, 48, seed=7), fps=FPS))
    cached, plain = _worker(reward_url, encode_cache=str(built["out"])), _worker(reward_url)
    tasks = [GroupTask(f"n{i}", "p9", CORPUS[3], str(clip), seed=8, group_size=2) for i in range(2)]
    with caplog.at_level(logging.WARNING, logger="editrl.rollout_workers.encode_cache"):
        with_cache = cached.sample(tasks)
    without = plain.sample(tasks)
    assert all(torch.equal(a.source_latents, b.source_latents) and torch.equal(a.rewards, b.rewards)
               for a, b in zip(with_cache, without))
    assert cached.cache_stats() == {"hits": 2, "misses": 1}  # null and CORPUS[3] hit, the clip missed once
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "new.mp4" in warnings[0] and "not in the cache" in warnings[0]


def test_bad_rows_are_listed_and_printed_and_the_command_exits_1(built, table):
    assert built["code"] == 1
    path = str(table["path"].resolve())
    failed = {f["prompt_id"]: f for f in built["manifest"]["failed"]}
    assert [(f["table"], f["row"]) for f in built["manifest"]["failed"]] == [(path, 3), (path, 4), (path, 5)]
    assert "too short" in failed["p3"]["problem"] and "missing.mp4" in failed["p4"]["problem"]
    assert "instruction" in failed["p5"]["problem"]
    assert not {(path, p) for p in failed} & {(r["table"], r["prompt_id"]) for r in built["manifest"]["rows"]}
    lines = built["stdout"].splitlines()  # one line per failed row, with its table, then the summary
    assert [line.split(": ")[:2] for line in lines[:-1]] == [[path, "p3"], [path, "p4"], [path, "p5"]]
    assert "4 of 7 rows cached" in lines[-1]
