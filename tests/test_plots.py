"""Training curves: one PNG per history, panels with the columns present, the best epoch marked."""

from __future__ import annotations

import numpy as np
from PIL import Image

from triageseg.postprocess.plots import write_curves

PANELS = [
    ("loss", [("train_loss", "train"), ("val_loss", "validation")]),
    ("IoU", [("iou_background", "background"), ("iou_interior", "interior"), ("iou_boundary", "boundary")]),
    ("F1", [("val_f1", "validation mean F1")]),
]


def _rows(n=6):
    return [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e, "iou_background": 0.9, "iou_interior": 0.1 * e,
             "iou_boundary": "", "val_f1": 0.1 * e} for e in range(1, n + 1)]


def test_curves_png_has_one_panel_per_drawn_group(tmp_path):
    path = write_curves(tmp_path / "curves.png", _rows(), PANELS, best=4, title="segmenter fluorescence")
    assert path == tmp_path / "curves.png"
    with Image.open(path) as im:
        width, height = im.size
        pixels = np.asarray(im.convert("L"))
    assert width == 3 * 420 and height == 340  # three panels of 4.2 x 3.4 inches at 100 dpi
    assert pixels.std() > 10  # something is drawn
    assert not list(tmp_path.glob(".*part*"))  # written atomically: no temporary file left


def test_panels_without_data_are_left_out(tmp_path):
    rows = [{"epoch": 1, "train_loss": 0.5}, {"epoch": 2, "train_loss": 0.4}]
    path = write_curves(tmp_path / "c.png", rows, PANELS)
    with Image.open(path) as im:
        assert im.size[0] == 420  # only the loss panel has numbers


def test_nothing_to_plot_writes_nothing(tmp_path):
    assert write_curves(tmp_path / "c.png", [], PANELS) is None
    assert write_curves(tmp_path / "d.png", [{"epoch": 1, "other": 3}], PANELS) is None
    assert not list(tmp_path.iterdir())
