"""Predicted per-image quality without ground truth: cheap signals -> a small regressor -> mean F1.

On thousands of images nobody looks at every overlay; :func:`predict_quality` says which
to look at first. Per image, :func:`image_signals` takes the class probabilities
(3xHxW: background / interior / boundary) and the decoded instances and measures:

- ``object_confidence``: mean max-probability over the pixels inside objects;
- ``boundary_entropy``: mean normalised 3-class entropy where the boundary class is
  plausible (p_boundary >= 0.1): touching nuclei the model could not separate cleanly;
- ``uncertain_share``: share of pixels whose max-probability is below 0.6;
- ``count_deviation`` / ``size_deviation``: how far the image's object density (objects
  per megapixel) and median object area lie from those of the model's training labels,
  in training standard deviations of their logarithms (:class:`TrainingStats`);
- ``no_objects``: 1 when the decode found nothing;
- ``router_confidence`` / ``ood_score``: the router's, when the caller has them.

':class:`QualityModel` is a standardised ridge regression on those signals (by default with
each coefficient kept on its expected side, :data:`SIGNS`), fitted with scikit-learn on
(signals, true mean F1) pairs of the model's validation images and stored as plain
numbers (``quality.json``: means, scales, coefficients, intercept, clip range, and the
fit points themselves).
Signals the fit did not see (the router's, for a segmenter trained on its own) are left
out of the model and ignored when given, so a model predicts with or without them.
NumPy/SciPy only at prediction; scikit-learn is imported by :func:`fit_quality` alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from triageseg.datasets.atomic import write_json_atomic
from triageseg.datasets.errors import BundleError

QUALITY_JSON = "quality.json"
KIND = "triageseg-quality"
FORMAT = 1
# Every signal image_signals can give, in a fixed order.
SIGNALS = (
    "object_confidence", "boundary_entropy", "uncertain_share", "count_deviation", "size_deviation", "no_objects",
    "router_confidence", "ood_score",
)
# Signals only the router gives: optional at fit and at prediction.
ROUTER_SIGNALS = ("router_confidence", "ood_score")
UNCERTAIN_BELOW = 0.6  # a pixel whose max-probability is below this counts as uncertain
BOUNDARY_PLAUSIBLE = 0.1  # boundary-class probability from which a pixel counts for boundary_entropy
RIDGE_ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0)  # ridge penalties tried (cross-validated) by fit_quality
# The direction each signal should push the predicted F1 (+1 higher is better, -1 higher is worse):
# fit_quality's default "signed" method keeps every coefficient on its side (or at 0).
SIGNS = {"object_confidence": 1, "boundary_entropy": -1, "uncertain_share": -1, "count_deviation": -1,
         "size_deviation": -1, "no_objects": -1, "router_confidence": 1, "ood_score": -1}
METHODS = ("signed", "free")


@dataclass(frozen=True)
class TrainingStats:
    """Object density and size of a model's training labels (log scale), the reference of the deviations."""

    log_density_mean: float  # mean over training images of log(objects per megapixel + 1)
    log_density_std: float  # their standard deviation (at least 0.1)
    log_area_mean: float  # mean over training images of log(median object area in pixels)
    log_area_std: float  # their standard deviation (at least 0.1)
    n_images: int  # training images measured

    def to_dict(self) -> dict[str, float]:
        """Plain JSON-able dict of the fields."""
        return {k: float(v) if k != "n_images" else int(v) for k, v in self.__dict__.items()}


def _density_and_area(labels: np.ndarray) -> tuple[float, float]:
    """(log(objects per megapixel + 1), log(median object area)) of one label image; area NaN when empty."""
    counts = np.bincount(np.asarray(labels).ravel().astype(np.int64))[1:]
    areas = counts[counts > 0]
    density = len(areas) / max(1, labels.size) * 1e6
    return math.log(density + 1.0), (math.log(float(np.median(areas))) if len(areas) else math.nan)


def training_stats(labels: Sequence[np.ndarray]) -> TrainingStats:
    """Density and size statistics of training label images (HxW instance labels, 0 = background).

    Raises:
        ValueError: no label images.
    """
    if not len(labels):
        raise ValueError("training_stats needs at least one label image")
    pairs = np.array([_density_and_area(lab) for lab in labels], dtype=np.float64)
    dens, area = pairs[:, 0], pairs[:, 1][np.isfinite(pairs[:, 1])]
    if not len(area):
        area = np.array([0.0])
    return TrainingStats(
        log_density_mean=float(dens.mean()), log_density_std=max(0.1, float(dens.std())),
        log_area_mean=float(area.mean()), log_area_std=max(0.1, float(area.std())), n_images=len(labels),
    )


