"""Teach a bundle's router a new modality: a refitted head and OOD statistics with one more class.

The ViT backbone stays as it is; only the classification head (a linear layer on the pooled
features) is refitted, which takes seconds on a CPU. It needs features of every class:

- the new modality: the corrected images, each seen as its whole-image thumbnail and as
  flipped, rotated and cropped views (the router's own training augments the same way);
- the classes the router knows: the bundle's stored router reference (``router/reference.safetensors``:
  pooled features of up to 64 training thumbnails per class, written by
  ``train_router`` since this feature), or, for an older bundle without it, images of those
  modalities drawn by the synthetic generator (``datasets.synth``), which is what the demo
  bundles were trained on. A known modality that neither source can provide is refused.

The head starts from the old weights plus one new row and is fitted by full-batch cross-entropy
(class-balanced) on those features; the temperature is kept. The OOD statistics (``router/ood.py``)
get the new class's mean (over all views of the new images), and the covariance the classes share
gets the new class's (Ledoit-Wolf) covariance added with weight 1 / (number of classes): adding a
positive semi-definite term can only lower a known image's Mahalanobis score, so nothing the old
router accepted is newly rejected. The threshold becomes the largest of the old one, the 99 %
prediction bound of the new views' scores (``calibrate_threshold``, as at training) and 1.1 x their
highest score: the shared covariance was fitted without the new class, whose spread it may
underestimate; the rule is recorded in ``ood.json``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from triageseg import bundle as _bundle
from triageseg.datasets.errors import DataError
from triageseg.router.reference import REFERENCE, load_reference, save_reference_features

SYNTH_PER_CLASS = 12  # synthetic images per known class for a bundle without a stored reference
VIEWS_PER_IMAGE = 8  # views of each new image (whole thumbnail, flips, rotations, crops)
THRESHOLD_MARGIN = 1.1
VAL_COPY = "__val"  # id suffix of the staged copies of training images (finetune.run.stage_data)


def _views(image: np.ndarray, size: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` thumbnails of one image: the whole image, then random crops (50-100 % side), flips, rotations."""
    from triageseg.router.model import background_colour, make_thumbnail

    fill = background_colour(image)
    out = [make_thumbnail(image, size, fill=fill)]
    h, w = image.shape[:2]
    while len(out) < n:
        f = rng.uniform(0.5, 1.0)
        ch, cw = max(8, int(h * f)), max(8, int(w * f))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        view = make_thumbnail(image[top : top + ch, left : left + cw], size, fill=fill)
        view = np.rot90(view, int(rng.integers(4)))
        out.append(np.ascontiguousarray(view[:, ::-1] if rng.random() < 0.5 else view))
    return np.stack(out)


def _known_features(router_dir: Path, model, config, rng, device) -> tuple[np.ndarray, np.ndarray, str]:
    """Features and class indices of the known classes: stored reference, else synthetic images."""
    stored = load_reference(router_dir, config.class_names)
    if stored is not None:
        return stored[0], stored[1], "stored router reference"
    from triageseg.datasets.io import normalize_image
    from triageseg.datasets.synth import MODALITIES, synth_sample
    from triageseg.router.model import router_outputs

    missing = [c for c in config.class_names if c not in MODALITIES]
    if missing:
        raise DataError(router_dir, f"the router has no stored reference ({REFERENCE}) and the synthetic "
                                    f"generator cannot draw {missing}; retrain the router (train router) with "
                                    "this version, which stores it")
    thumbs, labels = [], []
    for k, name in enumerate(config.class_names):
        for _ in range(SYNTH_PER_CLASS):
            image, _ = synth_sample(name, size=int(rng.choice([128, 192, 256])), rng=rng)
            thumbs.append(_views(normalize_image(image), config.image_size, 1, rng)[0])
            labels.append(k)
    _, feats = router_outputs(model, config, np.stack(thumbs), device=device)
    return feats, np.asarray(labels), "synthetic images of the known modalities (no stored reference)"


