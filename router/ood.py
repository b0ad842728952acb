"""How unlike every trained modality an image is: the router's out-of-distribution score.

A softmax confidence cannot say "I have never seen this": a phase-contrast picture was routed
to the fluorescence specialist with confidence 0.97. This module scores each router view
against statistics of the training split instead, and a threshold calibrated on the
validation split turns the score into the ``unknown modality`` verdict.

Methods (``OODModel.method``; ``benchmarks/bench_ood.py`` compares them):

- ``features``: squared Mahalanobis distance of the ViT's pooled features (pre-logits) to the
  nearest modality mean, with one covariance shared by the modalities, shrunk by Ledoit-Wolf
  (scikit-learn) because a few dozen training images span far fewer than the 192 feature
  dimensions of ``vit_tiny``.
- ``energy``: ``-T logsumexp(logits / T)`` (low for images the classifier knows).
- ``thumbstats``: the same Mahalanobis distance on cheap thumbnail statistics (per-channel
  percentiles, spread, gradient energy, saturation; :func:`thumbnail_stats`).
- ``combined``: the larger of ``features`` and ``thumbstats``, each divided by its median on
  the training split (so neither dominates by scale alone).

An image with several router views (a large image: the whole thumbnail plus crops at the
training scale, see :func:`triageseg.router.model.image_views`) gets the median of its
views' scores, whether the views come from the image in memory or from an overview and
lazily read crops (both go through :func:`triageseg.router.model.classify_views`).

Stored in the router folder as ``ood.safetensors`` (the means and precision matrices) and
``ood.json`` (method, threshold, calibration); ``bundle.json`` repeats the method and the
threshold under ``ood``. A router folder without both files has no OOD check (old bundles).
NumPy, SciPy and scikit-learn only: no torch here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from triageseg.bundle import read_json
from triageseg.datasets.atomic import atomic_path, write_json_atomic
from triageseg.datasets.errors import BundleError

OOD_JSON = "ood.json"
OOD_WEIGHTS = "ood.safetensors"
OOD_FORMAT = 1
METHODS = ("features", "energy", "thumbstats", "combined")
# Chosen by benchmarks/bench_ood.py (benchmarks/RESULTS.md, "Out-of-distribution routing"): on the demo's data
# thumbstats met every goal (false rejects 0 of 45, AUROC 0.993-1.000 on every group), while the ViT features
# rejected 2.2 % of the test images and reached 0.92-0.98 on blank images and two held-out modalities, the energy
# score 0.01-0.39 on photographs, noise and blanks, and combined inherited the features' misses.
DEFAULT_METHOD = "thumbstats"
KEEP = 0.99  # share of in-distribution images the threshold is calibrated to keep


@dataclass(frozen=True)
class ViewSet:
    """What the router computed for N views: logits ``N x C``, features ``N x D``, thumbnails ``N x S x S x 3``."""

    logits: np.ndarray
    features: np.ndarray
    thumbs: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.logits)
        if len(self.features) != n or len(self.thumbs) != n:
            raise ValueError(f"logits, features and thumbs differ in length: {n}, {len(self.features)}, "
                             f"{len(self.thumbs)}")


@dataclass(frozen=True)
class OODModel:
    """Fitted OOD statistics and the calibrated threshold (``score > threshold`` = unknown modality)."""

    method: str  # one of METHODS
    class_names: tuple[str, ...]  # the router's modalities, in the order of the means
    threshold: float  # calibrated on the validation split (see calibrate_threshold)
    temperature: float = 1.0  # the router's softmax temperature (energy)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)  # "<component>.means", ".precision", ".scale"
    calibration: dict[str, Any] = field(default_factory=dict)  # how the threshold was set (JSON-ready)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown OOD method {self.method!r}; known: {', '.join(METHODS)}")
        if not math.isfinite(self.threshold):
            raise ValueError(f"OOD threshold must be a finite number, got {self.threshold!r}")
        object.__setattr__(self, "class_names", tuple(self.class_names))
        for comp in _components(self.method):
            for key in (f"{comp}.means", f"{comp}.precision"):
                if key not in self.tensors:
                    raise ValueError(f"OOD method {self.method!r} needs the tensor {key!r}")
            means, precision = self.tensors[f"{comp}.means"], self.tensors[f"{comp}.precision"]
            d = means.shape[-1]
            if means.ndim != 2 or means.shape[0] != len(self.class_names) or precision.shape != (d, d):
                raise ValueError(f"OOD tensors of {comp!r} have shapes {means.shape} and {precision.shape}, "
                                 f"expected {len(self.class_names)} x D and D x D")

    def view_scores(self, views: ViewSet) -> np.ndarray:
        """The score of each view (``N``, float64); higher = less like any trained modality."""
        return method_scores(self.method, views, self.tensors, self.temperature)

    def is_unknown(self, score: float | None) -> bool:
        """Whether ``score`` is above the threshold (None: never)."""
        return score is not None and float(score) > self.threshold

    def summary(self) -> dict[str, Any]:
        """What ``bundle.json`` records under ``ood``."""
        return {"method": self.method, "threshold": self.threshold, "keep": self.calibration.get("keep", KEEP),
                "n_val": self.calibration.get("n_val")}


def _components(method: str) -> tuple[str, ...]:
    return {"features": ("features",), "energy": (), "thumbstats": ("thumbstats",),
            "combined": ("features", "thumbstats")}[method]


# --------------------------------------------------------------------------- scores


def thumbnail_stats(thumbs: np.ndarray) -> np.ndarray:
    """Cheap statistics of ``N x S x S x 3`` thumbnails in [0, 1]: ``N x 19`` float64.

    Per channel the 5th, 50th and 95th percentiles and the standard deviation; then the mean
    absolute horizontal + vertical difference (gradient energy: texture and noise) per
    channel, the mean and 95th percentile of the per-pixel channel spread (saturation), the
    share of pixels within 0.05 of the median (background) and the mean of the grey image's
    absolute Laplacian.
    """
    x = np.asarray(thumbs, dtype=np.float32)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected N x S x S x 3 thumbnails, got shape {x.shape}")
    n, side = len(x), x.shape[1:3]
    # channel-first (N x 3 x P): every reduction runs along contiguous memory (3x faster)
    chan = np.ascontiguousarray(x.reshape(n, -1, 3).transpose(0, 2, 1))
    pct = np.percentile(chan, [5, 50, 95], axis=2)  # 3 x N x 3
    std = chan.std(axis=2)
    planes = chan.reshape(n, 3, *side)
    grad = np.abs(np.diff(planes, axis=2)).mean(axis=(2, 3)) + np.abs(np.diff(planes, axis=3)).mean(axis=(2, 3))
    spread = chan.max(axis=1) - chan.min(axis=1)  # N x P
    flat_grey = chan.mean(axis=1)
    median = np.median(flat_grey, axis=1)
    near = (np.abs(flat_grey - median[:, None]) < 0.05).mean(axis=1)
    grey = flat_grey.reshape(n, *side)
    lap = np.abs(4 * grey[:, 1:-1, 1:-1] - grey[:, :-2, 1:-1] - grey[:, 2:, 1:-1] - grey[:, 1:-1, :-2]
                 - grey[:, 1:-1, 2:]).mean(axis=(1, 2))
    cols = [pct[0], pct[1], pct[2], std, grad, spread.mean(1)[:, None], np.percentile(spread, 95, axis=1)[:, None],
            near[:, None], lap[:, None]]
    return np.concatenate(cols, axis=1).astype(np.float64)


THUMBSTAT_DIM = 19  # columns of thumbnail_stats


def mahalanobis_fit(x: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class means and the precision of one shared Ledoit-Wolf covariance of the class-centred samples.

    Args:
        x: ``N x D`` samples.
        labels: ``N`` class indices in ``[0, n_classes)``; every class needs a sample.
        n_classes: number of classes.

    Returns:
        ``(means C x D, precision D x D)``, float64.
    """
    from sklearn.covariance import LedoitWolf

    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels)
    if x.ndim != 2 or labels.shape != (len(x),):
        raise ValueError(f"expected N x D samples and N labels, got {x.shape} and {labels.shape}")
    missing = [c for c in range(n_classes) if not (labels == c).any()]
    if missing:
        raise ValueError(f"no sample of classes {missing} to fit their means")
    means = np.stack([x[labels == c].mean(axis=0) for c in range(n_classes)])
    centred = x - means[labels]
    lw = LedoitWolf(assume_centered=True).fit(centred)
    return means, np.asarray(lw.precision_, dtype=np.float64)


