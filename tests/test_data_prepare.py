"""``editrl data prepare``: a folder of videos at other rates and aspect ratios becomes clips
at the config's geometry with the right frames, prompt tables split by clip, and a report
that names every video that could not be used."""
import json
from pathlib import Path

import numpy as np
from test_prompt_tables import frame_indices, level_clip, write_clip, write_table

from editrl.cli import main
from editrl.cluster.data_prepare import heldout
from editrl.protocol.dataset import PromptDataset
from editrl.protocol.prompt_table import load_prompts
from editrl.protocol.video import read_video

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "configs" / "default.yaml")  # 5 frames of 64x64 at 4 fps


def _folder(tmp_path: Path) -> Path:
    videos = tmp_path / "videos"
    # 16 fps, 48 x 96 (wide), 1.5 s: at 4 fps the 5 frames are its frames 0, 4, 8, 12, 16
    wide = level_clip(24, height=48, width=96)
    wide[:, :, :24] = 255  # the sides a centre crop to 1:1 removes (columns 0..23 and 72..95)
    wide[:, :, 72:] = 0
    write_clip(videos / "wide.mp4", wide, fps=16)
    write_clip(videos / "sub" / "tall.mp4", level_clip(6, height=96, width=48), fps=4)  # 4 fps: frames 0..4
    write_clip(videos / "short.mp4", level_clip(3), fps=4)  # 0.75 s, the 5 frames need 1.25
    (videos / "junk.mp4").write_bytes(b"not a video" * 20)
    return videos


