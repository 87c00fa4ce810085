"""Loading the prompt tables and source clips, with validation.

A prompt table is a Parquet file with the columns in :data:`REQUIRED_COLUMNS`
(see ``assets/clips/README.md``); ``video_path`` is relative to the Parquet
file's directory. Bad rows are skipped with a warning, bad clips with an error
log, and only a table with nothing usable left is an error.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from skimage.transform import resize

from editrl.protocol.edits import CHECKABLE_EDIT_TYPES
from editrl.protocol.video import read_video

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


def _file_problem(path: str) -> str | None:
    """Why the clip file at ``path`` cannot be read (missing, not a file, empty), or None."""
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror}"
    if not os.path.isfile(path):
        return "not a file"
    return "empty file" if size == 0 else None


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
    """Prompts of one table; the clips stay on disk (the rollout workers decode them).

    Args:
        parquet_path: the prompt table.
        num_frames, height, width: clip format, see :func:`load_clip`.

    Prompts whose clip file is missing or empty are dropped with an error log naming the
    clip and the prompt ids, then a summary warning. Nothing is decoded here: a clip that
    exists but cannot be decoded, or is too short, fails its groups on the worker (each
    failure counted and named) and the reading of :meth:`clip`.

    Raises:
        ValueError: nothing usable is left (or from :func:`load_prompts`).
        FileNotFoundError: the table does not exist.
    """

    CLIP_CACHE_SIZE = 8
    """Decoded clips :meth:`clip` keeps (least recently used go first)."""

    def __init__(self, parquet_path: str | os.PathLike, num_frames: int, height: int, width: int) -> None:
        self.parquet_path = Path(parquet_path)
        self.num_frames, self.height, self.width = num_frames, height, width
        all_rows = load_prompts(self.parquet_path)
        by_path: dict[str, list[PromptRow]] = {}
        for row in all_rows:
            by_path.setdefault(row.video_path, []).append(row)

        failed: set[str] = set()
        for video_path, path_rows in by_path.items():
            problem = _file_problem(video_path)
            if problem is not None:
                logger.error("cannot load clip %s (%s); dropping prompts %s",
                             video_path, problem, [r.prompt_id for r in path_rows])
                failed.add(video_path)

        self.rows: list[PromptRow] = [r for r in all_rows if r.video_path not in failed]
        dropped = len(all_rows) - len(self.rows)
        if dropped:
            logger.warning("%s: dropped %d of %d prompts (%d clips failed to load)",
                           self.parquet_path, dropped, len(all_rows), len(failed))
        if not self.rows:
            raise ValueError(f"{self.parquet_path}: no prompt has a loadable clip")
        self._by_id = {r.prompt_id: r for r in self.rows}
        self._decoded = functools.lru_cache(maxsize=self.CLIP_CACHE_SIZE)(self._decode)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> PromptRow:
        return self.rows[index]

    def clip(self, row: PromptRow) -> np.ndarray:
        """The row's source clip, decoded on first use (the last :attr:`CLIP_CACHE_SIZE` kept):
        read-only ``uint8`` ``(num_frames, height, width, 3)``.

        Raises:
            KeyError: the row is not one of this table's usable rows.
            VideoDecodeError, ValueError: the clip cannot be decoded or is too short (see :func:`load_clip`).
        """
        if self._by_id.get(row.prompt_id) != row:
            raise KeyError(f"no clip loaded for {row.video_path} (prompt {row.prompt_id!r})")
        return self._decoded(row.video_path)

    def _decode(self, video_path: str) -> np.ndarray:
        clip = load_clip(video_path, self.num_frames, self.height, self.width)
        clip.setflags(write=False)
        return clip

    def by_id(self, prompt_id: str) -> PromptRow:
        """The row with this ``prompt_id``; ``KeyError`` naming it if absent."""
        try:
            return self._by_id[prompt_id]
        except KeyError:
            raise KeyError(f"unknown prompt_id {prompt_id!r} in {self.parquet_path}") from None