def mahalanobis_score(x: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance of each row of ``x`` to the nearest of ``means``: ``N`` float64."""
    x = np.asarray(x, dtype=np.float64)
    diff = x[:, None, :] - means[None, :, :]  # N x C x D
    d2 = np.einsum("ncd,de,nce->nc", diff, precision, diff)
    return np.maximum(d2.min(axis=1), 0.0)


def energy_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``-T logsumexp(logits / T)`` per row: ``N`` float64 (lower for inputs like the training data)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    m = z.max(axis=1)
    return -temperature * (m + np.log(np.exp(z - m[:, None]).sum(axis=1)))


def _component(name: str, views: ViewSet) -> np.ndarray:
    return np.asarray(views.features, np.float64) if name == "features" else thumbnail_stats(views.thumbs)


def method_scores(method: str, views: ViewSet, tensors: dict[str, np.ndarray], temperature: float = 1.0) -> np.ndarray:
    """Per-view scores of ``method`` with fitted ``tensors`` (see the module docstring)."""
    if method == "energy":
        return energy_score(views.logits, temperature)
    parts = []
    for comp in _components(method):
        d2 = mahalanobis_score(_component(comp, views), tensors[f"{comp}.means"], tensors[f"{comp}.precision"])
        scale = tensors.get(f"{comp}.scale")
        parts.append(d2 / float(scale.reshape(-1)[0]) if scale is not None else d2)
    return np.max(np.stack(parts), axis=0)


def combine_view_scores(scores: np.ndarray) -> float:
    """One image's score from its views' scores: the median.

    A huge image's whole-image thumbnail shows nuclei smaller than any the router trained on,
    so it may score high while its training-scale crops score low; the median follows the
    majority of the views, and for a single view it is that view's score.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("no view scores to combine")
    return float(np.median(scores))


# --------------------------------------------------------------------------- fit and calibrate


def calibrate_threshold(scores: Sequence[float], keep: float = KEEP) -> tuple[float, dict[str, Any]]:
    """A threshold that keeps at least ``keep`` of in-distribution images, from validation scores.

    With a few dozen validation images the empirical ``keep`` quantile is just their maximum,
    which says nothing about the next image. So the scores are fitted by a log-normal (a normal
    for ``energy``, whose scores are negative) and the threshold is the one-sided upper
    prediction bound for one new image at level ``keep``:
    ``exp(mean + t_{keep, n-1} * sd * sqrt(1 + 1/n))`` of the log-scores (Student t, so the
    uncertainty of the fitted mean and spread is paid for), and never below the largest
    validation score.

    Args:
        scores: OOD scores of the validation images (at least 2).
        keep: share of in-distribution images to keep (0.5-1).

    Returns:
        ``(threshold, info)``; ``info`` says how (fit, n_val, mean, sd, t, max_val) for ``ood.json``.
    """
    from scipy.stats import t as student_t

    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    s = s[np.isfinite(s)]
    if len(s) < 2:
        raise ValueError(f"need at least 2 finite validation scores to calibrate the OOD threshold, got {len(s)}")
    if not 0.5 <= keep < 1.0:
        raise ValueError(f"keep must be in [0.5, 1), got {keep}")
    log = bool((s > 0).all())
    v = np.log(s) if log else s
    mean, sd, n = float(v.mean()), float(v.std(ddof=1)), len(v)
    tq = float(student_t.ppf(keep, df=n - 1))
    bound = mean + tq * max(sd, 1e-6) * math.sqrt(1 + 1 / n)
    threshold = max(float(math.exp(bound)) if log else float(bound), float(s.max()))
    info = {"fit": "log-normal" if log else "normal", "keep": keep, "n_val": n, "mean": mean, "sd": sd, "t": tq,
            "max_val": float(s.max()), "prediction_bound": float(math.exp(bound)) if log else float(bound)}
    return threshold, info


def fit_ood(
    train: ViewSet,
    train_labels: np.ndarray,
    val: ViewSet,
    class_names: Sequence[str],
    *,
    method: str = DEFAULT_METHOD,
    temperature: float = 1.0,
    keep: float = KEEP,
) -> OODModel:
    """Fit the statistics of ``method`` on the training views and calibrate the threshold on the validation views.

    Args:
        train: router outputs for one view per training image (its whole-image thumbnail).
        train_labels: class index per training view.
        val: router outputs for the validation images (one view each).
        class_names: the router's modalities.
        method: one of :data:`METHODS`.
        temperature: the router's softmax temperature (used by ``energy``).
        keep: share of validation images the threshold keeps (see :func:`calibrate_threshold`).
    """
    if method not in METHODS:
        raise ValueError(f"unknown OOD method {method!r}; known: {', '.join(METHODS)}")
    tensors: dict[str, np.ndarray] = {}
    for comp in _components(method):
        means, precision = mahalanobis_fit(_component(comp, train), train_labels, len(class_names))
        tensors[f"{comp}.means"], tensors[f"{comp}.precision"] = means, precision
        if method == "combined":
            d2 = mahalanobis_score(_component(comp, train), means, precision)
            tensors[f"{comp}.scale"] = np.array([max(float(np.median(d2)), 1e-9)])
    scores = method_scores(method, val, tensors, temperature)
    threshold, info = calibrate_threshold(scores, keep)
    return OODModel(method=method, class_names=tuple(class_names), threshold=threshold, temperature=temperature,
                    tensors=tensors, calibration=info)


# --------------------------------------------------------------------------- save / load


def save_ood(run_dir: str | os.PathLike, ood: OODModel) -> None:
    """Write ``ood.safetensors`` (tensors) and ``ood.json`` (the rest) into the router folder, atomically each."""
    from safetensors.numpy import save_file

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in ood.tensors.items()}
    if not tensors:  # safetensors cannot write an empty file; energy needs no tensor
        tensors = {"_empty": np.zeros(1)}
    with atomic_path(run_dir / OOD_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"kind": "triageseg-router-ood"})
    write_json_atomic(run_dir / OOD_JSON, {
        "format_version": OOD_FORMAT, "method": ood.method, "class_names": list(ood.class_names),
        "threshold": ood.threshold, "temperature": ood.temperature, "calibration": ood.calibration,
        "tensors": sorted(ood.tensors),
    })


