"""What an image file holds, read from its header without decoding the pixels.

:func:`read_header` gives the width, height, planes and sample layout of a PNG (IHDR),
JPEG (start-of-frame) or TIFF (tags, through tifffile, no tile or strip decoded), so a
caller can refuse a decompression bomb (a few hundred KB that decode to gigabytes) before
it is decoded. :func:`png_stream_problem` checks a PNG's chunk structure, CRCs and
compressed rows with bounded memory; libpng, inside imagecodecs, keeps its output buffer
for good when it fails half way, so a PNG is checked before it is handed to it.

Example:
    >>> header = read_header("slide.png")                     # doctest: +SKIP
    >>> header.width, header.height, header.pixels            # doctest: +SKIP
    (30000, 30000, 900000000)
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from triageseg.datasets.errors import DataError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# colour type -> samples per pixel in the file (a palette index is one sample)
_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
# Adam7 passes: (x0, y0, dx, dy)
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_INFLATE_STEP = 1 << 20  # decompressed bytes per step: the check never holds more


@dataclass(frozen=True)
class ImageHeader:
    """The pixel layout a file declares.

    Attributes:
        width, height: plane size in pixels.
        planes: planes of the first series (pages, z, t; 1 for PNG and JPEG).
        samples: values per pixel once decoded (3 for a palette PNG).
        bytes_per_sample: 1, 2, 4 or 8.
    """

    width: int
    height: int
    planes: int = 1
    samples: int = 1
    bytes_per_sample: int = 1

    @property
    def pixels(self) -> int:
        """Pixels of every plane together."""
        return self.width * self.height * self.planes

    @property
    def decoded_bytes(self) -> int:
        """Bytes of the decoded array."""
        return self.pixels * self.samples * self.bytes_per_sample


def _png_header(head: bytes, tail: bytes, size: int, path: Path) -> ImageHeader:
    def bad(problem: str) -> DataError:
        return DataError(path, f"cannot decode PNG image: {problem}")

    if not head.startswith(PNG_SIGNATURE):
        raise bad("not a PNG file (no PNG signature at the start)")
    if b"IEND" not in tail:
        raise bad(f"truncated PNG ({size} bytes, no IEND chunk at the end)")
    if len(head) < 33 or head[12:16] != b"IHDR":
        raise bad("corrupt PNG (no IHDR header chunk at the start)")
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    if colour not in _PNG_SAMPLES or depth not in _PNG_DEPTHS[colour]:
        raise bad(f"corrupt PNG (bit depth {depth} with colour type {colour} is not valid)")
    samples = 3 if colour == 3 else _PNG_SAMPLES[colour]
    return ImageHeader(width, height, 1, samples, 2 if depth == 16 else 1)


def _jpeg_header(fh, path: Path) -> ImageHeader:
    """Follow the JPEG segments (seeking past each by its length) to the start-of-frame header."""
    def bad(problem: str) -> DataError:
        return DataError(path, f"cannot decode JPEG image: {problem}")

    if fh.read(2) != b"\xff\xd8":
        raise bad("not a JPEG file (no start-of-image marker)")
    while True:
        marker = fh.read(2)
        while len(marker) == 2 and marker[0] == 0xFF and marker[1] == 0xFF:  # fill bytes
            marker = marker[1:] + fh.read(1)
        if len(marker) < 2 or marker[0] != 0xFF or marker[1] in (0xD9, 0xDA):
            raise bad("corrupt JPEG (no frame header with the image size before the image data)")
        code = marker[1]
        if code in (0x01, 0xD8) or 0xD0 <= code <= 0xD7:  # markers without a length
            continue
        segment = fh.read(2)
        if len(segment) < 2:
            raise bad("truncated JPEG (the data stops inside its header)")
        length = struct.unpack(">H", segment)[0]
        # start of frame: every SOFn except DHT (C4), JPG (C8) and DAC (CC)
        if 0xC0 <= code <= 0xCF and code not in (0xC4, 0xC8, 0xCC):
            frame = fh.read(6)
            if len(frame) < 6:
                raise bad("truncated JPEG (the data stops inside its frame header)")
            precision, height, width, comps = struct.unpack(">BHHB", frame)
            if height == 0 or width == 0:
                raise bad(f"unsupported JPEG (the frame header declares {width} x {height} pixels)")
            return ImageHeader(width, height, 1, comps, 2 if precision > 8 else 1)
        fh.seek(length - 2, os.SEEK_CUR)


def _tiff_header(path: Path) -> tuple[ImageHeader, list[str]]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise DataError(path, "TIFF file contains no image")
            series = tif.series[0]
            shape, axes = series.shape, series.axes
            itemsize = np.dtype(series.dtype).itemsize
            notes = _shared_offsets(series.pages)
    except DataError:
        raise
    except Exception as err:  # tifffile raises several error types for corrupt files
        raise DataError(path, f"cannot read TIFF (truncated or corrupt?): {err}") from None
    dims = dict(zip(axes, shape))
    if "Y" not in dims or "X" not in dims:
        raise DataError(path, f"TIFF series without Y and X axes (axes {axes!r})")
    samples = math.prod(size for ax, size in dims.items() if ax in "SC")
    planes = math.prod(size for ax, size in dims.items() if ax not in "YXSC")
    return ImageHeader(dims["X"], dims["Y"], planes, samples, itemsize), notes


def _shared_offsets(pages, limit: int = 4096) -> list[str]:
    """Notes on pages whose non-empty tiles or strips share one data offset (at most ``limit`` pages looked at)."""
    notes = []
    for index, page in enumerate(pages):
        if index >= limit or page is None:
            break
        keyframe = getattr(page, "keyframe", page)
        offsets = [o for o, c in zip(getattr(page, "dataoffsets", ()), getattr(page, "databytecounts", ())) if c > 0]
        if len(set(offsets)) < len(offsets):
            kind = "tiles" if getattr(keyframe, "is_tiled", False) else "strips"
            notes.append(f"page {index}: {len(offsets)} {kind} point at {len(set(offsets))} distinct data offsets")
    return notes


def read_header(path: str | os.PathLike) -> tuple[ImageHeader, list[str]]:
    """The pixel layout of an image file, from its header only, and notes on a suspicious layout.

    Args:
        path: a PNG, JPEG or TIFF file (the extension decides how it is read).

    Returns:
        ``(header, notes)``; ``notes`` lists TIFF pages whose tiles or strips reuse one
        another's data (the same compressed bytes decoded again and again: no real writer
        does that, a decompression bomb does).

    Raises:
        DataError: an empty, unreadable or unsupported file, named.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".png", ".jpg", ".jpeg", ".tif", ".tiff"):
        raise DataError(path, f"unsupported image extension {suffix!r}; expected one of .png, .tif, .tiff, .jpg, .jpeg")
    try:
        size = path.stat().st_size
        if size == 0:
            raise DataError(path, "empty file (0 bytes)")
        if suffix in (".tif", ".tiff"):
            return _tiff_header(path)
        with path.open("rb") as fh:
            if suffix != ".png":
                return _jpeg_header(fh, path), []
            head = fh.read(64)
            fh.seek(max(0, size - 64))
            return _png_header(head, fh.read(64), size, path), []
    except OSError as err:
        raise DataError(path, f"cannot read file ({err.strerror or err})") from None


