"""The README.md written next to the bundled dataset (deterministic text)."""
from __future__ import annotations

from collections import Counter
from typing import Sequence

from editrl.protocol.edits import CHECKABLE_EDIT_TYPES
from editrl.tools.dataset.catalog import EDIT_CATEGORIES, HELDOUT_PICTURES, Picture

_COLUMNS_DOC = """\
| column | type | meaning |
|---|---|---|
| `prompt_id` | string | unique id, `<clip_id>-NN` |
| `clip_id` | string | `<picture>_<motion>` |
| `video_path` | string | source clip, relative to the Parquet file's directory |
| `instruction` | string | the editing instruction |
| `edit_category` | string | one of `colour`, `add`, `remove`, `replace`, `style`, `background` |
| `edit_type` | string | a checkable type (`brighten`, `darken`, `grayscale`, `saturate`, `warm`, `cool`) or, for free-form edits, the category |
| `checkable` | bool | true when the edit is one of the pixel transforms of `editrl.protocol.edits.apply_edit(frames, edit_type, strength)`, so the edited video can be computed and checked (the strength is the data user's choice) |
| `source_caption` | string | caption of the source clip (content and camera motion) |
| `target_caption` | string | caption of the edited clip |
| `picture` | string | source picture id |
| `motion` | string | camera motion id |
| `split` | string | `train` or `heldout` |
"""

_SCHEMA_DOC = """\
These tables are one instance of editrl's prompt-table schema (`editrl.protocol.prompt_table`); a table of your own videos needs only the two required columns. Tables may be Parquet (`.parquet`), JSON Lines (`.jsonl`, one object a line) or CSV (`.csv`, header line), chosen by suffix; point `data.train_prompts` / `data.heldout_prompts` at them and check one with `editrl data check TABLE --config PRESET`.

| column | required | meaning |
|---|---|---|
| `video_path` | yes | source clip; a relative path is relative to the table's folder |
| `instruction` | yes | the editing instruction |
| `prompt_id` | no | unique id; when absent or blank: `<clip file stem>-<first 10 hex digits of SHA-1 of "video_path\\ninstruction\\nstart_s\\nend_s">`, so it depends only on the row's content |
| `source_caption`, `target_caption`, `split`, `clip_id`, `picture`, `motion` | no | text, empty when absent |
| `edit_category` | no | text |
| `edit_type` | no | defaults to `edit_category` (or empty) |
| `checkable` | no | defaults to `edit_type` being a checkable type; true with another `edit_type` is a bad row |
| `reference_image` | no | an image file, relative like `video_path` |
| `start_s`, `end_s` | no | the part of the clip to use, seconds from its first frame (default: all of it) |

Other columns are kept, per row, in `PromptRow.extra` (one info log names them). A row with a blank required field, a time that is negative or not a number, or `start_s >= end_s` is skipped with a warning naming the file, the row index, the prompt id and the rule; a missing required column, an unsupported suffix or a duplicate `prompt_id` is an error. Clips are sampled at the run's `fps` (frame `k` is the decoded frame nearest to `start_s + k / fps`) and brought to `policy.height x policy.width` by a centre crop to that aspect ratio and a resize. The bundled presets set `fps: 4`, so their 5 frames are frames 0, 2, 4, 6 and 8 of these 8 fps clips.
"""

