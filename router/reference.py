"""The router's stored reference: pooled features of a sample of its training thumbnails, per class.

``train_router`` writes ``router/reference.safetensors`` so that the router head can later be
refitted with one more class (``finetune.router_add``) without the training images.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from triageseg.datasets.errors import DataError

REFERENCE = "reference.safetensors"
REFERENCE_PER_CLASS = 64  # stored pooled features per known class


def save_reference(run_dir: str | os.PathLike, model, config, thumbs: np.ndarray, labels: np.ndarray, *,
                   seed: int = 0, device=None) -> Path:
    """Store pooled features of up to :data:`REFERENCE_PER_CLASS` thumbnails per class in the router folder.

    ``train_router`` calls it with the training thumbnails, so a later fine-tune can refit the
    head for a new modality without the training data.
    """
    from triageseg.router.model import router_outputs

    thumbs = np.asarray(thumbs)
    if thumbs.dtype == np.uint8:
        thumbs = thumbs.astype(np.float32) / 255
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == k))[:REFERENCE_PER_CLASS]
                                   for k in range(len(config.class_names))]))
    _, feats = router_outputs(model, config, thumbs[keep], device=device)
    path = Path(run_dir) / REFERENCE
    save_reference_features(path.parent, feats, labels[keep], config)
    return path


def load_reference(router_dir: Path, class_names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """(features N x D, class indices N) stored for ``class_names``, or None when the router has none."""
    from safetensors import safe_open

    path = router_dir / REFERENCE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="np") as f:
        names = tuple((f.metadata() or {}).get("class_names", "").split(","))
        if names != tuple(class_names):
            raise DataError(path, f"stored for classes {list(names)}, the router has {list(class_names)}")
        return f.get_tensor("features"), f.get_tensor("labels")


def save_reference_features(router_dir: Path, feats: np.ndarray, labels: np.ndarray, config) -> None:
    """Write up to :data:`REFERENCE_PER_CLASS` of the given features per class, atomically."""
    from safetensors.numpy import save_file

    from triageseg.datasets.atomic import atomic_path

    keep = np.concatenate([np.flatnonzero(labels == k)[:REFERENCE_PER_CLASS] for k in range(len(config.class_names))])
    with atomic_path(router_dir / REFERENCE) as tmp:
        save_file({"features": np.ascontiguousarray(feats[keep], np.float32),
                   "labels": labels[keep].astype(np.int64)}, str(tmp),
                  metadata={"class_names": ",".join(config.class_names)})


