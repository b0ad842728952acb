"""Per-nucleus measurements from instance labels: id, area, mean intensity, centroid.

One pass of ``np.bincount`` per quantity, so a label image with thousands of nuclei costs
a few array scans; labels need not be consecutive (absent ids are simply not listed).

Example:
    >>> labels = np.array([[0, 1, 1], [0, 0, 3]], np.uint32)
    >>> table = measure_nuclei(labels, np.array([[9, 2, 4], [9, 9, 7]]), pixel_size=0.5)
    >>> table.ids.tolist(), table.area_px.tolist(), table.area_um2.tolist()
    ([1, 3], [2, 1], [0.5, 0.25])
    >>> table.mean_intensity.tolist()
    [3.0, 7.0]
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

import numpy as np

TABLE_COLUMNS = ("id", "area_px", "area_um2", "mean_intensity", "centroid_y", "centroid_x")


@dataclass(frozen=True)
class NucleusTable:
    """One row per nucleus, as parallel arrays sorted by id.

    Attributes:
        ids: label value of each nucleus (int64).
        area_px: its area in pixels (int64).
        area_um2: its area in square microns, None when the pixel size is unknown.
        mean_intensity: mean of the intensity image over the nucleus (file units; the
            mean over channels for a multi-channel image).
        centroid_y: row of its centroid in pixels.
        centroid_x: column of its centroid in pixels.
    """

    ids: np.ndarray
    area_px: np.ndarray
    area_um2: np.ndarray | None
    mean_intensity: np.ndarray
    centroid_y: np.ndarray
    centroid_x: np.ndarray

    @property
    def count(self) -> int:
        """Number of nuclei."""
        return int(self.ids.size)

    def rows(self) -> list[dict]:
        """The table as JSON-ready dicts keyed by :data:`TABLE_COLUMNS` (``area_um2`` None when unknown)."""
        um2 = self.area_um2 if self.area_um2 is not None else [None] * self.count
        return [
            {
                "id": int(i),
                "area_px": int(a),
                "area_um2": None if u is None else float(u),
                "mean_intensity": float(m),
                "centroid_y": float(y),
                "centroid_x": float(x),
            }
            for i, a, u, m, y, x in zip(
                self.ids, self.area_px, um2, self.mean_intensity, self.centroid_y, self.centroid_x, strict=True
            )
        ]

    def to_csv(self) -> str:
        """The table as CSV text with a header row (``area_um2`` empty when the pixel size is unknown)."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(TABLE_COLUMNS)
        for row in self.rows():
            writer.writerow(
                [
                    row["id"],
                    row["area_px"],
                    "" if row["area_um2"] is None else f"{row['area_um2']:.6g}",
                    f"{row['mean_intensity']:.6g}",
                    f"{row['centroid_y']:.2f}",
                    f"{row['centroid_x']:.2f}",
                ]
            )
        return buf.getvalue()


def measure_nuclei(
    labels: np.ndarray,
    intensity: np.ndarray,
    *,
    pixel_size: float | tuple[float, float] | None = None,
) -> NucleusTable:
    """Measure every nucleus of an instance label image.

    Args:
        labels: HxW non-negative integer labels, 0 = background.
        intensity: HxW or HxWxC pixel values of the same image (any numeric dtype);
            channels are averaged per pixel.
        pixel_size: microns per pixel, one number or (y, x); None leaves ``area_um2`` None.

    Returns:
        A :class:`NucleusTable` sorted by id.

    Raises:
        ValueError: labels not 2-D integer, negative labels, an intensity image whose
            first two dimensions differ from the labels', or a non-positive pixel size.
    """
    labels = np.asarray(labels)
    intensity = np.asarray(intensity)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 2-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels must be non-negative, found {labels.min()}")
    if intensity.ndim not in (2, 3) or intensity.shape[:2] != labels.shape:
        raise ValueError(f"intensity of shape {intensity.shape} does not match labels of shape {labels.shape}")
    if not (np.issubdtype(intensity.dtype, np.number) or intensity.dtype == bool):
        raise ValueError(f"intensity must be numeric, got dtype {intensity.dtype}")
    pair = None
    if pixel_size is not None:
        pair = (float(pixel_size),) * 2 if np.isscalar(pixel_size) else tuple(float(v) for v in pixel_size)
        if len(pair) != 2 or not all(np.isfinite(v) and v > 0 for v in pair):
            raise ValueError(f"pixel_size must be a positive number or (y, x) pair in microns, got {pixel_size!r}")

    flat = labels.ravel().astype(np.int64, copy=False)
    values = intensity.astype(np.float64, copy=False)
    if values.ndim == 3:
        values = values.mean(axis=2)
    n = int(flat.max(initial=0)) + 1
    area = np.bincount(flat, minlength=n)
    ids = np.flatnonzero(area)
    ids = ids[ids > 0]
    height, width = labels.shape
    # one weight image at a time: the row/column index images are as large as the labels
    weights = (
        lambda: values,
        lambda: np.broadcast_to(np.arange(height, dtype=np.float64)[:, None], labels.shape),
        lambda: np.broadcast_to(np.arange(width, dtype=np.float64)[None, :], labels.shape),
    )
    sums = [np.bincount(flat, weights=w().ravel(), minlength=n)[ids] for w in weights]
    area_ids = area[ids].astype(np.int64)
    return NucleusTable(
        ids=ids.astype(np.int64),
        area_px=area_ids,
        area_um2=None if pair is None else area_ids * (pair[0] * pair[1]),
        mean_intensity=sums[0] / area_ids,
        centroid_y=sums[1] / area_ids,
        centroid_x=sums[2] / area_ids,
    )
