"""OME-Zarr (NGFF) in and out: lazy input at any pyramid level, label pyramids written band by band.

Input: :class:`OmeZarrImage` opens one level of an NGFF ``multiscales`` image (a local
folder or an fsspec URI such as ``s3://bucket/slide.ome.zarr``) and reads only the chunks
a region needs. It looks like :class:`~triageseg.datasets.lazy.LazyImage`: ``shape``
``(H, W)`` or ``(H, W, C)`` (channels last), ``dtype``, ``levels``, ``pixel_size`` in
microns from the level's ``coordinateTransformations`` and ``image[y0:y1, x0:x1]``.

Output: :func:`write_labels_zarr` takes the same row reader as
:func:`~triageseg.datasets.pyramid.write_pyramid` and writes an NGFF ``labels`` image
(``<root>/labels/<name>``, a multiscale pyramid whose level ``k`` is every ``2**k``-th
pixel, as in the OME-TIFF) band by band (:mod:`triageseg.datasets.zarrpyramid`: here, or
by Ray tasks, the same bytes), the NGFF metadata written by the ``ome-zarr`` library.
The image is never whole in memory. Locally the zarr is written under a temporary name
and renamed when complete; to a URI it is written in place and our record (``triageseg``
attribute of the root) is written last. Every chunk is stored, empty ones too, so
:func:`verify_zarr` can tell a cut-off write from empty space.

Example:
    >>> write_labels_zarr("out/slide.ome.zarr", (40000, 30000), np.uint32, read_rows, pixel_size=(0.25, 0.25))  # doctest: +SKIP
    >>> with OmeZarrImage("out/slide.ome.zarr", labels="slide", level=2) as labels:  # doctest: +SKIP
    ...     labels.shape, labels.pixel_size                                          # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from triageseg.datasets.errors import DataError

ZARR_SUFFIX = ".ome.zarr"
RECORD_KEY = "triageseg"  # our own attribute of the root group (not NGFF): the label record, written last
_METADATA_FILES = ("zarr.json", ".zattrs")  # NGFF 0.5 (zarr v3) / 0.4 (zarr v2)
_UNITS = {"micrometer": 1.0, "micron": 1.0, "µm": 1.0, "um": 1.0, "nanometer": 1e-3, "nm": 1e-3,
          "millimeter": 1e3, "mm": 1e3, "centimeter": 1e4, "meter": 1e6, "angstrom": 1e-4}

RowReader = Callable[[int, int], np.ndarray]


def ome_zarr_writer():
    """The ``ome_zarr.writer`` module, or an ImportError saying how to install it (an optional dependency)."""
    try:
        import ome_zarr.writer
    except ImportError as err:
        raise ImportError("writing OME-Zarr needs the ome-zarr package: pip install 'triageseg[omezarr]' "
                          f"(or pip install ome-zarr): {err}") from None
    return ome_zarr.writer


def is_zarr(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a zarr folder or URI (``*.zarr``)."""
    return str(path).rstrip("/").lower().endswith(".zarr")