class _Rows:
    """Walks the decompressed rows of a PNG, checking each row's filter byte (0-4)."""

    def __init__(self, width: int, height: int, bits_per_pixel: int, interlaced: bool):
        passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
        self.layout = []  # (rows, bytes per row incl. the filter byte) of each non-empty pass
        for x0, y0, dx, dy in passes:
            cols, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
            if cols > 0 and rows > 0:
                self.layout.append((rows, 1 + (cols * bits_per_pixel + 7) // 8))
        self.pass_index, self.rows_left, self.need = -1, 0, 0

    @property
    def done(self) -> bool:
        return self.need == 0 and self.rows_left == 0 and self.pass_index >= len(self.layout) - 1

    def feed(self, buf: bytes) -> str | None:
        """Check the next decompressed bytes; a problem, or None. Bytes past the last row are ignored."""
        i, n = 0, len(buf)
        view = np.frombuffer(buf, np.uint8)
        while i < n:
            if self.need:
                take = min(self.need, n - i)
                i, self.need = i + take, self.need - take
                continue
            if self.rows_left == 0:
                if self.pass_index >= len(self.layout) - 1:
                    return None  # extra data after the image: libpng ignores it
                self.pass_index += 1
                self.rows_left = self.layout[self.pass_index][0]
            stride = self.layout[self.pass_index][1]
            count = min(self.rows_left, -(-(n - i) // stride))
            filters = view[i:i + (count - 1) * stride + 1:stride]
            if int(filters.max()) > 4:
                return f"corrupt PNG (row filter type {int(filters.max())}, valid are 0-4)"
            last = i + (count - 1) * stride
            self.rows_left -= count
            self.need = stride - min(stride, n - last)
            i = last + min(stride, n - last)
        return None


def png_stream_problem(data: bytes) -> str | None:
    """Why a PNG byte string would fail to decode, or None: chunk lengths, CRCs, compressed rows.

    Inflates the image data in steps of 1 MB without keeping it, so the check costs one
    pass of zlib and no memory for the pixels.
    """
    if not data.startswith(PNG_SIGNATURE):
        return "not a PNG file (no PNG signature at the start)"
    truncated = f"truncated PNG ({len(data)} bytes, no IEND chunk at the end)"
    if b"IEND" not in data[-64:]:
        return truncated
    pos, rows, palette = 8, None, False
    inflater = zlib.decompressobj()
    while True:
        if pos + 12 > len(data):
            return truncated
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 12 + length
        if end > len(data):
            return truncated
        body = data[pos + 8:end - 4]
        if zlib.crc32(kind + body) != struct.unpack(">I", data[end - 4:end])[0]:
            return f"corrupt PNG (the {kind.decode('latin-1')!r} chunk at byte {pos} fails its CRC check)"
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body[:13])
            if colour not in _PNG_SAMPLES or depth not in _PNG_DEPTHS[colour]:
                return f"corrupt PNG (bit depth {depth} with colour type {colour} is not valid)"
            if not width or not height:
                return f"corrupt PNG (the header declares {width} x {height} pixels)"
            rows = _Rows(width, height, depth * _PNG_SAMPLES[colour], interlace == 1)
            needs_palette = colour == 3
        elif kind == b"PLTE":
            palette = True
        elif kind == b"IDAT":
            if rows is None:
                return "corrupt PNG (image data before the IHDR header)"
            if needs_palette and not palette:
                return "corrupt PNG (a palette image without its PLTE palette)"
            problem = _inflate_rows(inflater, body, rows)
            if problem:
                return problem
        elif kind == b"IEND":
            break
        pos = end
    if rows is None or not rows.done:
        return "corrupt PNG (the image data ends before the last row)"
    return None


def _inflate_rows(inflater, chunk: bytes, rows: _Rows) -> str | None:
    pending = chunk
    try:
        while pending and not inflater.eof:
            out = inflater.decompress(pending, _INFLATE_STEP)
            pending = inflater.unconsumed_tail
            problem = rows.feed(out)
            if problem:
                return problem
    except zlib.error as err:
        return f"corrupt PNG (the compressed image data is damaged: {err})"
    return None


__all__ = ["ImageHeader", "PNG_SIGNATURE", "png_stream_problem", "read_header"]
