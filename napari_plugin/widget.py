"""The dock widget: choose a bundle, then Route or Segment the selected image layer.

The work runs in a napari thread worker (:func:`~triageseg.napari_plugin.steps.analyse_steps`),
so the viewer stays responsive; each stage moves the widget's progress bar (and napari's
activity indicator). Segment adds a Labels layer ``<image> labels`` whose metadata records
the modality, confidence, probabilities, model used and decision, shown in the widget too.
"""

from __future__ import annotations

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from triageseg.datasets.errors import DataError
from triageseg.napari_plugin.steps import Analysis, Failure, Step, analyse_steps, layer_pixels

AUTO_TEXT = "auto (the router decides)"


def describe(analysis: Analysis) -> str:
    """The decision as the widget shows it, one fact per line."""
    r = analysis.routing
    conf = "forced" if r.confidence is None else f"confidence {r.confidence:.3f}"
    lines = [f"modality: {r.modality} ({conf})", f"model used: {r.used_model}", f"decision: {r.decision}"]
    if r.probabilities:
        ranked = sorted(r.probabilities.items(), key=lambda kv: -kv[1])
        lines.append("probabilities: " + ", ".join(f"{k} {v:.3f}" for k, v in ranked))
    if r.size_source and r.size_source != "off":  # off: a bundle trained before size triage
        size = "unknown" if r.diameter is None else f"{r.diameter:.1f} px"
        lines.append(f"nucleus diameter: {size} ({r.size_source}; scale {r.scale:g})")
    if r.ood_score is not None:
        lines.append(f"OOD score: {r.ood_score:.4g}" + (" (unknown modality)" if r.decision.startswith("unknown")
                                                         else ""))
    if analysis.count is not None:
        lines.append(f"nuclei: {analysis.count}")
    return "\n".join(lines)


