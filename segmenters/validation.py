"""Validation of a training run, its history files and its curves.

:func:`validate_epoch` runs the real decode on the validation images once per epoch
(tiled predict -> watershed -> F1) and, from the same probabilities, the validation loss
(the training loss on the full validation images), per-class IoU of the argmax against
the 3-class targets, and the quality signals of every image with its true mean F1 (the
points :func:`triageseg.postprocess.quality.fit_quality` learns from). The rows go to
``history.csv`` / ``history.json`` and :func:`write_training_curves` draws them as
``curves.png`` beside them.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from triageseg.datasets.atomic import write_json_atomic, write_text_atomic
from triageseg.segmenters.model import HISTORY_CSV, HISTORY_JSON

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from triageseg.postprocess.quality import TrainingStats
    from triageseg.postprocess.watershed import WatershedParams
    from triageseg.segmenters.config import TrainConfig

CLASS_NAMES = ("background", "interior", "boundary")
HISTORY_FIELDS = (
    "epoch", "steps", "train_loss", "iou_background", "iou_interior", "iou_boundary",
    "val_loss", "val_iou_background", "val_iou_interior", "val_iou_boundary", "val_mean_f1", "lr", "seconds",
)
# The panels of curves.png: (title, [(history column, legend label), ...]).
CURVE_PANELS = (
    ("loss", [("train_loss", "train"), ("val_loss", "validation")]),
    ("validation IoU per class", [(f"val_iou_{c}", c) for c in CLASS_NAMES]),
    ("validation mean F1", [("val_mean_f1", "mean F1 (default protocol)")]),
)


@dataclass
class Validation:
    """What one validation pass measured."""

    mean_f1: float  # mean F1 (default protocol, pooled over the images)
    loss: float  # the training loss on the validation images (mean over images)
    iou: list[float]  # per-class IoU (background, interior, boundary) of the argmax, pooled; NaN if absent
    probs: list[np.ndarray] = field(default_factory=list)  # 3xHxW probabilities per image
    signals: list[dict[str, float]] = field(default_factory=list)  # quality signals per image
    image_f1: list[float] = field(default_factory=list)  # true mean F1 per image


def predict_all(model: torch.nn.Module, images: Sequence[np.ndarray], *, config: TrainConfig) -> list[np.ndarray]:
    """3xHxW probabilities of every image (tiled, as at inference)."""
    from triageseg.segmenters.predict import predict

    return [
        predict(model, img, tile_size=config.tile_size, overlap=config.overlap, batch_size=config.val_batch_size,
                amp=config.amp, scale=config.scale)
        for img in images
    ]


def validate(
    model: torch.nn.Module,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    *,
    config: TrainConfig,
    params: WatershedParams | None = None,
) -> tuple[float, list[np.ndarray]]:
    """Mean F1 (default protocol) of ``model`` decoded by the watershed, and the probabilities.

    Args:
        model: the network, on the device to use.
        images: float32 HxWx3 validation images.
        labels: their ground-truth instance labels.
        config: tile size, overlap, batch size and AMP setting come from here.
        params: watershed parameters (``None`` = defaults).
    """
    from triageseg.postprocess.metrics import evaluate
    from triageseg.postprocess.watershed import watershed

    probs = predict_all(model, images, config=config)
    preds = [watershed(p, params) for p in probs]
    return float(evaluate(list(labels), preds).mean_f1), probs


def make_val_targets(labels: Sequence[np.ndarray], *, config: TrainConfig) -> list[np.ndarray]:
    """The 3-class targets of the validation labels, as training makes them (made once per run)."""
    from triageseg.postprocess.targets import make_targets

    return [make_targets(lab, width=config.boundary_width, mode=config.boundary_mode) for lab in labels]


def validate_epoch(
    model: torch.nn.Module,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    *,
    config: TrainConfig,
    params: WatershedParams | None = None,
    stats: TrainingStats | None = None,
    probs: Sequence[np.ndarray] | None = None,
    targets: Sequence[np.ndarray] | None = None,
) -> Validation:
    """Mean F1, loss, per-class IoU and per-image quality signals of one validation pass.

    Args:
        model: the network, on the device to use (unused when ``probs`` are given).
        images: float32 HxWx3 validation images.
        labels: their ground-truth instance labels.
        config: tiling, loss weights and the targets' boundary width/mode come from here.
        params: watershed parameters (``None`` = defaults).
        stats: the training labels' statistics (quality signals ``count/size_deviation``).
        probs: probabilities already computed for ``images`` (then nothing is predicted again).
        targets: the 3-class targets of ``labels`` (:func:`make_val_targets`), made here when None.
    """
    import torch

    from triageseg.postprocess.metrics import evaluate
    from triageseg.postprocess.quality import image_signals
    from triageseg.postprocess.watershed import watershed
    from triageseg.segmenters.losses import confusion_matrix, iou_per_class, segmentation_loss

    probs = list(probs) if probs is not None else predict_all(model, images, config=config)
    preds = [watershed(p, params) for p in probs]
    result = evaluate(list(labels), preds)
    confusion = torch.zeros(3, 3, dtype=torch.int64)
    losses = []
    class_weights = (1.0, 1.0, config.boundary_weight)
    targets = make_val_targets(labels, config=config) if targets is None else targets
    for p, tgt in zip(probs, targets, strict=True):
        target = torch.from_numpy(tgt.astype(np.int64))[None]
        # log-probabilities are logits of the same softmax: the training loss, from what predict returned
        logits = torch.from_numpy(np.log(np.clip(p, 1e-7, 1.0)).astype(np.float32))[None]
        losses.append(float(segmentation_loss(logits, target, class_weights=class_weights,
                                              dice_weight=config.dice_weight)))
        confusion += confusion_matrix(logits, target, 3)
    return Validation(
        mean_f1=float(result.mean_f1),
        loss=float(np.mean(losses)) if losses else math.nan,
        iou=iou_per_class(confusion.numpy()),
        probs=probs,
        signals=[image_signals(p, pred, stats=stats) for p, pred in zip(probs, preds, strict=True)],
        image_f1=[float(r.mean_f1) for r in result.per_image],
    )


def jsonable(value: float | None) -> float | None:
    """A float for JSON: None for None, NaN or infinity."""
    return None if value is None or not math.isfinite(value) else float(value)


def history_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """The text of ``history.csv``: one line per epoch, the :data:`HISTORY_FIELDS` columns."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(HISTORY_FIELDS), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in HISTORY_FIELDS})
    return buf.getvalue()


