"""Tests of the bundled dataset: colour edits, builder, loader."""
from __future__ import annotations

import logging
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from editrl.protocol.dataset import PromptDataset, load_clip, load_prompts, resize_frames
from editrl.protocol.edits import CHECKABLE_EDIT_TYPES, apply_edit
from editrl.protocol.video import read_video
from editrl.tools.dataset.build import COLUMNS, SCHEMA, build_dataset, camera_path
from editrl.tools.dataset.catalog import EDIT_CATEGORIES, HELDOUT_PICTURES, MOTIONS, PICTURES

# ---------------------------------------------------------------- edits

# Two pixels: p0 = (0.2, 0.4, 0.6), p1 = (1.0, 0.5, 0.0).
# Luma: Y0 = 0.299*0.2 + 0.587*0.4 + 0.114*0.6 = 0.0598 + 0.2348 + 0.0684 = 0.363
#       Y1 = 0.299*1.0 + 0.587*0.5 + 0.114*0.0 = 0.299 + 0.2935 = 0.5925
PIXELS = np.array([[[[0.2, 0.4, 0.6], [1.0, 0.5, 0.0]]]], dtype=np.float32)  # (1, 1, 2, 3)

EXPECTED_HALF_STRENGTH = {
    # x + 0.2*0.5 = x + 0.1; p1.R = 1.1 clips to 1.
    "brighten": [[0.3, 0.5, 0.7], [1.0, 0.6, 0.1]],
    # x * (1 - 0.25) = 0.75 x
    "darken": [[0.15, 0.3, 0.45], [0.75, 0.375, 0.0]],
    # 0.5 x + 0.5 Y: p0 -> (0.1, 0.2, 0.3) + 0.1815; p1 -> (0.5, 0.25, 0.0) + 0.29625
    "grayscale": [[0.2815, 0.3815, 0.4815], [0.79625, 0.54625, 0.29625]],
    # Y + 1.5 (x - Y): p0 -> 0.363 + 1.5*(-0.163, 0.037, 0.237) = (0.1185, 0.4185, 0.7185);
    # p1 -> 0.5925 + 1.5*(0.4075, -0.0925, -0.5925) = (1.20375, 0.45375, -0.29625), clipped.
    "saturate": [[0.1185, 0.4185, 0.7185], [1.0, 0.45375, 0.0]],
    # x + 0.5*(0.12, 0.03, -0.12) = x + (0.06, 0.015, -0.06); p1 -> (1.06, 0.515, -0.06), clipped.
    "warm": [[0.26, 0.415, 0.54], [1.0, 0.515, 0.0]],
    # x + 0.5*(-0.12, 0, 0.12) = x + (-0.06, 0, 0.06)
    "cool": [[0.14, 0.4, 0.66], [0.94, 0.5, 0.06]],
}


@pytest.mark.parametrize("edit_type", CHECKABLE_EDIT_TYPES)
def test_edit_matches_hand_computed_values(edit_type):
    out = apply_edit(PIXELS, edit_type, 0.5)
    assert out.dtype == np.float32 and out.shape == PIXELS.shape
    np.testing.assert_allclose(out[0, 0], EXPECTED_HALF_STRENGTH[edit_type], atol=1e-6)
    assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize("edit_type", CHECKABLE_EDIT_TYPES)
def test_edit_strength_zero_is_identity(edit_type):
    out = apply_edit(PIXELS, edit_type, 0.0)
    np.testing.assert_array_equal(out, PIXELS)
    assert out is not PIXELS


def test_full_grayscale_equals_luma():
    out = apply_edit(PIXELS, "grayscale", 1.0)
    np.testing.assert_allclose(out[0, 0], [[0.363] * 3, [0.5925] * 3], atol=1e-6)


def test_edit_rejects_bad_type_and_strength():
    with pytest.raises(ValueError, match="sepia"):
        apply_edit(PIXELS, "sepia", 0.5)
    for strength in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="strength"):
            apply_edit(PIXELS, "warm", strength)
    with pytest.raises(ValueError, match="channels"):
        apply_edit(np.zeros((1, 2, 2, 4), np.float32), "warm", 0.5)


# ---------------------------------------------------------------- builder


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dataset")
    build_dataset(out)
    return out


@pytest.fixture(scope="module")
def tables(built) -> dict[str, list[dict]]:
    return {s: pq.read_table(built / f"prompts_{s}.parquet").to_pylist() for s in ("train", "heldout")}


def test_build_layout_and_columns(built, tables):
    clips = sorted((built / "clips").glob("*.mp4"))
    assert len(clips) >= 24
    assert (built / "README.md").is_file()
    for split, rows in tables.items():
        schema = pq.read_schema(built / f"prompts_{split}.parquet")
        assert schema.names == list(COLUMNS)
        assert schema.field("checkable").type == pa.bool_()
        assert {r["split"] for r in rows} == {split}
    all_rows = tables["train"] + tables["heldout"]
    assert len({r["prompt_id"] for r in all_rows}) == len(all_rows)
    assert {r["clip_id"] for r in all_rows} == {p.stem for p in clips}
    assert {r["motion"] for r in all_rows} == set(MOTIONS)
    for row in all_rows:
        assert all(row[c] not in (None, "") for c in COLUMNS if c != "checkable")
        assert (built / row["video_path"]).is_file()
        assert row["target_caption"] != row["source_caption"]


