"""The napari loop, clicked through: segment, correct the labels, add, fine-tune 2 steps, before/after.

Uses the untrained ``tiny_bundle`` (conftest); the corrections are the synthetic images' true labels.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

napari = pytest.importorskip("napari", reason="the napari extra is not installed")

from triageseg import bundle as B  # noqa: E402
from triageseg.datasets.layout import Dataset  # noqa: E402
from triageseg.datasets.synth import synth_sample  # noqa: E402
from test_napari_plugin import TIMEOUT_MS, _click_and_wait, _dock, opengl_display  # noqa: E402, F401


def _click(qtbot, button):
    from qtpy.QtCore import Qt

    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)


@pytest.mark.usefixtures("opengl_display")
def test_correct_add_finetune_and_compare_in_the_widget(make_napari_viewer, qtbot, tiny_bundle, tmp_path,
                                                        monkeypatch):
    monkeypatch.setenv("TRIAGESEG_CONFIG_DIR", str(tmp_path / "config"))
    before = {p: p.read_bytes() for p in tiny_bundle.rglob("*") if p.is_file()}
    viewer = make_napari_viewer()
    rng = np.random.default_rng(11)
    truths = {}
    for name in ("cells_a", "cells_b"):
        image, truths[name] = synth_sample("fluorescence", size=96, rng=rng)
        viewer.add_image(image, name=name)
    widget = _dock(viewer, qtbot, tiny_bundle)
    panel = widget.finetune_panel
    assert panel.add_button.text() == "Add to training set"
    assert not panel.compare_button.isEnabled()  # nothing fine-tuned yet

    # errors are shown in the panel: no folder, empty labels, wrong shape, non-integer values, unknown modality
    widget.layer_combo.setCurrentText("cells_a")
    _click_and_wait(qtbot, widget, widget.segment_button)
    labels = viewer.layers["cells_a labels"]
    assert panel.labels_combo.currentText() == "cells_a labels"
    _click(qtbot, panel.add_button)
    assert panel.status.text().startswith("error: choose the dataset folder")
    data = tmp_path / "corrections"
    panel.set_dataset(str(data))
    labels.data = np.zeros_like(labels.data)
    panel.modality_combo.setCurrentText("fluorescence")
    _click(qtbot, panel.add_button)
    assert "empty" in panel.status.text() and panel.status.text().startswith("error:")
    viewer.add_labels(np.ones((40, 40), np.uint32), name="cells_b labels")
    panel.labels_combo.setCurrentText("cells_b labels")
    _click(qtbot, panel.add_button)
    assert panel.status.text().startswith("error:") and "shape (40, 40)" in panel.status.text()
    viewer.layers.remove("cells_b labels")
    fake = types.SimpleNamespace(name="cells_a labels", data=np.full((96, 96), 0.5, np.float32), metadata={})
    with pytest.MonkeyPatch.context() as patch:  # napari's own fixtures use `monkeypatch`: never undo theirs
        patch.setattr(panel, "selected_labels", lambda: fake)  # a napari Labels layer cannot hold floats
        _click(qtbot, panel.add_button)
    assert panel.status.text().startswith("error:") and "non-integer" in panel.status.text()
    panel.refresh()
    panel.labels_combo.setCurrentText("cells_a labels")
    panel.modality_combo.setCurrentText("phase")  # the router did not call it unknown
    labels.data = truths["cells_a"]
    _click(qtbot, panel.add_button)
    assert "not a modality of the bundle" in panel.status.text()
    assert not (data / "splits.csv").exists()

    # correct (programmatically: the true labels) and add both images
    panel.modality_combo.setCurrentText("fluorescence")
    _click(qtbot, panel.add_button)
    assert panel.status.text().startswith("added cells_a (fluorescence, train")
    widget.layer_combo.setCurrentText("cells_b")
    _click_and_wait(qtbot, widget, widget.segment_button)
    viewer.layers["cells_b labels"].data = truths["cells_b"]
    panel.labels_combo.setCurrentText("cells_b labels")
    panel.modality_combo.setCurrentText("fluorescence")
    _click(qtbot, panel.add_button)
    assert panel.status.text().startswith("added cells_b")
    ds = Dataset(data)
    assert [s.id for s in ds.samples] == ["cells_a", "cells_b"] and ds.modalities == ["fluorescence"]
    assert np.array_equal(ds.load(ds.samples[1])[1], truths["cells_b"])
    # the folder is remembered for the next session
    from triageseg.napari_plugin.finetune_panel import recall

    assert recall("dataset") == str(data)

    # fine-tune 2 steps in a worker: progress to the end, the new bundle beside the old one
    assert panel.minutes_spin.value() == 5.0
    panel.steps_spin.setValue(2)
    seen = []
    panel.progress.valueChanged.connect(seen.append)
    _click(qtbot, panel.finetune_button)
    assert not panel.finetune_button.isEnabled() and panel.stop_button.isEnabled()
    qtbot.waitUntil(panel.finetune_button.isEnabled, timeout=TIMEOUT_MS)
    assert panel.result is not None, panel.status.text()
    out = tiny_bundle.parent / "bundle-ft1"
    assert panel.out_edit.text() == str(out) and panel.result.out == out
    assert B.read_manifest(out)["provenance"]["parent"] == str(tiny_bundle.resolve())
    assert seen[-1] == panel.progress.maximum() and len(seen) >= 3
    assert panel.scores.text().startswith("fluorescence: val F1 old ")
    assert {p: p.read_bytes() for p in tiny_bundle.rglob("*") if p.is_file()} == before

    # before / after: a second Labels layer from the new bundle
    panel.labels_combo.setCurrentText("cells_b labels")
    _click(qtbot, panel.compare_button)
    qtbot.waitUntil(lambda: "cells_b labels (fine-tuned)" in [layer.name for layer in viewer.layers],
                    timeout=TIMEOUT_MS)
    after = viewer.layers["cells_b labels (fine-tuned)"]
    assert isinstance(after, napari.layers.Labels) and after.data.shape == (96, 96)
    assert after.metadata["bundle"] == str(out)
    assert "val F1 old" in panel.scores.text()
    assert "cells_b labels (fine-tuned)" not in [panel.labels_combo.itemText(i)
                                                  for i in range(panel.labels_combo.count())]
