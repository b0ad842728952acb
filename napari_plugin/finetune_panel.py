"""The dock widget's correct -> add -> fine-tune panel: Add to training set, Fine-tune (with Stop), Before / after.

After Segment (or on a ``segment`` output folder opened with the reader) the user corrects
the Labels layer with napari's paint, erase and fill tools, then:

- **Add to training set** saves the image, the corrected labels and the modality into a
  dataset folder (:func:`triageseg.finetune.add_to_training_set`); the folder is chosen
  once and remembered between sessions. A modality the bundle does not know is accepted
  only when the router called the image an unknown modality (its OOD verdict).
- **Fine-tune** runs :func:`triageseg.finetune.finetune` in a napari thread worker with
  a progress bar; **Stop** ends training, keeps the best epoch so far and still writes the
  new bundle beside the old one.
- **Before / after** segments the image with the new bundle into a second Labels layer
  ``<image> labels (fine-tuned)`` and shows the old and new validation F1.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
)

from triageseg.datasets.errors import DataError

SPLIT_AUTO = "auto (every 5th to val)"
FINETUNED_SUFFIX = " labels (fine-tuned)"
SETTINGS_FILE = "napari.json"


def settings_path() -> Path:
    """Where the panel remembers the dataset folder (``$TRIAGESEG_CONFIG_DIR`` or ``~/.config/triageseg``)."""
    base = os.environ.get("TRIAGESEG_CONFIG_DIR") or Path.home() / ".config" / "triageseg"
    return Path(base) / SETTINGS_FILE


def recall(key: str) -> str:
    try:
        return str(json.loads(settings_path().read_text(encoding="utf-8")).get(key, ""))
    except (OSError, ValueError, AttributeError):
        return ""


def remember(key: str, value: str) -> None:
    from triageseg.datasets.atomic import write_json_atomic

    path = settings_path()
    try:
        current = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        current = {}
    current[key] = value
    try:
        write_json_atomic(path, current)
    except OSError:  # a read-only home: the folder is still kept for this session
        pass


def next_bundle_name(bundle: str) -> str:
    """``<bundle>-ft1``, or the next free ``-ftN`` beside it."""
    base = Path(bundle)
    stem = base.name.split("-ft")[0] if "-ft" in base.name else base.name
    n = 1
    while (base.parent / f"{stem}-ft{n}").exists() or (base.parent / f"{stem}-ft{n}.partial").exists():
        n += 1
    return str(base.parent / f"{stem}-ft{n}")


class _Relay(QObject):
    """Carries the fine-tune's progress from the worker thread to the panel (a queued signal)."""

    progressed = Signal(int, int, str)


