"""Huge images without loading them: TIFF / BigTIFF / OME-TIFF / SVS read region by region.

:class:`LazyImage` opens one pyramid level of a TIFF and reads only the tiles a region
needs (tifffile's zarr store, or a memory map for uncompressed contiguous data), so a
whole-slide image of 100k x 100k pixels is opened in milliseconds and read block by
block. It looks like a NumPy array of shape HxW or HxWxC (channels last): slicing
``image[y0:y1, x0:x1]`` returns the pixels of that region in the file's dtype.

Files that cannot be read in bounded memory are refused with a message naming them:
truncated files (tile data past the end of the file) and non-tiled files whose strips
are too large to decode one at a time.

Example:
    >>> with LazyImage("slide.svs", level=1) as image:      # doctest: +SKIP
    ...     image.shape, image.dtype, image.pixel_size       # doctest: +SKIP
    ...     patch = image[1000:1512, 2000:2512]              # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from triageseg.datasets.errors import DataError

# A non-tiled file is read one strip at a time; a strip larger than this (a one-strip
# 16000 x 16000 RGB image is 768 MiB) would break the memory bound of the block path.
MAX_CHUNK_BYTES = 64 * 2**20
_TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".tf8")
_CHANNEL_AXES = ("S", "C")


class LazyImage:
    """One pyramid level of a TIFF file, read region by region.

    Attributes:
        path: the file.
        level: the pyramid level (0 = full resolution).
        shape: ``(H, W)`` or ``(H, W, C)``, channels last.
        dtype: pixel dtype of the file.
        levels: ``(H, W)`` of every pyramid level in the file.
        pixel_size: microns per pixel ``(y, x)`` at this level, or None.
        tiled: whether the level is stored in tiles (else strips or contiguous).
    """

    def __init__(self, path: str | os.PathLike, *, level: int = 0, max_chunk_bytes: int | None = None):
        import tifffile

        self.path = Path(path)
        self.level = int(level)
        if not self.path.is_file():
            raise DataError(self.path, "no such file" if not self.path.exists() else "not a file")
        if self.path.stat().st_size == 0:
            raise DataError(self.path, "empty file (0 bytes)")
        try:
            self._tif = tifffile.TiffFile(self.path)
        except Exception as err:  # noqa: BLE001 - tifffile raises several error types for corrupt files
            raise DataError(self.path, f"cannot read TIFF (truncated or corrupt?): {err}") from None
        try:
            self._open(MAX_CHUNK_BYTES if max_chunk_bytes is None else int(max_chunk_bytes))
        except BaseException:
            self._tif.close()
            raise

    def _open(self, max_chunk_bytes: int) -> None:
        tif = self._tif
        if not tif.series:
            raise DataError(self.path, "TIFF file contains no image")
        series = tif.series[0]
        levels = series.levels
        self.levels = [_yx(self.path, lvl.axes, lvl.shape) for lvl in levels]
        if not 0 <= self.level < len(levels):
            raise DataError(
                self.path,
                f"pyramid level {self.level} requested; the file has level(s) 0..{len(levels) - 1} "
                f"of sizes {', '.join(f'{h}x{w}' for h, w in self.levels)}",
            )
        lvl = levels[self.level]
        self._axes, self._order = _layout(self.path, lvl.axes, lvl.shape)
        self.dtype = np.dtype(lvl.dtype).newbyteorder("=")
        if self.dtype.kind not in "biuf":
            raise DataError(self.path, f"unsupported pixel dtype {self.dtype}; expected integer or float")
        self._full_shape = tuple(int(n) for n in lvl.shape)
        self.shape = tuple(self._full_shape[i] for i in self._order)
        _check_complete(self.path, lvl.pages)
        page = lvl.keyframe
        self.tiled = bool(page.is_tiled)
        offset = lvl.dataoffset
        if offset is not None and not page.is_tiled:
            # uncompressed contiguous strips: the OS pages in only what a region touches
            order = tif.byteorder
            self._array = np.memmap(self.path, dtype=self.dtype.newbyteorder(order), mode="r", offset=offset,
                                    shape=tuple(lvl.shape))
        else:
            chunk_bytes = math.prod(page.chunks) * self.dtype.itemsize
            if not page.is_tiled and chunk_bytes > max_chunk_bytes:
                raise DataError(
                    self.path,
                    f"not tiled: the image is stored in compressed strips of {page.rowsperstrip} rows "
                    f"({chunk_bytes / 2**20:.0f} MiB each), which cannot be read block by block in bounded "
                    "memory; save it as a tiled TIFF (e.g. tifffile.imwrite(path, data, tile=(512, 512)), "
                    "vips tiffsave --tile, or bfconvert)",
                )
            import zarr

            self._array = zarr.open(series.aszarr(level=self.level), mode="r")
        self.pixel_size = _pixel_size(self.path, tif, self.levels[0], self.levels[self.level])

    @property
    def ndim(self) -> int:
        """2 for HxW, 3 for HxWxC."""
        return len(self.shape)

    def __getitem__(self, key) -> np.ndarray:
        """Pixels of ``image[y0:y1, x0:x1]`` (two slices with step 1), channels last."""
        data = read_region(self._array, key, axes=self._axes, full_shape=self._full_shape, shape=self.shape,
                           yx="YX", name=self.path, where=self.path)
        return np.ascontiguousarray(data, dtype=self.dtype.newbyteorder("="))

    def close(self) -> None:
        """Close the file (the lazy array cannot be read afterwards)."""
        self._array = None
        self._tif.close()

    def __enter__(self) -> LazyImage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LazyImage({str(self.path)!r}, level={self.level}, shape={self.shape}, dtype={self.dtype})"


def _yx(path: Path, axes: str, shape) -> tuple[int, int]:
    if "Y" not in axes or "X" not in axes:
        raise DataError(path, f"image has no Y/X plane (axes {axes!r}, shape {tuple(shape)})")
    return int(shape[axes.index("Y")]), int(shape[axes.index("X")])


def _layout(path: Path, axes: str, shape) -> tuple[str, list[int]]:
    """Check the axes of a level; return them and the axis order Y, X[, C] of the non-singleton ones."""
    if len(axes) != len(shape):
        raise DataError(path, f"cannot interpret axes {axes!r} for shape {tuple(shape)}")
    _yx(path, axes, shape)
    other = [ax for ax, n in zip(axes, shape) if ax not in "YX" and n > 1]
    if len(other) > 1 or (other and other[0] not in _CHANNEL_AXES):
        raise DataError(
            path,
            f"3-D stack, time series or unlabelled pages are not read block-wise (axes {axes!r}, shape "
            f"{tuple(shape)}); save one 2-D plane (YX, optionally with a colour/channel axis) per file",
        )
    order = [axes.index("Y"), axes.index("X")] + ([axes.index(other[0])] if other else [])
    return axes, order


def _check_complete(path: Path, pages) -> None:
    """Refuse a file whose tile or strip data run past its end (a cut-off download or copy)."""
    size = path.stat().st_size
    for page in pages:
        if page is None:
            continue
        offsets = np.asarray(page.dataoffsets, np.int64)
        counts = np.asarray(page.databytecounts, np.int64)
        if offsets.size == 0:
            continue
        end = int((offsets + counts)[counts > 0].max(initial=0))
        if end > size:
            missing = int(((offsets + counts) > size).sum())
            raise DataError(
                path,
                f"truncated TIFF: the image data end at byte {end:,} but the file has {size:,} bytes "
                f"({missing} of {offsets.size} tiles/strips missing)",
            )


_MPP = re.compile(r"\bMPP\s*=\s*([0-9.eE+-]+)")


def _pixel_size(path: Path, tif, full: tuple[int, int], this: tuple[int, int]) -> tuple[float, float] | None:
    """Microns per pixel at a level: OME PhysicalSize, Aperio MPP, else the resolution tags."""
    from triageseg.datasets.io import read_pixel_size

    base: tuple[float, float] | None = None
    if tif.is_ome and tif.ome_metadata:
        base = _ome_pixel_size(tif.ome_metadata)
    if base is None and tif.is_svs:
        match = _MPP.search(tif.pages[0].description or "")
        if match and float(match.group(1)) > 0:
            base = (float(match.group(1)), float(match.group(1)))
    if base is None:
        base = read_pixel_size(path)
    if base is None:
        return None
    return base[0] * full[0] / this[0], base[1] * full[1] / this[1]


_OME_UNITS = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _ome_pixel_size(xml: str) -> tuple[float, float] | None:
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for element in root.iter():
        if element.tag.endswith("Pixels"):
            values = []
            for ax in ("Y", "X"):
                size = element.attrib.get(f"PhysicalSize{ax}")
                unit = _OME_UNITS.get(element.attrib.get(f"PhysicalSize{ax}Unit", "µm"))
                if size is None or unit is None:
                    return None
                values.append(float(size) * unit)
            return (values[0], values[1]) if all(v > 0 and math.isfinite(v) for v in values) else None
    return None


def image_size(path: str | os.PathLike, *, level: int = 0) -> tuple[int, int] | None:
    """``(H, W)`` of an image from its header only (TIFF at ``level``, PNG, JPEG), or None if unknown.

    None means "read it to find out": the in-memory reader then reports any problem.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".zarr":
            from triageseg.datasets.omezarr import OmeZarrImage

            return OmeZarrImage(path, level=level).levels[level]
        if suffix in _TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                levels = tif.series[0].levels
                if not 0 <= level < len(levels):
                    return None
                return _yx(path, levels[level].axes, levels[level].shape)
        with path.open("rb") as fh:
            head = fh.read(1 << 16)
        if suffix == ".png" and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
            return int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big")
        if suffix in (".jpg", ".jpeg"):
            return _jpeg_size(head)
    except (OSError, ValueError, IndexError, DataError):
        return None
    except Exception:  # noqa: BLE001 - tifffile errors on a corrupt header: let the full reader report it
        return None
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Height and width from the first start-of-frame marker of a JPEG header."""
    pos = 2
    while pos + 9 < len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return int.from_bytes(data[pos + 5 : pos + 7], "big"), int.from_bytes(data[pos + 7 : pos + 9], "big")
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


def is_tiff(path: str | os.PathLike) -> bool:
    """Whether ``path`` has a TIFF-family extension that :class:`LazyImage` reads."""
    return Path(path).suffix.lower() in _TIFF_SUFFIXES


def read_region(array, key, *, axes: str | Sequence[str], full_shape: Sequence[int], shape: Sequence[int],
                yx: str, name, where) -> np.ndarray:
    """``array[y0:y1, x0:x1]`` of a lazily read N-d ``array`` whose axes are named ``axes``, channels last.

    ``yx`` names the row and column axes (``"YX"`` for tifffile's series, ``"yx"`` for NGFF);
    every other axis of length 1 is dropped and the rest (channels) moved last. ``name`` is
    what a bad index names, ``where`` what a chunk that fails to decode names.
    """
    if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, slice) for k in key)):
        raise ValueError(f"{name}: index a lazy image with two slices [y0:y1, x0:x1], got {key!r}")
    spans = [k.indices(n) for k, n in zip(key, shape[:2])]
    if any(step != 1 for _, _, step in spans):
        raise ValueError(f"{name}: lazy reads take slices with step 1, got {key!r}")
    (y0, y1, _), (x0, x1, _) = spans
    y_ax, x_ax = yx
    index = []
    for ax, n in zip(axes, full_shape):
        if ax == y_ax:
            index.append(slice(y0, max(y0, y1)))
        elif ax == x_ax:
            index.append(slice(x0, max(x0, x1)))
        else:
            index.append(slice(None) if n > 1 else 0)
    try:
        data = np.asarray(array[tuple(index)])
    except Exception as err:  # noqa: BLE001 - a tile or chunk that fails to decode
        raise DataError(where, f"cannot read region {key!r} (truncated or corrupt chunk?): {err}") from None
    kept = [ax for ax, n in zip(axes, full_shape) if ax in yx or n > 1]
    order = [kept.index(y_ax), kept.index(x_ax)] + [i for i, ax in enumerate(kept) if ax not in yx]
    return np.transpose(data, order)
