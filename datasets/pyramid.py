"""Streaming label images of any size to a tiled, pyramidal OME-TIFF (napari, Fiji, QuPath).

The image is never held whole: :func:`write_pyramid` asks a reader for one strip of
rows at a time (``tile`` rows, full width) and hands tifffile one tile at a time. Level 0
is the full resolution; each further level halves both sides by taking every other pixel
of the level above (nearest neighbour, so label ids stay ids; kept on disk in between)
and is stored as a SubIFD of level 0, the OME-TIFF pyramid layout that Bio-Formats
(Fiji, QuPath) and tifffile (napari) read.
A file over 2 GiB of pixels is written as BigTIFF. The file is written under a temporary
name and renamed when complete.

Example:
    >>> write_pyramid("labels.tif", (40000, 30000), np.uint32, read_rows, pixel_size=0.25)  # doctest: +SKIP
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from triageseg.datasets.atomic import atomic_path

DEFAULT_TILE = 512
# Levels are added until the longer side fits in this many pixels.
_SMALLEST = 1024

RowReader = Callable[[int, int], np.ndarray]  # (y0, y1) -> rows y0:y1 of the full-resolution image


def pyramid_shapes(shape: tuple[int, int], *, smallest: int = _SMALLEST) -> list[tuple[int, int]]:
    """(H, W) of each level: full size, then halved (rounding up) until the longer side is <= ``smallest``."""
    shapes = [(int(shape[0]), int(shape[1]))]
    while max(shapes[-1]) > smallest:
        h, w = shapes[-1]
        shapes.append((math.ceil(h / 2), math.ceil(w / 2)))
    return shapes


class _Scratch:
    """Strips of the next pyramid level, kept on disk (zstd) until that level is written."""

    def __init__(self, folder: Path):
        self.folder = folder

    def save(self, level: int, k: int, strip: np.ndarray) -> None:
        import imagecodecs

        buf = io.BytesIO()
        np.save(buf, strip)
        (self.folder / f"{level}_{k}.npy.zst").write_bytes(imagecodecs.zstd_encode(buf.getvalue(), level=1))

    def load(self, level: int, k: int) -> np.ndarray | None:
        import imagecodecs

        path = self.folder / f"{level}_{k}.npy.zst"
        if not path.is_file():
            return None
        data = imagecodecs.zstd_decode(path.read_bytes())
        path.unlink()
        return np.load(io.BytesIO(data))


def _strips(read_rows: RowReader, scratch: _Scratch, level: int, shape: tuple[int, int], tile: int) -> Iterator[np.ndarray]:
    """Strips of ``tile`` rows of one level: read for level 0, else two halved strips of the level above."""
    h, w = shape
    for k, ty in enumerate(range(0, h, tile)):
        if level == 0:
            strip = np.asarray(read_rows(ty, min(h, ty + tile)))
        else:
            parts = [p for p in (scratch.load(level, 2 * k), scratch.load(level, 2 * k + 1)) if p is not None]
            strip = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if strip.shape != (min(tile, h - ty), w):
            raise ValueError(f"level {level} strip {k}: got shape {strip.shape}, expected {(min(tile, h - ty), w)}")
        yield strip


def _tiles(strips: Iterator[np.ndarray], scratch: _Scratch, level: int, more: bool, tile: int,
           dtype: np.dtype) -> Iterator[np.ndarray]:
    """Tiles in row-major order (what tifffile expects); each strip, halved, is kept for the next level."""
    for k, strip in enumerate(strips):
        strip = strip.astype(dtype, copy=False)
        if more:
            scratch.save(level + 1, k, strip[::2, ::2])
        for tx in range(0, strip.shape[1], tile):
            yield np.ascontiguousarray(strip[:, tx : tx + tile])


def write_pyramid(
    path: str | os.PathLike,
    shape: tuple[int, int],
    dtype,
    read_rows: RowReader,
    *,
    tile: int = DEFAULT_TILE,
    pixel_size: float | tuple[float, float] | None = None,
    name: str = "labels",
    record: dict | None = None,
) -> Path:
    """Write a label image given by a row reader as a tiled pyramidal OME-TIFF, atomically.

    Args:
        path: destination (.tif / .ome.tif).
        shape: (H, W) of the full-resolution image.
        dtype: uint16 or uint32 (what the ids need).
        read_rows: ``(y0, y1) -> array`` of rows ``y0:y1`` of the full-resolution image,
            called once per strip of ``tile`` rows, top to bottom. Each further level is
            made from the one above it (kept on disk beside ``path`` while writing).
        tile: tile side (multiple of 16).
        pixel_size: microns per pixel at full resolution, one number or (y, x).
        name: image name stored in the OME metadata.
        record: JSON-ready facts stored in level 0 (:mod:`triageseg.datasets.tiffrecord`).

    Returns:
        The path written. The file's content depends only on its pixels and arguments
        (no time stamps; the OME UUID is derived from the content parameters).
    """
    import tifffile
    from triageseg.datasets.io import _pixel_size_pair
    from triageseg.datasets.tiffrecord import record_tags

    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
        raise ValueError(f"dtype must be uint16 or uint32, got {dtype}")
    if tile < 16 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16, got {tile}")
    shapes = pyramid_shapes(shape)
    pair = _pixel_size_pair(pixel_size)
    metadata: dict = {"axes": "YX", "Name": name}
    common: dict = {"tile": (tile, tile), "compression": "zlib", "photometric": "minisblack", "dtype": dtype}
    if pair is not None:
        metadata.update(PhysicalSizeY=pair[0], PhysicalSizeX=pair[1], PhysicalSizeYUnit="µm", PhysicalSizeXUnit="µm")
    # a fixed UUID for fixed content parameters: a rerun (or a resumed run) writes the same bytes
    metadata["UUID"] = "urn:uuid:" + str(uuid.uuid5(uuid.NAMESPACE_URL, f"triageseg:{name}:{shape}:{dtype}:{pair}"))
    bigtiff = shape[0] * shape[1] * dtype.itemsize > 2**31
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.levels.") as td, \
            tifffile.TiffWriter(tmp, bigtiff=bigtiff, ome=True) as tw:
        scratch = _Scratch(Path(td))
        for level, level_shape in enumerate(shapes):
            step = 2**level
            kwargs = dict(common)
            if pair is not None:
                kwargs.update(resolution=(1e4 / (pair[1] * step), 1e4 / (pair[0] * step)), resolutionunit="CENTIMETER")
            if level == 0:
                kwargs.update(subifds=len(shapes) - 1, metadata=metadata, extratags=record_tags(record))
            else:
                kwargs.update(subfiletype=1, metadata=None)
            strips = _strips(read_rows, scratch, level, level_shape, tile)
            tw.write(_tiles(strips, scratch, level, level + 1 < len(shapes), tile, dtype), shape=level_shape, **kwargs)
    return path
