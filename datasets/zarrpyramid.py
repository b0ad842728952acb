"""An NGFF label pyramid written band by band, by one process or by many tasks, the same bytes either way.

:func:`write_label_pyramid` lays out ``<root>/labels/<name>`` with every level's array
(zarr) and the NGFF metadata (``ome_zarr.writer``: ``write_multiscales_metadata`` and
``write_label_metadata``), then fills the levels with :func:`write_band` calls. Level
``k`` is ``labels[::2**k, ::2**k]`` (every second pixel of the level above, the nearest
pyramid of :func:`~triageseg.datasets.pyramid.pyramid_shapes`: sides halved rounding up),
so label ids stay ids and a level's scale is exactly ``2**k`` times level 0's.

A band is a run of whole chunk rows of its source level, ``tile * 2**(e - s)`` rows high
for the levels ``s+1 .. e`` it makes (and ``s`` itself when ``s`` is 0), so every row it
takes every second of is its own and the chunk rows it writes at each level are its own:
bands need no halo and never share a chunk, and may run in any order or at once. The
levels go in stages of ``band_levels`` (0..2, then 3..4 from level 2, ...), each stage's
bands reading the level the one before wrote: a band stays a few chunk rows high however
many levels a slide has, and memory is one strip of ``tile`` source rows plus a chunk row
per level.

``tasks`` says where the bands run (:class:`LabelTasks`: here, one after the other; a
cluster's, e.g. ``pipeline/cluster/ray_blocks.RayLabelTasks``: as Ray tasks). The bands
are the same calls of the same function, so the zarr is the same array for array.
:func:`label_tasks` sets the tasks for the writes made inside a ``with`` block (the Ray
finish task uses it around the local block path's writer).

Example:
    >>> write_label_pyramid("tmp.ome.zarr", "slide", (700, 531), np.uint32, read_rows, tile=128)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import numpy as np

RowReader = Callable[[int, int], np.ndarray]
BAND_LEVELS = 2  # levels made per stage: bands of 4 chunk rows


class LabelTasks:
    """Bands run here, one after the other (the default)."""

    def map(self, fn: Callable, calls: list[tuple]) -> None:
        """Run ``fn(*args)`` for every ``args`` of ``calls``; return when all are done."""
        for args in calls:
            fn(*args)


_TASKS: contextvars.ContextVar[LabelTasks | None] = contextvars.ContextVar("triageseg_label_tasks", default=None)


@contextlib.contextmanager
def label_tasks(tasks: LabelTasks | None) -> Iterator[None]:
    """Label pyramids written inside the block go through ``tasks`` (None: here)."""
    token = _TASKS.set(tasks)
    try:
        yield
    finally:
        _TASKS.reset(token)


def current_tasks() -> LabelTasks:
    """The tasks set by :func:`label_tasks`, or :class:`LabelTasks` (here)."""
    return _TASKS.get() or LabelTasks()


def stages(n_levels: int, band_levels: int = BAND_LEVELS) -> list[tuple[int, int]]:
    """``(source level, last level)`` of each stage: (0, 2), (2, 4), ... up to ``n_levels - 1``."""
    if band_levels < 1:
        raise ValueError(f"band_levels must be >= 1, got {band_levels}")
    out, s = [], 0
    while True:
        e = min(n_levels - 1, s + band_levels)
        out.append((s, e))
        if e >= n_levels - 1:
            return out
        s = e


def _level_url(where: str, name: str, level: int) -> str:
    return f"{str(where).rstrip('/')}/labels/{name}/s{level}"


def _open_level(where: str, name: str, level: int, mode: str = "r+"):
    import zarr

    # every chunk stored, empty ones too (a runtime setting, not in the metadata: each writer sets it),
    # so verify_zarr can tell a cut-off write from empty space
    return zarr.open_array(_level_url(where, name, level), mode=mode).with_config({"write_empty_chunks": True})


def create_levels(where: str, name: str, shapes: list[tuple[int, int]], dtype, *, tile: int,
                  pixel_size: tuple[float, float] | None) -> None:
    """The group ``<where>/labels/<name>``: one empty array per level and the NGFF metadata (by ome-zarr)."""
    import zarr
    from ome_zarr.writer import write_label_metadata, write_multiscales_metadata

    root = zarr.open_group(str(where), mode="w", zarr_format=3)
    group = root.require_group("labels").require_group(name)
    for k, (h, w) in enumerate(shapes):
        group.create_array(f"s{k}", shape=(h, w), chunks=(tile, tile), dtype=np.dtype(dtype), fill_value=0,
                           dimension_names=("y", "x"))
    py, px = (1.0, 1.0) if pixel_size is None else pixel_size
    # strided levels: pixel i of level k is pixel i * 2**k of level 0, so the scale is exact and no translation
    datasets = [{"path": f"s{k}", "coordinateTransformations": [{"type": "scale", "scale": [py * 2**k, px * 2**k]}]}
                for k in range(len(shapes))]
    units = None if pixel_size is None else {"y": "micrometer", "x": "micrometer"}
    write_multiscales_metadata(group, datasets, axes=["y", "x"], axes_units=units, name=name)
    write_label_metadata(root["labels"], name)


def write_band(where: str, name: str, read_rows: RowReader | None, first: int, last: int, y0: int, y1: int,
               tile: int) -> None:
    """Rows ``y0:y1`` of level ``first`` made into levels ``first``..``last`` (``first`` itself only when 0).

    Args:
        where: the zarr root (folder or URI) laid out by :func:`create_levels`.
        name: the labels image's name.
        read_rows: ``(y0, y1) -> rows`` of level 0, for strips of ``tile`` rows at multiples of
            ``tile``; None for a later stage (its rows are read from level ``first``).
        first, last: the stage (:func:`stages`).
        y0, y1: the band, in rows of level ``first``: ``y0`` a multiple of ``tile * 2**(last - first)``.
        tile: the chunk side.
    """
    step = 2 ** (last - first)
    if y0 % (tile * step) or tile % step:
        raise ValueError(f"band {y0}:{y1} of level {first} is not aligned to {tile * step} rows")
    targets = range(0 if first == 0 else 1, last - first + 1)  # levels first + j
    arrays = {j: _open_level(where, name, first + j) for j in targets}
    if read_rows is None:
        source = _open_level(where, name, first, mode="r")
        read_rows = lambda a, b: source[a:b]  # noqa: E731
        width = source.shape[1]
    else:
        width = arrays[0].shape[1]
    pending: dict[int, list[np.ndarray]] = {j: [] for j in targets}
    start = {j: y0 // 2**j for j in targets}
    for r0 in range(y0, y1, tile):
        r1 = min(y1, r0 + tile)
        rows = np.asarray(read_rows(r0, r1))
        expected = (r1 - r0, width)
        if rows.shape != expected:
            raise ValueError(f"rows {r0}:{r1} of level {first}: got shape {rows.shape}, expected {expected}")
        for j in targets:
            pending[j].append(rows[:: 2**j, :: 2**j])  # r0 is a multiple of tile, so of 2**j
            held = sum(len(p) for p in pending[j])
            if held >= tile or r1 == y1:
                part = np.concatenate(pending[j]) if len(pending[j]) > 1 else pending[j][0]
                arrays[j][start[j] : start[j] + held] = part.astype(arrays[j].dtype, copy=False)
                start[j] += held
                pending[j] = []


def write_label_pyramid(where: str, name: str, shape: tuple[int, int], dtype, read_rows: RowReader, *,
                        tile: int, shapes: list[tuple[int, int]], pixel_size: tuple[float, float] | None = None,
                        tasks: LabelTasks | None = None, band_levels: int = BAND_LEVELS) -> None:
    """Lay out the label pyramid at ``where`` and write every level, band by band, through ``tasks``.

    Args:
        where: the zarr root (a folder or an fsspec URI), written in place.
        name: the labels image's name (``labels/<name>``).
        shape: (H, W) of level 0.
        dtype: label dtype.
        read_rows: ``(y0, y1) -> rows`` of the labels for strips of ``tile`` rows; with tasks
            other than here it must be picklable and read what every worker sees.
        tile: chunk side (a multiple of ``2**band_levels``).
        shapes: (H, W) of each level (:func:`~triageseg.datasets.pyramid.pyramid_shapes`).
        pixel_size: microns per pixel (y, x) of level 0.
        tasks: where the bands run (default: :func:`current_tasks`).
        band_levels: levels per stage.
    """
    if tuple(shapes[0]) != tuple(int(n) for n in shape):
        raise ValueError(f"level 0 shape {shapes[0]} differs from the labels' {tuple(shape)}")
    create_levels(where, name, shapes, dtype, tile=tile, pixel_size=pixel_size)
    tasks = tasks or current_tasks()
    for first, last in stages(len(shapes), band_levels):
        band = tile * 2 ** (last - first)
        h = shapes[first][0]
        reader = read_rows if first == 0 else None
        tasks.map(write_band, [(str(where), name, reader, first, last, y, min(h, y + band), tile)
                               for y in range(0, h, band)])
