"""Huge images block by block: the grid, global normalisation, and decoding one block.

The class probabilities of a huge image are computed once per pixel, on the whole
image's tile grid (:mod:`triageseg.pipeline.blockwise.probstore`), so they are bit for bit those
of the in-memory path. The labels are then decoded block by block from them. The image
is cut into a grid of **cores** that tile it exactly; each core is decoded in a window
with a **margin** on every side that has a neighbour (its *outer* region). One block
(:func:`decode_block`):

1. watershed of the window's probabilities (:func:`~triageseg.postprocess.watershed.decode_components`:
   each foreground component is decoded on its own, so a window holding a component
   whole decodes it exactly as the whole image does);
2. the components that meet the core and touch a side of the window that cuts through
   the image are decoded again in a grown window until they are whole;
3. the block **owns** the objects whose first pixel (raster order) lies in its core:
   every object of the image is owned by exactly one block, whole.

So the block labels equal the whole image's up to the numbering: there is nothing to
stitch. :mod:`triageseg.pipeline.blockwise.stitch` numbers the objects (consecutive ids in block
order) and renders each core.

Example:
    >>> grid = plan_blocks((768, 768), block_size=256, margin=48)
    >>> len(grid.blocks), grid.blocks[4].core, grid.blocks[4].outer
    (9, (256, 512, 256, 512), (208, 560, 208, 560))
"""

from __future__ import annotations

import functools
import io
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from triageseg.pipeline.blockwise.normalise import NormStats, scan_image  # noqa: F401 - re-exported (the block path's API)
from triageseg.postprocess.watershed import WatershedParams, decode_components

Box = tuple[int, int, int, int]  # y0, y1, x0, x1 (half-open)
# Default window around each core: twice the diameter of nuclei up to 32 px across (a foreground
# component reaching farther is decoded in a grown window).
DEFAULT_MARGIN = 64
DEFAULT_BLOCK_SIZE = 2048
# Largest side of a window grown around a foreground component (16k x 16k float32 probabilities: 3 GiB; 6144: 0.4 GiB).
GROW_LIMIT = 6144


@dataclass(frozen=True)
class Block:
    """One block of a grid: its core (the pixels it is responsible for) and outer region (what it reads)."""

    index: int  # position in the grid, row-major
    row: int  # block row
    col: int  # block column
    core: Box  # pixels this block's core covers; the cores tile the image exactly
    outer: Box  # core plus the margin on every side that has a neighbour, clipped to the image
    shape: tuple[int, int]  # the whole image (H, W)

    @property
    def cut(self) -> tuple[bool, bool, bool, bool]:
        """Which sides of the outer region cut through the image (top, bottom, left, right)."""
        return self.outer[0] > 0, self.outer[1] < self.shape[0], self.outer[2] > 0, self.outer[3] < self.shape[1]


@dataclass(frozen=True)
class BlockGrid:
    """How an image is cut into blocks (see :func:`plan_blocks`)."""

    shape: tuple[int, int]  # image (H, W)
    margin: int  # context in pixels around each core
    rows: tuple[tuple[int, int, int, int], ...]  # per block row: core y0, y1, outer y0, y1
    cols: tuple[tuple[int, int, int, int], ...]  # per block column: core x0, x1, outer x0, x1

    @functools.cached_property
    def blocks(self) -> tuple[Block, ...]:
        """All blocks, row-major."""
        return tuple(
            Block(r * len(self.cols) + c, r, c, (cy0, cy1, cx0, cx1), (oy0, oy1, ox0, ox1), self.shape)
            for r, (cy0, cy1, oy0, oy1) in enumerate(self.rows)
            for c, (cx0, cx1, ox0, ox1) in enumerate(self.cols)
        )

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    def neighbours(self, block: Block) -> list[Block]:
        """The up to 8 blocks around ``block`` (their outer regions overlap its own)."""
        blocks = self.blocks
        out = []
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                r, c = block.row + dr, block.col + dc
                if (dr or dc) and 0 <= r < len(self.rows) and 0 <= c < len(self.cols):
                    out.append(blocks[r * len(self.cols) + c])
        return out

    def to_dict(self) -> dict:
        """JSON-ready description (stored in the journal to recognise the same grid on resume)."""
        return {"shape": list(self.shape), "margin": self.margin, "rows": [list(r) for r in self.rows],
                "cols": [list(c) for c in self.cols]}


