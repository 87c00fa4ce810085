"""``editrl data``: commands on prompt tables. ``editrl data check TABLE`` validates every row
of a table against a training config before a run uses it.

``check`` reads the table (:mod:`editrl.protocol.prompt_table`), checks the config's video
geometry against the model (:func:`editrl.cluster.preflight.check_geometry`), then for each
row that passes the schema: the clip file exists, decodes, and is long enough for
``num_frames`` frames at the config's ``fps`` within the row's ``start_s`` / ``end_s``
(:func:`editrl.protocol.dataset.load_clip`, the workers' own decoding), and a
``reference_image`` exists and decodes. Clips are decoded on a thread pool (PyAV decodes
outside the GIL). No torch or Ray is imported.
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from editrl.cluster.command_errors import error, one_line
from editrl.cluster.data_prepare import add_prepare_parser
from editrl.cluster.encode_cache import add_cache_parser

DEFAULT_JOBS = min(4, os.cpu_count() or 1)
"""Clips ``editrl data check`` decodes at a time, unless ``--jobs`` says."""


@dataclass(frozen=True)
class ClipFormat:
    """What the rows of a table must give: ``num_frames`` frames of ``height x width`` pixels
    sampled at ``fps`` frames per second (from the config's ``policy`` and top-level ``fps``)."""

    num_frames: int
    height: int
    width: int
    fps: float


def add_data_parser(sub) -> argparse._SubParsersAction:
    """Add ``editrl data`` (a group of subcommands) and its ``check``, ``prepare`` and ``cache`` to ``sub``.

    Returns:
        The group's subparsers object, to add more ``editrl data ...`` commands to.
    """
    data = sub.add_parser("data", help="prepare, check and cache prompt tables (editrl data prepare VIDEOS, editrl data check TABLE, "
                                       "editrl data cache TABLE)")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    check = commands.add_parser("check", help="validate every row of a prompt table against a training config")
    check.add_argument("table", metavar="TABLE", help="prompt table: .parquet, .jsonl or .csv")
    check.add_argument("--config", default="configs/default.yaml", help="YAML preset (TrainConfig) whose geometry and fps to check against")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field, e.g. fps=24")
    check.add_argument("--jobs", type=int, default=DEFAULT_JOBS, help=f"clips decoded at a time (default {DEFAULT_JOBS})")
    check.set_defaults(func=cmd_data_check)
    add_prepare_parser(commands)
    add_cache_parser(commands)
    return commands


def row_problem(row, clip: ClipFormat) -> str | None:
    """Why a schema-valid row cannot be used with ``clip``, or None.

    Args:
        row: a :class:`~editrl.protocol.prompt_table.PromptRow`.
        clip: the format asked for.

    Returns:
        One line naming the file and what is wrong: missing or empty file, not a decodable
        video (or image), or too short for ``clip`` (the message of
        :func:`~editrl.protocol.dataset.load_clip`).
    """
    from editrl.protocol.dataset import file_problem, load_clip
    from editrl.protocol.video import ImageDecodeError, VideoDecodeError, decode_image

    problem = file_problem(row.video_path)
    if problem is not None:
        return f"video_path {row.video_path}: {problem}"
    try:
        load_clip(row.video_path, clip.num_frames, clip.height, clip.width, fps=clip.fps, start_s=row.start_s, end_s=row.end_s)
    except (VideoDecodeError, ValueError, OSError) as exc:
        return " ".join(str(exc).split())
    if row.reference_image is not None:
        problem = file_problem(row.reference_image)
        if problem is not None:
            return f"reference_image {row.reference_image}: {problem}"
        try:
            with open(row.reference_image, "rb") as handle:
                decode_image(handle.read(), what=f"reference_image {row.reference_image}")
        except (ImageDecodeError, OSError) as exc:
            return " ".join(str(exc).split())
    return None


def cmd_data_check(args: argparse.Namespace) -> int:
    """``editrl data check TABLE``: one line per row on stdout (``<prompt_id>: ok`` or
    ``<prompt_id>: <problem>``; ``row <i>`` for a row whose id cannot be told), in file order,
    then a summary line.

    Returns:
        0 when the config's geometry and every row are fine; 1 otherwise, and 1 with one line
        ``editrl: error: ...`` on stderr when the config or the table cannot be read (missing
        file, unsupported suffix, missing required column, duplicate ``prompt_id``).
    """
    from editrl.cluster.config import load_train_config, parse_overrides
    from editrl.cluster.preflight import PreflightError, check_geometry, model_factors
    from editrl.protocol.prompt_table import read_prompt_table
    from editrl.resources import resolve_path

    if args.jobs < 1:
        return error(f"--jobs {args.jobs}: must be at least 1")
    try:
        config = load_train_config(args.config, parse_overrides(args.set))
        contents = read_prompt_table(resolve_path(args.table))
    except (ValueError, OSError) as exc:
        return error(one_line(exc))
    policy = config.policy
    clip = ClipFormat(policy.num_frames, policy.height, policy.width, config.fps)
    out = sys.stdout
    failures = 0
    try:
        factors = model_factors(policy)
    except PreflightError as exc:
        factors = None
        out.write(f"geometry: not checked, the model's factors are unknown ({exc})\n")
    if factors is not None:
        try:
            check_geometry(policy, factors)
            out.write(f"geometry: ok ({clip.num_frames} frames of {clip.height}x{clip.width} for {factors.source})\n")
        except PreflightError as exc:
            failures += 1
            out.write(f"geometry: {exc}\n")

    problems = {p.index: p for p in contents.problems}
    valid_indices = [i for i in range(contents.total) if i not in problems]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        row_results = dict(zip(valid_indices, pool.map(lambda row: row_problem(row, clip), contents.rows)))
    rows = dict(zip(valid_indices, contents.rows))
    bad_rows = 0
    for index in range(contents.total):
        if index in problems:
            name, problem = problems[index].prompt_id or f"row {index}", f"row {index}: {problems[index].problem}"
        else:
            name, problem = rows[index].prompt_id, row_results[index]
        bad_rows += problem is not None
        out.write(f"{name}: {problem or 'ok'}\n")
    out.write(f"{contents.path}: {contents.total - bad_rows} of {contents.total} rows ok, {bad_rows} with problems "
              f"({clip.num_frames} frames of {clip.height}x{clip.width} at fps {clip.fps:g})\n")
    return 1 if failures or bad_rows else 0
