"""Deterministic builder of the bundled source clips and prompt tables.

Source clips are real photographs shipped inside scikit-image's wheel, filmed
by a virtual camera: a square window pans or zooms smoothly (sub-pixel) over
the picture and is resampled with anti-aliasing to ``size x size`` pixels.
Each clip gets 6 editing instructions (4 checkable colour edits, 2 free-form
edits written for the picture), see :mod:`editrl.tools.dataset.catalog`.

Output layout (``out_dir``)::

    clips/<clip_id>.mp4          H.264, 9 frames, 128x128, 8 fps, crf 10
    prompts_train.parquet        one row per instruction (see README.md)
    prompts_heldout.parquet      all prompts of the held-out pictures' clips
    README.md                    columns, provenance, licences, statistics

Building twice gives byte-identical files (fixed seed, single-threaded x264,
no timestamps in the Parquet metadata).
"""
from __future__ import annotations

import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import skimage
import skimage.io
from skimage.filters import gaussian
from skimage.transform import AffineTransform, resize, warp

from editrl.protocol.edits import CHECKABLE_EDIT_TYPES
from editrl.protocol.video import encode_mp4
from editrl.tools.dataset.catalog import (
    COLOUR_TEMPLATES,
    HELDOUT_PICTURES,
    PICTURES,
    Picture,
    motion_phrase,
)
from editrl.tools.dataset.readme import render_readme

logger = logging.getLogger(__name__)

NUM_FRAMES = 9
FRAME_SIZE = 128
FPS = 8
CRF = 10
DEFAULT_SEED = 20240607
MAX_PICTURE_SIDE = 320
"""Pictures are first downscaled (anti-aliased) so that their shorter side is
at most this many pixels; this bounds the per-frame blur cost."""
PAN_WINDOW = 0.85
"""Pan window side as a fraction of the picture's shorter side."""
PAN_TRAVEL = 0.3
"""Largest pan travel as a fraction of the window side."""
ZOOM_WIDE, ZOOM_TIGHT = 1.0, 0.55
"""Zoom window sides (fractions of the shorter side) at the wide and tight end."""

COLUMNS: tuple[str, ...] = (
    "prompt_id", "clip_id", "video_path", "instruction", "edit_category", "edit_type", "checkable",
    "source_caption", "target_caption", "picture", "motion", "split",
)
SCHEMA = pa.schema([(name, pa.bool_() if name == "checkable" else pa.string()) for name in COLUMNS])


def skimage_data_dir() -> Path:
    """The ``data`` directory inside the installed scikit-image package."""
    return Path(skimage.__file__).resolve().parent / "data"