_MOTIONS_DOC = """\
| motion | camera |
|---|---|
| `pan_lr` | constant-speed pan from left to right, window side 0.85 x the picture's shorter side |
| `pan_tb` | the same pan (tilt) from top to bottom |
| `zoom_in` | window shrinks geometrically from 1.0 to 0.55 x the shorter side, centred on the picture's focus point (clamped inside the picture) |
| `zoom_out` | the reverse of `zoom_in` |
"""


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def render_readme(pictures: Sequence[Picture], rows: Sequence[dict], frame_size: int, num_frames: int,
                  fps: int, crf: int, seed: int, skimage_version: str) -> str:
    """Markdown description of the built dataset.

    Args:
        pictures: the catalogue pictures.
        rows: all prompt rows (both splits), as dicts with the dataset columns.
        frame_size, num_frames, fps, crf: the clip format.
        seed: the generator seed used for the choices.
        skimage_version: version of the scikit-image the pictures came from.
    """
    splits = ("train", "heldout")
    clips = {s: sorted({r["clip_id"] for r in rows if r["split"] == s}) for s in splits}
    types = {s: Counter(r["edit_type"] for r in rows if r["split"] == s) for s in splits}
    cats = {s: Counter(r["edit_category"] for r in rows if r["split"] == s) for s in splits}
    all_types = list(CHECKABLE_EDIT_TYPES) + ["add", "remove", "replace", "style", "background"]
    provenance = [
        (f"`{p.name}`", f"`skimage/data/{p.filename}`", p.credit, p.licence,
         ", ".join(f"`{m}`" for m in p.motions), "heldout" if p.name in HELDOUT_PICTURES else "train")
        for p in pictures
    ]
    parts = [
        "# Bundled source clips and editing prompts\n",
        "Real source videos with editing instructions for training and evaluating "
        "instruction-based video editing. Built by `scripts/build_dataset.py`; do not edit by hand.\n",
        "## Files\n",
        f"- `clips/<clip_id>.mp4`: H.264 (yuv420p), {num_frames} frames, {frame_size}x{frame_size} pixels, "
        f"{fps} fps, crf {crf}.\n"
        "- `prompts_train.parquet`, `prompts_heldout.parquet`: one row per instruction.\n"
        "- `README.md`: this file.\n",
        "## The prompt-table schema\n",
        _SCHEMA_DOC,
        "## Columns\n",
        _COLUMNS_DOC,
        "## Splits\n",
        f"The held-out split holds every prompt of the clips of {', '.join(f'`{p}`' for p in HELDOUT_PICTURES)}, "
        "so held-out source videos are never seen in training. The train split holds the rest.\n",
        _table(["split", "clips", "prompts"], [(s, len(clips[s]), sum(types[s].values())) for s in splits]),
        "Prompts per `edit_type`:\n",
        _table(["edit_type"] + list(splits), [(t, types["train"][t], types["heldout"][t]) for t in all_types]),
        "Prompts per `edit_category`:\n",
        _table(["edit_category"] + list(splits), [(c, cats["train"][c], cats["heldout"][c])
                                                  for c in EDIT_CATEGORIES]),
        "## Source pictures and licences\n",
        f"All pictures are files shipped inside the scikit-image {skimage_version} wheel (`skimage/data`); "
        "nothing is downloaded. The `README.txt` in that directory lists no licences; the credits and "
        "licences below are the ones stated in the docstrings of the matching `skimage.data` functions. "
        "The scikit-image code itself is BSD-3-Clause.\n",
        _table(["picture", "file", "credit", "licence", "motions", "split"], provenance),
        "## Camera motions\n",
        "Each picture is filmed with 3 of the 4 motions below (every motion appears in the dataset). "
        "Pictures whose shorter side exceeds 320 pixels are first downscaled with anti-aliasing. Each frame "
        "is a square window of the picture: low-pass filtered with a Gaussian of sigma "
        f"`(scale - 1) / 2` (`scale` = window side / {frame_size}) and sampled bilinearly at the output pixel "
        "centres, so the window moves by sub-pixel amounts between frames.\n",
        _MOTIONS_DOC,
        "## Instructions and captions\n",
        "Each clip has 6 instructions: 4 checkable colour edits of 4 different types and 2 free-form edits "
        "(add / remove / replace / style / background) written by hand for the picture's content, each with "
        "a hand-written target caption. Checkable instructions use 4-5 paraphrases per type; the "
        "`grayscale` phrasing \"old black-and-white film\" and the `warm` phrasing \"golden-hour look\" have "
        "`edit_category` `style` but stay checkable. Clip `k` (in catalogue order) gets checkable types "
        "`k..k+3 (mod 6)`; each split cycles through the paraphrases of a type in order; the free-form edits "
        f"and the order of a clip's prompts are drawn from `numpy.random.default_rng({seed})`.\n",
        "## Rebuild\n",
        "```\npython scripts/build_dataset.py --out assets/clips\n```\n\n"
        "The build is deterministic: the same library versions give byte-identical mp4 and Parquet files.\n",
    ]
    return "\n".join(part if part.endswith("\n") else part + "\n" for part in parts)
