"""Typed results of the F1 evaluator: per image, per set of images, and the Caicedo error counts.

Built by :mod:`triageseg.postprocess.metrics` (which also exports them); arrays are per
IoU threshold and read-only. The definitions of the counts are in that module's docstring.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

AREA_BINS = ("0-250", "250-625", "625-900", ">900")  # Caicedo error analysis: object area bins, pixels
ERROR_IOU = 0.7  # an object is missed / extra when it has no match at IoU above this
SPLIT_MERGE_IOU = 0.1  # overlaps above this IoU count for splits and merges


def _frozen(values, dtype) -> np.ndarray:
    arr = np.array(values, dtype=dtype)
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True)
class CaicedoErrors:
    """Error analysis of Caicedo et al. 2019 (see the module docstring for definitions)."""

    missed: tuple[int, ...]  # GT objects unmatched at IoU > 0.7, per area bin of AREA_BINS
    extra: tuple[int, ...]  # predictions unmatched at IoU > 0.7, per area bin of AREA_BINS
    splits: int  # GT objects overlapped by >= 2 predictions with IoU > 0.1
    merges: int  # predictions overlapping >= 2 GT objects with IoU > 0.1
    area_bins: tuple[str, ...] = AREA_BINS  # bin names, pixels

    def __add__(self, other: CaicedoErrors) -> CaicedoErrors:
        return CaicedoErrors(
            missed=tuple(a + b for a, b in zip(self.missed, other.missed)),
            extra=tuple(a + b for a, b in zip(self.extra, other.extra)),
            splits=self.splits + other.splits,
            merges=self.merges + other.merges,
        )

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {
            "iou": ERROR_IOU,
            "split_merge_iou": SPLIT_MERGE_IOU,
            "area_bins": list(self.area_bins),
            "missed": list(self.missed),
            "extra": list(self.extra),
            "splits": self.splits,
            "merges": self.merges,
        }


@dataclass(frozen=True, eq=False)
class ImageResult:
    """Scores of one image. Arrays are per threshold and read-only."""

    id: str | None  # image id (file name without extension) when known
    protocol: str  # protocol name
    thresholds: tuple[float, ...]  # IoU thresholds
    n_true: int  # objects in the ground truth
    n_pred: int  # objects in the prediction
    tp: np.ndarray  # int, matched pairs
    fp: np.ndarray  # int, unmatched predictions
    fn: np.ndarray  # int, unmatched GT objects
    precision: np.ndarray  # tp / (tp + fp)
    recall: np.ndarray  # tp / (tp + fn)
    f1: np.ndarray  # 2 tp / (2 tp + fp + fn)
    ap: np.ndarray  # tp / (tp + fp + fn) (the DSB 2018 "AP")
    mean_f1: float  # mean of f1 over thresholds
    mean_ap: float  # mean of ap over thresholds
    errors: CaicedoErrors | None = None  # caicedo2019 only

    def f1_at(self, threshold: float) -> float:
        """F1 at one of ``thresholds`` (ValueError if it is not one of them)."""
        return float(self.f1[_threshold_index(self.thresholds, threshold)])

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        head = {"id": self.id, "n_true": self.n_true, "n_pred": self.n_pred}
        return {**head, **_scores_dict(self, self.errors)}


@dataclass(frozen=True, eq=False)
class EvalResult:
    """Scores of a set of images under one protocol. Arrays are per threshold and read-only.

    ``mean_f1`` is the headline number (mean over thresholds of ``f1``); how ``f1`` is
    aggregated over images depends on the protocol (pooled counts for ``default``,
    mean of per-image F1 otherwise). ``tp``/``fp``/``fn`` are always pooled sums.
    """

    protocol: str  # protocol name
    thresholds: tuple[float, ...]  # IoU thresholds
    n_images: int  # images scored
    n_true: int  # GT objects, all images
    n_pred: int  # predicted objects, all images
    tp: np.ndarray  # int, summed over images
    fp: np.ndarray  # int, summed over images
    fn: np.ndarray  # int, summed over images
    precision: np.ndarray  # per threshold, aggregated as the protocol says
    recall: np.ndarray  # per threshold, aggregated as the protocol says
    f1: np.ndarray  # per threshold, aggregated as the protocol says
    mean_f1: float  # mean of f1 over thresholds: THE headline number
    image_mean_f1: float  # mean over images of each image's mean F1
    ap: np.ndarray | None  # dsb2018: mean over images of per-image AP, per threshold
    mean_ap: float | None  # dsb2018: mean of ap over thresholds
    per_image: tuple[ImageResult, ...]  # one entry per image, input order
    caicedo: CaicedoErrors | None = None  # caicedo2019: errors summed over images

    @property
    def score(self) -> float:
        """The protocol's own headline: ``mean_ap`` for dsb2018, else ``mean_f1``."""
        return self.mean_ap if self.protocol == "dsb2018" else self.mean_f1

    def f1_at(self, threshold: float) -> float:
        """F1 at one of ``thresholds`` (ValueError if it is not one of them)."""
        return float(self.f1[_threshold_index(self.thresholds, threshold)])

    def summary(self) -> dict:
        """The aggregate numbers only (no per-image list), JSON-ready."""
        out = _scores_dict(self, self.caicedo)
        out["n_images"] = self.n_images
        return out

    def to_dict(self) -> dict:
        """JSON-ready dict: protocol, thresholds, the summary and per-image results."""
        return {
            "protocol": self.protocol,
            "thresholds": list(self.thresholds),
            **self.summary(),
            "n_true": self.n_true,
            "n_pred": self.n_pred,
            "image_mean_f1": self.image_mean_f1,
            "per_image": [r.to_dict() for r in self.per_image],
        }


def _scores_dict(result: ImageResult | EvalResult, errors: CaicedoErrors | None) -> dict:
    """JSON-ready scores per threshold shared by image and aggregate results (AP for dsb2018, errors if any)."""
    out = {"mean_f1": result.mean_f1}
    for name in ("f1", "precision", "recall", "tp", "fp", "fn"):
        out[name] = getattr(result, name).tolist()
    if result.protocol == "dsb2018":
        out["mean_ap"] = result.mean_ap
        out["ap"] = result.ap.tolist()
    if errors is not None:
        out["errors"] = errors.to_dict()
    return out


def _threshold_index(thresholds: Sequence[float], threshold: float) -> int:
    for i, t in enumerate(thresholds):
        if abs(t - threshold) < 1e-9:
            return i
    raise ValueError(f"threshold {threshold} is not one of {list(thresholds)}")
