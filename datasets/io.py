"""Image and label I/O: any microscopy image in, float32 HxWx3 in [0, 1] out.

Images are read with tifffile (TIFF) and imagecodecs (PNG, JPEG) and normalised per
image by percentiles over all channels jointly, so stained images keep their colour.
Instance labels are written as zlib-compressed TIFF (uint16 when the maximum fits,
else uint32), atomically, ImageJ-compatible when uint16 so Fiji and napari open them.

Example:
    >>> image = read_image("cells.tif")                  # doctest: +SKIP
    >>> image.shape, image.dtype                         # doctest: +SKIP
    ((520, 696, 3), dtype('float32'))
    >>> write_labels("cells_labels.tif", labels, pixel_size=0.65)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from triageseg.datasets.atomic import atomic_path
from triageseg.datasets.errors import DataError
from triageseg.datasets.headers import png_stream_problem

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
_TIFF_SUFFIXES = (".tif", ".tiff")
# Axes tifffile uses for colour samples and channels; every other axis of size > 1
# (Z, T, I, Q, ...) makes the file a stack or a series, which we refuse.
_CHANNEL_AXES = ("S", "C")
# Generic axes (tifffile 'I' = pages, 'Q' = unknown): 2-4 of them could be channels as well as
# planes of a stack, so they are never guessed; the caller chooses (``page`` or ``channel``).
_MAX_GENERIC_CHANNELS = 4
_MICRONS_PER_UNIT = {
    "um": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "µm": 1.0,
    "\\u00B5m": 1.0,
    "nm": 1e-3,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
}

# Writers that know no pixel size often store 72 or 96 dpi; those are not microscopy.
_SCREEN_DPI = (72.0, 96.0)

ChannelSpec = int | Sequence[int] | None


def image_id(path: str | os.PathLike) -> str:
    """The id of an image or label file: its name without the image extension.

    Example:
        >>> image_id("data/images/fluorescence_0007.png")
        'fluorescence_0007'
    """
    name = Path(path).name
    lower = name.lower()
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _decode_png_jpeg(path: Path) -> np.ndarray:
    import imagecodecs

    data = path.read_bytes()
    if not data:
        raise DataError(path, "empty file (0 bytes)")
    # Decode with the codec the extension names: imagecodecs.imread would otherwise try
    # every codec it has and report a page of unrelated failures.
    codec = "png" if path.suffix.lower() == ".png" else "jpeg8"
    # libpng keeps its output buffer for good when a PNG fails half way (~the decoded size per
    # file): check the structure first, with bounded memory, and hand it only PNGs that decode
    problem = png_stream_problem(data) if codec == "png" else None
    if problem is not None:
        raise DataError(path, f"cannot decode PNG image: {problem}")
    try:
        array = np.asarray(imagecodecs.imread(data, codec=codec))
    except Exception as err:  # imagecodecs raises codec-specific errors
        kind = path.suffix.lower()[1:].upper()
        problem = _container_problem(data, codec)
        if problem is not None:
            raise DataError(path, f"cannot decode {kind} image: {problem}") from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(path, f"cannot decode {kind} image (truncated or corrupt?): {first}") from None
    # libjpeg fills a cut-off scan with grey and only warns: check that the file reaches its end marker.
    if codec == "jpeg8" and not _jpeg_reaches_end(data):
        raise DataError(path, f"cannot decode JPEG image: {_truncated_jpeg(data)}")
    return array


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _jpeg_reaches_end(data: bytes) -> bool:
    """Whether the JPEG marker structure, followed from the start, reaches an end-of-image marker.

    Segments carry their length; entropy-coded scan data is skipped up to the next marker
    (inside it 0xFF is always followed by 0x00 or a restart marker). Bytes after the end
    marker (some cameras append data) do not matter.
    """
    pos, n = 2, len(data)
    while pos + 1 < n:
        if data[pos] != 0xFF:
            return False  # not at a marker: corrupt
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # end of image
            return True
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        if pos + 3 >= n:
            return False
        pos += 2 + ((data[pos + 2] << 8) | data[pos + 3])
        if marker == 0xDA:  # start of scan: skip the entropy-coded data to the next real marker
            while True:
                pos = data.find(b"\xff", pos)
                if pos < 0 or pos + 1 >= n:
                    return False
                follower = data[pos + 1]
                if follower == 0x00 or 0xD0 <= follower <= 0xD7:
                    pos += 2
                    continue
                if follower == 0xFF:
                    pos += 1
                    continue
                break
    return False


def _container_problem(data: bytes, codec: str) -> str | None:
    """Why a PNG/JPEG byte string that failed to decode is broken, when its structure shows it."""
    if codec == "png":
        if not data.startswith(_PNG_SIGNATURE):
            return "not a PNG file (no PNG signature at the start)"
        if b"IEND" not in data[-64:]:
            return f"truncated PNG ({len(data)} bytes, no IEND chunk at the end)"
    elif codec == "jpeg8":
        if not data.startswith(b"\xff\xd8"):
            return "not a JPEG file (no start-of-image marker)"
        if not _jpeg_reaches_end(data):
            return _truncated_jpeg(data)
    return None


def _truncated_jpeg(data: bytes) -> str:
    return f"truncated JPEG ({len(data)} bytes, the data stops before its end-of-image marker)"


def _read_tiff(path: Path) -> tuple[np.ndarray, str, bool]:
    """Return the first series of a TIFF, its tifffile axes and whether it is RGB(A)."""
    import tifffile

    if path.stat().st_size == 0:
        raise DataError(path, "empty file (0 bytes)")
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise DataError(path, "TIFF file contains no image")
            series = tif.series[0]
            axes = series.axes
            page = series.pages[0] if series.pages else tif.pages[0]
            is_rgb = int(getattr(page, "photometric", 0)) == 2  # PHOTOMETRIC.RGB
            array = series.asarray()
    except DataError:
        raise
    except Exception as err:  # tifffile raises several error types for corrupt files
        raise DataError(path, f"cannot read TIFF (truncated or corrupt?): {err}") from None
    return np.asarray(array), axes, is_rgb


def read_image_raw(path: str | os.PathLike, *, page: int | None = None, pages_as_channels: bool = False) -> np.ndarray:
    """Read an image without normalisation, as HxW or HxWxC (channels last).

    Singleton axes are squeezed; a TIFF channel axis is moved last; RGBA alpha is kept
    (``normalize_image`` drops it). 3-D stacks and time series are refused unless ``page``
    picks one plane. 2-4 pages without axis metadata may be channels or planes: they are
    refused unless ``page`` picks one or ``pages_as_channels`` says they are channels.

    Args:
        path: a PNG, JPEG or TIFF file.
        page: plane of a multi-page TIFF (the one non-channel axis besides Y and X) to read.
        pages_as_channels: read 2-4 pages without axis metadata as channels.

    Returns:
        The pixel array in its file dtype.

    Raises:
        DataError: unreadable, truncated or empty file, unsupported extension, a stack /
            time series (the message names the axes found), ambiguous pages, or a ``page``
            the file does not have.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no such file" if not path.exists() else "not a file")
    if page is not None and (isinstance(page, bool) or not isinstance(page, (int, np.integer)) or page < 0):
        raise DataError(path, f"page must be a non-negative integer, got {page!r}")
    suffix = path.suffix.lower()
    if suffix in _TIFF_SUFFIXES:
        array, axes, _ = _read_tiff(path)
        return _channels_last(path, array, axes, page=page, pages_as_channels=pages_as_channels)
    if page:
        raise DataError(path, f"page {page} requested but a {suffix[1:].upper()} file holds one plane (page 0)")
    if suffix in IMAGE_SUFFIXES:
        array = _decode_png_jpeg(path)
        if array.ndim not in (2, 3):
            raise DataError(path, f"unsupported image shape {array.shape}")
        return array
    raise DataError(path, f"unsupported image extension {suffix!r}; expected one of {', '.join(IMAGE_SUFFIXES)}")


