"""``editrl data prepare``: from a folder of videos to prompt tables a config can train on.

Every video (:data:`VIDEO_SUFFIXES`, found recursively, in sorted order) is decoded as the
rollout workers decode sources (:func:`editrl.protocol.dataset.load_clip`): ``num_frames``
frames at the config's ``fps``, centre-cropped to the config's aspect ratio and resized to
``policy.height x policy.width``; the config's geometry is checked against the model first
(multiples of the VAE's spatial factor times the patch, ``4k+1`` frames for Wan). Each clip is
written as ``clips/<name>.mp4`` (H.264 at ``fps``) so the tables point at exactly the frames a
run will see.

Instructions come from one of:

* ``--instructions TABLE``: a prompt table (:mod:`editrl.protocol.prompt_table`) whose
  ``video_path`` names videos of the folder; each row becomes a row of the output, its
  ``start_s`` / ``end_s`` applied when the clip is cut, its other columns kept;
* ``--writer WRITER.yaml``: a VLM writes a source caption, an instruction, a target caption
  and an edit category per clip (:mod:`editrl.cluster.instruction_writer`, categories balanced).

The split is by clip, so no held-out source is ever trained on: a clip is held out when the
first 8 hex digits of the SHA-1 of its name, read as a fraction of 2**32, fall below
``--heldout-fraction`` (stable when videos are added). Output: ``prompts_train.jsonl``,
``prompts_heldout.jsonl`` and ``prepare_report.json`` (every video and row with its outcome);
a video that cannot be used is named on the console with its reason and counted, never
dropped silently.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from editrl.cluster.command_errors import error, one_line

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
"""File types ``editrl data prepare`` picks up from the folder (case-insensitive)."""


@dataclass(frozen=True)
class Source:
    """One clip to cut: the video file, the part of it (seconds) and the name of the output clip."""

    path: Path
    name: str
    start_s: float | None = None
    end_s: float | None = None


def heldout(name: str, fraction: float) -> bool:
    """Whether the clip called ``name`` is held out: ``int(sha1(name)[:8], 16) / 2**32 < fraction``."""
    return int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 2**32 < fraction


def find_videos(folder: Path) -> list[Path]:
    """The video files under ``folder`` (recursive, by :data:`VIDEO_SUFFIXES`), sorted by path.

    Raises:
        FileNotFoundError: ``folder`` is not a directory.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"video folder not found: {folder}")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)


def _clip_name(path: Path, folder: Path, start_s: float | None, end_s: float | None) -> str:
    """``<path under folder, / as __, no suffix>`` plus ``@<start>-<end>`` for a part of the video."""
    stem = "__".join(path.relative_to(folder).with_suffix("").parts) if path.is_relative_to(folder) else path.stem
    if start_s is None and end_s is None:
        return stem
    return f"{stem}@{start_s or 0:g}-{'end' if end_s is None else f'{end_s:g}'}"


def add_prepare_parser(commands) -> None:
    """Add ``prepare`` to the ``editrl data`` subcommands."""
    prepare = commands.add_parser("prepare", help="turn a folder of videos into prompt tables for a config's geometry")
    prepare.add_argument("videos", metavar="VIDEOS", help="folder of source videos (searched recursively)")
    prepare.add_argument("--config", default="configs/default.yaml", help="YAML preset whose geometry, fps and model to prepare for")
    prepare.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field, e.g. fps=16")
    prepare.add_argument("--out", required=True, help="output folder (clips/, prompts_*.jsonl, prepare_report.json)")
    source = prepare.add_mutually_exclusive_group(required=True)
    source.add_argument("--instructions", metavar="TABLE", help="prompt table whose video_path names videos of VIDEOS")
    source.add_argument("--writer", metavar="YAML", help="instruction writer config (a VLM writes one prompt per clip)")
    prepare.add_argument("--heldout-fraction", type=float, default=0.1, help="share of clips held out (default 0.1)")
    prepare.set_defaults(func=cmd_data_prepare)


def _sources(args: argparse.Namespace, folder: Path) -> tuple[list[Source], list[dict], list[dict]]:
    """The clips to cut, the output rows without their clip (``--instructions``; empty for
    ``--writer``) and the rows of the table that were refused."""
    from editrl.protocol.prompt_table import read_prompt_table

    if args.writer:
        return [Source(p, _clip_name(p, folder, None, None)) for p in find_videos(folder)], [], []
    contents = read_prompt_table(args.instructions)
    sources: dict[str, Source] = {}
    rows, refused = [], [{"row": p.index, "prompt_id": p.prompt_id, "problem": p.problem} for p in contents.problems]
    for row in contents.rows:
        path = Path(row.video_path)
        name = _clip_name(path, folder.resolve(), row.start_s, row.end_s)
        sources.setdefault(name, Source(path, name, row.start_s, row.end_s))
        record = {k: v for k, v in vars(row).items() if k not in ("video_path", "start_s", "end_s", "extra") and v not in ("", None)}
        rows.append({**record, **row.extra, "clip": name})
    return list(sources.values()), rows, refused


