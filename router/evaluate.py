"""Scoring the router on labelled images: accuracy and the confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from triageseg.router.model import RouterConfig, classify

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from triageseg.datasets.layout import Sample


@dataclass(frozen=True)
class RouterEval:
    """Router accuracy on a set of labelled images."""

    class_names: tuple[str, ...]  # classifier outputs = confusion-matrix columns
    row_names: tuple[str, ...]  # true modalities = rows (class_names, then any unknown to the router)
    confusion: np.ndarray  # int64 rows x columns: confusion[true, predicted]
    accuracy: float  # fraction of images whose top-1 modality is right (nan for no images)
    ids: tuple[str, ...]  # image ids, in the order below
    true: tuple[str, ...]  # true modality per image
    predicted: tuple[str, ...]  # top-1 modality per image
    confidence: tuple[float, ...]  # top-1 probability per image

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (confusion as nested lists, per-image rows)."""
        return {
            "accuracy": self.accuracy,
            "n_images": len(self.ids),
            "class_names": list(self.class_names),
            "row_names": list(self.row_names),
            "confusion": self.confusion.tolist(),
            "per_image": [
                {"id": i, "true": t, "predicted": p, "confidence": c}
                for i, t, p, c in zip(self.ids, self.true, self.predicted, self.confidence)
            ],
        }



def evaluate_router(
    model: torch.nn.Module,
    config: RouterConfig,
    samples: Sequence[Sample],
    *,
    device: str | torch.device | None = None,
    chunk: int = 16,
) -> RouterEval:
    """Classify labelled samples with :func:`classify` (crops included) and score them.

    Args:
        model: the router.
        config: its configuration.
        samples: dataset samples with a ``modality`` (others are skipped).
        device: where to run (default: the model's device).
        chunk: images read and classified together (bounds memory for large images).
    """
    from triageseg.datasets.io import read_image

    samples = [s for s in samples if s.modality is not None]
    ids, true, pred, conf = [], [], [], []
    for start in range(0, len(samples), chunk):
        part = samples[start : start + chunk]
        preds = classify(model, config, [read_image(s.image_path) for s in part], device=device)
        for s, p in zip(part, preds):
            ids.append(s.id)
            true.append(s.modality)
            pred.append(p.modality)
            conf.append(p.confidence)
    return score_predictions(config.class_names, ids, true, pred, conf)


def score_predictions(
    class_names: Sequence[str],
    ids: Sequence[str],
    true: Sequence[str],
    predicted: Sequence[str],
    confidence: Sequence[float],
) -> RouterEval:
    """Confusion matrix and accuracy from per-image true and predicted modality names."""
    class_names = tuple(class_names)
    rows = class_names + tuple(sorted(set(true) - set(class_names)))
    confusion = np.zeros((len(rows), len(class_names)), np.int64)
    for t, p in zip(true, predicted):
        confusion[rows.index(t), class_names.index(p)] += 1
    correct = sum(t == p for t, p in zip(true, predicted))
    return RouterEval(
        class_names=class_names,
        row_names=rows,
        confusion=confusion,
        accuracy=correct / len(true) if len(true) else float("nan"),
        ids=tuple(ids),
        true=tuple(true),
        predicted=tuple(predicted),
        confidence=tuple(float(c) for c in confidence),
    )


def format_confusion(ev: RouterEval) -> str:
    """A small text table: rows = true modality, columns = predicted."""
    width = max(8, *(len(n) for n in ev.row_names + ev.class_names)) + 1
    lines = ["true \\ pred".ljust(width) + "".join(c.rjust(width) for c in ev.class_names)]
    for name, row in zip(ev.row_names, ev.confusion):
        lines.append(name.ljust(width) + "".join(str(int(v)).rjust(width) for v in row))
    return "\n".join(lines)


__all__ = ["RouterEval", "evaluate_router", "format_confusion", "score_predictions"]