def _spans(length: int, block: int, margin: int, align: tuple[float, float] | None) -> list[tuple[int, int, int, int]]:
    """1-D cores and outer spans covering ``[0, length)``."""
    if length <= block + margin:
        return [(0, length, 0, length)]
    n = math.ceil(length / block)
    ideal = length / n
    if align is None:
        first = interior = max(1, round(ideal))
    else:
        # outer lengths of the form tile + k * stride: the segmenter's tiles then cover each
        # block without a nearly empty last tile (what keeps the block path as fast as the whole image)
        tile, stride = align
        first = int(tile + max(0, math.ceil((ideal + margin - tile) / stride)) * stride) - margin
        interior = int(tile + max(0, math.ceil((ideal + 2 * margin - tile) / stride)) * stride) - 2 * margin
    if interior < 2 * margin or first < 1:
        # only neighbouring blocks may overlap: a core must be at least two margins wide
        raise ValueError(f"block size {block} is too small for a margin of {margin} px (cores need >= 2 margins)")
    spans = []
    start, end = 0, first
    while True:
        if length - end <= margin:  # a remainder thinner than the margin joins this block
            end = length
        spans.append((start, end, max(0, start - margin), min(length, end + margin)))
        if end >= length:
            return spans
        start, end = end, end + interior


