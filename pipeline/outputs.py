"""Extra outputs beside a label image: an outline overlay PNG and an ImageJ/Fiji ROI set."""

from __future__ import annotations

import os

import numpy as np

from triageseg.datasets.atomic import atomic_path


def write_overlay(path: str | os.PathLike, image: np.ndarray, labels: np.ndarray) -> None:
    """Write a PNG of ``image`` with the outlines of ``labels`` drawn in yellow."""
    from PIL import Image
    from skimage.segmentation import find_boundaries

    rgb = (np.clip(image, 0, 1) * 255).astype(np.uint8).copy()
    edges = find_boundaries(labels, mode="inner")
    rgb[edges] = (255, 220, 0)
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
