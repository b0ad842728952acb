"""Open a triageseg output folder (``segment --out``) in napari: one Labels layer per image.

A folder is recognised by its ``routing.csv``. Each row's label image becomes a Labels layer
``<name> labels`` with the row's modality, confidence, model used and decision in its
metadata, scaled by the pixel size stored in the TIFF; the input image it was made from is
opened beneath it when that file is still where ``routing.csv`` says.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path

ROUTING_CSV = "routing.csv"


def _folder(path) -> Path | None:
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    path = Path(path)
    if path.name == ROUTING_CSV and path.is_file():
        path = path.parent
    return path if (path / ROUTING_CSV).is_file() else None


def get_reader(path: str | os.PathLike | list) -> Callable | None:
    """napari reader hook: a reader for a triageseg output folder (or its routing.csv), else None."""
    folder = _folder(path)
    if folder is None:
        return None
    return lambda _path: read_output_folder(folder)


def _metadata(row: dict, folder: Path) -> dict:
    confidence = row.get("confidence", "")
    objects = row.get("objects", "")
    return {
        "modality": row.get("modality", ""),
        "confidence": float(confidence) if confidence else None,
        "used_model": row.get("used_model", ""),
        "decision": row.get("decision", ""),
        "count": int(objects) if objects.isdigit() else None,
        "source_file": row.get("file", ""),
        "output_folder": str(folder),
    }


def read_output_folder(folder: str | os.PathLike) -> list[tuple]:
    """Layer data tuples for every row of ``folder/routing.csv`` whose label image exists.

    Returns:
        ``(data, kwargs, layer_type)`` tuples: for each row the source image (when found)
        as ``"image"``, then its labels as ``"labels"``.

    Raises:
        DataError: an unreadable routing.csv or label image, naming the file.
    """
    from triageseg.datasets.errors import DataError
    from triageseg.datasets.io import read_image_raw, read_labels, read_pixel_size

    folder = Path(folder)
    table = folder / ROUTING_CSV
    try:
        with table.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        raise DataError(table, f"cannot read the routing table: {err}") from None
    layers: list[tuple] = []
    for row in sorted(rows, key=lambda r: r.get("output", "")):
        output = folder / Path(row.get("output", "")).name
        if not row.get("output") or not output.is_file():
            continue
        name = Path(output.name).stem
        pixel_size = read_pixel_size(output)
        placement = {} if pixel_size is None else {"scale": pixel_size}
        source = Path(row.get("file", ""))
        if row.get("file") and source.is_file():
            try:
                layers.append((read_image_raw(source), {"name": name, **placement}, "image"))
            except DataError:
                pass  # the labels still open; the input has changed since
        meta = _metadata(row, folder)
        layers.append((read_labels(output), {"name": f"{name} labels", "metadata": meta, **placement}, "labels"))
    return layers
