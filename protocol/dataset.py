"""Loading the prompt tables and source clips, with validation.

The table schema and reading are in :mod:`editrl.protocol.prompt_table` (Parquet, JSONL or
CSV; ``video_path`` relative to the table's folder). Bad rows are skipped with a warning,
bad clips with an error log, and only a table with nothing usable left is an error. Clips
are sampled in time at a frame rate (:func:`sample_times`) and brought to the model's size
by a centre crop to its aspect ratio and a resize (:func:`crop_resize`).
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import numpy as np
from skimage.transform import resize

from editrl.protocol.prompt_table import (  # noqa: F401 - the loader's public names
    OPTIONAL_COLUMNS, REQUIRED_COLUMNS, TABLE_SUFFIXES, PromptRow, RowProblem, TableContents, derived_prompt_id,
    load_prompts, read_prompt_table,
)
from editrl.protocol.video import TimedFrames

logger = logging.getLogger(__name__)

TIME_TOLERANCE_S = 1e-6
"""Slack on frame times when comparing them with ``start_s`` / ``end_s`` (container timestamps are rounded)."""


def file_problem(path: str) -> str | None:
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


def crop_resize(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bring frames to ``height x width`` without distorting them: the largest centred window
    of the target's aspect ratio, then an anti-aliased resize (:func:`resize_frames`) - the
    same as resizing to cover ``height x width`` and centre-cropping, up to rounding.

    For a source of ``H x W``: if ``W * height > H * width`` (wider than the target) the window
    is ``H`` rows by ``round(H * width / height)`` columns from column ``(W - w) // 2``,
    otherwise all ``W`` columns by ``round(W * height / width)`` rows from row ``(H - h) // 2``.

    Args:
        frames: ``uint8`` array ``(F, H, W, 3)``.
        height, width: output size in pixels.

    Returns:
        ``uint8`` array ``(F, height, width, 3)``; the input itself when the size already matches.
    """
    src_h, src_w = frames.shape[1:3]
    if src_w * height > src_h * width:
        crop_w = max(1, min(src_w, round(src_h * width / height)))
        left = (src_w - crop_w) // 2
        frames = frames[:, :, left:left + crop_w]
    elif src_w * height < src_h * width:
        crop_h = max(1, min(src_h, round(src_w * height / width)))
        top = (src_h - crop_h) // 2
        frames = frames[:, top:top + crop_h]
    return resize_frames(frames, height, width)


def sample_times(num_frames: int, fps: float, start_s: float = 0.0) -> np.ndarray:
    """The times frames are taken at: ``start_s + k / fps`` for ``k = 0 .. num_frames - 1``.

    Returns:
        ``float64 (num_frames,)``, seconds from the clip's first frame.
    """
    return start_s + np.arange(num_frames, dtype=np.float64) / fps