class TriagesegWidget(QWidget):
    """Route / Segment the selected image layer with a triageseg bundle.

    Args:
        napari_viewer: the viewer whose layers it works on (napari passes it).
    """

    def __init__(self, napari_viewer):
        from triageseg.napari_plugin.llvm_guard import keep_triton_out

        super().__init__()
        keep_triton_out()  # before any job imports torch
        self.viewer = napari_viewer
        self.bundle: str | None = None
        self.worker = None
        self._cache: dict = {}

        self.bundle_edit = QLineEdit()
        self.bundle_edit.setPlaceholderText("model bundle folder")
        self.browse_button = QPushButton("Choose...")
        self.bundle_info = QLabel("no bundle chosen")
        self.bundle_info.setWordWrap(True)
        self.layer_combo = QComboBox()
        self.modality_combo = QComboBox()
        self.tile_spin = QSpinBox()
        self.tile_spin.setRange(0, 8192)
        self.tile_spin.setSingleStep(32)
        self.tile_spin.setSpecialValueText("each model's own")
        self.diameter_spin = QDoubleSpinBox()  # 0 = estimate it; otherwise the user's diameter (px)
        self.diameter_spin.setRange(0, 2000)
        self.diameter_spin.setDecimals(1)
        self.diameter_spin.setSpecialValueText("auto (estimated)")
        self.route_button = QPushButton("Route")
        self.segment_button = QPushButton("Segment")
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.decision = QLabel("")
        self.decision.setWordWrap(True)
        self._lay_out()
        self._add_finetune_panel()

        self.browse_button.clicked.connect(self._choose_bundle)
        self.bundle_edit.editingFinished.connect(lambda: self.set_bundle(self.bundle_edit.text()))
        self.route_button.clicked.connect(lambda: self.run(segment=False))
        self.segment_button.clicked.connect(lambda: self.run(segment=True))
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed,
                      self.viewer.layers.events.reordered):
            event.connect(self._refresh_layers)
        self.viewer.layers.selection.events.active.connect(self._follow_selection)
        self._refresh_layers()
        self._set_busy(False)

    def _lay_out(self) -> None:
        row = QHBoxLayout()
        row.addWidget(self.bundle_edit)
        row.addWidget(self.browse_button)
        form = QFormLayout()
        form.addRow("bundle", row)
        form.addRow("", self.bundle_info)
        form.addRow("image", self.layer_combo)
        form.addRow("force modality", self.modality_combo)
        form.addRow("tile size", self.tile_spin)
        form.addRow("nucleus diameter (px)", self.diameter_spin)
        buttons = QHBoxLayout()
        buttons.addWidget(self.route_button)
        buttons.addWidget(self.segment_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.decision)
        layout.addStretch(1)

    def _add_finetune_panel(self) -> None:
        """Add to training set / Fine-tune / Before-after, below the segmentation controls (finetune_panel.py)."""
        from triageseg.napari_plugin.finetune_panel import FinetunePanel

        self.finetune_panel = FinetunePanel(self)
        self.layout().insertWidget(self.layout().count() - 1, self.finetune_panel)  # above the stretch
        # after set_bundle (connected later in __init__) has read the new bundle
        self.bundle_edit.editingFinished.connect(lambda: QTimer.singleShot(0, self.finetune_panel.refresh))

    # ------------------------------------------------------------------ bundle
    def _choose_bundle(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a triageseg model bundle", self.bundle_edit.text())
        if folder:
            self.bundle_edit.setText(folder)
            self.set_bundle(folder)

    def set_bundle(self, folder: str) -> None:
        """Use the bundle at ``folder``: list its models for the modality choice (models load on first use)."""
        from triageseg import bundle as _bundle

        self.modality_combo.clear()
        self.modality_combo.addItem(AUTO_TEXT, None)
        self.bundle = None
        folder = folder.strip()
        if not folder:
            self.bundle_info.setText("no bundle chosen")
        else:
            try:
                manifest = _bundle.read_manifest(folder)
            except DataError as err:
                self.bundle_info.setText(f"error: {err}")
            else:
                models = list(manifest.get("segmenters", []))
                for name in models:
                    self.modality_combo.addItem(name, name)
                router = "router" if manifest.get("has_router") else "no router: force a modality"
                self.bundle_info.setText(f"{len(models)} models ({', '.join(models)}); {router}")
                self.bundle = folder
        self._set_busy(False)

    # ------------------------------------------------------------------ layers
    def _image_layers(self) -> list:
        from napari.layers import Image

        return [layer for layer in self.viewer.layers if isinstance(layer, Image)]

    def _refresh_layers(self, _event=None) -> None:
        current = self.layer_combo.currentText()
        names = [layer.name for layer in self._image_layers()]
        self.layer_combo.clear()
        self.layer_combo.addItems(names)
        if current in names:
            self.layer_combo.setCurrentText(current)
        self._follow_selection()

    def _follow_selection(self, _event=None) -> None:
        active = self.viewer.layers.selection.active
        if active is not None and active.name in [layer.name for layer in self._image_layers()]:
            self.layer_combo.setCurrentText(active.name)

    def selected_layer(self):
        """The image layer chosen in the widget (the viewer's selected image layer by default), or None."""
        name = self.layer_combo.currentText()
        return next((layer for layer in self._image_layers() if layer.name == name), None)

    # --------------------------------------------------------------------- run
    def _set_busy(self, busy: bool) -> None:
        ready = not busy and self.bundle is not None
        self.route_button.setEnabled(ready)
        self.segment_button.setEnabled(ready)
        self.browse_button.setEnabled(not busy)
        self.bundle_edit.setEnabled(not busy)

    def run(self, *, segment: bool) -> None:
        """Start a Route (``segment=False``) or Segment job on the selected layer in a thread worker."""
        from napari.qt.threading import create_worker

        layer = self.selected_layer()
        if self.bundle is None or layer is None:
            self.status.setText("choose a bundle and an image layer first")
            return
        try:
            pixels = layer_pixels(layer.data, rgb=layer.rgb, name=layer.name, multiscale=layer.multiscale)
        except DataError as err:
            self.status.setText(f"error: {err}")
            return
        total = 4 if segment else 2
        self.progress.setRange(0, total)
        self.progress.setValue(0)
        self.status.setText("starting")
        self._set_busy(True)
        self.worker = create_worker(
            analyse_steps, self.bundle, pixels, layer_name=layer.name, segment=segment,
            modality=self.modality_combo.currentData(), tile_size=self.tile_spin.value() or None,
            diameter=self.diameter_spin.value() or None,
            cache=self._cache, _progress={"total": total, "desc": f"triageseg: {layer.name}"},
        )
        self.worker.yielded.connect(self._on_step)
        self.worker.returned.connect(self._on_result)
        self.worker.errored.connect(self._on_error)
        self.worker.finished.connect(lambda: self._set_busy(False))
        self.worker.start()

    def _on_step(self, step: Step) -> None:
        self.progress.setValue(step.done)
        self.status.setText(f"{step.text}...")

    def _on_error(self, err: Exception) -> None:  # a bug: napari also shows its traceback
        self.progress.setValue(0)
        self.status.setText(f"error: {type(err).__name__}: {err}")

    def _on_result(self, analysis: Analysis | Failure) -> None:
        if isinstance(analysis, Failure):
            self.progress.setValue(0)
            self.status.setText(f"error: {analysis.message}")
            return
        self.progress.setValue(self.progress.maximum())
        self.decision.setText(describe(analysis))
        if analysis.labels is None:
            self.status.setText(f"routed {analysis.layer_name}")
            return
        name = f"{analysis.layer_name} labels"
        source = next((layer for layer in self._image_layers() if layer.name == analysis.layer_name), None)
        placement = {} if source is None else {"scale": source.scale, "translate": source.translate}
        existing = next((layer for layer in self.viewer.layers if layer.name == name), None)
        if existing is not None and existing.data.shape == analysis.labels.shape:
            existing.data = analysis.labels
            existing.metadata = analysis.metadata()
        else:
            if existing is not None:
                self.viewer.layers.remove(existing)
            self.viewer.add_labels(analysis.labels, name=name, metadata=analysis.metadata(), **placement)
        self.status.setText(f"segmented {analysis.layer_name}: layer '{name}'")