class FinetunePanel(QGroupBox):
    """The correct -> add -> fine-tune panel of :class:`~triageseg.napari_plugin.widget.TriagesegWidget`.

    Args:
        host: the dock widget (its viewer, chosen bundle and image layers).
    """

    def __init__(self, host):
        super().__init__("Correct and fine-tune")
        self.host = host
        self.viewer = host.viewer
        self.worker = None
        self.stop_event: threading.Event | None = None
        self.result = None  # the last FinetuneResult
        self._followed: str | None = None  # the Labels layer whose modality the combo last proposed
        self._relay = _Relay()
        self._relay.progressed.connect(self._on_progress)

        self.labels_combo = QComboBox()
        self.dataset_edit = QLineEdit(recall("dataset"))
        self.dataset_edit.setPlaceholderText("corrections dataset folder")
        self.dataset_button = QPushButton("Choose...")
        self.modality_combo = QComboBox()
        self.modality_combo.setEditable(True)
        self.split_combo = QComboBox()
        self.split_combo.addItems([SPLIT_AUTO, "train", "val"])
        self.add_button = QPushButton("Add to training set")
        self.minutes_spin = QDoubleSpinBox()
        self.minutes_spin.setRange(0.5, 240.0)
        self.minutes_spin.setValue(5.0)
        self.minutes_spin.setSuffix(" min")
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(0, 100000)
        self.steps_spin.setSpecialValueText("auto")
        self.out_edit = QLineEdit()
        self.out_edit.setPlaceholderText("new bundle folder (default: <bundle>-ftN)")
        self.finetune_button = QPushButton("Fine-tune")
        self.stop_button = QPushButton("Stop")
        self.compare_button = QPushButton("Before / after")
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.scores = QLabel("")
        self.scores.setWordWrap(True)
        self._lay_out()

        self.dataset_button.clicked.connect(self._choose_dataset)
        self.dataset_edit.editingFinished.connect(lambda: remember("dataset", self.dataset_edit.text().strip()))
        self.add_button.clicked.connect(self.add)
        self.finetune_button.clicked.connect(self.start_finetune)
        self.stop_button.clicked.connect(self.stop)
        self.compare_button.clicked.connect(self.before_after)
        self.labels_combo.currentTextChanged.connect(self._follow_labels)
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self.refresh)
        self.refresh()
        self._set_busy(False)

    def _lay_out(self) -> None:
        row = QHBoxLayout()
        row.addWidget(self.dataset_edit)
        row.addWidget(self.dataset_button)
        form = QFormLayout()
        form.addRow("labels", self.labels_combo)
        form.addRow("modality", self.modality_combo)
        form.addRow("dataset", row)
        form.addRow("split", self.split_combo)
        form.addRow("", self.add_button)
        form.addRow("budget", self.minutes_spin)
        form.addRow("steps", self.steps_spin)
        form.addRow("new bundle", self.out_edit)
        buttons = QHBoxLayout()
        buttons.addWidget(self.finetune_button)
        buttons.addWidget(self.stop_button)
        buttons.addWidget(self.compare_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.scores)

    # ------------------------------------------------------------------ state
    def _labels_layers(self) -> list:
        from napari.layers import Labels

        return [layer for layer in self.viewer.layers
                if isinstance(layer, Labels) and not layer.name.endswith(FINETUNED_SUFFIX)]

    def refresh(self, _event=None) -> None:
        """List the Labels layers and the bundle's modalities (called when layers or the bundle change)."""
        current = self.labels_combo.currentText()
        names = [layer.name for layer in self._labels_layers()]
        self.labels_combo.blockSignals(True)
        self.labels_combo.clear()
        self.labels_combo.addItems(names)
        if current in names:
            self.labels_combo.setCurrentText(current)
        elif names:
            self.labels_combo.setCurrentText(names[-1])  # the newest: what Segment just added
        self.labels_combo.blockSignals(False)
        self._follow_labels()

    def bundle_modalities(self) -> list[str]:
        from triageseg import bundle as _bundle

        if not self.host.bundle:
            return []
        try:
            return list(_bundle.read_manifest(self.host.bundle).get("modalities", []))
        except DataError:
            return []

    def _follow_labels(self, _name: str | None = None) -> None:
        """Offer the bundle's modalities; a newly selected Labels layer proposes the modality it was routed to."""
        typed = self.modality_combo.currentText()
        mods = self.bundle_modalities()
        self.modality_combo.clear()
        self.modality_combo.addItems(mods)
        layer = self.selected_labels()
        guess = typed
        if layer is not None and layer.name != self._followed:  # another layer: its modality; else what was typed
            guess = str(dict(layer.metadata or {}).get("modality") or typed)
        self._followed = None if layer is None else layer.name
        if guess:
            self.modality_combo.setCurrentText(guess)

    def selected_labels(self):
        name = self.labels_combo.currentText()
        return next((layer for layer in self._labels_layers() if layer.name == name), None)

    def source_image(self, labels_layer):
        """The image layer the labels were made from: ``source_layer`` in their metadata, else ``<name> labels``'s."""
        from napari.layers import Image

        meta = dict(labels_layer.metadata or {})
        candidates = [meta.get("source_layer"), labels_layer.name.removesuffix(" labels")]
        for name in candidates:
            for layer in self.viewer.layers:
                if isinstance(layer, Image) and layer.name == name:
                    return layer
        return None

    def _set_busy(self, busy: bool) -> None:
        self.add_button.setEnabled(not busy)
        self.finetune_button.setEnabled(not busy)
        self.stop_button.setEnabled(busy and self.stop_event is not None)
        self.compare_button.setEnabled(not busy and self.result is not None)

    def _choose_dataset(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Dataset folder for corrected images", self.dataset_edit.text())
        if folder:
            self.set_dataset(folder)

    def set_dataset(self, folder: str) -> None:
        """Use (and remember) ``folder`` as the corrections dataset."""
        self.dataset_edit.setText(folder)
        remember("dataset", folder)

    # -------------------------------------------------------------------- add
    def add(self) -> None:
        """Add the selected Labels layer and its image to the dataset; refusals are shown in the panel."""
        from triageseg.finetune import add_to_training_set
        from triageseg.napari_plugin.steps import layer_pixels

        labels_layer = self.selected_labels()
        folder = self.dataset_edit.text().strip()
        if labels_layer is None:
            self.status.setText("error: no Labels layer: segment an image (or open a segment output folder) first")
            return
        if not folder:
            self.status.setText("error: choose the dataset folder for corrected images first")
            return
        image_layer = self.source_image(labels_layer)
        if image_layer is None:
            self.status.setText(f"error: no image layer for {labels_layer.name!r}; open the image it was made from")
            return
        modality = self.modality_combo.currentText().strip()
        known = self.bundle_modalities()
        decision = str((labels_layer.metadata or {}).get("decision", ""))
        if known and modality not in known and not decision.startswith("unknown"):
            self.status.setText(
                f"error: {modality!r} is not a modality of the bundle ({', '.join(known)}); a new modality is "
                "accepted for an image the router called an unknown modality (OOD)")
            return
        split = None if self.split_combo.currentText() == SPLIT_AUTO else self.split_combo.currentText()
        try:
            pixels = layer_pixels(image_layer.data, rgb=image_layer.rgb, name=image_layer.name,
                                  multiscale=image_layer.multiscale)
            added = add_to_training_set(folder, pixels, labels_layer.data, modality, image_layer.name, split=split)
        except (DataError, ValueError, OSError) as err:
            self.status.setText(f"error: {err}")
            return
        remember("dataset", folder)
        verb = "replaced" if added.replaced else "added"
        self.status.setText(f"{verb} {added.id} ({added.modality}, {added.split}, {added.n_objects} nuclei) in "
                            f"{folder}")

    # --------------------------------------------------------------- finetune
    def start_finetune(self) -> None:
        """Fine-tune in a thread worker: progress bar, Stop, the new bundle beside the old one."""
        from napari.qt.threading import create_worker

        from triageseg.finetune import finetune

        folder = self.dataset_edit.text().strip()
        if not self.host.bundle:
            self.status.setText("error: choose a bundle first")
            return
        if not folder:
            self.status.setText("error: add corrected images to a dataset folder first")
            return
        out = self.out_edit.text().strip() or next_bundle_name(self.host.bundle)
        self.out_edit.setText(out)
        modality = self.modality_combo.currentText().strip() or None
        self.stop_event = threading.Event()
        self.result = None
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.status.setText(f"fine-tuning {modality or ''} into {out}")
        self.worker = create_worker(
            finetune, self.host.bundle, folder, out, modality=modality, minutes=self.minutes_spin.value(),
            stop_event=self.stop_event, progress=self._relay.progressed.emit,
            steps=self.steps_spin.value() or None, _start_thread=False,
        )
        self.worker.returned.connect(self._on_finetuned)
        self.worker.errored.connect(self._on_error)
        self.worker.finished.connect(self._on_finished)
        self._set_busy(True)
        self.worker.start()

    def stop(self) -> None:
        """Ask the fine-tune to stop after the current step (it keeps the best epoch and writes the bundle)."""
        if self.stop_event is not None:
            self.stop_event.set()
            self.status.setText("stopping: the best epoch so far is kept and the new bundle written")

    def _on_progress(self, done: int, total: int, text: str) -> None:
        self.progress.setRange(0, max(1, total))
        self.progress.setValue(done)
        if self.stop_event is None or not self.stop_event.is_set():
            self.status.setText(f"{text}... ({done}/{total})")

    def _on_finetuned(self, res) -> None:
        self.result = res
        self.progress.setValue(self.progress.maximum())
        how = "stopped early, " if res.stopped else ""
        self.status.setText(f"new bundle {res.out} ({how}{res.epochs_completed} epochs; the old one is unchanged)")
        self.scores.setText(self.describe(res))

    @staticmethod
    def describe(res) -> str:
        """The old and new validation F1 as the panel shows them."""
        what = "new modality, from " + res.init_from if res.new_modality else "kept: " + res.kept
        n = res.n_val if res.val_source == "val split" else res.n_train
        return (f"{res.modality}: val F1 old {res.val_f1_before:.3f} -> new {res.val_f1_after:.3f} "
                f"({n} {res.val_source}; {what})")

    def _on_error(self, err: Exception) -> None:
        self.progress.setValue(0)
        self.status.setText(f"error: {err}" if isinstance(err, (DataError, ValueError)) else
                            f"error: {type(err).__name__}: {err}")

    def _on_finished(self) -> None:
        self.stop_event = None
        self.worker = None
        self._set_busy(False)

    # ----------------------------------------------------------- before/after
    def before_after(self) -> None:
        """Segment the selected labels' image with the new bundle into ``<image> labels (fine-tuned)``."""
        from napari.qt.threading import create_worker

        from triageseg.napari_plugin.steps import analyse_steps, layer_pixels

        labels_layer = self.selected_labels()
        image_layer = None if labels_layer is None else self.source_image(labels_layer)
        if self.result is None or image_layer is None:
            self.status.setText("error: fine-tune first, with an image and its labels selected")
            return
        try:
            pixels = layer_pixels(image_layer.data, rgb=image_layer.rgb, name=image_layer.name,
                                  multiscale=image_layer.multiscale)
        except DataError as err:
            self.status.setText(f"error: {err}")
            return
        self.status.setText(f"segmenting {image_layer.name} with {self.result.out}")
        self.worker = create_worker(analyse_steps, str(self.result.out), pixels, layer_name=image_layer.name,
                                    segment=True, cache={}, _start_thread=False)
        self.worker.returned.connect(lambda analysis: self._on_after(analysis, image_layer))
        self.worker.errored.connect(self._on_error)
        self.worker.finished.connect(self._on_finished)
        self._set_busy(True)
        self.worker.start()

    def _on_after(self, analysis, image_layer) -> None:
        from triageseg.napari_plugin.steps import Failure

        if isinstance(analysis, Failure):
            self.status.setText(f"error: {analysis.message}")
            return
        name = f"{analysis.layer_name}{FINETUNED_SUFFIX}"
        existing = next((layer for layer in self.viewer.layers if layer.name == name), None)
        if existing is not None:
            self.viewer.layers.remove(existing)
        self.viewer.add_labels(analysis.labels, name=name, metadata=analysis.metadata(),
                               scale=image_layer.scale, translate=image_layer.translate)
        self.status.setText(f"before: the edited labels; after: layer '{name}' ({analysis.count} nuclei, "
                            f"{analysis.routing.used_model})")
        self.scores.setText(self.describe(self.result))
