"""Nucleus outlines as a GeoJSON FeatureCollection, the format QuPath imports.

One feature per nucleus: a valid polygon (a multipolygon for a nucleus in pieces) in pixel coordinates (x right, y down, pixel ``(r, c)``
spans ``[c, c+1) x [r, r+1)`` as in QuPath; traced with OpenCV), with the properties QuPath reads
(``objectType: detection``, ``classification.name`` = the modality, ``measurements``)
plus ``label`` (the id in the label image), ``area_px`` and, when the pixel size is known,
``area_um2``. Features are written one at a time, so a whole slide's nuclei never sit in
memory together; the file appears under its name only when complete.

Example:
    >>> with GeoJSONWriter("slide.geojson", modality="he") as out:   # doctest: +SKIP
    ...     out.add(7, mask, (top, left))                             # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path

import numpy as np

from triageseg.datasets.atomic import atomic_path

# Tracing resolution (see mask_polygon).
_UP = 3
# QuPath draws classified objects in their class colour; one fixed colour per modality name.
_PALETTE = ((0, 200, 255), (255, 160, 0), (200, 0, 200), (0, 200, 0), (255, 60, 60))


def _trace(piece: np.ndarray, top: int, left: int) -> list[list[float]]:
    """The outer ring of one 4-connected, hole-free boolean crop (see :func:`mask_rings`)."""
    import cv2

    padded = cv2.copyMakeBorder(np.ascontiguousarray(piece, dtype=np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    fine = cv2.resize(padded, None, fx=_UP, fy=_UP, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(fine, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    ring = max(contours, key=len)[:, 0, :].astype(np.float64)
    # centre of a fine pixel, back in image pixels (pixel (r, c) spans [c, c+1) x [r, r+1))
    xy = (ring + 0.5) / _UP - 1.0 + np.array([left, top], np.float64)
    points = np.round(xy, 3).tolist()
    return points + [points[0]]


def mask_rings(mask: np.ndarray, top: int = 0, left: int = 0) -> list[list[list[float]]]:
    """Closed outlines ``[[x, y], ...]`` of a boolean mask, one per 4-connected piece, largest first.

    Each piece is traced with its holes filled, at 3x resolution (OpenCV, straight runs
    merged), so the outline runs 1/6 px inside the pixel edges: its area is within a few
    percent of the pixel count. Why pieces: pixels of one object that meet only at a
    corner would make one ring touch itself there, which is invalid geometry (shapely,
    QuPath and GIS tools reject or mangle it); a 4-connected piece without 4-connected
    holes has no such corner, and rings of different pieces stay 1/3 px apart.

    Args:
        mask: 2-D boolean crop of one object.
        top, left: where the crop lies in the image.

    Returns:
        The rings (first vertex repeated at the end); empty for an empty mask.
    """
    from scipy import ndimage

    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    pieces, n = ndimage.label(np.asarray(mask, bool))  # the default structure: 4-connected
    if n == 0:
        return []
    sizes = np.bincount(pieces.ravel(), minlength=n + 1)
    rings = []
    for index, region in sorted(enumerate(ndimage.find_objects(pieces), start=1), key=lambda t: -sizes[t[0]]):
        # background not 4-connected to the outside is a hole: filled, so no ring touches itself
        piece = ndimage.binary_fill_holes(pieces[region] == index)
        rings.append(_trace(piece, top + region[0].start, left + region[1].start))
    return rings


def mask_polygon(mask: np.ndarray, top: int = 0, left: int = 0) -> list[list[float]] | None:
    """The ring of the largest piece of a boolean mask (see :func:`mask_rings`), or None for an empty mask."""
    rings = mask_rings(mask, top, left)
    return rings[0] if rings else None


def mask_geometry(mask: np.ndarray, top: int = 0, left: int = 0) -> dict | None:
    """A valid GeoJSON geometry of a boolean mask: a Polygon, or a MultiPolygon when it has several pieces."""
    rings = mask_rings(mask, top, left)
    if not rings:
        return None
    if len(rings) == 1:
        return {"type": "Polygon", "coordinates": [rings[0]]}
    return {"type": "MultiPolygon", "coordinates": [[ring] for ring in rings]}


def write_geojson(path: str | os.PathLike, labels: np.ndarray, *, modality: str,
                  pixel_size: tuple[float, float] | None = None, image: str | None = None) -> Path:
    """Write the objects of an in-memory label image as a GeoJSON FeatureCollection (atomically)."""
    from scipy import ndimage

    labels = np.asarray(labels)
    with GeoJSONWriter(path, modality=modality, pixel_size=pixel_size, image=image) as out:
        for index, region in enumerate(ndimage.find_objects(labels.astype(np.int64, copy=False)), start=1):
            if region is not None:
                out.add(index, labels[region] == index, (region[0].start, region[1].start))
    return Path(path)


class GeoJSONWriter:
    """Write nucleus features one by one into a FeatureCollection file (atomic on close)."""

    def __init__(self, path: str | os.PathLike, *, modality: str, pixel_size: tuple[float, float] | None = None,
                 image: str | None = None):
        self.path = Path(path)
        self.modality = modality
        self.pixel_size = pixel_size
        self.count = 0
        self._image = image or self.path.stem
        self._colour = list(_PALETTE[sum(modality.encode()) % len(_PALETTE)])
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic_path(self.path))
        self._fh = self._stack.enter_context(open(tmp, "w", encoding="utf-8"))  # noqa: SIM115 - closed by the stack
        self._fh.write('{"type": "FeatureCollection", "features": [\n')

    def add(self, label: int, mask: np.ndarray, top_left: tuple[int, int], area: int | None = None) -> bool:
        """Add one nucleus from its boolean mask crop; returns False when it has no outline."""
        geometry = mask_geometry(mask, *top_left)
        if geometry is None:
            return False
        area = int(mask.sum()) if area is None else int(area)
        measurements: dict = {"label": int(label), "area_px": area}
        if self.pixel_size is not None:
            measurements["area_um2"] = round(area * self.pixel_size[0] * self.pixel_size[1], 4)
        feature = {
            "type": "Feature",
            # QuPath keeps object ids as UUIDs; derived from the image and label, so reruns agree
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"triageseg:{self._image}:{int(label)}")),
            "geometry": geometry,
            "properties": {
                "objectType": "detection",
                "name": f"nucleus {int(label)}",
                "classification": {"name": self.modality, "color": self._colour},
                "label": int(label),
                "area_px": area,
                "modality": self.modality,
                "measurements": measurements,
            },
        }
        self._fh.write((",\n" if self.count else "") + json.dumps(feature, separators=(",", ":")))
        self.count += 1
        return True

    def close(self) -> None:
        """Finish the collection and move the file into place."""
        self._fh.write("\n]}\n")
        self._stack.close()

    def abort(self) -> None:
        """Drop the partial file (the destination is left as it was)."""
        with contextlib.suppress(Exception):
            self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self) -> GeoJSONWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