def test_prepare_cuts_clips_at_the_configured_geometry_with_the_right_frames(tmp_path, capsys):
    videos = _folder(tmp_path)
    table = write_table(tmp_path / "instructions.jsonl", [
        {"video_path": "videos/wide.mp4", "instruction": "make it red", "edit_category": "colour"},
        {"video_path": "videos/wide.mp4", "instruction": "late part", "start_s": 0.25},
        {"video_path": "videos/sub/tall.mp4", "instruction": "add a hat", "prompt_id": "hat", "mood": "sunny"},
        {"video_path": "videos/short.mp4", "instruction": "x"},
        {"video_path": "videos/junk.mp4", "instruction": "x"},
        {"video_path": "videos/wide.mp4", "instruction": ""},
    ])
    out = tmp_path / "prepared"
    code = main(["data", "prepare", str(videos), "--config", DEFAULT, "--out", str(out), "--instructions", str(table),
                 "--heldout-fraction", "0"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 1
    assert any(line.startswith("short: ") and "clip too short" in line for line in lines)
    assert any(line.startswith("junk: ") and "cannot decode video" in line for line in lines)
    assert "row 5: field 'instruction' is null or empty" in lines
    assert lines[-1].endswith("3 train and 0 held-out prompts from 3 of 5 clips; 2 clips and 1 rows could not be used "
                              "(prepare_report.json)")

    wide = read_video(str(out / "clips" / "wide.mp4"))
    assert wide.shape == (5, 64, 64, 3)
    assert frame_indices(wide[:, 20:44, 20:44]) == [0, 4, 8, 12, 16]
    assert wide[:, :, :4].mean() < 200 and wide[:, :, -4:].mean() > 20  # the white / black sides were cropped off
    late = read_video(str(out / "clips" / "wide@0.25-end.mp4"))
    assert frame_indices(late) == [4, 8, 12, 16, 20]  # 0.25 s + k / 4 s at 16 fps
    assert frame_indices(read_video(str(out / "clips" / "sub__tall.mp4"))) == [0, 1, 2, 3, 4]

    rows = {r.instruction: r for r in load_prompts(out / "prompts_train.jsonl")}
    assert rows["add a hat"].prompt_id == "hat" and rows["add a hat"].extra == {"mood": "sunny"}
    assert rows["make it red"].edit_category == "colour" and rows["make it red"].split == "train"
    assert rows["late part"].start_s is None  # the clip already is the part
    # the prepared table trains at the same geometry: the clips' own frames, nothing resampled away
    data = PromptDataset(out / "prompts_train.jsonl", num_frames=5, height=64, width=64, fps=4)
    np.testing.assert_array_equal(data.clip(rows["make it red"]), wide)
    report = json.loads((out / "prepare_report.json").read_text())
    assert sorted(f["clip"] for f in report["failed_clips"]) == ["junk", "short"]
    assert report["refused_rows"][0]["row"] == 5


def test_the_split_is_by_clip_and_stable(tmp_path, capsys):
    videos = tmp_path / "videos"
    names = [f"clip{i:02d}" for i in range(40)]
    for name in names:
        write_clip(videos / f"{name}.mp4", level_clip(5, 16, 16), fps=4)
    records = [{"video_path": f"videos/{n}.mp4", "instruction": f"edit {j}"} for n in names for j in range(2)]
    table = write_table(tmp_path / "i.jsonl", records)
    out = tmp_path / "out"
    assert main(["data", "prepare", str(videos), "--config", DEFAULT, "--out", str(out), "--instructions", str(table),
                 "--heldout-fraction", "0.25"]) == 0
    train, held = load_prompts(out / "prompts_train.jsonl"), load_prompts(out / "prompts_heldout.jsonl")
    assert {Path(r.video_path).stem for r in train}.isdisjoint({Path(r.video_path).stem for r in held})
    assert len(train) + len(held) == 80 and all(r.split == "heldout" for r in held)
    # the rule: sha1(name)[:8] / 2**32 < fraction, so adding videos never moves a clip
    assert {Path(r.video_path).stem for r in held} == {n for n in names if heldout(n, 0.25)}
    assert 4 <= len(held) / 2 <= 16


def test_a_geometry_the_model_cannot_take_is_refused_before_anything_is_written(tmp_path, capsys):
    videos = _folder(tmp_path)
    table = write_table(tmp_path / "i.jsonl", [{"video_path": "videos/wide.mp4", "instruction": "x"}])
    out = tmp_path / "out"
    code = main(["data", "prepare", str(videos), "--config", DEFAULT, "--set", "policy.num_frames=6", "--out", str(out),
                 "--instructions", str(table)])
    err = capsys.readouterr().err
    assert code == 1 and not out.exists()
    assert err.startswith("editrl: error: policy.num_frames=6: must be 2k+1")


def test_prepare_with_the_vlm_writer_names_the_clips_it_could_not_write(tmp_path, capsys, monkeypatch):
    import re

    import yaml
    from standins import GEMINI_PROMPT_BLOCK, GeminiStandIn, gemini_text_answer

    def answer(body):
        text = "\n".join(p.get("text", "") for c in body["contents"] for p in c.get("parts", []))
        category = re.search(r"Edit category: (\w+)", text).group(1)
        if category == "add":  # the second clip's request is blocked
            return GEMINI_PROMPT_BLOCK
        return 200, gemini_text_answer(json.dumps({"source_caption": "a grey clip", "instruction": f"do a {category} edit",
                                                   "target_caption": "an edited grey clip", "edit_category": category}))

    videos = tmp_path / "videos"
    for name in ("a", "b", "c"):
        write_clip(videos / f"{name}.mp4", level_clip(6, 32, 32), fps=4)
    monkeypatch.setenv("GEMINI_API_KEY", "test-key")
    with GeminiStandIn({}, default=[answer]) as standin:
        writer = tmp_path / "writer.yaml"
        writer.write_text(yaml.safe_dump({"client": "gemini", "model": "writer", "base_url": standin.url,
                                          "api_version": "v1beta", "attempts": 1}))
        out = tmp_path / "out"
        code = main(["data", "prepare", str(videos), "--config", DEFAULT, "--out", str(out), "--writer", str(writer),
                     "--heldout-fraction", "0"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 1
    assert lines[0].startswith("b: instruction writer: blocked")
    rows = load_prompts(out / "prompts_train.jsonl")
    # clips in sorted order ask the categories in turn: a colour, b add (blocked), c remove
    assert [(Path(r.video_path).name, r.edit_category, r.instruction) for r in rows] == [
        ("a.mp4", "colour", "do a colour edit"), ("c.mp4", "remove", "do a remove edit")]
    assert rows[0].source_caption == "a grey clip" and rows[0].target_caption == "an edited grey clip"