def _fit_head(head_w: np.ndarray, head_b: np.ndarray, feats: np.ndarray, labels: np.ndarray, n_classes: int,
              *, seed: int, iterations: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Full-batch, class-balanced cross-entropy on fixed features, from the old head plus a new row."""
    import torch

    torch.manual_seed(seed)
    x = torch.from_numpy(np.asarray(feats, np.float32))
    y = torch.from_numpy(np.asarray(labels, np.int64))
    counts = torch.bincount(y, minlength=n_classes).float().clamp(min=1)
    w = torch.zeros(n_classes, x.shape[1])
    b = torch.zeros(n_classes)
    w[: len(head_w)] = torch.from_numpy(head_w)
    b[: len(head_b)] = torch.from_numpy(head_b)
    new = y == n_classes - 1
    w[-1] = x[new].mean(0) / max(1e-6, float(x[new].mean(0).norm())) * float(w[:-1].norm(dim=1).mean())
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(iterations):
        loss = torch.nn.functional.cross_entropy(x @ w.T + b, y, weight=1.0 / counts) + 1e-4 * (w**2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach().numpy(), b.detach().numpy()


def add_modality(bundle: str | os.PathLike, modality: str, data: str | os.PathLike, *, seed: int = 0,
                 device: str = "auto", log=None) -> dict[str, Any]:
    """Add ``modality`` to the router of ``bundle`` (modified in place: the fine-tune's new bundle).

    Args:
        bundle: the bundle being built (never a parent).
        modality: the new class name.
        data: a dataset whose images of ``modality`` teach it (all splits are used).

    Returns:
        What was done (JSON-ready): sources of the features, training accuracy, the OOD threshold.
    """
    import torch

    from triageseg.datasets.layout import Dataset
    from triageseg.router.model import load_router, router_outputs, save_router
    from triageseg.router.ood import load_ood, save_ood, thumbnail_stats

    say = log or (lambda _m: None)
    router_dir = _bundle.router_dir(bundle)
    if not (router_dir / _bundle.WEIGHTS).is_file():
        return {"router": "none in the bundle: force the modality at segmentation time"}
    model, config = load_router(router_dir, device=device)
    if modality in config.class_names:
        return {"router": f"already knows {modality}"}
    if not hasattr(model, "head") or not isinstance(model.head, torch.nn.Linear):
        raise DataError(router_dir, "the router has no linear head to refit")
    rng = np.random.default_rng(seed)
    ds = Dataset(data)
    # a staged copy of a training image standing in for val (finetune.run.stage_data) is not a second image
    images = [ds.load(s)[0] for s in ds.samples if s.modality == modality and not s.id.endswith(VAL_COPY)]
    if not images:
        raise DataError(ds.root, f"no image of modality {modality!r} to teach the router")
    new_thumbs = np.concatenate([_views(img, config.image_size, VIEWS_PER_IMAGE, rng) for img in images])
    _, new_feats = router_outputs(model, config, new_thumbs, device=device)
    old_feats, old_labels, source = _known_features(router_dir, model, config, rng, device)
    n = len(config.class_names) + 1
    feats = np.concatenate([old_feats, new_feats])
    labels = np.concatenate([old_labels, np.full(len(new_feats), n - 1)])
    w, b = _fit_head(model.head.weight.detach().cpu().numpy(), model.head.bias.detach().cpu().numpy(), feats,
                     labels, n, seed=seed)
    accuracy = float(((feats @ w.T + b).argmax(1) == labels).mean())
    new_config = config.replace(class_names=(*config.class_names, modality))
    head = torch.nn.Linear(w.shape[1], n)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(w))
        head.bias.copy_(torch.from_numpy(b))
    model.head = head.to(next(model.parameters()).device)
    model.num_classes = n

    info: dict[str, Any] = {"known_features": source, "n_new_images": len(images), "n_new_views": len(new_thumbs),
                            "head_train_accuracy": round(accuracy, 4)}
    ood = load_ood(router_dir)
    if ood is not None:
        ood = _extend_ood(ood, new_config, new_thumbs, new_feats, model, thumbnail_stats)
        info["ood_threshold"] = ood.threshold
    save_router(router_dir, model, new_config)
    # the reference gains the new class, so a second new modality refits from stored features too
    save_reference_features(router_dir, feats, labels, new_config)
    if ood is not None:
        save_ood(router_dir, ood)
    _bundle.update_manifest(bundle, modalities=list(new_config.class_names),
                            **({"ood": ood.summary()} if ood is not None else {}))
    say(f"router: added {modality} (head refitted on {source} + {len(images)} images; training accuracy "
        f"{accuracy:.3f})")
    return info


def _extend_ood(ood, config, thumbs: np.ndarray, feats: np.ndarray, model, thumbnail_stats):
    """The OOD model with the new class's mean (shared covariance kept) and a threshold that admits it."""
    from dataclasses import replace

    from triageseg.router.ood import KEEP, ViewSet, calibrate_threshold

    from sklearn.covariance import LedoitWolf

    tensors = dict(ood.tensors)
    n_known = len(config.class_names) - 1
    for comp, values in (("thumbstats", None), ("features", feats)):
        key = f"{comp}.means"
        if key in tensors:
            x = np.asarray(thumbnail_stats(thumbs) if comp == "thumbstats" else values, np.float64)
            mean = x.mean(0, keepdims=True)
            tensors[key] = np.concatenate([tensors[key], mean])
            # add the new class's spread to the shared covariance (a PSD term: no known image scores higher)
            spread = LedoitWolf(assume_centered=True).fit(x - mean).covariance_
            cov = np.linalg.pinv(tensors[f"{comp}.precision"]) + spread / (n_known + 1)
            tensors[f"{comp}.precision"] = np.linalg.pinv(cov)
    logits = np.zeros((len(thumbs), len(config.class_names)), np.float32)  # energy only; recomputed below
    extended = replace(ood, class_names=tuple(config.class_names), tensors=tensors)
    if ood.method == "energy":
        from triageseg.router.model import router_outputs

        logits, _ = router_outputs(model, config, thumbs)
    scores = extended.view_scores(ViewSet(logits, feats, thumbs))
    bound, info = calibrate_threshold(scores, ood.calibration.get("keep", KEEP))
    threshold = max(float(ood.threshold), float(bound), THRESHOLD_MARGIN * float(np.max(scores)))
    calibration = {**ood.calibration, "new_modality": config.class_names[-1], "new_modality_fit": info,
                   "threshold_rule": "max(old threshold, the prediction bound of the new images' views' scores, "
                                     f"{THRESHOLD_MARGIN} x their highest score)"}
    return replace(extended, threshold=threshold, calibration=calibration)