def load_picture(picture: Picture) -> np.ndarray:
    """Read a bundled picture from scikit-image's data directory (never downloads).

    Returns:
        ``uint8`` array ``(H, W, 3)``, RGB (an alpha channel is dropped).

    Raises:
        FileNotFoundError: the file is not in the installed wheel.
        ValueError: the picture is not a colour (RGB/RGBA) image.
    """
    path = skimage_data_dir() / picture.filename
    if not path.is_file():
        raise FileNotFoundError(f"picture {picture.name!r}: {path} is not shipped with this scikit-image")
    image = np.asarray(skimage.io.imread(str(path)))
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise ValueError(f"picture {picture.name!r} ({path}) is not RGB: shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"picture {picture.name!r} ({path}) is not 8-bit: dtype {image.dtype}")
    return np.ascontiguousarray(image[..., :3])


def camera_path(motion: str, height: int, width: int, focus: tuple[float, float],
                num_frames: int = NUM_FRAMES) -> np.ndarray:
    """Camera windows over a picture, one per frame.

    Args:
        motion: ``pan_lr``, ``pan_tb``, ``zoom_in`` or ``zoom_out``.
        height, width: picture size in pixels.
        focus: ``(row, col)`` zoom target as fractions of height and width.
        num_frames: number of frames.

    Returns:
        ``float64`` array ``(num_frames, 3)`` of ``(center_row, center_col,
        side)`` in picture pixels (continuous coordinates, pixel ``i`` covers
        ``[i, i + 1)``). Every window lies inside the picture. Pans move at
        constant speed; zooms change the side geometrically (constant zoom rate).
    """
    short = float(min(height, width))
    t = np.linspace(0.0, 1.0, num_frames)

    def clamp(center: np.ndarray, side: np.ndarray, extent: float) -> np.ndarray:
        return np.clip(center, side / 2.0, extent - side / 2.0)

    if motion in ("pan_lr", "pan_tb"):
        side = np.full(num_frames, PAN_WINDOW * short)
        along, across = (width, height) if motion == "pan_lr" else (height, width)
        travel = min(PAN_TRAVEL * side[0], along - side[0])
        moving = along / 2.0 - travel / 2.0 + travel * t
        fixed = np.full(num_frames, across / 2.0)
        rows, cols = (fixed, moving) if motion == "pan_lr" else (moving, fixed)
    elif motion in ("zoom_in", "zoom_out"):
        ratio = t if motion == "zoom_in" else 1.0 - t
        side = short * ZOOM_WIDE * (ZOOM_TIGHT / ZOOM_WIDE) ** ratio
        rows = clamp(np.full(num_frames, focus[0] * height), side, height)
        cols = clamp(np.full(num_frames, focus[1] * width), side, width)
    else:
        raise ValueError(f"unknown camera motion {motion!r}")
    return np.stack([rows, cols, side], axis=1)


def render_window(picture: np.ndarray, center_row: float, center_col: float, side: float,
                  size: int = FRAME_SIZE) -> np.ndarray:
    """Resample a square window of a picture to ``size x size`` with anti-aliasing.

    The picture is low-pass filtered with a Gaussian of sigma ``(scale - 1) / 2``
    (``scale = side / size``, the same rule as ``skimage.transform.resize``),
    then sampled bilinearly at the output pixel centres, so sub-pixel window
    positions give smooth motion.

    Args:
        picture: ``float64`` array ``(H, W, 3)`` in ``[0, 1]``.
        center_row, center_col, side: the window in picture pixels.
        size: output side in pixels.

    Returns:
        ``float64`` array ``(size, size, 3)`` in ``[0, 1]``.
    """
    height, width = picture.shape[:2]
    scale = side / size
    top, left = center_row - side / 2.0, center_col - side / 2.0
    sigma = max(0.0, (scale - 1.0) / 2.0)
    margin = int(math.ceil(4.0 * sigma)) + 2
    r0, r1 = max(0, int(math.floor(top)) - margin), min(height, int(math.ceil(top + side)) + margin)
    c0, c1 = max(0, int(math.floor(left)) - margin), min(width, int(math.ceil(left + side)) + margin)
    region = picture[r0:r1, c0:c1]
    if sigma > 0:
        region = gaussian(region, sigma=sigma, mode="nearest", channel_axis=-1, preserve_range=True)
    # Output pixel centre j sits at picture coordinate left + (j + 0.5) * scale,
    # i.e. at array index left + (j + 0.5) * scale - 0.5.
    transform = AffineTransform(scale=(scale, scale),
                                translation=(left - c0 + 0.5 * scale - 0.5, top - r0 + 0.5 * scale - 0.5))
    out = warp(region, transform, output_shape=(size, size), order=1, mode="edge", preserve_range=True)
    return np.clip(out, 0.0, 1.0)


def prepare_picture(image: np.ndarray, max_side: int = MAX_PICTURE_SIDE) -> np.ndarray:
    """``uint8`` ``(H, W, 3)`` -> ``float64`` in ``[0, 1]``, downscaled if its shorter side exceeds ``max_side``."""
    picture = image.astype(np.float64) / 255.0
    short = min(picture.shape[:2])
    if short > max_side:
        factor = max_side / short
        shape = (round(picture.shape[0] * factor), round(picture.shape[1] * factor), 3)
        picture = resize(picture, shape, order=1, anti_aliasing=True, preserve_range=True)
    return picture


def render_clip(picture: np.ndarray, motion: str, focus: tuple[float, float],
                num_frames: int = NUM_FRAMES, size: int = FRAME_SIZE) -> np.ndarray:
    """Film a picture with a camera motion.

    Args:
        picture: ``float64`` array ``(H, W, 3)`` in ``[0, 1]`` (see :func:`prepare_picture`).
        motion, focus: see :func:`camera_path`.

    Returns:
        ``uint8`` array ``(num_frames, size, size, 3)``.
    """
    windows = camera_path(motion, picture.shape[0], picture.shape[1], focus, num_frames)
    frames = np.stack([render_window(picture, r, c, s, size) for r, c, s in windows])
    return np.clip(np.round(frames * 255.0), 0, 255).astype(np.uint8)


def clip_id(picture: Picture, motion: str) -> str:
    """``<picture>_<motion>``, e.g. ``astronaut_zoom_in``."""
    return f"{picture.name}_{motion}"


def build_prompt_rows(seed: int = DEFAULT_SEED) -> list[dict]:
    """All prompt rows of the dataset (no rendering), in a fixed order.

    Choices:
      - checkable types: clip ``k`` (counting over all pictures in catalogue
        order) gets types ``k, k+1, k+2, k+3`` (mod 6) of
        :data:`CHECKABLE_EDIT_TYPES`, which balances the types overall and,
        with the held-out pictures at positions 1 and 4, inside each split;
      - phrasing: each split cycles through the templates of a type in order;
      - free-form edits: the picture's 4 edits are permuted by the seeded
        generator and clips take pairs (0, 1), (2, 3), (1, 2) of that order;
      - the 6 prompts of a clip are shuffled by the seeded generator before
        numbering (``<clip_id>-00`` ... ``-05``).

    Returns:
        One ``dict`` per prompt with the keys :data:`COLUMNS`.
    """
    rng = np.random.default_rng(seed)
    template_counter: Counter = Counter()
    rows: list[dict] = []
    clip_index = 0
    for picture in PICTURES:
        split = "heldout" if picture.name in HELDOUT_PICTURES else "train"
        free_order = [picture.edits[i] for i in rng.permutation(len(picture.edits))]
        for m, motion in enumerate(picture.motions):
            cid = clip_id(picture, motion)
            phrase = motion_phrase(motion, picture.zoom_subject)
            base = {
                "clip_id": cid, "video_path": f"clips/{cid}.mp4",
                "source_caption": f"{picture.content}, {phrase}.",
                "picture": picture.name, "motion": motion, "split": split,
            }
            entries = []
            for j in range(4):
                edit_type = CHECKABLE_EDIT_TYPES[(clip_index + j) % len(CHECKABLE_EDIT_TYPES)]
                templates = COLOUR_TEMPLATES[edit_type]
                template = templates[template_counter[(split, edit_type)] % len(templates)]
                template_counter[(split, edit_type)] += 1
                entries.append({
                    "instruction": template.instruction, "edit_category": template.category,
                    "edit_type": edit_type, "checkable": True,
                    "target_caption": f"{picture.content}, {template.target_phrase}, {phrase}.",
                })
            for i in ((0, 1), (2, 3), (1, 2))[m]:
                edit = free_order[i]
                entries.append({
                    "instruction": edit.instruction, "edit_category": edit.category,
                    "edit_type": edit.category, "checkable": False,
                    "target_caption": f"{edit.target}, {phrase}.",
                })
            for n, k in enumerate(rng.permutation(len(entries))):
                rows.append({"prompt_id": f"{cid}-{n:02d}", **base, **entries[k]})
            clip_index += 1
    return [{name: row[name] for name in COLUMNS} for row in rows]


def write_parquet(rows: list[dict], path: Path) -> None:
    """Write rows with :data:`SCHEMA`; the file holds no timestamps, so equal rows give equal bytes."""
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    pq.write_table(table, str(path), compression="zstd", use_dictionary=False, write_statistics=False)


@dataclass(frozen=True)
class BuildSummary:
    """What :func:`build_dataset` wrote."""

    out_dir: Path
    num_clips: int
    prompts_per_split: dict[str, int]
    edit_type_counts: dict[str, dict[str, int]]
    category_counts: dict[str, int]
    total_bytes: int


def build_dataset(out_dir: str | os.PathLike, seed: int = DEFAULT_SEED) -> BuildSummary:
    """Build clips, prompt tables and README into ``out_dir`` (created if needed).

    Stale ``*.mp4`` files in ``out_dir/clips`` that this build does not write
    are deleted so the directory matches the tables.
    """
    out = Path(out_dir)
    clips_dir = out / "clips"
    clips_dir.mkdir(parents=True, exist_ok=True)
    rows = build_prompt_rows(seed)

    written = set()
    for picture in PICTURES:
        prepared = prepare_picture(load_picture(picture))
        for motion in picture.motions:
            frames = render_clip(prepared, motion, picture.focus)
            name = f"{clip_id(picture, motion)}.mp4"
            (clips_dir / name).write_bytes(encode_mp4(frames, fps=FPS, crf=CRF))
            written.add(name)
    for stale in sorted(clips_dir.glob("*.mp4")):
        if stale.name not in written:
            logger.info("removing stale clip %s", stale)
            stale.unlink()

    splits = {"train": [r for r in rows if r["split"] == "train"],
              "heldout": [r for r in rows if r["split"] == "heldout"]}
    for split, split_rows in splits.items():
        write_parquet(split_rows, out / f"prompts_{split}.parquet")

    type_counts = {s: dict(sorted(Counter(r["edit_type"] for r in rs).items())) for s, rs in splits.items()}
    summary_wo_size = dict(
        out_dir=out, num_clips=len(written),
        prompts_per_split={s: len(rs) for s, rs in splits.items()},
        edit_type_counts=type_counts,
        category_counts=dict(sorted(Counter(r["edit_category"] for r in rows).items())),
    )
    readme = render_readme(PICTURES, rows, FRAME_SIZE, NUM_FRAMES, FPS, CRF, seed, skimage.__version__)
    (out / "README.md").write_text(readme, encoding="utf-8")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    summary = BuildSummary(total_bytes=total, **summary_wo_size)
    logger.info("built %d clips, %s prompts into %s (%d bytes)", summary.num_clips,
                summary.prompts_per_split, out, total)
    return summary
