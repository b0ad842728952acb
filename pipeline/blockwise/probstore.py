"""The class probabilities of a huge image, computed once per pixel and kept on disk.

:func:`compute_probabilities` runs a probability stream
(:func:`~triageseg.segmenters.predict.stream_probabilities`: the whole image's tiles,
batches and blending, band of tile rows by band) over the normalised rows of an
array-like image and writes the rows into a :class:`ProbabilityStore`, a zarr 3 array of
float32 (the in-memory path's dtype; float16 where the pipeline rounds its probabilities to
it, ``segment --prob-dtype``) in the image's journal folder. The blocks are then
decoded from it (:func:`~triageseg.pipeline.blockwise.blocks.decode_block`). Rows are written in
whole chunk rows, and each finished chunk row is recorded with a checksum of every chunk
file it wrote, so an interrupted run resumes at the unfinished chunk rows.

A journal is a folder a user can damage (a deleted, truncated or overwritten file, a
disk error). Reopening a store therefore checks it: the array's metadata against the
one this module writes (put back when it differs), and every recorded chunk file for
presence and checksum. A chunk row with a missing or damaged chunk is forgotten and
computed again (the stream starts at any row and gives the same rows bit for bit), so
a damaged journal costs time, never wrong labels; each repair is logged naming the store.

Example:
    >>> store = ProbabilityStore(journal.folder / "probs.zarr", (16000, 16000))     # doctest: +SKIP
    >>> compute_probabilities(stream, read_rows, store)                             # doctest: +SKIP
    >>> store.read((0, 2048, 0, 2048)).shape                                        # doctest: +SKIP
    (3, 2048, 2048)
"""

from __future__ import annotations

import json
import logging
import math
import os
import zlib
from collections.abc import Callable, Iterator

import numpy as np

from triageseg.datasets.atomic import write_json_atomic
from triageseg.datasets.errors import DataError
from triageseg.pipeline.blockwise.location import (
    Location,
    child,
    infos,
    is_dir,
    is_remote,
    location,
    name_of,
    parent,
    read_bytes,
    write_bytes,
    zarr_store,
)

logger = logging.getLogger(__name__)

# Rows per chunk row of the store (and per resume step); columns per chunk.
CHUNK_ROWS = 256
CHUNK_COLS = 1024
STATE_FORMAT = 2  # 2: finished chunk rows with a CRC-32 per chunk file (1: a count of finished rows)
# What a store may hold: float32 (the network's output), or float16 (2-3x fewer bytes; the
# pipeline then rounds its probabilities the same way in memory: Pipeline(prob_dtype=...)).
DTYPES = ("float32", "float16")

Stream = Callable[..., Iterator[tuple[int, int, np.ndarray]]]  # (read_rows, shape, start=) -> (y0, y1, probs)