def test_build_six_prompts_per_clip_with_four_checkable_types(tables):
    per_clip = defaultdict(list)
    for row in tables["train"] + tables["heldout"]:
        per_clip[row["clip_id"]].append(row)
    assert len(per_clip) >= 24
    for clip_rows in per_clip.values():
        assert len(clip_rows) == 6
        checkable = [r["edit_type"] for r in clip_rows if r["checkable"]]
        assert len(checkable) == 4 and len(set(checkable)) == 4
        assert set(checkable) <= set(CHECKABLE_EDIT_TYPES)


def test_build_categories_types_and_split(tables):
    for split, rows in tables.items():
        types = Counter(r["edit_type"] for r in rows if r["checkable"])
        assert set(types) == set(CHECKABLE_EDIT_TYPES), split
        assert min(types.values()) >= 4, split
        assert {r["edit_category"] for r in rows} == set(EDIT_CATEGORIES), split
    all_rows = tables["train"] + tables["heldout"]
    for row in all_rows:
        if row["checkable"]:
            assert row["edit_category"] in ("colour", "style")
        else:
            assert row["edit_type"] == row["edit_category"] != "colour"
    styled = {r["edit_type"] for r in all_rows if r["checkable"] and r["edit_category"] == "style"}
    assert styled == {"grayscale", "warm"}
    # Each checkable phrasing means one type only.
    meaning = defaultdict(set)
    for row in all_rows:
        meaning[row["instruction"]].add(row["edit_type"])
    assert all(len(types) == 1 for types in meaning.values())
    assert len({r["instruction"] for r in all_rows if r["checkable"]}) >= 4 * len(CHECKABLE_EDIT_TYPES)
    train_pictures = {r["picture"] for r in tables["train"]}
    heldout_pictures = {r["picture"] for r in tables["heldout"]}
    assert heldout_pictures == set(HELDOUT_PICTURES)
    assert not train_pictures & heldout_pictures
    assert not {r["clip_id"] for r in tables["train"]} & {r["clip_id"] for r in tables["heldout"]}


def test_build_clips_decode(built):
    for path in sorted((built / "clips").glob("*.mp4")):
        frames = read_video(str(path))
        assert frames.shape == (9, 128, 128, 3), path
        assert frames.dtype == np.uint8
        assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 1.0, f"{path} does not move"


def test_camera_windows_stay_inside_picture():
    for picture in PICTURES:
        for motion in MOTIONS:
            windows = camera_path(motion, 300, 451, picture.focus)
            rows, cols, side = windows.T
            assert np.all(rows - side / 2 >= -1e-9) and np.all(rows + side / 2 <= 300 + 1e-9)
            assert np.all(cols - side / 2 >= -1e-9) and np.all(cols + side / 2 <= 451 + 1e-9)
            assert np.ptp(windows, axis=0).max() > 1.0
    with pytest.raises(ValueError, match="spin"):
        camera_path("spin", 100, 100, (0.5, 0.5))


def test_build_is_deterministic(built, tmp_path):
    build_dataset(tmp_path)
    names = ["prompts_train.parquet", "prompts_heldout.parquet", "README.md"]
    names += [f"clips/{p.name}" for p in sorted((built / "clips").glob("*.mp4"))]
    assert sorted(p.name for p in (tmp_path / "clips").iterdir()) == sorted(n[6:] for n in names[3:])
    for name in names:
        assert (built / name).read_bytes() == (tmp_path / name).read_bytes(), name


# ---------------------------------------------------------------- loader


def _write_table(directory: Path, rows: list[dict], name: str = "prompts.parquet") -> Path:
    path = directory / name
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), str(path))
    return path


def _copy_clips(built: Path, directory: Path, rows: list[dict]) -> None:
    (directory / "clips").mkdir(exist_ok=True)
    for video_path in {r["video_path"] for r in rows}:
        shutil.copyfile(built / video_path, directory / video_path)


def test_load_prompts_resolves_paths(built, tables):
    rows = load_prompts(built / "prompts_heldout.parquet")
    assert [r.prompt_id for r in rows] == [r["prompt_id"] for r in tables["heldout"]]
    assert all(Path(r.video_path).is_absolute() and Path(r.video_path).is_file() for r in rows)
    assert isinstance(rows[0].checkable, bool)


def test_load_prompts_skips_row_with_missing_instruction(tables, tmp_path, caplog):
    rows = [dict(r) for r in tables["train"][:6]]
    bad_id = rows[2]["prompt_id"]
    rows[2]["instruction"] = None
    rows[4]["instruction"] = "   "
    path = _write_table(tmp_path, rows)
    with caplog.at_level(logging.WARNING, logger="editrl.protocol.dataset"):
        loaded = load_prompts(path)
    assert [r.prompt_id for r in loaded] == [rows[i]["prompt_id"] for i in (0, 1, 3, 5)]
    messages = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert any(bad_id in m and "instruction" in m for m in messages)
    assert any(rows[4]["prompt_id"] in m for m in messages)
    assert any("skipped 2 of 6" in m for m in messages)


