"""A JSON record stored inside a label TIFF: how its labels were made (e.g. its routing.csv row).

Kept in a private TIFF tag (:data:`RECORD_TAG`, >= 32768 and unregistered, so readers skip
it) as ASCII JSON. Being in the label file itself, it is written, renamed into place and
lost together with the pixels: a label file never has another file's record.
"""

from __future__ import annotations

import json
import os

RECORD_TAG = 65420


def record_tags(record: dict | None) -> list[tuple]:
    """tifffile ``extratags`` that store ``record`` (none for None)."""
    if record is None:
        return []
    return [(RECORD_TAG, "s", 0, json.dumps(record, sort_keys=True, ensure_ascii=True, default=str), True)]


def read_record(path: str | os.PathLike) -> dict | None:
    """The record stored in a label file (:func:`~triageseg.datasets.io.write_labels`, the pyramid writer); None without one."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            tag = tif.pages[0].tags.get(RECORD_TAG)
            text = None if tag is None else tag.value
        record = json.loads(text) if isinstance(text, str) else None
    except Exception:  # noqa: BLE001 - unreadable or not a TIFF: no record
        return None
    return record if isinstance(record, dict) else None