class ProbabilityStore:
    """float32 (or float16) ``3 x H x W`` class probabilities on disk (zarr 3, zstd), with the finished chunk rows.

    ``<folder>.json`` (beside the store) records, for each finished chunk row, the CRC-32
    of each of its chunk files (``None``: no file, zarr keeps no chunk that is all fill
    value). Opening an existing store verifies both (see the module docstring).

    ``folder`` may be a URI (``s3://bucket/prefix/probs.zarr``: zarr through fsspec). There a
    chunk's checksum is the one the object store keeps for it (its ETag, with its size),
    read from one listing per chunk row: recording and verifying then read no chunk
    bytes back over the network.
    """

    def _set_geometry(self, folder: str | os.PathLike, shape: tuple[int, int], classes: int,
                      dtype: str = "float32") -> None:
        """The store's folder, shape, class count, dtype, chunk grid and state file (no I/O)."""
        if dtype not in DTYPES:
            raise ValueError(f"a probability store holds {' or '.join(DTYPES)}, not {dtype!r}")
        self.dtype = dtype
        self.folder: Location = location(folder)
        self.remote = is_remote(self.folder)
        self.shape = (int(shape[0]), int(shape[1]))
        self.classes = int(classes)
        self.n_chunk_rows = math.ceil(self.shape[0] / CHUNK_ROWS)
        self.n_chunk_cols = math.ceil(self.shape[1] / CHUNK_COLS)
        self._state = child(parent(self.folder), f"{name_of(self.folder)}.json")
        self._state_found = False

    def __init__(self, folder: str | os.PathLike, shape: tuple[int, int], classes: int = 3, *,
                 dtype: str = "float32"):
        import zarr

        self._set_geometry(folder, shape, classes, dtype)
        self._done = self._read_state()
        if self._done is None and self._state_found:
            logger.warning("%s: unreadable or foreign state file %s in the block journal; computing every probability "
                           "row again", self.folder, self._state.name)
        if self._done is None or not is_dir(self.folder):
            self.array = zarr.create_array(zarr_store(self.folder), shape=(self.classes, *self.shape), dtype=self.dtype,
                                           chunks=(self.classes, CHUNK_ROWS, CHUNK_COLS), fill_value=0.0,
                                           overwrite=True)
            self._done = {}
            self._write_state()
            return
        self._check_metadata()
        self.array = zarr.open_array(zarr_store(self.folder), mode="r+")
        self._verify_chunks()

    # ---- state

    def _read_state(self) -> dict[int, list[int | None]] | None:
        """The recorded chunk rows, or None when the state file is absent, unreadable or of another store."""
        try:
            text = read_bytes(self._state)
        except FileNotFoundError:
            return None
        except OSError:
            text = b""
        self._state_found = True
        try:
            data = json.loads(text)
            if (data.get("format") != STATE_FORMAT or data.get("shape") != list(self.shape)
                    or data.get("checksum", "crc32") != self._checksum_kind
                    or data.get("dtype", "float32") != self.dtype):  # chunks of another dtype: computed again
                return None
            done = {int(r): [None if s is None else int(s) for s in sums] for r, sums in data["chunks"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        if any(not 0 <= r < self.n_chunk_rows or len(s) != self.n_chunk_cols for r, s in done.items()):
            return None
        return done

    @property
    def _checksum_kind(self) -> str:
        """What the recorded sums are: ``crc32`` of the chunk files, or ``etag`` (the object store's own)."""
        return "etag" if self.remote else "crc32"

    def _write_state(self) -> None:
        state = {"format": STATE_FORMAT, "rows": self.rows, "shape": list(self.shape),
                 "chunk": [CHUNK_ROWS, CHUNK_COLS], "dtype": self.dtype, "checksum": self._checksum_kind,
                 "chunks": {str(r): self._done[r] for r in sorted(self._done)}}
        if self.remote:
            write_bytes(self._state, (json.dumps(state, indent=2) + "\n").encode("utf-8"))
        else:
            write_json_atomic(self._state, state)

    # ---- verification

    def _expected_metadata(self) -> bytes:
        """The ``zarr.json`` this module writes for this shape (made in memory)."""
        import zarr
        from zarr.core.buffer import default_buffer_prototype

        array = zarr.create_array(zarr.storage.MemoryStore(), shape=(self.classes, *self.shape), dtype=self.dtype,
                                  chunks=(self.classes, CHUNK_ROWS, CHUNK_COLS), fill_value=0.0)
        return array.metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()

    def _check_metadata(self) -> None:
        """Put back the array's metadata when it is not what this module writes (the chunks are checked apart)."""
        path = child(self.folder, "zarr.json")
        expected = self._expected_metadata()
        try:
            ok = json.loads(read_bytes(path)) == json.loads(expected)
        except (OSError, ValueError):
            ok = False
        if not ok:
            logger.warning("%s: damaged array metadata (zarr.json) in the block journal; rewritten, the recorded "
                           "chunks are verified by their checksums", self.folder)
            write_bytes(path, expected)

    def _chunk_path(self, r: int, c: int) -> Location:
        return child(self.folder, self.array.metadata.encode_chunk_key((0, r, c)))

    def _chunk_sum(self, r: int, c: int) -> int | None:
        """CRC-32 of chunk file ``(r, c)``; None when there is no such file."""
        try:
            return zlib.crc32(read_bytes(self._chunk_path(r, c)))
        except FileNotFoundError:
            return None

    def _row_sums(self, r: int) -> list[int | None]:
        """The checksum of each chunk file of chunk row ``r`` (None: no file), as they are now."""
        if not self.remote:
            return [self._chunk_sum(r, c) for c in range(self.n_chunk_cols)]
        # one listing of the row's chunk folder: the store's own content hash of each object
        keys = [self.array.metadata.encode_chunk_key((0, r, c)) for c in range(self.n_chunk_cols)]
        folders = {k.rsplit("/", 1)[0] for k in keys}
        listed = {f"{f}/{n}": info for f in folders for n, info in infos(child(self.folder, f)).items()}
        return [_object_sum(listed.get(k)) for k in keys]

    def _verify_chunks(self) -> None:
        """Forget every recorded chunk row with a chunk file missing or not matching its checksum."""
        bad = {r: [c for c, now in enumerate(self._row_sums(r)) if now != sums[c]] for r, sums in self._done.items()}
        bad = {r: cols for r, cols in bad.items() if cols}
        if not bad:
            return
        for r in bad:
            del self._done[r]
        self._write_state()
        where = ", ".join(f"rows {r * CHUNK_ROWS}:{min(self.shape[0], (r + 1) * CHUNK_ROWS)} (chunk(s) "
                          f"{', '.join(self.array.metadata.encode_chunk_key((0, r, c)) for c in cols)})"
                          for r, cols in sorted(bad.items()))
        logger.warning("%s: probability chunk(s) missing or damaged in the block journal: %s; computing those rows "
                       "again", self.folder, where)

    # ---- rows

    @property
    def rows(self) -> int:
        """Rows finished from the top (all rows above this one are final)."""
        r = 0
        while r in self._done:
            r += 1
        return min(self.shape[0], r * CHUNK_ROWS)

    @property
    def complete(self) -> bool:
        """Whether every row is finished."""
        return len(self._done) == self.n_chunk_rows

    @property
    def finished(self) -> int:
        """Rows finished, wherever they are."""
        return sum(min(self.shape[0], (r + 1) * CHUNK_ROWS) - r * CHUNK_ROWS for r in self._done)

    def missing(self) -> list[tuple[int, int]]:
        """The unfinished rows, as ``(y0, y1)`` runs of consecutive unfinished chunk rows, top to bottom."""
        runs: list[tuple[int, int]] = []
        for r in range(self.n_chunk_rows):
            if r in self._done:
                continue
            y0, y1 = r * CHUNK_ROWS, min(self.shape[0], (r + 1) * CHUNK_ROWS)
            if runs and runs[-1][1] == y0:
                runs[-1] = (runs[-1][0], y1)
            else:
                runs.append((y0, y1))
        return runs

    def write_rows(self, y0: int, probs: np.ndarray) -> None:
        """Store rows ``y0 : y0 + n`` and record them (whole chunk rows from ``y0`` on, the last may be short)."""
        y1 = y0 + probs.shape[1]
        if y0 % CHUNK_ROWS or (y1 % CHUNK_ROWS and y1 != self.shape[0]) or not 0 <= y0 < y1 <= self.shape[0]:
            raise ValueError(f"rows {y0}:{y1} are not whole chunk rows of {self.folder} ({CHUNK_ROWS} rows each)")
        self.array[:, y0:y1, :] = probs
        # the checksums of the files as written (read back: zarr chose their bytes), recorded after them
        for r in range(y0 // CHUNK_ROWS, math.ceil(y1 / CHUNK_ROWS)):
            self._done[r] = self._row_sums(r)
        self._write_state()

    def read(self, box: tuple[int, int, int, int]) -> np.ndarray:
        """The probabilities of a box ``(y0, y1, x0, x1)`` of finished rows: float32 ``3 x h x w``.

        Raises:
            ValueError: rows not computed yet.
            DataError: a chunk file damaged since the store was opened (naming the store; a rerun
                computes it again).
        """
        y0, y1, x0, x1 = box
        if any(r not in self._done for r in range(y0 // CHUNK_ROWS, math.ceil(y1 / CHUNK_ROWS))):
            raise ValueError(f"rows {y0}:{y1} are not all computed yet in {self.folder}")
        try:
            return np.asarray(self.array[:, y0:y1, x0:x1], dtype=np.float32)
        except Exception as err:  # noqa: BLE001 - zarr/zstd errors: a damaged journal, not a bad input
            raise DataError(self.folder, f"damaged probability chunk in the block journal ({type(err).__name__}: "
                                         f"{err}); run again to compute it again") from err


def _object_sum(info: dict | None) -> int | None:
    """A checksum of an object from its listing: the store's content hash (ETag, md5 or crc32c) with its size.

    None when there is no object; an object store that lists no hash gives its size only
    (a truncated chunk is still seen; zarr's zstd frames check their own content on read).
    """
    if info is None:
        return None
    tag = next((str(info[k]) for k in ("ETag", "etag", "md5Hash", "crc32c") if info.get(k)), "").strip('"')
    return zlib.crc32(f"{info.get('size')}:{tag}".encode())


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
            ``row`` on (e.g. ``Pipeline.probability_stream``); it is started once per run of
            unfinished rows and closed at the run's end.
        read_rows: ``(y0, y1) -> float32 (y1 - y0) x W x 3`` normalised rows.
        store: where the rows go; rows it has already are not computed again.
        progress: called with the number of rows written each time some are.

    Returns:
        The number of rows computed now.
    """
    computed = sum(_compute_run(stream, read_rows, store, start, stop, progress) for start, stop in store.missing())
    if not store.complete:
        raise ValueError(f"probability stream ended early: rows {store.missing()} of {store.shape[0]} missing")
    return computed


def _compute_run(stream: Stream, read_rows: Callable[[int, int], np.ndarray], store: ProbabilityStore, start: int,
                 stop: int, progress: Callable[[int], None] | None) -> int:
    """Rows ``start:stop`` (whole chunk rows) from the stream started at ``start``; rows computed."""
    pending: list[np.ndarray] = []
    pending_rows, at = 0, start
    rows = stream(read_rows, store.shape, start=start)
    try:
        for y0, y1, probs in rows:
            if y0 != at + pending_rows:
                raise ValueError(f"probability stream gave rows {y0}:{y1}, expected them from row {at + pending_rows}")
            pending.append(probs)
            pending_rows += y1 - y0
            end = min(stop, at + pending_rows)
            ready = end - at if end == stop else end // CHUNK_ROWS * CHUNK_ROWS - at
            if ready > 0:
                block = np.concatenate(pending, axis=1) if len(pending) > 1 else pending[0]
                store.write_rows(at, block[:, :ready])
                rest = block[:, ready:]
                pending, pending_rows, at = ([rest] if rest.shape[1] else []), rest.shape[1], at + ready
                if progress is not None:
                    progress(ready)
            if at >= stop:  # the rows below are finished already
                break
    finally:
        if hasattr(rows, "close"):
            rows.close()
    return at - start
