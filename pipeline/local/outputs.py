"""Extra outputs beside a label image: an outline overlay PNG, overlay layers and an ImageJ/Fiji ROI set."""

from __future__ import annotations

import os

import numpy as np

from triageseg.datasets.atomic import atomic_path

OUTLINE_COLOUR = (255, 220, 0)
OVERLAY_STYLES = ("outlines", "filled")


def label_rgba(labels: np.ndarray, *, style: str = "outlines") -> np.ndarray:
    """An HxWx4 uint8 layer to lay over the image: transparent background, nuclei drawn.

    Args:
        labels: HxW instance labels, 0 = background.
        style: ``"outlines"`` (each nucleus' inner outline in yellow) or ``"filled"``
            (each nucleus filled with its own colour; a label keeps its colour between calls).

    Raises:
        ValueError: labels not 2-D, or an unknown style.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    if style not in OVERLAY_STYLES:
        raise ValueError(f"unknown overlay style {style!r}; expected one of {', '.join(OVERLAY_STYLES)}")
    out = np.zeros(labels.shape + (4,), np.uint8)
    if style == "outlines":
        from skimage.segmentation import find_boundaries

        edges = find_boundaries(labels, mode="inner")
        out[edges] = (*OUTLINE_COLOUR, 255)
        return out
    from skimage.color import hsv2rgb

    ids, inverse = np.unique(labels, return_inverse=True)
    # golden-ratio hues: neighbouring ids (usually neighbouring nuclei) get distant colours
    hues = (ids.astype(np.float64) * 0.618033988749895) % 1.0
    hsv = np.stack([hues, np.full_like(hues, 0.65), np.ones_like(hues)], axis=-1)
    palette = np.concatenate([(hsv2rgb(hsv[None])[0] * 255).round().astype(np.uint8),
                              np.full((ids.size, 1), 255, np.uint8)], axis=1)
    palette[ids == 0] = 0
    return palette[inverse.reshape(labels.shape)]


def write_overlay(path: str | os.PathLike, image: np.ndarray, labels: np.ndarray) -> None:
    """Write a PNG of ``image`` with the outlines of ``labels`` drawn in yellow."""
    from PIL import Image

    rgb = (np.clip(image, 0, 1) * 255).astype(np.uint8).copy()
    rgb[label_rgba(labels)[..., 3] > 0] = OUTLINE_COLOUR
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")


def write_rois(path: str | os.PathLike, labels: np.ndarray) -> None:
    """Write an ImageJ/Fiji ROI set (zip of polygon ROIs, one per object)."""
    import zipfile

    from roifile import ImagejRoi
    from scipy import ndimage
    from skimage.measure import find_contours

    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for index, region in enumerate(ndimage.find_objects(labels.astype(np.int64)), start=1):
            if region is None:
                continue
            mask = np.pad(labels[region] == index, 1)
            contours = find_contours(mask.astype(np.uint8), 0.5)
            if not contours:
                continue
            contour = max(contours, key=len)
            # (row, col) in the padded crop -> (x, y) in the image
            xy = np.stack([contour[:, 1] - 1 + region[1].start, contour[:, 0] - 1 + region[0].start], axis=1)
            roi = ImagejRoi.frompoints(xy)
            roi.name = f"{index:05d}"
            zf.writestr(f"{index:05d}.roi", roi.tobytes())