def image_signals(
    probs: np.ndarray,
    labels: np.ndarray,
    *,
    stats: TrainingStats | None = None,
    router_confidence: float | None = None,
    ood_score: float | None = None,
) -> dict[str, float]:
    """The quality signals of one segmented image (see the module docstring).

    Args:
        probs: 3xHxW class probabilities (background, interior, boundary), summing to 1 per pixel.
        labels: HxW instance labels decoded from them (0 = background).
        stats: the model's training statistics; without them the deviations are 0.
        router_confidence: the router's confidence in the image's modality, when known.
        ood_score: the router's out-of-distribution score, when known.

    Returns:
        ``{signal: value}`` for the signals of :data:`SIGNALS` that are known (router ones only when given).

    Raises:
        ValueError: ``probs`` not 3xHxW or ``labels`` not of its HxW.
    """
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    if probs.ndim != 3 or probs.shape[0] != 3:
        raise ValueError(f"probs must be 3xHxW, got shape {probs.shape}")
    if labels.shape != probs.shape[1:]:
        raise ValueError(f"labels shape {labels.shape} does not match probs {probs.shape[1:]}")
    counts = np.bincount(labels.ravel().astype(np.int64))[1:]
    areas = counts[counts > 0]
    return signals_from_sums(pixel_sums(probs, labels), n_objects=len(areas),
                             median_area=float(np.median(areas)) if len(areas) else None, stats=stats,
                             router_confidence=router_confidence, ood_score=ood_score)


# Order of the pixel_sums vector.
SUMS = ("object_pmax", "object_pixels", "boundary_entropy", "boundary_pixels", "uncertain_pixels", "pixels")