def write_history(run_dir: Path, rows: Sequence[Mapping[str, Any]], final: Mapping[str, Any] | None, *,
                  name: str | None = None) -> None:
    """Write ``history.csv``, ``history.json`` and ``curves.png`` (titled ``name``) into ``run_dir``, atomically."""
    write_text_atomic(run_dir / HISTORY_CSV, history_csv(rows))
    write_json_atomic(run_dir / HISTORY_JSON, {"epochs": list(rows), "final": dict(final) if final else None})
    write_training_curves(run_dir, rows, final, name=name)


def write_training_curves(run_dir: Path, rows: Sequence[Mapping[str, Any]],
                          final: Mapping[str, Any] | None = None, *, name: str | None = None) -> Path | None:
    """``curves.png`` of a segmenter history: losses, validation IoU per class, validation mean F1, best epoch.

    The best epoch is ``final["best_epoch"]`` when the run has ended, else the epoch of
    the highest validation mean F1 so far. Returns the path, or None with no rows.
    """
    from triageseg.postprocess.plots import CURVES_PNG, write_curves

    best = (final or {}).get("best_epoch")
    if best is None and rows:
        scored = [r for r in rows if r.get("val_mean_f1") is not None]
        best = max(scored, key=lambda r: float(r["val_mean_f1"]))["epoch"] if scored else None
    return write_curves(run_dir / CURVES_PNG, rows, CURVE_PANELS, x="epoch", best=best,
                        title=f"segmenter {name}" if name else "segmenter training")
