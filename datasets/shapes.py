"""The height and width of an image file from its header, without decoding the pixels.

A resumed batch run checks each existing output against its input's shape; decoding
every input again just to learn its size would cost as much as reading the whole
collection, so TIFF, PNG and JPEG headers are read instead.

Example:
    >>> image_shape("cells.png")                        # doctest: +SKIP
    (520, 696)
"""

from __future__ import annotations

import os
from pathlib import Path


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (SOF0-SOF15 without DHT 0xC4, JPG 0xC8 and DAC 0xCC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def image_shape(path: str | os.PathLike, *, page: int | None = None) -> tuple[int, int]:
    """(height, width) of the image ``read_image(path, page=page)`` would return.

    Falls back to reading the image when the header does not tell (unusual TIFF layouts).

    Raises:
        DataError: the file cannot be read (as for ``read_image``).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    shape = None
    try:
        if suffix in (".tif", ".tiff"):
            shape = _tiff_shape(path)
        elif suffix == ".png":
            shape = _png_shape(path)
        elif suffix in (".jpg", ".jpeg"):
            shape = _jpeg_shape(path)
    except (OSError, ValueError):
        shape = None
    if shape is None:
        from triageseg.datasets.io import read_image_raw

        return tuple(read_image_raw(path, page=page, pages_as_channels=True).shape[:2])  # type: ignore[return-value]
    return shape


def _tiff_shape(path: Path) -> tuple[int, int] | None:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes, shape = series.axes, series.shape
    except Exception:  # noqa: BLE001 - tifffile raises many types; the full read names the problem
        return None
    if "Y" not in axes or "X" not in axes or len(axes) != len(shape):
        return None
    return int(shape[axes.index("Y")]), int(shape[axes.index("X")])


def _png_shape(path: Path) -> tuple[int, int] | None:
    with path.open("rb") as fh:
        head = fh.read(24)
    if len(head) < 24 or not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return (height, width) if height and width else None


def _jpeg_shape(path: Path) -> tuple[int, int] | None:
    with path.open("rb") as fh:
        if fh.read(2) != b"\xff\xd8":
            return None
        while True:
            byte = fh.read(1)
            while byte == b"\xff":  # fill bytes before the marker code
                byte = fh.read(1)
            if not byte:
                return None
            marker = byte[0]
            if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length field
                continue
            length = fh.read(2)
            if len(length) < 2:
                return None
            size = int.from_bytes(length, "big")
            if marker in _SOF_MARKERS:
                frame = fh.read(5)  # precision, height, width
                if len(frame) < 5:
                    return None
                height, width = int.from_bytes(frame[1:3], "big"), int.from_bytes(frame[3:5], "big")
                return (height, width) if height and width else None
            if marker in (0xD9, 0xDA):  # end of image or scan data before any frame header
                return None
            fh.seek(size - 2, os.SEEK_CUR)
            if fh.read(1) != b"\xff":
                return None