def plan_blocks(
    shape: Sequence[int],
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    margin: int = DEFAULT_MARGIN,
    align: tuple[float, float] | None = None,
) -> BlockGrid:
    """Cut an image of ``shape`` into blocks.

    Args:
        shape: image (H, W) (further axes are ignored).
        block_size: target side of a core in pixels; without ``align`` the cores are equal
            up to rounding (``ceil(side / block_size)`` per side).
        margin: context in pixels read around each core (at least twice the largest
            nucleus diameter, so a nucleus near a core boundary is whole in some block).
        align: ``(tile, stride)`` of the segmenter's tiling in input pixels; outer regions
            are then sized ``tile + k * stride`` (cores a little larger or smaller than
            ``block_size``).

    Raises:
        ValueError: non-positive sizes, or a margin too large for the block size.
    """
    h, w = int(shape[0]), int(shape[1])
    if h < 1 or w < 1:
        raise ValueError(f"image shape must be positive, got {tuple(shape)}")
    if block_size < 16:
        raise ValueError(f"block_size must be >= 16, got {block_size}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if align is not None and not (align[0] > 0 and 0 < align[1] <= align[0]):
        raise ValueError(f"align must be (tile, stride) with 0 < stride <= tile, got {align!r}")
    rows = tuple(_spans(h, block_size, margin, align))
    cols = tuple(_spans(w, block_size, margin, align))
    return BlockGrid((h, w), int(margin), rows, cols)


# --------------------------------------------------------------------------- one block


@dataclass(frozen=True, eq=False)
class BlockResult:
    """The objects one block owns, whole, in a box of the image.

    ``labels`` holds only the owned objects, numbered 1..n in the raster order of their
    first pixels; ``first[k]`` is object ``k + 1``'s first pixel as a flat index into the
    image (``y * W + x``), ``area[k]`` its pixel count.
    """

    index: int  # the block's index in the grid
    box: Box  # where ``labels`` lies in the image (the owned objects' bounding box; empty if none)
    labels: np.ndarray  # uint32, the box's size, owned objects only
    first: np.ndarray  # int64, increasing
    area: np.ndarray  # int64
    grown: int = 0  # components decoded again in a grown window
    oversized: int = 0  # of those, components larger than the grown window's limit (decoded in the limited window)

    @property
    def n(self) -> int:
        """Number of owned objects."""
        return int(self.area.size)

    def to_bytes(self) -> bytes:
        """Compressed serialisation (npz in zstd) for a journal file or an object store."""
        import imagecodecs

        buf = io.BytesIO()
        np.savez(buf, index=self.index, box=np.asarray(self.box, np.int64), labels=self.labels, first=self.first,
                 area=self.area, grown=self.grown, oversized=self.oversized)
        # zstd at level 1: ~10x faster to read back than the zip deflate of savez_compressed, and smaller
        return imagecodecs.zstd_encode(buf.getvalue(), level=1)

    @classmethod
    def from_bytes(cls, data: bytes) -> BlockResult:
        """Inverse of :meth:`to_bytes`."""
        import imagecodecs

        with np.load(io.BytesIO(imagecodecs.zstd_decode(data))) as z:
            return cls(int(z["index"]), tuple(int(v) for v in z["box"]), z["labels"], z["first"], z["area"],
                       int(z["grown"]), int(z["oversized"]))

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically to ``path``."""
        from triageseg.datasets.atomic import atomic_path

        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike) -> BlockResult:
        """Read a result written by :meth:`save`."""
        return cls.from_bytes(Path(path).read_bytes())


ProbReader = Callable[[Box], np.ndarray]  # box of the image -> float32 3 x h x w probabilities


@dataclass(frozen=True)
class _Piece:
    """Owned objects decoded in one window: their labels there, and each object's first pixel and area."""

    window: Box
    labels: np.ndarray  # int32 window labels (0 outside the owned objects)
    ids: np.ndarray  # window label of each owned object
    first: np.ndarray  # int64 flat image index of each one's first pixel
    area: np.ndarray  # int64


def _cut_sides(box: Box, shape: tuple[int, int]) -> tuple[bool, bool, bool, bool]:
    return box[0] > 0, box[1] < shape[0], box[2] > 0, box[3] < shape[1]


def _touches_cut(sl: tuple[slice, slice], window: Box, shape: tuple[int, int]) -> bool:
    """Whether an object's slices (window coordinates) reach a side of ``window`` that cuts through the image."""
    top, bottom, left, right = _cut_sides(window, shape)
    h, w = window[1] - window[0], window[3] - window[2]
    return ((top and sl[0].start == 0) or (bottom and sl[0].stop == h) or (left and sl[1].start == 0)
            or (right and sl[1].stop == w))


def _owned(raw: np.ndarray, keep: np.ndarray, window: Box, core: Box, shape: tuple[int, int],
           min_size: int) -> _Piece:
    """The objects of ``raw`` inside the components marked by ``keep`` whose first pixel lies in ``core``."""
    labels = np.where(keep, raw, 0)
    flat = labels.ravel()
    ids, first_at, area = np.unique(flat, return_index=True, return_counts=True)
    sel = (ids > 0) & (area >= max(min_size, 1))
    ids, first_at, area = ids[sel], first_at[sel], area[sel]
    h_w = window[3] - window[2]
    fy, fx = first_at // h_w + window[0], first_at % h_w + window[2]
    mine = (fy >= core[0]) & (fy < core[1]) & (fx >= core[2]) & (fx < core[3])
    return _Piece(window, labels, ids[mine], (fy * shape[1] + fx)[mine].astype(np.int64), area[mine].astype(np.int64))


def _grow_component(read_probs: ProbReader, params: WatershedParams, seed: tuple[int, int], box: Box,
                    shape: tuple[int, int], step: int, limit: int) -> tuple[Box, np.ndarray, np.ndarray, bool]:
    """Decode the foreground component holding pixel ``seed`` in windows grown around ``box`` until it is whole.

    A window never grows past ``limit`` pixels a side around ``seed`` (memory stays bounded
    on a slide whose foreground is one huge component).

    Returns:
        ``(window, raw labels, mask of the component, whole)`` in that window; ``whole`` is
        False when the component reached past the limit (it is then decoded in the
        limited window).
    """
    h, w = shape
    half = limit // 2
    cap = (max(0, seed[0] - half), min(h, seed[0] + half), max(0, seed[1] - half), min(w, seed[1] + half))
    while True:
        window = (max(cap[0], box[0] - step), min(cap[1], box[1] + step), max(cap[2], box[2] - step),
                  min(cap[3], box[3] + step))
        raw, comps = decode_components(read_probs(window), params)
        k = comps[seed[0] - window[0], seed[1] - window[2]]
        mask = comps == k
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        sl = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        if not _touches_cut(sl, window, shape):
            return window, raw, mask, True
        if window == cap:
            return window, raw, mask, False
        box = (window[0] + sl[0].start, window[0] + sl[0].stop, window[2] + sl[1].start, window[2] + sl[1].stop)
        step *= 2


def decode_block(read_probs: ProbReader, block: Block, *, params: WatershedParams, margin: int,
                 limit: int = GROW_LIMIT) -> BlockResult:
    """Decode one block from the image's probabilities: the objects it owns, whole (see the module docstring).

    Args:
        read_probs: box of the image -> its float32 3 x h x w probabilities (e.g.
            :meth:`~triageseg.pipeline.blockwise.probstore.ProbabilityStore.read`).
        block: a block of :func:`plan_blocks` for this image.
        params: watershed parameters.
        margin: the grid's margin (how far a grown window first reaches past a component).
        limit: the largest side of a grown window (at least twice the block's window; a
            component larger than that is decoded in a window of this side around it and may
            then differ between the blocks it spans; counted in ``BlockResult.oversized``).

    Returns:
        The block's :class:`BlockResult`.

    Raises:
        ValueError: probabilities of the wrong shape.
    """
    shape, window, core = block.shape, block.outer, block.core

    def read(box: Box) -> np.ndarray:
        probs = np.asarray(read_probs(box), dtype=np.float32)
        if probs.shape != (3, box[1] - box[0], box[3] - box[2]):
            raise ValueError(f"block {block.index}: probabilities of {box} have shape {probs.shape}")
        return probs

    raw, comps = decode_components(read(window), params)
    oy, ox = window[0], window[2]
    limit = max(int(limit), 2 * max(window[1] - window[0], window[3] - window[2]))
    in_core = np.unique(comps[core[0] - oy : core[1] - oy, core[2] - ox : core[3] - ox])
    in_core = in_core[in_core > 0]
    slices = ndi.find_objects(comps)
    whole = np.zeros(len(slices) + 1, bool)
    partial = []
    for k in in_core.tolist():
        if _touches_cut(slices[k - 1], window, shape):
            partial.append(k)
        else:
            whole[k] = True
    pieces = [_owned(raw, whole[comps], window, core, shape, params.min_size)]
    taken = set(pieces[0].first.tolist())
    oversized = 0
    for k in partial:
        sl = slices[k - 1]
        ys, xs = np.nonzero(comps[sl] == k)
        seed = (int(ys[0]) + sl[0].start + oy, int(xs[0]) + sl[1].start + ox)
        box = (sl[0].start + oy, sl[0].stop + oy, sl[1].start + ox, sl[1].stop + ox)
        grown, graw, mask, complete = _grow_component(read, params, seed, box, shape, max(margin, 16), limit)
        oversized += not complete
        piece = _owned(graw, mask, grown, core, shape, params.min_size)
        new = np.array([f not in taken for f in piece.first.tolist()], bool)
        if new.any():  # two cut pieces of one component in this window: decoded once
            pieces.append(_Piece(grown, piece.labels, piece.ids[new], piece.first[new], piece.area[new]))
            taken.update(piece.first[new].tolist())
    return _assemble(block.index, pieces, len(partial), oversized)


def _assemble(index: int, pieces: list[_Piece], grown: int, oversized: int) -> BlockResult:
    """One label box holding every owned object of a block, numbered by first pixel."""
    first = np.concatenate([p.first for p in pieces])
    area = np.concatenate([p.area for p in pieces])
    if first.size == 0:
        return BlockResult(index, (0, 0, 0, 0), np.zeros((0, 0), np.uint32), first, area, grown, oversized)
    order = np.argsort(first, kind="stable")
    rank = np.empty(first.size, np.int64)
    rank[order] = np.arange(1, first.size + 1)
    boxes = []
    for p in pieces:
        if p.ids.size:
            owned = np.isin(p.labels, p.ids)
            rows, cols = np.flatnonzero(owned.any(axis=1)), np.flatnonzero(owned.any(axis=0))
            boxes.append((p.window[0] + rows[0], p.window[0] + rows[-1] + 1, p.window[2] + cols[0],
                          p.window[2] + cols[-1] + 1))
    box = (min(b[0] for b in boxes), max(b[1] for b in boxes), min(b[2] for b in boxes), max(b[3] for b in boxes))
    labels = np.zeros((box[1] - box[0], box[3] - box[2]), np.uint32)
    start = 0
    for p in pieces:
        if not p.ids.size:
            continue
        lut = np.zeros(int(p.labels.max()) + 1, np.uint32)
        lut[p.ids] = rank[start : start + p.ids.size]
        start += p.ids.size
        y0, y1 = max(box[0], p.window[0]), min(box[1], p.window[1])
        x0, x1 = max(box[2], p.window[2]), min(box[3], p.window[3])
        ids = lut[p.labels[y0 - p.window[0] : y1 - p.window[0], x0 - p.window[2] : x1 - p.window[2]]]
        target = labels[y0 - box[0] : y1 - box[0], x0 - box[2] : x1 - box[2]]
        np.copyto(target, ids, where=ids > 0)
    return BlockResult(index, box, labels, first[order], area[order], grown, oversized)
