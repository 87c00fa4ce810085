"""Loading the prompt tables and source clips, with validation.

A prompt table is a Parquet file with the columns in :data:`REQUIRED_COLUMNS`
(see ``assets/clips/README.md``); ``video_path`` is relative to the Parquet
file's directory. Bad rows are skipped with a warning, bad clips with an error
log, and only a table with nothing usable left is an error.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from skimage.transform import resize

from editrl.protocol.edits import CHECKABLE_EDIT_TYPES
from editrl.protocol.video import VideoDecodeError, read_video

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS: tuple[str, ...] = (
    "prompt_id", "clip_id", "video_path", "instruction", "edit_category", "edit_type", "checkable",
    "source_caption", "target_caption", "picture", "motion", "split",
)
NON_EMPTY_FIELDS: tuple[str, ...] = ("prompt_id", "video_path", "instruction", "edit_type")
"""Fields a row cannot do without; a row with any of them null or blank is skipped."""


@dataclass(frozen=True)
class PromptRow:
    """One editing prompt.

    ``video_path`` is absolute. ``checkable`` rows have an ``edit_type`` in
    :data:`~editrl.protocol.edits.CHECKABLE_EDIT_TYPES`. Optional text fields that
    are null in the file are empty strings here.
    """

    prompt_id: str
    clip_id: str
    video_path: str
    instruction: str
    edit_category: str
    edit_type: str
    checkable: bool
    source_caption: str
    target_caption: str
    picture: str
    motion: str
    split: str


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def load_prompts(parquet_path: str | os.PathLike) -> list[PromptRow]:
    """Read and validate a prompt table.

    Args:
        parquet_path: the Parquet file.

    Returns:
        The valid rows in file order, ``video_path`` resolved against the
        file's directory.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a required column is missing, a ``prompt_id`` occurs twice,
            or no valid row remains.

    Rows with a null/blank field of :data:`NON_EMPTY_FIELDS`, or marked
    ``checkable`` with an ``edit_type`` that is not checkable, are skipped with
    one warning each, then one warning with the count.
    """
    path = Path(parquet_path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt table not found: {path}")
    table = pq.read_table(str(path))
    for column in REQUIRED_COLUMNS:
        if column not in table.column_names:
            raise ValueError(f"prompt table {path} has no column {column!r} (columns: {table.column_names})")
    records = table.select(list(REQUIRED_COLUMNS)).to_pylist()
    base_dir = path.resolve().parent

    rows: list[PromptRow] = []
    seen: set[str] = set()
    skipped = 0
    for index, record in enumerate(records):
        pid = record["prompt_id"]
        name = f"prompt_id {pid!r}" if not _blank(pid) else f"row {index}"
        if not _blank(pid):
            if pid in seen:
                raise ValueError(f"prompt table {path} has duplicate prompt_id {pid!r}")
            seen.add(pid)
        bad = next((f for f in NON_EMPTY_FIELDS if _blank(record[f])), None)
        if bad is not None:
            logger.warning("%s: skipping %s (row %d): field %r is null or empty", path, name, index, bad)
            skipped += 1
            continue
        edit_type = str(record["edit_type"])
        checkable = bool(record["checkable"]) if record["checkable"] is not None else edit_type in CHECKABLE_EDIT_TYPES
        if checkable and edit_type not in CHECKABLE_EDIT_TYPES:
            logger.warning("%s: skipping %s (row %d): checkable but edit_type %r is not one of %s",
                           path, name, index, edit_type, CHECKABLE_EDIT_TYPES)
            skipped += 1
            continue
        text = {k: "" if record[k] is None else str(record[k]) for k in REQUIRED_COLUMNS if k != "checkable"}
        text["video_path"] = str(base_dir / text["video_path"])
        rows.append(PromptRow(checkable=checkable, **text))
    if skipped:
        logger.warning("%s: skipped %d of %d rows", path, skipped, len(records))
    if not rows:
        raise ValueError(f"prompt table {path} has no valid rows ({skipped} of {len(records)} skipped)")
    return rows


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize each frame with anti-aliasing.

    Args:
        frames: ``uint8`` array ``(F, H, W, 3)``.
        height, width: output size in pixels.

    Returns:
        ``uint8`` array ``(F, height, width, 3)``, rounded to nearest; the input
        itself when the size already matches.
    """
    if frames.shape[1:3] == (height, width):
        return frames
    out = np.stack([
        resize(frame, (height, width), order=1, anti_aliasing=True, preserve_range=True) for frame in frames
    ])
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def load_clip(path: str | os.PathLike, num_frames: int, height: int, width: int) -> np.ndarray:
    """Decode a source clip to a fixed number of frames and size.

    Args:
        path: the video file.
        num_frames: frames wanted; a longer clip is subsampled at the evenly
            spaced indices ``round(linspace(0, F - 1, num_frames))`` (first and
            last frames kept).
        height, width: output size in pixels (anti-aliased resize if different).

    Returns:
        ``uint8`` array ``(num_frames, height, width, 3)``, RGB.

    Raises:
        VideoDecodeError: the file is not a decodable video (message names the path).
        FileNotFoundError: the file does not exist.
        ValueError: the clip has fewer than ``num_frames`` frames, or a size is
            not positive.
    """
    if num_frames < 1 or height < 1 or width < 1:
        raise ValueError(f"num_frames, height and width must be positive, got {num_frames}, {height}, {width}")
    frames = read_video(str(path))
    total = frames.shape[0]
    if total < num_frames:
        raise ValueError(f"{path}: clip has {total} frames, fewer than the {num_frames} asked for")
    if total > num_frames:
        indices = np.round(np.linspace(0, total - 1, num_frames)).astype(np.int64)
        frames = frames[indices]
    return resize_frames(frames, height, width)