def _is_uri(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def _join(base, *parts: str):
    """``base/part/...``: a Path for a local folder, a string for a URI (Path would fold ``s3://`` to ``s3:/``)."""
    if _is_uri(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return Path(base).joinpath(*parts)


def _check_root(path: str | os.PathLike) -> None:
    """Refuse a local folder without zarr metadata, naming the missing file."""
    if _is_uri(path):
        return
    folder = Path(path)
    if not folder.exists():
        raise DataError(folder, "no such OME-Zarr folder")
    if not folder.is_dir():
        raise DataError(folder, "not a folder: an OME-Zarr image is a folder (*.ome.zarr)")
    if not any((folder / name).is_file() for name in _METADATA_FILES):
        raise DataError(folder / "zarr.json", "missing: not a zarr group (neither zarr.json nor .zattrs), "
                                              "the OME-Zarr is truncated or was not written completely")


def _open_group(path: str | os.PathLike):
    import zarr

    _check_root(path)
    try:
        return zarr.open_group(str(path), mode="r")
    except Exception as err:  # noqa: BLE001 - zarr raises several types for a broken group
        raise DataError(path, f"cannot open as a zarr group (truncated or corrupt?): {err}") from None


def _ngff(attrs: dict) -> dict:
    """The NGFF attributes of a group: under ``ome`` (0.5) or at the top (0.4)."""
    return attrs.get("ome", attrs) if isinstance(attrs.get("ome"), dict) else attrs


def _scale_of(transforms) -> list[float] | None:
    for t in transforms or ():
        if t.get("type") == "scale":
            return [float(v) for v in t["scale"]]
    return None


class OmeZarrImage:
    """One pyramid level of an OME-Zarr (NGFF) multiscale image, read region by region.

    Attributes:
        path: the zarr folder or URI.
        level: the pyramid level (0 = full resolution).
        shape: ``(H, W)`` or ``(H, W, C)``, channels last.
        dtype: pixel dtype.
        levels: ``(H, W)`` of every level.
        pixel_size: microns per pixel ``(y, x)`` at this level, or None when the metadata give none.
    """

    def __init__(self, path: str | os.PathLike, *, level: int = 0, labels: str | None = None):
        self.path = path if _is_uri(path) else Path(path)
        self.level = int(level)
        root = _open_group(path)
        group = root
        where = path
        if labels is not None:
            where = _join(path, "labels", labels)
            _check_root(where)
            try:
                group = root[f"labels/{labels}"]
            except Exception as err:  # noqa: BLE001
                raise DataError(where, f"no labels image {labels!r}: {err}") from None
        multiscales = _ngff(dict(group.attrs)).get("multiscales")
        if not multiscales:
            raise DataError(_join(where, "zarr.json"), "no NGFF 'multiscales' metadata: not an OME-Zarr image")
        ms = multiscales[0]
        axes = [a["name"] if isinstance(a, dict) else str(a) for a in ms.get("axes", ["y", "x"])]
        units = [a.get("unit") if isinstance(a, dict) else None for a in ms.get("axes", [])] or [None] * len(axes)
        if "y" not in axes or "x" not in axes:
            raise DataError(where, f"image has no y/x axes (axes {axes})")
        datasets = ms["datasets"]
        if not 0 <= self.level < len(datasets):
            raise DataError(where, f"pyramid level {self.level} requested; the image has level(s) 0..{len(datasets) - 1}")
        arrays = []
        for ds in datasets:
            try:
                arrays.append(group[ds["path"]])
            except Exception as err:  # noqa: BLE001 - a level whose array metadata are gone
                raise DataError(_join(where, ds["path"], "zarr.json"),
                                f"missing or unreadable array metadata of level {ds['path']!r}: {err}") from None
        self._axes = axes
        self.levels = [(int(a.shape[axes.index("y")]), int(a.shape[axes.index("x")])) for a in arrays]
        self._array = arrays[self.level]
        self._where = _join(where, datasets[self.level]["path"])
        full = tuple(int(n) for n in self._array.shape)
        other = [ax for ax, n in zip(axes, full) if ax not in "yx" and n > 1]
        if len(other) > 1 or (other and other[0] != "c"):
            raise DataError(where, f"only 2-D images (y, x, optionally c) are read; got axes {axes} of shape {full}")
        self._full_shape = full
        self._order = [axes.index("y"), axes.index("x")] + ([axes.index("c")] if other else [])
        self.shape = tuple(full[i] for i in self._order)
        self.dtype = np.dtype(self._array.dtype)
        if self.dtype.kind not in "biuf":
            raise DataError(where, f"unsupported pixel dtype {self.dtype}; expected integer or float")
        self.pixel_size = _pixel_size(ms, datasets[self.level], axes, units)

    @property
    def ndim(self) -> int:
        """2 for HxW, 3 for HxWxC."""
        return len(self.shape)

    def __getitem__(self, key) -> np.ndarray:
        """Pixels of ``image[y0:y1, x0:x1]`` (two slices with step 1), channels last."""
        from triageseg.datasets.lazy import read_region

        data = read_region(self._array, key, axes=self._axes, full_shape=self._full_shape, shape=self.shape,
                           yx="yx", name=self.path, where=self._where)
        return np.ascontiguousarray(data)

    def close(self) -> None:
        """Nothing to release (zarr reads open no handles between reads); here for :class:`LazyImage`'s interface."""
        self._array = None

    def __enter__(self) -> OmeZarrImage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OmeZarrImage({str(self.path)!r}, level={self.level}, shape={self.shape}, dtype={self.dtype})"


def _pixel_size(ms: dict, dataset: dict, axes: list[str], units: list) -> tuple[float, float] | None:
    """Microns per pixel (y, x) of one level: its scale times the multiscale's, in the axes' units.

    Without a unit the scale is taken as microns, unless it is all 1.0 (what writers store
    when they were given no pixel size).
    """
    scale = _scale_of(dataset.get("coordinateTransformations"))
    if scale is None or len(scale) != len(axes):
        return None
    outer = _scale_of(ms.get("coordinateTransformations"))
    if outer is not None and len(outer) == len(axes):
        scale = [a * b for a, b in zip(scale, outer)]
    out = []
    for ax in ("y", "x"):
        i = axes.index(ax)
        unit = units[i] if i < len(units) else None
        if unit is None:
            factor = None if all(scale[axes.index(a)] == 1.0 for a in ("y", "x")) else 1.0
        else:
            factor = _UNITS.get(str(unit).lower())
        if factor is None or not (scale[i] > 0 and math.isfinite(scale[i])):
            return None
        out.append(scale[i] * factor)
    return out[0], out[1]


def zarr_fingerprint(path: str | os.PathLike) -> str:
    """A hash of a local zarr folder's metadata files (contents) and chunk files (names, sizes, times).

    What a block journal is keyed on for an OME-Zarr input (the TIFF one hashes sampled bytes).
    """
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    root = Path(path)
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        st = p.stat()
        digest.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        if p.name in ("zarr.json", ".zattrs", ".zarray", ".zgroup"):
            digest.update(p.read_bytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- writing


def write_labels_zarr(
    path: str | os.PathLike,
    shape: tuple[int, int],
    dtype,
    read_rows: RowReader,
    *,
    tile: int = 512,
    pixel_size: float | tuple[float, float] | None = None,
    name: str | None = None,
    record: dict | None = None,
    smallest: int = 1024,
    tasks=None,
    band_levels: int | None = None,
) -> None:
    """Write labels as an NGFF ``labels`` image (``<path>/labels/<name>``) with a multiscale pyramid.

    The levels are written band by band (:mod:`triageseg.datasets.zarrpyramid`): here, or by
    ``tasks`` (e.g. Ray tasks), the same bytes either way. Level ``k`` is every ``2**k``-th
    pixel of level 0.

    Args:
        path: the ``*.ome.zarr`` folder, or an fsspec URI.
        shape: (H, W) of the labels.
        dtype: label dtype (uint16 / uint32).
        read_rows: ``(y0, y1) -> rows`` of the labels, asked for strips of ``tile`` rows.
        tile: chunk side.
        pixel_size: microns per pixel (one value, or (y, x)); stored as the level scales.
        name: the labels image's name (default: the folder's stem).
        record: JSON-ready dict stored as the root's ``triageseg`` attribute (written last).
        smallest: levels are added until the longer side is at most this.
        tasks: where the bands run (:class:`~triageseg.datasets.zarrpyramid.LabelTasks`; default
            the one :func:`~triageseg.datasets.zarrpyramid.label_tasks` set, else here). Tasks
            elsewhere need ``path`` on storage they all reach and a picklable ``read_rows``.
        band_levels: levels made per stage of bands (default
            :data:`~triageseg.datasets.zarrpyramid.BAND_LEVELS`).
    """
    import zarr

    from triageseg.datasets.pyramid import pyramid_shapes
    from triageseg.datasets.zarrpyramid import BAND_LEVELS, write_label_pyramid

    ome_zarr_writer()  # the clear ImportError when ome-zarr is missing
    target = str(path)
    name = name or Path(target.rstrip("/")).name.removesuffix(".zarr").removesuffix(".ome")
    shape = (int(shape[0]), int(shape[1]))
    pair = None
    if pixel_size is not None:
        py, px = (pixel_size, pixel_size) if np.isscalar(pixel_size) else pixel_size
        pair = (float(py), float(px))
    local = not _is_uri(target)
    where = target
    if local:
        final = Path(target)
        final.parent.mkdir(parents=True, exist_ok=True)
        # a name claim_outputs knows as this output's temporary (removed when a killed run left it)
        where = tempfile.mkdtemp(prefix=f".{name}.levels.", dir=final.parent)
        os.chmod(where, 0o755)
    try:
        write_label_pyramid(where, name, shape, dtype, read_rows, tile=tile,
                            shapes=pyramid_shapes(shape, smallest=smallest), pixel_size=pair, tasks=tasks,
                            band_levels=BAND_LEVELS if band_levels is None else band_levels)
        if record is not None:
            zarr.open_group(where, mode="r+").attrs[RECORD_KEY] = record  # last: its presence marks the zarr complete
        if local:
            if final.exists():
                shutil.rmtree(final)
            os.replace(where, final)
    except BaseException:
        if local:
            shutil.rmtree(where, ignore_errors=True)
        raise


def read_record(path: str | os.PathLike) -> dict | None:
    """The ``triageseg`` record stored in a label zarr's root, or None."""
    try:
        attrs = dict(_open_group(path).attrs)
    except DataError:
        return None
    value = attrs.get(RECORD_KEY)
    return value if isinstance(value, dict) else None


def verify_zarr(path: str | os.PathLike, shape=None, *, name: str | None = None,
                require_record: bool = True) -> str | None:
    """Why the label zarr at ``path`` cannot count as an output for an input of ``shape``; None when it can.

    Checks the root and labels metadata, every level's array metadata, that every chunk of
    every level is stored (our writer stores empty chunks too), level 0's (H, W), and the
    record written last (unless ``require_record`` is False).
    """
    try:
        root = _open_group(path)
        names = _ngff(dict(root.attrs)).get("labels") if "labels" in root else None
        if not names:
            labels_attrs = dict(root["labels"].attrs) if "labels" in root else {}
            names = _ngff(labels_attrs).get("labels")
        if not names:
            return "no NGFF labels image in it (labels metadata missing)"
        label = name or names[0]
        image = OmeZarrImage(path, labels=label)
        group = root[f"labels/{label}"]
        for ds in _ngff(dict(group.attrs))["multiscales"][0]["datasets"]:
            array = group[ds["path"]]
            if array.nchunks_initialized != array.nchunks:
                return (f"level {ds['path']!r} holds {array.nchunks_initialized} of {array.nchunks} chunks "
                        "(cut off while writing)")
    except DataError as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - zarr raises many types for broken stores
        return f"not a readable OME-Zarr ({err})"
    if require_record and RECORD_KEY not in dict(root.attrs):
        return f"no {RECORD_KEY!r} record in its root (written last: the write was cut off)"
    if shape is not None and image.levels[0] != tuple(int(n) for n in shape[:2]):
        return f"shape {image.levels[0]} differs from its input's {tuple(shape[:2])}"
    return None