def _channels_last(
    path: Path, array: np.ndarray, axes: str, *, page: int | None = None, pages_as_channels: bool = False
) -> np.ndarray:
    if len(axes) != array.ndim:  # should not happen; fall back to shape-only reasoning
        axes = "Q" * (array.ndim - 2) + "YX"
        if array.ndim == 3 and array.shape[-1] in (3, 4):
            axes = "YXS"
    keep = [i for i, (ax, n) in enumerate(zip(axes, array.shape, strict=True)) if n > 1 or ax in "YX"]
    array = array.reshape([array.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    if page is not None:
        array, axes = _pick_page(path, array, axes, page)
    other = [ax for ax in axes if ax not in "YX"]
    channel_like = [ax for ax in other if ax in _CHANNEL_AXES]
    generic = [ax for ax in other if ax in "IQ"]
    if len(other) == 1 and generic and array.shape[axes.index(generic[0])] <= _MAX_GENERIC_CHANNELS:
        n = array.shape[axes.index(generic[0])]
        if not pages_as_channels:
            raise DataError(
                path,
                f"{n} pages without axis metadata (pages 0-{n - 1}, shape {tuple(array.shape)}): they may be "
                f"channels or planes of a stack; read one plane with page=<0-{n - 1}> (CLI: --page) or use the "
                "pages as channels with channel=<index> (CLI: --channel)",
            )
        channel_like = generic
    if len(other) > 1 or (other and not channel_like):
        raise DataError(
            path,
            f"3-D stack or time series is not supported (axes {axes!r}, shape {tuple(array.shape)}); "
            "read one plane with page=<index> (CLI: --page) when one axis holds the planes, or save one "
            "2-D plane (YX, optionally with colour/channel axis) per file",
        )
    if "Y" not in axes or "X" not in axes:
        raise DataError(path, f"image has no Y/X plane (axes {axes!r}, shape {tuple(array.shape)})")
    order = [axes.index("Y"), axes.index("X")] + ([axes.index(channel_like[0])] if channel_like else [])
    return np.transpose(array, order)


def _pick_page(path: Path, array: np.ndarray, axes: str, page: int) -> tuple[np.ndarray, str]:
    """Plane ``page`` along the one axis that is neither Y, X nor a channel axis."""
    planes = [ax for ax in axes if ax not in "YX" and ax not in _CHANNEL_AXES]
    if not planes:
        if page == 0:
            return array, axes  # the only plane
        raise DataError(path, f"page {page} requested but the file holds one plane (page 0; shape "
                              f"{tuple(array.shape)})")
    if len(planes) > 1:
        raise DataError(
            path, f"page {page} is ambiguous: the planes run along {len(planes)} axes (axes {axes!r}, shape "
                  f"{tuple(array.shape)}); save one 2-D plane per file",
        )
    axis = axes.index(planes[0])
    n = array.shape[axis]
    if page >= n:
        raise DataError(path, f"page {page} out of range: the file has {n} pages (0-{n - 1})")
    return np.take(array, page, axis=axis), axes.replace(planes[0], "")


def _validate_dtype(array: np.ndarray, name: str) -> np.ndarray:
    if array.size == 0 or array.ndim < 2 or min(array.shape[:2]) == 0:
        raise DataError(name, f"empty image (shape {tuple(array.shape)})")
    if array.dtype == bool:
        return array.astype(np.uint8)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise DataError(name, f"unsupported pixel dtype {array.dtype}; expected integer or float")
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all():
            kind = "NaN" if np.isnan(array).any() else "infinite"
            raise DataError(name, f"image contains {kind} values ({int((~finite).sum())} pixels)")
    return array


def _select_channels(array: np.ndarray, channel: ChannelSpec, name: str) -> np.ndarray:
    """HxW or HxWxC -> HxWx3 (still in the input dtype's range, as float32)."""
    if array.ndim == 2:
        if channel not in (None, 0, (0,), [0]):
            raise DataError(
                name, f"channel {channel!r} requested but the image is single-channel (shape {array.shape})"
            )
        return np.repeat(array[..., None].astype(np.float32), 3, axis=2)
    if array.ndim != 3:
        raise DataError(name, f"expected HxW or HxWxC image, got shape {tuple(array.shape)}")
    n = array.shape[2]
    if channel is not None:
        chans = (channel,) if isinstance(channel, (int, np.integer)) else tuple(channel)
        if not 1 <= len(chans) <= 3:
            raise DataError(name, f"channel must be one index or up to 3 indices, got {channel!r}")
        for c in chans:
            if not isinstance(c, (int, np.integer)) or not 0 <= c < n:
                raise DataError(
                    name, f"channel {c!r} out of range: the image has {n} channels (shape {tuple(array.shape)})"
                )
        if len(chans) == 1:
            return np.repeat(array[..., chans[0] : chans[0] + 1].astype(np.float32), 3, axis=2)
        out = np.zeros(array.shape[:2] + (3,), np.float32)
        out[..., : len(chans)] = array[..., list(chans)]
        return out
    if n == 1:
        return np.repeat(array.astype(np.float32), 3, axis=2)
    if n == 3:
        return array.astype(np.float32)
    if n == 4:  # RGBA: alpha carries no intensity
        return array[..., :3].astype(np.float32)
    raise DataError(
        name,
        f"image has {n} channels (shape {tuple(array.shape)}); choose which to use with channel=<index> "
        "or channel=(i, j, k) (CLI: --channel)",
    )


def normalize_image(
    array: np.ndarray,
    *,
    channel: ChannelSpec = None,
    percentiles: tuple[float, float] | None = (1.0, 99.8),
    name: str = "<array>",
) -> np.ndarray:
    """Turn an in-memory image into float32 HxWx3 in [0, 1].

    Gray is replicated to 3 channels, RGBA loses its alpha, 2 or more than 4 channels
    need ``channel``. The low/high percentiles are taken over all (selected) channels
    jointly and mapped to 0/1 with clipping. When they coincide (a near-constant
    image) the minimum/maximum are used instead; a constant image becomes all zeros.

    Args:
        array: HxW or HxWxC pixels (channels last), integer or float.
        channel: one channel index (gray, replicated), or up to 3 indices mapped to
            R, G, B (missing ones are zero). Required for 2 or more than 4 channels.
        percentiles: (low, high) in percent; None scales integers by their dtype
            maximum and clips floats to [0, 1].
        name: what to call the image in error messages (a file path for read_image).

    Returns:
        float32 array HxWx3 with values in [0, 1].

    Raises:
        DataError: empty image, NaN/inf, unsupported dtype or channel layout.
    """
    array = _validate_dtype(np.asarray(array), name)
    if array.ndim == 3 and array.shape[2] == 2 and channel is None:
        raise DataError(name, f"image has 2 channels (shape {tuple(array.shape)}); choose one with channel=<index>")
    out = _select_channels(array, channel, name)
    if percentiles is None:
        if np.issubdtype(array.dtype, np.integer):
            out /= float(np.iinfo(array.dtype).max)
        return np.clip(out, 0.0, 1.0, out=out)
    lo_p, hi_p = percentiles
    if not 0.0 <= lo_p < hi_p <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles!r}")
    # Large images: estimate percentiles on a strided subsample (same result to ~1e-3).
    sample = out if out.size <= 4_000_000 else out[:: max(1, out.shape[0] // 1000), :: max(1, out.shape[1] // 1000)]
    lo, hi = (float(v) for v in np.percentile(sample, (lo_p, hi_p)))
    if hi <= lo:
        lo, hi = float(out.min()), float(out.max())
    if hi <= lo:
        return np.zeros_like(out)
    out -= lo
    out /= hi - lo
    return np.clip(out, 0.0, 1.0, out=out)


def read_image(
    path: str | os.PathLike,
    *,
    channel: ChannelSpec = None,
    page: int | None = None,
    percentiles: tuple[float, float] | None = (1.0, 99.8),
) -> np.ndarray:
    """Read a PNG / JPEG / TIFF image as float32 HxWx3 in [0, 1].

    Handles 8/16-bit and float, gray, RGB, RGBA (alpha dropped) and multi-channel
    images (``channel`` required for 2 or more than 4 channels). 3-D stacks and time
    series are refused with a message naming the axes found, unless ``page`` picks a
    plane; 2-4 pages without axis metadata need ``page`` or ``channel`` (then the pages
    are the channels). The file is not modified.

    Args:
        path: image file.
        channel: see ``normalize_image``.
        page: plane of a multi-page TIFF to read (see ``read_image_raw``).
        percentiles: see ``normalize_image``.

    Raises:
        DataError: naming the file, for anything it cannot turn into a 2-D image.
    """
    path = Path(path)
    raw = read_image_raw(path, page=page, pages_as_channels=channel is not None)
    return normalize_image(raw, channel=channel, percentiles=percentiles, name=str(path))


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """Read an instance label image (PNG or TIFF, any integer dtype) as uint32 HxW.

    Raises:
        DataError: unreadable file, not 2-D, float or negative labels.
    """
    path = Path(path)
    if path.suffix.lower() not in (".png",) + _TIFF_SUFFIXES:
        raise DataError(path, f"unsupported label extension {path.suffix!r}; expected .png, .tif or .tiff")
    array = read_image_raw(path)
    return check_labels(array, name=str(path))


def check_labels(labels: np.ndarray, *, name: str = "<labels>") -> np.ndarray:
    """Validate an instance label array and return it as uint32 HxW.

    Raises:
        DataError: not 2-D, empty, float/bool/other dtype, negative or > 2**32-1 values.
    """
    labels = np.asarray(labels)
    if labels.ndim == 3 and labels.shape[2] == 1:
        labels = labels[..., 0]
    if labels.ndim != 2:
        raise DataError(name, f"labels must be a 2-D image, got shape {tuple(labels.shape)}")
    if labels.size == 0:
        raise DataError(name, f"empty label image (shape {tuple(labels.shape)})")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(name, f"labels must have an integer dtype, got {labels.dtype}")
    if labels.dtype.kind == "i" and labels.min() < 0:
        raise DataError(name, f"labels must be non-negative, found {labels.min()}")
    if labels.max() > np.iinfo(np.uint32).max:
        raise DataError(name, f"label value {labels.max()} does not fit uint32")
    return labels.astype(np.uint32, copy=False)


def _pixel_size_pair(pixel_size: float | tuple[float, float] | None) -> tuple[float, float] | None:
    if pixel_size is None:
        return None
    pair = (float(pixel_size), float(pixel_size)) if np.isscalar(pixel_size) else tuple(float(v) for v in pixel_size)
    if len(pair) != 2 or not all(np.isfinite(v) and v > 0 for v in pair):
        raise ValueError(f"pixel_size must be a positive number or (y, x) pair in microns, got {pixel_size!r}")
    return pair  # type: ignore[return-value]


def write_labels(
    path: str | os.PathLike,
    labels: np.ndarray,
    *,
    pixel_size: float | tuple[float, float] | None = None,
    record: dict | None = None,
) -> Path:
    """Write instance labels as a zlib-compressed TIFF, atomically.

    uint16 when the maximum label fits, else uint32. uint16 files are written in the
    ImageJ format (Fiji and napari open them as label images); uint32 is outside the
    ImageJ format and is written as a plain TIFF. The pixel size, when given, is
    stored in the resolution tags (and the ImageJ unit 'micron').

    Args:
        path: destination (.tif / .tiff).
        labels: HxW non-negative integer array, 0 = background.
        pixel_size: microns per pixel, one number or (y, x).
        record: JSON-ready facts about how the labels were made (e.g. their routing.csv
            row), stored in the file itself (:mod:`triageseg.datasets.tiffrecord`).

    Returns:
        The path written.
    """
    import tifffile

    from triageseg.datasets.tiffrecord import record_tags

    path = Path(path)
    labels = check_labels(labels, name=str(path))
    pair = _pixel_size_pair(pixel_size)
    dtype = np.uint16 if labels.max(initial=0) <= np.iinfo(np.uint16).max else np.uint32
    data = np.ascontiguousarray(labels.astype(dtype, copy=False))
    kwargs: dict = {"compression": "zlib", "photometric": "minisblack"}
    if pair is not None:
        kwargs["resolution"] = (1.0 / pair[1], 1.0 / pair[0])
    if dtype == np.uint16:
        kwargs["imagej"] = True
        kwargs["metadata"] = {"axes": "YX", **({"unit": "um"} if pair is not None else {})}
    else:
        kwargs["metadata"] = None
        if pair is not None:
            kwargs["resolutionunit"] = "CENTIMETER"
            kwargs["resolution"] = (1e4 / pair[1], 1e4 / pair[0])
    kwargs["extratags"] = record_tags(record)
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, data, **kwargs)
    return path


def read_pixel_size(path: str | os.PathLike) -> tuple[float, float] | None:
    """Pixel size in microns (y, x) from a TIFF's resolution tags, or None.

    Understands ImageJ files (unit in the ImageJ metadata) and the TIFF resolution
    units centimetre and inch. Non-TIFF files, and files without resolution or with
    no physical unit, give None.
    """
    import tifffile

    path = Path(path)
    if path.suffix.lower() not in _TIFF_SUFFIXES:
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            tags = page.tags
            if "XResolution" not in tags or "YResolution" not in tags:
                return None
            xres, yres = (tags[k].value for k in ("XResolution", "YResolution"))
            unit_tag = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
            ij_unit = (tif.imagej_metadata or {}).get("unit") if tif.is_imagej else None
    except Exception as err:
        raise DataError(path, f"cannot read TIFF (truncated or corrupt?): {err}") from None

    def per_pixel(res) -> float:
        num, den = res if isinstance(res, tuple) else (res, 1)
        return den / num if num else float("nan")

    if ij_unit is not None:
        factor = _MICRONS_PER_UNIT.get(str(ij_unit).strip().lower())
        if factor is None:
            return None
    elif unit_tag == 3:  # centimetre
        factor = 1e4
    elif unit_tag in (4, 5):  # millimetre, micrometre (tifffile's extensions of the TIFF units)
        factor = 1e3 if unit_tag == 4 else 1.0
    elif unit_tag == 2:  # inch
        if any(abs(1.0 / per_pixel(r) - dpi) < 1e-6 for r in (xres, yres) for dpi in _SCREEN_DPI):
            return None
        factor = 25400.0
    else:
        return None
    y, x = per_pixel(yres) * factor, per_pixel(xres) * factor
    if not (np.isfinite(x) and np.isfinite(y) and x > 0 and y > 0):
        return None
    return (y, x)