class PromptDataset:
    """Prompts of one table with their source clips decoded once, at construction.

    Args:
        parquet_path: the prompt table.
        num_frames, height, width: clip format, see :func:`load_clip`.

    Prompts whose clip cannot be loaded (missing, undecodable, too short) are
    dropped with an error log naming the clip and the prompt ids, then a
    summary warning.

    Raises:
        ValueError: nothing usable is left (or from :func:`load_prompts`).
        FileNotFoundError: the table does not exist.
    """

    def __init__(self, parquet_path: str | os.PathLike, num_frames: int, height: int, width: int) -> None:
        self.parquet_path = Path(parquet_path)
        self.num_frames, self.height, self.width = num_frames, height, width
        all_rows = load_prompts(self.parquet_path)
        by_path: dict[str, list[PromptRow]] = {}
        for row in all_rows:
            by_path.setdefault(row.video_path, []).append(row)

        self._clips: dict[str, np.ndarray] = {}
        failed: set[str] = set()
        for video_path, path_rows in by_path.items():
            try:
                clip = load_clip(video_path, num_frames, height, width)
            except (VideoDecodeError, ValueError, OSError) as exc:
                logger.error("cannot load clip %s (%s); dropping prompts %s",
                             video_path, exc, [r.prompt_id for r in path_rows])
                failed.add(video_path)
                continue
            clip.setflags(write=False)
            self._clips[video_path] = clip

        self.rows: list[PromptRow] = [r for r in all_rows if r.video_path not in failed]
        dropped = len(all_rows) - len(self.rows)
        if dropped:
            logger.warning("%s: dropped %d of %d prompts (%d clips failed to load)",
                           self.parquet_path, dropped, len(all_rows), len(failed))
        if not self.rows:
            raise ValueError(f"{self.parquet_path}: no prompt has a loadable clip")
        self._by_id = {r.prompt_id: r for r in self.rows}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> PromptRow:
        return self.rows[index]

    def clip(self, row: PromptRow) -> np.ndarray:
        """The cached source clip of a row: read-only ``uint8`` ``(num_frames, height, width, 3)``."""
        try:
            return self._clips[row.video_path]
        except KeyError:
            raise KeyError(f"no clip loaded for {row.video_path} (prompt {row.prompt_id!r})") from None

    def by_id(self, prompt_id: str) -> PromptRow:
        """The row with this ``prompt_id``; ``KeyError`` naming it if absent."""
        try:
            return self._by_id[prompt_id]
        except KeyError:
            raise KeyError(f"unknown prompt_id {prompt_id!r} in {self.parquet_path}") from None