def load_clip(path: str | os.PathLike, num_frames: int, height: int, width: int, fps: float | None = None,
              start_s: float | None = None, end_s: float | None = None) -> np.ndarray:
    """Decode a part of a source clip at a frame rate and bring it to a fixed size.

    Frame ``k`` is the decoded frame whose presentation time is nearest to
    ``t_k = start_s + k / fps`` (:func:`sample_times`; ties go to the earlier frame), among the
    frames in ``[start_s, end_s)``; a clip of lower rate than ``fps`` repeats frames. With
    ``fps`` None the clip's own frames are taken: ``num_frames`` consecutive frames from the
    first at or after ``start_s``. Times are seconds from the clip's first frame; only frames up
    to the last one needed are decoded, and only the chosen ones converted to RGB.

    Args:
        path: the video file.
        num_frames: frames wanted.
        height, width: output size in pixels (:func:`crop_resize`: centre crop to the aspect
            ratio, anti-aliased resize; nothing is squashed).
        fps: frames per second to sample at, or None for the clip's own frames.
        start_s, end_s: the part of the clip to use (None: from its start / to its end).

    Returns:
        ``uint8`` array ``(num_frames, height, width, 3)``, RGB. A clip at ``fps`` frames a
        second gives exactly its first ``num_frames`` decoded frames (from ``start_s``).

    Raises:
        VideoDecodeError: the file is not a decodable video (message names the path).
        FileNotFoundError: the file does not exist.
        ValueError: the part is too short - the last time ``t_{n-1}`` is not before its end
            (``end_s``, or the last frame's time plus one frame interval, whichever is first),
            or (``fps`` None) it holds fewer than ``num_frames`` frames; the message gives the
            clip's frames and duration, the fps and what is needed. Also a size, ``fps`` or
            time that is not valid.
    """
    if num_frames < 1 or height < 1 or width < 1:
        raise ValueError(f"num_frames, height and width must be positive, got {num_frames}, {height}, {width}")
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    start = 0.0 if start_s is None else float(start_s)
    if start < 0 or (end_s is not None and end_s <= start):
        raise ValueError(f"{path}: start_s={start_s} and end_s={end_s} must satisfy 0 <= start_s < end_s")
    targets = sample_times(num_frames, fps, start) if fps is not None else None
    chosen: list[object] = []  # per output frame: the av.VideoFrame taken
    seen = 0  # candidate frames decoded
    last_time, interval = None, None
    with TimedFrames(str(path)) as video:
        prev = None  # (time, frame) of the previous candidate
        for time_s, frame in video:
            if time_s < start - TIME_TOLERANCE_S:
                continue
            if end_s is not None and time_s >= end_s - TIME_TOLERANCE_S:
                break
            seen += 1
            if last_time is not None:
                interval = time_s - last_time
            last_time = time_s
            if targets is None:
                chosen.append(frame)
                if len(chosen) == num_frames:
                    break
                continue
            while len(chosen) < num_frames and time_s >= targets[len(chosen)] - TIME_TOLERANCE_S:
                target = targets[len(chosen)]
                take_prev = prev is not None and target - prev[0] <= time_s - target
                chosen.append(prev[1] if take_prev else frame)
            if len(chosen) == num_frames:
                break
            prev = (time_s, frame)
        rate = video.rate
    step = (1.0 / rate) if rate else interval
    if targets is not None and len(chosen) < num_frames and last_time is not None:
        clip_end = last_time + (step if step else 0.0)
        if end_s is not None:
            clip_end = min(clip_end, end_s)
        while len(chosen) < num_frames and targets[len(chosen)] < clip_end - TIME_TOLERANCE_S:
            chosen.append(prev[1])
    if len(chosen) < num_frames:
        duration = 0.0 if last_time is None else last_time - start + (step or 0.0)
        part = f"from start_s={start}" + (f" to end_s={end_s}" if end_s is not None else "")
        own = f"{rate:g} fps" if rate else "unknown fps"
        if targets is None:
            need = f"{num_frames} consecutive frames (fps not set: the clip's own rate)"
        else:
            need = (f"{num_frames} frames at fps {fps:g} take the times {targets[0]:g} .. {targets[-1]:g} s, "
                    f"so more than {(num_frames - 1) / fps:g} s from start_s")
        raise ValueError(f"{path}: clip too short: {seen} frames ({duration:.3f} s at {own}) {part}; {need}")
    rgb: dict[int, np.ndarray] = {}
    frames = np.stack([rgb.setdefault(id(f), TimedFrames.rgb(f)) for f in chosen])
    return crop_resize(frames, height, width)


class PromptDataset:
    """Prompts of one table; the clips stay on disk (the rollout workers decode them).

    Args:
        parquet_path: the prompt table (``.parquet``, ``.jsonl`` or ``.csv``).
        num_frames, height, width: clip format, see :func:`load_clip`.
        fps: the rate clips are sampled at (None: each clip's own frames), see :func:`load_clip`.

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

    def __init__(self, parquet_path: str | os.PathLike, num_frames: int, height: int, width: int,
                 fps: float | None = None) -> None:
        self.parquet_path = Path(parquet_path)
        self.num_frames, self.height, self.width, self.fps = num_frames, height, width, fps
        all_rows = load_prompts(self.parquet_path)
        by_path: dict[str, list[PromptRow]] = {}
        for row in all_rows:
            by_path.setdefault(row.video_path, []).append(row)

        failed: set[str] = set()
        for video_path, path_rows in by_path.items():
            problem = file_problem(video_path)
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
        return self._decoded(row.video_path, row.start_s, row.end_s)

    def _decode(self, video_path: str, start_s: float | None, end_s: float | None) -> np.ndarray:
        clip = load_clip(video_path, self.num_frames, self.height, self.width, self.fps, start_s, end_s)
        clip.setflags(write=False)
        return clip

    def by_id(self, prompt_id: str) -> PromptRow:
        """The row with this ``prompt_id``; ``KeyError`` naming it if absent."""
        try:
            return self._by_id[prompt_id]
        except KeyError:
            raise KeyError(f"unknown prompt_id {prompt_id!r} in {self.parquet_path}") from None
