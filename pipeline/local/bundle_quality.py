"""One quality model for a whole bundle, fitted on validation images as inference sees them.

Each segmenter's own ``quality.json`` (``segmenters/train.py``) is fitted on its modality's
validation images run through itself, without the router. At inference the quality estimate also
meets images the router sent to another model (misrouted, or the generalist as fallback), and the
per-segmenter fits are on different scales, so one model's 0.6 is not another's.

:func:`fit_bundle_quality` routes every validation image through the bundle's router and runs it
through every segmenter of the bundle: the router's pick (as at inference) and the others (what a
misrouted image looks like). Each (image, segmenter) point carries the segmenter's signals (with
that segmenter's training statistics), the router's probability for that segmenter's modality as
``router_confidence`` (the top-1 confidence for the generalist: what inference passes when that
model runs) and the image's OOD score. The signal set (all, without the OOD score, without the
router's signals, confidence only) is chosen by leave-one-image-out Spearman on these validation
points, then one ridge (``postprocess.quality.fit_quality``) is fitted on all points and written
into every segmenter's ``quality.json`` with that segmenter's own training statistics, so
``Pipeline.quality`` needs no change.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from triageseg import bundle as _bundle
from triageseg.postprocess.quality import ROUTER_SIGNALS, SIGNALS


def bundle_points(pipe, data_root: str | os.PathLike, *, split: str = "val", max_images: int | None = None,
                  progress: bool = False) -> list[dict[str, Any]]:
    """(signals, true F1) of every image of ``split`` through every segmenter, with the router's signals.

    Returns:
        One dict per (image, segmenter): ``id``, ``modality`` (true), ``model``, ``routed`` (the
        router's choice, as inference would run it), ``signals``, ``f1``.
    """
    from tqdm.auto import tqdm

    from triageseg.datasets.layout import Dataset
    from triageseg.postprocess.metrics import match_image
    from triageseg.postprocess.quality import image_signals
    from triageseg.postprocess.watershed import watershed

    ds = Dataset(data_root)
    samples = ds.select(split=split)[: max_images or None]
    has_router = bool(pipe.manifest.get("has_router"))
    points = []
    for sample in tqdm(samples, desc="quality points", unit="img", disable=not progress):
        image, gt = ds.load(sample)
        pred = pipe.route([image])[0] if has_router else None
        used = pipe.choose(pred)[0] if pred is not None else None  # what inference would run
        for name in pipe.available:
            qm = pipe.quality_model(name)
            probs = pipe.probabilities(image, name)
            labels = watershed(probs, pipe.params(name))
            # the router's belief that this model fits the image; the top-1 confidence for the generalist,
            # which is what inference passes whichever model runs
            conf = None if pred is None else float(pred.probs.get(name, pred.confidence))
            if pred is not None and name == used:
                conf = float(pred.confidence)
            signals = image_signals(probs, labels, stats=None if qm is None else qm.stats, router_confidence=conf,
                                    ood_score=None if pred is None else pred.ood_score)
            points.append({"id": sample.id, "modality": sample.modality, "model": name, "routed": name == used,
                           "signals": signals, "f1": float(match_image(gt, labels).mean_f1)})
    return points


def fit_bundle_quality(
    bundle_dir: str | os.PathLike,
    data_root: str | os.PathLike,
    *,
    split: str = "val",
    device: str = "auto",
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fit one quality model on every (``split`` image, segmenter) of the bundle; write it into each segmenter.

    Returns:
        A summary: points, images, misrouted images, the signals used and the in-fit Spearman.
    """
    from triageseg.pipeline import Pipeline
    from triageseg.postprocess.quality import QUALITY_JSON, QualityModel, fit_quality

    pipe = Pipeline.from_bundle(bundle_dir, device=device)
    points = bundle_points(pipe, data_root, split=split, progress=progress)
    if len(points) < 4:
        log(f"quality: {len(points)} validation points; per-segmenter quality models kept")
        return {"n_points": len(points)}
    images = sorted({p["id"] for p in points})
    misrouted = sorted({p["id"] for p in points
                        if p["routed"] and p["model"] not in (p["modality"], _bundle.GENERALIST)})
    cv = {name: leave_one_image_out(points, keys) for name, keys in CANDIDATES.items()}
    finite = {k: v for k, v in cv.items() if not np.isnan(v)}
    chosen = max(finite, key=lambda k: (finite[k], -list(CANDIDATES).index(k))) if finite else "all"
    info = {"scope": "bundle: every val image through every segmenter, router signals included",
            "n_images": len(images), "models": list(pipe.available), "misrouted_images": len(misrouted),
            "target": "per-image mean F1, default protocol", "signal_set": chosen,
            "cv_spearman": {k: (None if np.isnan(v) else round(v, 4)) for k, v in cv.items()},
            "cv": "leave one val image out; Spearman of the routed points' predictions"}
    model = fit_quality(_only(points, CANDIDATES[chosen]), [p["f1"] for p in points], info=info, keep_points=False)
    for name in pipe.available:
        own = pipe.quality_model(name)
        QualityModel(model.signals, model.mean, model.scale, model.coef, model.intercept, model.clip,
                     None if own is None else own.stats, dict(model.fit)).save(
            _bundle.segmenter_dir(bundle_dir, name) / QUALITY_JSON)
    rho = model.fit.get("spearman_in_fit")
    routed = [p for p in points if p["routed"]]
    log(f"quality: one model for {len(pipe.available)} segmenters, fitted on {len(points)} points "
        f"({len(images)} val images x segmenters, {len(misrouted)} misrouted); signal set {chosen} by "
        f"leave-one-image-out Spearman ({', '.join(f'{k} {v:.3f}' for k, v in finite.items())}); "
        f"signals {', '.join(model.signals)}; Spearman in fit " + ("n/a" if rho is None else f"{rho:.3f}"))
    return {"n_points": len(points), "n_images": len(images), "n_routed": len(routed),
            "misrouted_images": len(misrouted), "signal_set": chosen, "cv_spearman": info["cv_spearman"],
            "signals": list(model.signals), "spearman_in_fit": rho}


# Signal sets tried, chosen by leave-one-image-out Spearman on the validation images. On the demo's bundle
# the OOD score, noisy on in-distribution images, lowered the held-out ranking when it was always in.
CANDIDATES = {
    "all": SIGNALS,
    "without ood_score": tuple(s for s in SIGNALS if s != "ood_score"),
    "without router signals": tuple(s for s in SIGNALS if s not in ROUTER_SIGNALS),
    "confidence only": ("object_confidence", "uncertain_share"),
}


def _only(points: list[dict[str, Any]], keys) -> list[dict[str, float]]:
    return [{k: v for k, v in p["signals"].items() if k in keys} for p in points]


def leave_one_image_out(points: list[dict[str, Any]], keys) -> float:
    """Spearman of held-out predictions: for each val image, fit on the others, predict its routed point."""
    from triageseg.postprocess.quality import fit_quality, spearman

    preds, trues = [], []
    for image_id in sorted({p["id"] for p in points}):
        train = [p for p in points if p["id"] != image_id]
        test = [p for p in points if p["id"] == image_id and p["routed"]]
        if len(train) < 2 or not test:
            continue
        model = fit_quality(_only(train, keys), [p["f1"] for p in train], keep_points=False)
        preds += [model.predict(p["signals"]) for p in test]
        trues += [p["f1"] for p in test]
    return spearman(preds, trues)
