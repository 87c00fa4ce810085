"""The contact sheet a run writes: one row per held-out prompt with both clips, the source,
the initial edit and the final edit left to right."""
from pathlib import Path

import numpy as np
from PIL import Image

from editrl.cluster.run_log import save_side_by_side, write_contact_sheet


def _clip(rgb) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, np.uint8), (3, 16, 16, 3)).copy()


def test_the_contact_sheet_shows_source_initial_and_final_edit_in_that_order(tmp_path):
    red, green, blue = (230, 20, 20), (20, 200, 20), (20, 20, 230)
    samples = tmp_path / "samples"
    save_side_by_side(samples / "heldout_initial_p1.mp4", _clip(red), _clip(green), fps=4)
    save_side_by_side(samples / "heldout_final_p1.mp4", _clip(red), _clip(blue), fps=4)
    save_side_by_side(samples / "heldout_initial_only.mp4", _clip(red), _clip(green), fps=4)  # no final clip: no row
    out = write_contact_sheet(samples, tmp_path / "sheet.png", {"p1": "make it blue"})
    assert out == tmp_path / "sheet.png"
    image = np.asarray(Image.open(out).convert("RGB")).astype(int)
    # one row: find each colour's columns and check they come left to right
    centres = []
    for colour in (red, green, blue):
        mask = (np.abs(image - np.array(colour)).sum(axis=2) < 60)
        assert mask.sum() > 500, colour
        centres.append(np.nonzero(mask)[1].mean())
    assert centres[0] < centres[1] < centres[2]
    assert write_contact_sheet(tmp_path / "empty", tmp_path / "none.png", {}) is None and not (tmp_path / "none.png").exists()
