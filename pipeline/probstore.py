"""The class probabilities of a huge image, computed once per pixel and kept on disk.

:func:`compute_probabilities` runs a probability stream
(:func:`~triageseg.segmenters.predict.stream_probabilities`: the whole image's tiles,
batches and blending, band of tile rows by band) over the normalised rows of an
array-like image and writes the rows into a :class:`ProbabilityStore`, a zarr 3 array of
float32 (the in-memory path's dtype) in the image's journal folder. The blocks are then
decoded from it (:func:`~triageseg.pipeline.blocks.decode_block`). Rows are written in
whole chunk rows and the number of finished rows is recorded after each, so an
interrupted run resumes at the first unfinished chunk row.

Example:
    >>> store = ProbabilityStore(journal.folder / "probs.zarr", (16000, 16000))     # doctest: +SKIP
    >>> compute_probabilities(stream, read_rows, store)                             # doctest: +SKIP
    >>> store.read((0, 2048, 0, 2048)).shape                                        # doctest: +SKIP
    (3, 2048, 2048)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from triageseg.datasets.atomic import write_json_atomic

# Rows per chunk row of the store (and per resume step); columns per chunk.
CHUNK_ROWS = 256
CHUNK_COLS = 1024

Stream = Callable[..., Iterator[tuple[int, int, np.ndarray]]]  # (read_rows, shape, start=) -> (y0, y1, probs)


class ProbabilityStore:
    """float32 ``3 x H x W`` class probabilities on disk (zarr 3, zstd), with the count of finished rows."""

    def __init__(self, folder: str | os.PathLike, shape: tuple[int, int], classes: int = 3):
        import zarr

        self.folder = Path(folder)
        self.shape = (int(shape[0]), int(shape[1]))
        self._state = self.folder.parent / f"{self.folder.name}.json"
        rows = self._read_state()
        if rows is None or not (self.folder / "zarr.json").is_file():
            self.array = zarr.create_array(self.folder, shape=(classes, *self.shape), dtype="float32",
                                           chunks=(classes, CHUNK_ROWS, CHUNK_COLS), fill_value=0.0, overwrite=True)
            self._write_state(0)
        else:
            self.array = zarr.open_array(self.folder, mode="r+")
            if tuple(self.array.shape[1:]) != self.shape:
                raise ValueError(f"{self.folder}: stored probabilities have shape {self.array.shape}, "
                                 f"expected {(classes, *self.shape)}")

    def _read_state(self) -> int | None:
        try:
            data = json.loads(self._state.read_text(encoding="utf-8"))
            rows = int(data["rows"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return rows if 0 <= rows <= self.shape[0] else None

    def _write_state(self, rows: int) -> None:
        write_json_atomic(self._state, {"rows": int(rows), "shape": list(self.shape)})

    @property
    def rows(self) -> int:
        """Rows finished (all rows above this one are final)."""
        rows = self._read_state()
        return 0 if rows is None else rows

    @property
    def complete(self) -> bool:
        """Whether every row is finished."""
        return self.rows == self.shape[0]

    def write_rows(self, y0: int, probs: np.ndarray) -> None:
        """Store rows ``y0 : y0 + n`` and record them (whole chunk rows from ``y0`` on, the last may be short)."""
        y1 = y0 + probs.shape[1]
        if y0 != self.rows or y0 % CHUNK_ROWS or (y1 % CHUNK_ROWS and y1 != self.shape[0]):
            raise ValueError(f"rows {y0}:{y1} are not the next whole chunk rows after row {self.rows}")
        self.array[:, y0:y1, :] = probs
        self._write_state(y1)

    def read(self, box: tuple[int, int, int, int]) -> np.ndarray:
        """The probabilities of a box ``(y0, y1, x0, x1)`` of finished rows: float32 ``3 x h x w``."""
        y0, y1, x0, x1 = box
        if y1 > self.rows:
            raise ValueError(f"rows {y0}:{y1} are not all computed yet (finished: {self.rows})")
        return np.asarray(self.array[:, y0:y1, x0:x1], dtype=np.float32)


def compute_probabilities(
    stream: Stream,
    read_rows: Callable[[int, int], np.ndarray],
    store: ProbabilityStore,
    *,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Fill ``store`` with the probabilities of the image whose normalised rows ``read_rows`` gives.

    Args:
        stream: ``stream(read_rows, shape, start=row)`` yielding ``(y0, y1, probs)`` from
            ``row`` on (e.g. ``Pipeline.probability_stream``).
        read_rows: ``(y0, y1) -> float32 (y1 - y0) x W x 3`` normalised rows.
        store: where the rows go; rows it has already are not computed again.
        progress: called with the number of rows written each time some are.

    Returns:
        The number of rows computed now.
    """
    h = store.shape[0]
    start = store.rows
    if start >= h:
        return 0
    pending: list[np.ndarray] = []
    pending_rows, at = 0, start
    for y0, y1, probs in stream(read_rows, store.shape, start=start):
        if y0 != at + pending_rows:
            raise ValueError(f"probability stream gave rows {y0}:{y1}, expected them from row {at + pending_rows}")
        pending.append(probs)
        pending_rows += y1 - y0
        ready = h - at if y1 == h else (at + pending_rows) // CHUNK_ROWS * CHUNK_ROWS - at
        if ready > 0:
            block = np.concatenate(pending, axis=1) if len(pending) > 1 else pending[0]
            store.write_rows(at, block[:, :ready])
            rest = block[:, ready:]
            pending, pending_rows, at = ([rest] if rest.shape[1] else []), rest.shape[1], at + ready
            if progress is not None:
                progress(ready)
    if store.rows != h:
        raise ValueError(f"probability stream ended at row {store.rows} of {h}")
    return h - start