def load_ood(run_dir: str | os.PathLike) -> OODModel | None:
    """Load a router folder's OOD statistics; None when it has neither file (a bundle made before them).

    Raises:
        BundleError: one file without the other, or a corrupt, truncated or inconsistent file (named).
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    run_dir = Path(run_dir)
    meta_path, tensor_path = run_dir / OOD_JSON, run_dir / OOD_WEIGHTS
    if not meta_path.exists() and not tensor_path.exists():
        return None
    meta = read_json(meta_path)  # BundleError naming it when missing or corrupt
    if not tensor_path.is_file():
        raise BundleError(tensor_path, f"missing file ({OOD_JSON} is there; retrain the router or delete both)")
    if meta.get("format_version") != OOD_FORMAT:
        raise BundleError(meta_path, f"unknown OOD format version {meta.get('format_version')!r} "
                                     f"(this triageseg reads {OOD_FORMAT})")
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise BundleError(tensor_path, f"corrupt or truncated safetensors file ({err})") from None
    tensors.pop("_empty", None)
    # NaN statistics would make every score NaN, and NaN > threshold is False: the check
    # would be silently off
    bad = [key for key, value in sorted(tensors.items()) if not np.isfinite(value).all()]
    if bad:
        raise BundleError(tensor_path, f"non-finite values (NaN or inf) in {', '.join(bad)}: the unknown-modality "
                                       "check cannot work with them; retrain the router")
    scales = [key for key, value in sorted(tensors.items()) if key.endswith(".scale") and not (value > 0).all()]
    if scales:
        raise BundleError(tensor_path, f"{scales[0]} must be positive, got {tensors[scales[0]].reshape(-1)[:3]}")
    try:
        names = meta["tensors"]
        if sorted(tensors) != sorted(names):
            raise ValueError(f"{OOD_WEIGHTS} holds {sorted(tensors)}, {OOD_JSON} lists {sorted(names)}")
        temperature = float(meta.get("temperature", 1.0))
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
        return OODModel(method=meta["method"], class_names=tuple(meta["class_names"]),
                        threshold=float(meta["threshold"]), temperature=temperature,
                        tensors=tensors, calibration=dict(meta.get("calibration", {})))
    except (KeyError, TypeError, ValueError) as err:
        raise BundleError(meta_path, f"not valid OOD statistics ({type(err).__name__}: {err})") from None


def router_feature_dim(model, class_names) -> int:
    """Width of the pooled features :func:`~triageseg.router.model.router_outputs` gives for ``model``.

    A timm ViT: its head's input (the pre-logits); any other classifier: its logits. An
    exported router (``pipeline.local.router_backend``) answers for the ViT it wraps.
    """
    if getattr(model, "feature_dim", None) is not None:  # served from its export (segmenters.served)
        return int(model.feature_dim)
    model = getattr(model, "eager", model)
    if all(hasattr(model, a) for a in ("forward_features", "forward_head", "head")):
        width = getattr(model.head, "in_features", None) or getattr(model, "head_hidden_size", None)
        return int(width or model.num_features)
    return len(class_names)


def check_fits_router(ood: OODModel, run_dir: str | os.PathLike, *, class_names, feature_dim: int) -> None:
    """Refuse OOD statistics made for another router: other classes, or features of another width.

    Scoring would otherwise fail at the first image with a broadcasting error naming no file.

    Args:
        ood: the statistics from :func:`load_ood`.
        run_dir: the router folder (named in the error).
        class_names: the router's modalities, in its order.
        feature_dim: the width of the router's pooled features.

    Raises:
        BundleError: naming ``ood.json`` or ``ood.safetensors`` and what does not match.
    """
    run_dir = Path(run_dir)
    if tuple(ood.class_names) != tuple(class_names):
        raise BundleError(run_dir / OOD_JSON, f"OOD statistics for the classes {list(ood.class_names)}, but the "
                                              f"router beside them has {list(class_names)}; retrain the router")
    expected = {"features": feature_dim, "thumbstats": THUMBSTAT_DIM}
    for comp in _components(ood.method):
        width = ood.tensors[f"{comp}.means"].shape[-1]
        if width != expected[comp]:
            raise BundleError(run_dir / OOD_WEIGHTS, f"{comp}.means has {width} columns, but the router gives "
                                                     f"{expected[comp]} {comp} values per image; retrain the router")
        scale = ood.tensors.get(f"{comp}.scale")
        if scale is not None and scale.size != 1:
            raise BundleError(run_dir / OOD_WEIGHTS, f"{comp}.scale must hold one number, got shape {scale.shape}")


__all__ = [
    "check_fits_router",
    "router_feature_dim",
    "DEFAULT_METHOD",
    "KEEP",
    "METHODS",
    "OODModel",
    "OOD_JSON",
    "OOD_WEIGHTS",
    "ViewSet",
    "calibrate_threshold",
    "combine_view_scores",
    "energy_score",
    "fit_ood",
    "load_ood",
    "mahalanobis_fit",
    "mahalanobis_score",
    "method_scores",
    "save_ood",
    "thumbnail_stats",
]
