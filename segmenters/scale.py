"""Per-modality input scale: bring nuclei to the size the network sees best.

Nuclei differ in size between modalities (in the synthetic data the median H&E nucleus
is 11 px across, fluorescence 15 px, brightfield 20 px; in DSB 2018 the spread is wider).
A specialist knows its modality, so it can resize its images by a fixed factor before the
network and resize the probabilities back afterwards: every specialist then sees nuclei
of about the same size, the size the shared base model learned on. The generalist does
not know the modality and runs at scale 1. Cellpose does the same with its ``diameter``.

The scale is set per segmenter (``train segmenter --scale``, or the tuning space);
``train all`` leaves it at 1, as 1.21 and 1.5 gained nothing on the synthetic H&E
(``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import math

import numpy as np

MIN_SCALE, MAX_SCALE = 0.25, 4.0


def check_scale(scale: float) -> float:
    """``scale`` as a float, refused outside ``[MIN_SCALE, MAX_SCALE]``."""
    value = float(scale)
    if not (MIN_SCALE <= value <= MAX_SCALE) or not math.isfinite(value):
        raise ValueError(f"scale must be in [{MIN_SCALE}, {MAX_SCALE}], got {scale!r}")
    return value


def scaled_shape(shape: tuple[int, ...], scale: float) -> tuple[int, int]:
    """(height, width) of an image of ``shape`` resized by ``scale`` (at least 1 pixel each)."""
    return max(1, int(round(shape[0] * scale))), max(1, int(round(shape[1] * scale)))


def resize_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """HxWxC (or HxW) float image resized to ``shape``: bilinear up, area-averaged down."""
    import cv2

    h, w = shape
    if image.shape[:2] == (h, w):
        return image
    shrinking = h * w < image.shape[0] * image.shape[1]
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    src = np.ascontiguousarray(image, dtype=np.float32)
    out = cv2.resize(src, (w, h), interpolation=interp)
    if src.ndim == 3 and out.ndim == 2:  # cv2 drops a single channel axis
        out = out[..., None]
    return out


def resize_probabilities(probs: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(classes, h, w) probabilities resized to ``shape``, still summing to 1 at every pixel."""
    if probs.shape[1:] == tuple(shape):
        return probs
    out = resize_image(np.ascontiguousarray(probs.transpose(1, 2, 0)), shape).transpose(2, 0, 1)
    out = np.clip(out, 0.0, None)
    out /= np.maximum(out.sum(axis=0, keepdims=True), 1e-12)
    return np.ascontiguousarray(out, dtype=np.float32)


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Instance labels resized to ``shape`` by nearest neighbour (pixel centres), ids unchanged."""
    h, w = shape
    if labels.shape == (h, w):
        return labels
    rows = np.minimum(((np.arange(h) + 0.5) * labels.shape[0] / h).astype(np.int64), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * labels.shape[1] / w).astype(np.int64), labels.shape[1] - 1)
    return labels[rows[:, None], cols[None, :]]
