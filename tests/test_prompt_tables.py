"""Bring-your-own prompt tables: the schema in Parquet / JSONL / CSV, clip sampling by frame rate
with an aspect-preserving crop, the model geometry rules and ``editrl data check``."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from editrl.cli import main
from editrl.protocol.dataset import PromptDataset, load_clip, load_prompts
from editrl.protocol.video import encode_mp4, read_video

ROOT = Path(__file__).resolve().parent.parent
BUNDLED_CLIPS = sorted((ROOT / "assets" / "clips" / "clips").glob("*.mp4"))


def level_clip(num_frames: int, height: int = 32, width: int = 32) -> np.ndarray:
    """Frame k is a uniform grey of level 16 + 8 k, so the frame a sample came from can be told."""
    return np.stack([np.full((height, width, 3), 16 + 8 * k, np.uint8) for k in range(num_frames)])


def frame_indices(frames: np.ndarray) -> list[int]:
    """The k of each sampled frame of a :func:`level_clip` (the codec moves a level by far less than 4)."""
    return [int(round((float(f.mean()) - 16) / 8)) for f in frames]


def write_clip(path: Path, frames: np.ndarray, fps: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_mp4(frames, fps=fps))
    return path


def write_table(path: Path, records: list[dict]) -> Path:
    columns = list(dict.fromkeys(k for r in records for k in r))  # every row's keys, in order of appearance
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in records]), str(path))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        lines = [",".join(columns)] + [",".join("" if r.get(c) is None else str(r[c]) for c in columns) for r in records]
        path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- schema


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv"])
def test_each_format_reads_with_paths_relative_to_the_table(tmp_path, suffix):
    write_clip(tmp_path / "data" / "clips" / "a.mp4", level_clip(8), fps=8)
    (tmp_path / "data" / "refs").mkdir()
    records = [
        {"video_path": "clips/a.mp4", "instruction": "make it warmer", "prompt_id": "p0", "edit_type": "warm",
         "reference_image": "refs/a.png", "start_s": 0.25, "end_s": 0.75},
        {"video_path": "clips/a.mp4", "instruction": "add a hat", "prompt_id": "p1", "edit_category": "add"},
    ]
    rows = load_prompts(write_table(tmp_path / "data" / f"prompts{suffix}", records))
    base = (tmp_path / "data").resolve()
    assert [r.prompt_id for r in rows] == ["p0", "p1"]
    assert rows[0].video_path == str(base / "clips" / "a.mp4") and rows[0].reference_image == str(base / "refs" / "a.png")
    assert (rows[0].start_s, rows[0].end_s) == (0.25, 0.75) and (rows[1].start_s, rows[1].end_s) == (None, None)
    assert rows[0].checkable and rows[0].edit_type == "warm"  # a checkable type, no checkable column
    # optional columns absent: edit_type falls back to edit_category, texts are empty, no reference image
    assert rows[1].edit_type == "add" and not rows[1].checkable and rows[1].reference_image is None
    assert rows[1].source_caption == rows[1].target_caption == rows[1].split == rows[1].clip_id == ""


def test_a_table_of_only_the_required_columns_gets_stable_derived_ids(tmp_path):
    write_clip(tmp_path / "clips" / "cat.mp4", level_clip(8), fps=8)
    records = [{"video_path": "clips/cat.mp4", "instruction": f"edit {i}"} for i in range(3)]
    first = load_prompts(write_table(tmp_path / "a.jsonl", records))
    again = load_prompts(write_table(tmp_path / "b.csv", records[::-1] + [{"video_path": "clips/cat.mp4", "instruction": "new"}]))
    ids = [r.prompt_id for r in first]
    assert all(re.fullmatch(r"cat-[0-9a-f]{10}", i) for i in ids) and len(set(ids)) == 3
    # the id depends on the row's content only: another file type, order and extra rows keep it
    assert {r.instruction: r.prompt_id for r in again if r.instruction != "new"} == {r.instruction: r.prompt_id for r in first}
    with pytest.raises(ValueError, match=r"duplicate prompt_id 'cat-[0-9a-f]{10}' \(rows 0 and 1\)"):
        load_prompts(write_table(tmp_path / "dup.jsonl", [records[0], records[0]]))


def test_unknown_columns_are_kept_per_row_and_named_once(tmp_path, caplog):
    write_clip(tmp_path / "a.mp4", level_clip(8), fps=8)
    path = write_table(tmp_path / "t.jsonl", [{"video_path": "a.mp4", "instruction": "x", "licence": "CC0", "score": 3}])
    with caplog.at_level(logging.INFO, logger="editrl.protocol.dataset"):
        [row] = load_prompts(path)
    assert row.extra == {"licence": "CC0", "score": 3}
    infos = [r.getMessage() for r in caplog.records if "not part of the prompt schema" in r.getMessage()]
    assert len(infos) == 1 and "licence" in infos[0] and "score" in infos[0]


def test_an_unsupported_suffix_or_a_missing_column_is_named(tmp_path):
    (tmp_path / "t.tsv").write_text("video_path\tinstruction\n")
    with pytest.raises(ValueError, match=r"t\.tsv: unsupported file type '\.tsv'; accepted suffixes: \.parquet, \.jsonl, \.csv"):
        load_prompts(tmp_path / "t.tsv")
    path = write_table(tmp_path / "t.csv", [{"video_path": "a.mp4", "prompt": "x"}])
    with pytest.raises(ValueError, match=r"t\.csv has no column 'instruction' \(columns: \['video_path', 'prompt'\]\)"):
        load_prompts(path)


def test_bad_rows_are_skipped_each_with_a_warning_naming_row_and_rule(tmp_path, caplog):
    good = {"video_path": "a.mp4", "instruction": "x"}
    records = [
        dict(good, prompt_id="ok"),
        dict(good, prompt_id="late", start_s=2.0, end_s=1.0),
        dict(good, prompt_id="neg", start_s=-1.0),
        dict(good, prompt_id="blank", video_path="  "),
        dict(good, prompt_id="flag", edit_type="add", checkable=True),
    ]
    with caplog.at_level(logging.WARNING, logger="editrl.protocol.dataset"):
        rows = load_prompts(write_table(tmp_path / "t.parquet", records))
    assert [r.prompt_id for r in rows] == ["ok"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("row 1 (prompt_id 'late'): start_s=2.0 must be before end_s=1.0" in m for m in warnings)
    assert any("row 2 (prompt_id 'neg'): start_s=-1.0 must be a finite number of seconds >= 0" in m for m in warnings)
    assert any("row 3 (prompt_id 'blank'): field 'video_path' is null or empty" in m for m in warnings)
    assert any("row 4 (prompt_id 'flag'): checkable but edit_type 'add'" in m for m in warnings)
    assert warnings[-1].endswith("skipped 4 of 5 rows") and all("t.parquet" in m for m in warnings)


# ---------------------------------------------------------------- clip sampling


def test_the_bundled_clips_decode_exactly_as_the_plain_decode():
    # 9 frames at 8 fps, 128x128: the run's rate and size take every frame unchanged
    assert len(BUNDLED_CLIPS) == 24
    for path in BUNDLED_CLIPS:
        full = read_video(str(path))
        assert full.shape == (9, 128, 128, 3)
        np.testing.assert_array_equal(load_clip(path, 9, 128, 128, fps=8), full)
        np.testing.assert_array_equal(load_clip(path, 9, 128, 128), full)


def test_a_24_fps_clip_is_sampled_at_the_configured_rate(tmp_path):
    path = write_clip(tmp_path / "c24.mp4", level_clip(24), fps=24)  # 1 s: frame k at k / 24 s
    # 8 fps: times 0, 1/8, 2/8, 3/8 s are the 24 fps frames 0, 3, 6, 9
    assert frame_indices(load_clip(path, 4, 32, 32, fps=8)) == [0, 3, 6, 9]
    # from 0.5 s: 0.5 + k/8 s = frames 12, 15, 18, 21
    assert frame_indices(load_clip(path, 4, 32, 32, fps=8, start_s=0.5, end_s=0.9)) == [12, 15, 18, 21]
    # 10 fps: 0.1 s is 2.4 frames -> nearest 2; 0.2 -> 4.8 -> 5; 0.3 -> 7.2 -> 7
    assert frame_indices(load_clip(path, 4, 32, 32, fps=10)) == [0, 2, 5, 7]
    # no fps: the clip's own consecutive frames from the first at or after start_s (0.5 s = frame 12)
    assert frame_indices(load_clip(path, 3, 32, 32, start_s=0.5)) == [12, 13, 14]
    # 9 frames at 8 fps need the time 1.0 s, past the clip's last frame at 23/24 s (it ends at 1.0 s)
    with pytest.raises(ValueError, match=r"c24\.mp4: clip too short: 24 frames \(1\.000 s at 24 fps\) from start_s=0\.0; "
                                         r"9 frames at fps 8 take the times 0 \.\. 1 s"):
        load_clip(path, 9, 32, 32, fps=8)
    # 4 frames at 8 fps from 0.5 s need 0.875 s, not before end_s 0.8
    with pytest.raises(ValueError, match=r"to end_s=0\.8; 4 frames at fps 8"):
        load_clip(path, 4, 32, 32, fps=8, start_s=0.5, end_s=0.8)


@pytest.mark.parametrize("shape", [(64, 96), (96, 64)], ids=["wide", "tall"])
def test_another_aspect_ratio_is_centre_cropped_not_squashed(tmp_path, shape):
    height, width = shape
    frames = np.zeros((3, height, width, 3), np.uint8)
    # 16-pixel bands at both ends of the long side (200 and 40), 120 in the middle square
    frames[...] = 120
    long_axis = 2 if width > height else 1
    index = [slice(None)] * 4
    index[long_axis] = slice(0, 16)
    frames[tuple(index)] = 200
    index[long_axis] = slice(-16, None)
    frames[tuple(index)] = 40
    path = write_clip(tmp_path / "a.mp4", frames, fps=8)
    decoded = read_video(str(path))
    square = decoded[:, :, 16:80] if long_axis == 2 else decoded[:, 16:80]
    np.testing.assert_array_equal(load_clip(path, 3, 64, 64, fps=8), square)  # the middle 64x64: a crop, no resize
    small = load_clip(path, 3, 32, 32, fps=8)
    assert small.shape == (3, 32, 32, 3)
    # nothing of the end bands: squashing the whole frame would bring 200 and 40 into the edge columns/rows
    assert np.abs(small.astype(int) - 120).max() <= 4


def test_the_dataset_samples_each_rows_part_at_its_fps(tmp_path):
    write_clip(tmp_path / "c24.mp4", level_clip(24), fps=24)
    path = write_table(tmp_path / "t.csv", [{"video_path": "c24.mp4", "instruction": "x", "prompt_id": "a", "start_s": 0.5}])
    data = PromptDataset(path, num_frames=3, height=32, width=32, fps=12)
    # 0.5 + k/12 s = frames 12, 14, 16
    assert frame_indices(data.clip(data.by_id("a"))) == [12, 14, 16]


# ---------------------------------------------------------------- geometry


def test_vae_scale_factors_prefer_the_configs_own_factors():
    from editrl.policy.geometry import vae_scale_factors

    # Wan2.2 TI2V-5B's VAE: 16x spatial by its scale_factor_spatial; 2 ** len(downsample) would say 8
    ti2v = {"z_dim": 48, "scale_factor_spatial": 16, "scale_factor_temporal": 4, "patch_size": 2,
            "temperal_downsample": [False, True, True]}
    assert vae_scale_factors(ti2v) == (16, 4)
    # Wan2.1: 2 ** 3 = 8 spatial, 2 ** (0 + 1 + 1) = 4 temporal
    assert vae_scale_factors({"temperal_downsample": [False, True, True]}) == (8, 4)
    with pytest.raises(ValueError, match="neither 'scale_factor_spatial' nor 'temperal_downsample'"):
        vae_scale_factors({"z_dim": 16})


def test_geometry_the_model_cannot_take_is_refused_with_the_rule():
    from editrl.policy.geometry import check_geometry

    check_geometry(480, 832, 81, 8, 4, 2)  # Wan2.1 480p: 480 = 30 x 16, 832 = 52 x 16, 81 = 4 x 20 + 1
    with pytest.raises(ValueError, match=r"^height=60: must be a multiple of 16 \(VAE factor 8 x patch 2 of the model\); nearest 48 or 64$"):
        check_geometry(60, 64, 81, 8, 4, 2)
    with pytest.raises(ValueError, match=r"^num_frames=80: must be 4k\+1 \(VAE temporal factor 4\) for the model; nearest 77 or 81$"):
        check_geometry(480, 832, 80, 8, 4, 2)
    # TI2V-5B: 16 x patch 2 = 32 pixels; 480 = 15 x 32 passes, 464 = 14.5 x 32 does not
    check_geometry(480, 704, 81, 16, 4, (2, 2))
    with pytest.raises(ValueError, match=r"width=464: must be a multiple of 32"):
        check_geometry(480, 464, 81, 16, 4, (2, 2))


def test_every_preset_passes_geometry_with_published_configs_for_absent_checkpoints():
    from editrl.cluster.config import load_train_config
    from editrl.cluster.preflight import check_geometry, model_factors

    presets = [p for p in sorted((ROOT / "configs").glob("*.yaml")) if not p.name.startswith("reward_server")]
    sources = {}
    for preset in presets:
        policy = load_train_config(preset).policy
        check_geometry(policy)
        sources[preset.name] = model_factors(policy).source
    assert sources["wan21_14b_480p.yaml"] == "the published config of Wan2.1-T2V-14B-Diffusers"
    assert sources["default.yaml"] == "checkpoint warm_checkpoint"


# ---------------------------------------------------------------- editrl data check


def run_check(capsys, *args: str) -> tuple[int, list[str], str]:
    code = main(["data", "check", *args])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def test_data_check_reports_every_bad_row_by_name(tmp_path, capsys):
    write_clip(tmp_path / "clips" / "good.mp4", level_clip(6), fps=8)
    write_clip(tmp_path / "clips" / "short.mp4", level_clip(3), fps=8)
    (tmp_path / "clips" / "junk.mp4").write_bytes(b"not a video" * 20)
    records = [
        {"prompt_id": "good", "video_path": "clips/good.mp4", "instruction": "x"},
        {"prompt_id": "gone", "video_path": "clips/gone.mp4", "instruction": "x"},
        {"prompt_id": "junk", "video_path": "clips/junk.mp4", "instruction": "x"},
        {"prompt_id": "short", "video_path": "clips/short.mp4", "instruction": "x"},
        {"prompt_id": "window", "video_path": "clips/good.mp4", "instruction": "x", "start_s": 0.5},
        {"prompt_id": "noinst", "video_path": "clips/good.mp4", "instruction": ""},
    ]
    table = write_table(tmp_path / "t.jsonl", records)
    # configs/default.yaml at 8 fps: 5 frames of 64x64, i.e. the times 0 .. 0.5 s
    at_8 = ("--config", str(ROOT / "configs" / "default.yaml"), "--set", "fps=8")
    code, lines, _ = run_check(capsys, str(table), *at_8)
    assert code == 1
    assert lines[0].startswith("geometry: ok (5 frames of 64x64 for checkpoint warm_checkpoint)")
    report = dict(line.split(": ", 1) for line in lines[1:-1])
    assert list(report) == ["good", "gone", "junk", "short", "window", "noinst"]
    assert report["good"] == "ok"
    assert report["gone"].startswith(f"video_path {tmp_path.resolve() / 'clips' / 'gone.mp4'}: FileNotFoundError")
    assert "junk.mp4: cannot decode video" in report["junk"]
    assert "short.mp4: clip too short: 3 frames (0.375 s at 8 fps)" in report["short"]
    assert "good.mp4: clip too short: 2 frames (0.250 s at 8 fps) from start_s=0.5" in report["window"]
    assert report["noinst"] == "row 5: field 'instruction' is null or empty"
    assert lines[-1] == f"{table.resolve()}: 1 of 6 rows ok, 5 with problems (5 frames of 64x64 at fps 8)"

    ok_table = write_table(tmp_path / "ok.csv", records[:1])
    code, lines, _ = run_check(capsys, str(ok_table), *at_8)
    assert code == 0 and lines[1] == "good: ok" and lines[-1].endswith("1 of 1 rows ok, 0 with problems (5 frames of 64x64 at fps 8)")
    # at the preset's 4 fps the 5 frames need 1.0 s, more than the 0.75 s clip
    code, lines, _ = run_check(capsys, str(ok_table), "--config", str(ROOT / "configs" / "default.yaml"))
    assert code == 1 and "clip too short" in lines[1]


def test_data_check_refuses_geometry_and_unreadable_tables_in_one_line(tmp_path, capsys):
    write_clip(tmp_path / "a.mp4", level_clip(6), fps=8)
    table = write_table(tmp_path / "t.csv", [{"video_path": "a.mp4", "instruction": "x", "prompt_id": "a"}])
    default = str(ROOT / "configs" / "default.yaml")
    code, lines, _ = run_check(capsys, str(table), "--config", default, "--set", "policy.height=60")
    assert code == 1
    assert lines[0] == ("geometry: policy.height=60: must be a multiple of 8 (VAE factor 4 x patch 2 of checkpoint "
                        "warm_checkpoint); nearest 56 or 64")
    code, lines, err = run_check(capsys, str(tmp_path / "gone.parquet"), "--config", default)
    assert (code, lines) == (1, []) and err == f"editrl: error: prompt table not found: {tmp_path / 'gone.parquet'}\n"
    bad = write_table(tmp_path / "bad.jsonl", [{"video": "a.mp4", "instruction": "x"}])
    code, lines, err = run_check(capsys, str(bad), "--config", default)
    assert code == 1 and lines == []
    assert err == f"editrl: error: prompt table {bad} has no column 'video_path' (columns: ['video', 'instruction'])\n"