def test_load_prompts_errors(tables, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        load_prompts(tmp_path / "nope.parquet")
    rows = tables["train"][:3]
    table = pa.Table.from_pylist(rows, schema=SCHEMA).drop_columns(["instruction"])
    pq.write_table(table, str(tmp_path / "nocol.parquet"))
    with pytest.raises(ValueError, match="no column 'instruction'") as info:
        load_prompts(tmp_path / "nocol.parquet")
    assert "nocol.parquet" in str(info.value) and "'video_path'" in str(info.value)  # the columns present
    dup = [dict(rows[0]), dict(rows[1]), dict(rows[2], prompt_id=rows[0]["prompt_id"])]
    with pytest.raises(ValueError, match=rf"duplicate prompt_id '{rows[0]['prompt_id']}' \(rows 0 and 2\)"):
        load_prompts(_write_table(tmp_path, dup, "dup.parquet"))
    empty = [dict(r, video_path=" ") for r in rows]
    with pytest.raises(ValueError, match="no valid rows"):
        load_prompts(_write_table(tmp_path, empty, "empty.parquet"))


def test_dataset_drops_missing_and_empty_clips_and_never_decodes(built, tables, tmp_path, caplog):
    from editrl.protocol.video import VideoDecodeError

    clip_ids = sorted({r["clip_id"] for r in tables["train"]})[:3]
    rows = [r for r in tables["train"] if r["clip_id"] in clip_ids]
    _copy_clips(built, tmp_path, rows)
    (tmp_path / f"clips/{clip_ids[1]}.mp4").write_bytes(b"")  # empty: dropped at once
    garbage = tmp_path / f"clips/{clip_ids[2]}.mp4"
    garbage.write_bytes(b"this is not an mp4 file" * 10)  # not decoded here: kept, fails when read
    path = _write_table(tmp_path, rows)
    with caplog.at_level(logging.WARNING, logger="editrl.protocol.dataset"):
        data = PromptDataset(path, num_frames=9, height=128, width=128)
    assert {r.clip_id for r in data.rows} == {clip_ids[0], clip_ids[2]}
    assert len(data) == 12
    errors = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.ERROR]
    assert len(errors) == 1 and "empty file" in errors[0] and f"{clip_ids[1]}-00" in errors[0]
    assert any("dropped 6 of 18" in rec.getMessage() for rec in caplog.records)
    with pytest.raises(VideoDecodeError, match=garbage.name):
        data.clip(next(r for r in data.rows if r.clip_id == clip_ids[2]))
    (tmp_path / f"clips/{clip_ids[0]}.mp4").unlink()
    garbage.unlink()
    with pytest.raises(ValueError, match="no prompt"):
        PromptDataset(path, num_frames=9, height=128, width=128)


def test_dataset_access(built):
    data = PromptDataset(built / "prompts_heldout.parquet", num_frames=9, height=64, width=64)
    assert len(data) == 36 and data[0] is data.rows[0]
    row = data.by_id(data[5].prompt_id)
    clip = data.clip(row)
    assert clip.shape == (9, 64, 64, 3) and clip.dtype == np.uint8 and not clip.flags.writeable
    same_clip = [r for r in data.rows if r.clip_id == row.clip_id]
    assert all(data.clip(r) is clip for r in same_clip)
    with pytest.raises(KeyError, match="missing-00"):
        data.by_id("missing-00")


def test_load_clip_takes_consecutive_frames_and_resizes(built):
    path = sorted((built / "clips").glob("*.mp4"))[0]
    full = read_video(str(path))
    assert full.shape[0] == 9
    np.testing.assert_array_equal(load_clip(path, 9, 128, 128), full)
    np.testing.assert_array_equal(load_clip(path, 9, 128, 128, fps=8), full)  # the clips' own rate: every frame
    out = load_clip(path, 5, 64, 64)
    assert out.shape == (5, 64, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, resize_frames(full[:5], 64, 64))  # fps None: the first 5 frames
    # at 4 fps the times 0, 0.25, .., 1.0 s are the 8 fps frames 0, 2, 4, 6, 8
    np.testing.assert_array_equal(load_clip(path, 5, 64, 64, fps=4), resize_frames(full[[0, 2, 4, 6, 8]], 64, 64))
    # Anti-aliased downscaling stays close to block averages of the source frame.
    block_mean = full[0].reshape(64, 2, 64, 2, 3).astype(float).mean(axis=(1, 3))
    assert np.abs(load_clip(path, 1, 64, 64)[0].astype(float) - block_mean).mean() < 6.0
    with pytest.raises(ValueError, match=path.name):
        load_clip(path, 10, 64, 64)


def test_load_clip_undecodable_names_path(tmp_path):
    from editrl.protocol.video import VideoDecodeError

    bad = tmp_path / "garbage.mp4"
    bad.write_bytes(b"\x00\x01garbage" * 50)
    with pytest.raises(VideoDecodeError, match="garbage.mp4"):
        load_clip(bad, 9, 128, 128)