def pixel_sums(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The per-pixel sums behind the signals (:data:`SUMS`), additive over disjoint regions (blocks).

    Args:
        probs: 3xhxw class probabilities of a region.
        labels: hxw instance labels of the same region (0 = background).
    """
    p = np.asarray(probs).astype(np.float32, copy=False)
    inside = np.asarray(labels) > 0
    pmax = p.max(axis=0)
    plausible = p[2] >= BOUNDARY_PLAUSIBLE
    entropy = 0.0
    if plausible.any():
        q = np.clip(p[:, plausible], 1e-6, 1.0)
        entropy = float((-(q * np.log(q)).sum(axis=0) / math.log(3)).sum())
    return np.array([float(pmax[inside].sum()), float(inside.sum()), entropy, float(plausible.sum()),
                     float((pmax < UNCERTAIN_BELOW).sum()), float(pmax.size)], np.float64)


def signals_from_sums(
    sums: np.ndarray,
    *,
    n_objects: int,
    median_area: float | None,
    stats: TrainingStats | None = None,
    router_confidence: float | None = None,
    ood_score: float | None = None,
) -> dict[str, float]:
    """The signals of :func:`image_signals` from :func:`pixel_sums` (summed over an image's blocks) and its objects.

    Args:
        sums: the :data:`SUMS` of the whole image.
        n_objects: objects in the image.
        median_area: their median area in pixels (None without objects).
        stats, router_confidence, ood_score: as for :func:`image_signals`.
    """
    pmax_in, n_in, ent, n_plaus, n_unc, n_pix = (float(v) for v in sums)
    out = {
        "object_confidence": pmax_in / n_in if n_in else 0.0,
        "boundary_entropy": ent / n_plaus if n_plaus else 0.0,
        "uncertain_share": n_unc / n_pix if n_pix else 0.0,
        "count_deviation": 0.0,
        "size_deviation": 0.0,
        "no_objects": 0.0 if n_objects else 1.0,
    }
    if stats is not None:
        density = math.log(n_objects / max(1.0, n_pix) * 1e6 + 1.0)
        out["count_deviation"] = abs(density - stats.log_density_mean) / stats.log_density_std
        if median_area:
            out["size_deviation"] = abs(math.log(median_area) - stats.log_area_mean) / stats.log_area_std
    if router_confidence is not None and math.isfinite(router_confidence):
        out["router_confidence"] = float(router_confidence)
    if ood_score is not None and math.isfinite(ood_score):
        out["ood_score"] = float(ood_score)
    return out


@dataclass(frozen=True)
class QualityModel:
    """A fitted standardised ridge regression: signals -> predicted mean F1, clipped to ``clip``."""

    signals: tuple[str, ...]  # the signals used, in coefficient order
    mean: tuple[float, ...]  # per-signal mean of the fit data (standardisation)
    scale: tuple[float, ...]  # per-signal standard deviation of the fit data (1 where constant)
    coef: tuple[float, ...]  # ridge coefficients on the standardised signals
    intercept: float  # ridge intercept
    clip: tuple[float, float] = (0.0, 1.0)  # predictions are clipped to this range
    stats: TrainingStats | None = None  # the model's training statistics (count / size deviations)
    fit: dict[str, Any] = field(default_factory=dict)  # how it was fitted: points, images, alpha, Spearman

    def predict(self, signals: Mapping[str, float]) -> float:
        """Predicted mean F1 of one image from its signals; a signal the model uses but lacks counts as its mean."""
        z = [(float(signals.get(s, m)) - m) / sc for s, m, sc in zip(self.signals, self.mean, self.scale, strict=True)]
        value = self.intercept + float(np.dot(self.coef, z)) if self.coef else self.intercept
        return float(min(self.clip[1], max(self.clip[0], value)))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of ``quality.json``."""
        return {
            "kind": KIND, "format": FORMAT, "signals": list(self.signals), "mean": list(self.mean),
            "scale": list(self.scale), "coef": list(self.coef), "intercept": self.intercept, "clip": list(self.clip),
            "training_stats": None if self.stats is None else self.stats.to_dict(), "fit": dict(self.fit),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str | os.PathLike | None = None) -> QualityModel:
        """Build from :meth:`to_dict`'s form; anything malformed raises :class:`BundleError` naming ``source``."""
        try:
            if d.get("kind") != KIND or d.get("format") != FORMAT:
                raise ValueError(f"not a quality model (kind {d.get('kind')!r} format {d.get('format')!r}, "
                                 f"expected {KIND!r} format {FORMAT})")
            signals = tuple(str(s) for s in d["signals"])
            unknown = sorted(set(signals) - set(SIGNALS))
            if unknown:
                raise ValueError(f"unknown signals {unknown}; valid: {list(SIGNALS)}")
            mean, scale, coef = (tuple(float(v) for v in d[k]) for k in ("mean", "scale", "coef"))
            if not len(mean) == len(scale) == len(coef) == len(signals):
                raise ValueError(f"{len(signals)} signals but {len(mean)} means, {len(scale)} scales, "
                                 f"{len(coef)} coefficients")
            values = (*mean, *scale, *coef, float(d["intercept"]))
            if not all(math.isfinite(v) for v in values) or min(scale, default=1.0) <= 0:
                raise ValueError("non-finite numbers or non-positive scales")
            lo, hi = (float(v) for v in d.get("clip", (0.0, 1.0)))
            st = d.get("training_stats")
            stats = None if st is None else TrainingStats(**{k: st[k] for k in TrainingStats.__dataclass_fields__})
            return cls(signals, mean, scale, coef, float(d["intercept"]), (lo, hi), stats, dict(d.get("fit") or {}))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise BundleError(source, f"invalid quality model ({type(err).__name__}: {err})") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``quality.json`` atomically; returns its path."""
        write_json_atomic(path, self.to_dict())
        return Path(path)


def load_quality(path: str | os.PathLike) -> QualityModel | None:
    """The quality model in ``path`` (a ``quality.json`` or the run folder holding it); None when there is none.

    Raises:
        BundleError: the file exists but is not valid JSON or not a quality model (naming it).
    """
    import json

    path = Path(path)
    if path.is_dir():
        path = path / QUALITY_JSON
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(path, f"unreadable quality model ({err})") from None
    if not isinstance(d, dict):
        raise BundleError(path, "invalid quality model (not a JSON object)")
    return QualityModel.from_dict(d, source=path)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (NaN when either side is constant or fewer than 3 points)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(spearmanr(a, b).statistic)


def fit_quality(
    points: Sequence[Mapping[str, float]],
    targets: Sequence[float],
    *,
    stats: TrainingStats | None = None,
    info: Mapping[str, Any] | None = None,
    method: str = "signed",
    keep_points: bool = True,
) -> QualityModel:
    """Fit a :class:`QualityModel` on (signals, true mean F1) pairs.

    Signals are standardised; the ridge penalty is chosen from :data:`RIDGE_ALPHAS` by
    5-fold cross-validated squared error. ``method="signed"`` (the default) constrains each
    coefficient to the side of :data:`SIGNS` (a ridge with non-negative coefficients on the
    oriented signals): with the few, correlated points of a short run, a free ridge gives
    some signals the wrong sign, which then mis-ranks new images. ``"free"`` is the plain
    ridge. A signal missing from some points, or constant over all of them, is left out.

    Args:
        points: one ``{signal: value}`` per (image, epoch) seen in validation.
        targets: the true mean F1 of each point.
        stats: the model's training statistics, stored with the model.
        info: extra provenance for ``fit`` (e.g. the number of images and epochs).
        method: ``"signed"`` or ``"free"``.
        keep_points: store the fit points in ``fit["points"]`` (to refit or compare methods later).

    Raises:
        ValueError: different lengths, fewer than 2 points, or an unknown method.
    """
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import KFold, cross_val_score

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if len(points) != len(targets):
        raise ValueError(f"{len(points)} signal rows but {len(targets)} targets")
    if len(points) < 2:
        raise ValueError(f"fit_quality needs at least 2 points, got {len(points)}")
    y = np.asarray(targets, dtype=np.float64)
    names = [s for s in SIGNALS if all(s in p for p in points)]
    x = np.array([[float(p[s]) for s in names] for p in points], dtype=np.float64).reshape(len(points), len(names))
    keep = [j for j in range(len(names)) if np.ptp(x[:, j]) > 1e-12]
    names, x = [names[j] for j in keep], x[:, keep]
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    fit: dict[str, Any] = {"n_points": len(points), "method": method, **dict(info or {})}
    coef, intercept = [], float(y.mean())
    if names:
        sign = np.array([SIGNS[n] if method == "signed" else 1 for n in names], dtype=np.float64)
        z = (x - mean) / scale * sign

        def ridge(alpha: float):
            return Ridge(alpha=alpha, positive=method == "signed")

        if len(points) >= 4:
            folds = KFold(n_splits=min(5, len(points)), shuffle=True, random_state=0)
            errors = [-cross_val_score(ridge(a), z, y, cv=folds, scoring="neg_mean_squared_error").mean()
                      for a in RIDGE_ALPHAS]
            alpha = RIDGE_ALPHAS[int(np.argmin(errors))]
        else:
            alpha = 1.0
        fitted = ridge(alpha).fit(z, y)
        coef, intercept = [float(c) for c in fitted.coef_ * sign], float(fitted.intercept_)
        fit["alpha"] = float(alpha)
    model = QualityModel(tuple(names), tuple(float(v) for v in mean), tuple(float(v) for v in scale), tuple(coef),
                         intercept, (0.0, 1.0), stats, fit)
    pred = [model.predict(p) for p in points]
    rho = spearman(pred, y)
    model.fit["spearman_in_fit"] = None if math.isnan(rho) else rho
    model.fit["mean_abs_error_in_fit"] = float(np.mean(np.abs(np.asarray(pred) - y)))
    if keep_points:
        model.fit["points"] = [{**{k: float(v) for k, v in p.items()}, "f1": float(t)} for p, t in zip(points, y)]
    return model


def predict_quality(
    model: QualityModel | None,
    probs: np.ndarray,
    labels: np.ndarray,
    *,
    router_confidence: float | None = None,
    ood_score: float | None = None,
) -> float | None:
    """Predicted mean F1 of one segmented image, or None without a quality model.

    Args:
        model: the segmenter's quality model (:func:`load_quality`), or None.
        probs: the 3xHxW class probabilities the labels were decoded from.
        labels: the HxW instance labels.
        router_confidence: the router's confidence, when the image was routed.
        ood_score: the router's out-of-distribution score, when known.
    """
    if model is None:
        return None
    signals = image_signals(probs, labels, stats=model.stats, router_confidence=router_confidence,
                            ood_score=ood_score)
    return model.predict(signals)
