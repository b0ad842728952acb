"""Training data of a segmenter run: which images train and validate, and the sampled, augmented crops.

The crops of global sample ``i`` are drawn from a generator seeded by ``(seed, i)``
(:class:`CropDataset`), so what an epoch sees depends neither on the worker count nor on
where a run was interrupted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from triageseg.datasets.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from triageseg.segmenters.config import TrainConfig

# Fraction of the training images held out for validation when the dataset has no val split.
FALLBACK_VAL_FRACTION = 0.15


class CropDataset:
    """Global sample index -> (image tensor 3xSxS, target tensor SxS), a pure function of the index.

    Implements the torch map-style dataset protocol (``__getitem__`` / ``__len__``).
    """

    def __init__(self, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], config: TrainConfig, length: int):
        from triageseg.segmenters.augment import build_augmentation
        from triageseg.segmenters.scale import resize_image, resize_labels, scaled_shape

        if config.scale != 1.0:  # the network's pixel grid: resize once, crop from the resized images
            shapes = [scaled_shape(img.shape, config.scale) for img in images]
            images = [resize_image(img, shp) for img, shp in zip(images, shapes, strict=True)]
            labels = [resize_labels(lab, shp) for lab, shp in zip(labels, shapes, strict=True)]
        self.images = list(images)
        self.labels = list(labels)
        self.config = config
        self.length = length
        self.transform = build_augmentation(config.modality, crop_size=config.crop_size, strength=config.aug_strength)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        import torch

        from triageseg.postprocess.targets import make_targets
        from triageseg.segmenters.augment import augment_sample

        rng = np.random.default_rng([self.config.seed, int(index)])
        which = int(rng.integers(len(self.images)))
        aug_seed = int(rng.integers(2**31 - 1))
        image, labels = augment_sample(self.transform, self.images[which], self.labels[which], seed=aug_seed)
        target = make_targets(labels, width=self.config.boundary_width, mode=self.config.boundary_mode)
        return (
            torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            torch.from_numpy(target.astype(np.int64)),
        )


def canonical_diameter(labels: Sequence[np.ndarray]) -> float | None:
    """The training set's nucleus diameter: the median over images of each image's median diameter (px)."""
    from triageseg.router.size import median_diameter

    found = [d for d in (median_diameter(lab) for lab in labels) if d is not None]
    return round(float(np.median(found)), 2) if found else None


def size_calibration(data: Sequence[tuple[np.ndarray, np.ndarray]], signals: Sequence[str] | None = None) -> float:
    """Label diameter over the size estimate (``router.size.estimate_diameter``), median over the images.

    The estimate measures the nuclei's masks; how a modality's nuclei are shaped (elongated
    H&E nuclei, clumps) biases it the same way on every image of that modality, so the
    segmenter records the factor its own training images give. ``signals`` (one per image,
    ``router.size.signal_for`` of its modality; default ``auto`` for all) must be what the
    pipeline will measure the same modality's images on.
    """
    from triageseg.router.size import estimate_diameter, median_diameter

    if signals is None:
        signals = ["auto"] * len(data)
    if len(signals) != len(data):
        raise ValueError(f"size_calibration: {len(signals)} signals for {len(data)} images")
    ratios = []
    for (image, labels), signal in zip(data, signals):
        true = median_diameter(labels)
        est = estimate_diameter(image, signal=signal).diameter if true is not None else None
        if est is not None:
            ratios.append(np.log(true / est))
    return round(float(np.clip(np.exp(np.median(ratios)), 0.1, 10.0)), 3) if ratios else 1.0


def to_diameter(data: Sequence[tuple[np.ndarray, np.ndarray]], diameter: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, labels) pairs each resized so its median nucleus diameter is ``diameter`` (like Cellpose's diam_mean).

    The factor is clipped to [0.25, 4]; an image without nuclei is kept as it is.
    """
    from triageseg.router.size import median_diameter
    from triageseg.segmenters.scale import resize_image, resize_labels, scaled_shape

    out = []
    for image, labels in data:
        d = median_diameter(labels)
        factor = 1.0 if d is None else float(np.clip(diameter / d, 0.25, 4.0))
        if abs(factor - 1.0) < 0.02:
            out.append((image, labels))
            continue
        shape = scaled_shape(image.shape, factor)
        out.append((resize_image(image, shape), resize_labels(labels, shape)))
    return out


class RangeSampler:
    """Yields the global sample indices ``start, ..., stop - 1`` in order (torch Sampler protocol)."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def worker_init(_worker_id: int) -> None:
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover
        pass


def balanced(samples: Sequence[Any], limit: int) -> list[Any]:
    """Up to ``limit`` samples taken round-robin over modalities (sorted ids within each)."""
    groups: dict[str, list[Any]] = {}
    for s in sorted(samples, key=lambda s: s.id):
        groups.setdefault(s.modality or "", []).append(s)
    out: list[Any] = []
    queues = [groups[k] for k in sorted(groups)]
    while len(out) < limit and any(queues):
        for q in queues:
            if q and len(out) < limit:
                out.append(q.pop(0))
    return out


def select_samples(dataset: Any, config: TrainConfig, log: Callable[[str], None]) -> tuple[list[Any], list[Any]]:
    """Train and validation samples for ``config.modality``; errors list what the dataset has."""
    if config.modality is not None and config.modality not in dataset.modalities:
        have = ", ".join(dataset.modalities) if dataset.modalities else "none (no modalities.csv)"
        raise DataError(dataset.root, f"no images of modality {config.modality!r}; the dataset has: {have}")
    train = dataset.select(split="train", modality=config.modality)
    val = dataset.select(split="val", modality=config.modality)
    if not train:
        splits = sorted({s.split or "none" for s in dataset.samples})
        raise DataError(
            dataset.root,
            f"no training images (split 'train') for modality {config.modality or 'any'}; splits present: "
            + ", ".join(splits),
        )
    if not val:
        if len(train) < 2:
            raise DataError(
                dataset.root, "no validation images (split 'val') and too few training images to hold some out"
            )
        order = np.random.default_rng(config.seed).permutation(len(train))
        n_val = max(1, round(FALLBACK_VAL_FRACTION * len(train)))
        val = [train[i] for i in sorted(order[:n_val])]
        train = [train[i] for i in sorted(order[n_val:])]
        log(f"note: no 'val' split; holding out {n_val} of the training images for validation")
    return train, val


def check_has_objects(root: Path, config: TrainConfig, labels: Sequence[np.ndarray]) -> None:
    """Refuse training labels without a single object: the model would learn to find nothing."""
    if not any(lab.any() for lab in labels):
        raise DataError(root, f"no objects to learn from: all {len(labels)} training label images of modality "
                              f"{config.modality or 'any'} are empty (all 0); check labels/ and splits.csv")