def cmd_data_prepare(args: argparse.Namespace) -> int:
    """``editrl data prepare VIDEOS --config X --out DIR (--instructions TABLE | --writer YAML)``.

    Returns:
        0 when every video and row was used; 1 when some could not be (each named on stdout
        and in ``prepare_report.json``), or with one ``editrl: error:`` line when the config,
        its geometry, the folder or the instruction table cannot be used (nothing written).
    """
    from editrl.cluster.config import load_train_config, parse_overrides
    from editrl.cluster.preflight import PreflightError, check_geometry

    if not 0.0 <= args.heldout_fraction < 1.0:
        return error(f"--heldout-fraction {args.heldout_fraction}: must be in [0, 1)")
    folder = Path(args.videos)
    try:
        config = load_train_config(args.config, parse_overrides(args.set))
        check_geometry(config.policy)
        writer = _writer_config(args.writer) if args.writer else None
        sources, rows, refused = _sources(args, folder)
    except (ValueError, OSError, PreflightError) as exc:
        return error(one_line(exc))
    if not sources:
        return error(f"no videos ({', '.join(VIDEO_SUFFIXES)}) under {folder}" if args.writer
                      else f"prompt table {args.instructions} has no usable rows")
    out = Path(args.out)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    clips, failures = _cut_clips(sources, config, out)
    if writer is not None:
        rows, written_failures = _written_rows(clips, writer)
        failures += written_failures
    report = _write_tables(out, rows, clips, failures, refused, args.heldout_fraction)
    for failure in failures:
        sys.stdout.write(f"{failure['clip']}: {failure['problem']}\n")
    for row in refused:
        sys.stdout.write(f"row {row['row']}: {row['problem']}\n")
    sys.stdout.write(f"{out}: {report['train']} train and {report['heldout']} held-out prompts from {len(clips)} of "
                     f"{len(sources)} clips; {len(failures)} clips and {len(refused)} rows could not be used "
                     f"(prepare_report.json)\n")
    return 1 if failures or refused else 0


def _writer_config(path: str):
    import yaml

    from editrl.cluster.instruction_writer import WriterConfig

    with open(path, encoding="utf-8") as stream:
        return WriterConfig.model_validate(yaml.safe_load(stream) or {})


def _cut_clips(sources: list[Source], config, out: Path) -> tuple[dict, list[dict]]:
    """Decode, crop and resize each source and write ``clips/<name>.mp4``; returns the frames
    by name and the sources that failed (name and reason)."""
    from editrl.protocol.dataset import load_clip
    from editrl.protocol.video import VideoDecodeError, encode_mp4

    policy = config.policy
    clips, failures = {}, []
    for source in sources:
        try:
            frames = load_clip(source.path, policy.num_frames, policy.height, policy.width, fps=config.fps,
                               start_s=source.start_s, end_s=source.end_s)
        except (VideoDecodeError, ValueError, OSError) as exc:
            failures.append({"clip": source.name, "video": str(source.path), "problem": " ".join(str(exc).split())})
            logger.warning("cannot use %s: %s", source.path, exc)
            continue
        (out / "clips" / f"{source.name}.mp4").write_bytes(encode_mp4(frames, fps=config.fps))
        clips[source.name] = frames
    return clips, failures


def _written_rows(clips: dict, writer) -> tuple[list[dict], list[dict]]:
    """One row per clip from the VLM instruction writer; its per-clip failures."""
    from editrl.cluster.instruction_writer import ClipFrames, ClipFailure, write_instructions

    result = write_instructions([ClipFrames(name, frames) for name, frames in clips.items()], writer)
    rows, failures = [], []
    for item in result.items:
        if isinstance(item, ClipFailure):
            failures.append({"clip": item.clip_id, "problem": f"instruction writer: {item.reason}"})
        else:
            rows.append({"prompt_id": item.clip_id, "clip": item.clip_id, "instruction": item.instruction,
                         "source_caption": item.source_caption, "target_caption": item.target_caption,
                         "edit_category": item.edit_category})
    return rows, failures


def _write_tables(out: Path, rows: list[dict], clips: dict, failures: list[dict], refused: list[dict], fraction: float) -> dict:
    """``prompts_train.jsonl`` / ``prompts_heldout.jsonl`` (rows of clips that were cut) and the report."""
    split_rows: dict[str, list[dict]] = {"train": [], "heldout": []}
    failed = {f["clip"] for f in failures}
    for row in rows:
        name = row.pop("clip")
        if name not in clips or name in failed:
            continue
        split = "heldout" if heldout(name, fraction) else "train"
        split_rows[split].append({**row, "video_path": f"clips/{name}.mp4", "clip_id": row.get("clip_id") or name, "split": split})
    for split, records in split_rows.items():
        with open(out / f"prompts_{split}.jsonl", "w", encoding="utf-8") as stream:
            stream.writelines(json.dumps(r, default=str) + "\n" for r in records)
    report = {"train": len(split_rows["train"]), "heldout": len(split_rows["heldout"]), "clips": sorted(clips),
              "failed_clips": failures, "refused_rows": refused, "heldout_fraction": fraction}
    (out / "prepare_report.json").write_text(json.dumps(report, indent=2))
    return report
