"""Stitching block results: every nucleus whole and once, globally unique consecutive ids.

Neighbouring blocks read overlapping regions, so a nucleus near a core boundary is usually
a candidate in two or more blocks (:mod:`triageseg.pipeline.blocks`), and their
predictions of it may differ a little. Two candidates of different blocks **conflict**
when they share a pixel. Conflicts are settled by one deterministic rule:

- a whole candidate wins over a cut one (one that touches a side of its block's region
  that cuts through the image: a nucleus larger than the margin allows);
- then the candidate seen with more context wins: its centroid lies farther from the
  nearest cut side of its block's region. That is the block whose core holds the
  nucleus' centre, and pieces of one nucleus have about its centre, so a block that
  splits a nucleus and one that sees it whole compare the same point;
- ties go to the lower block index, then the lower candidate number;
- candidates are taken greedily in that order, each one unless it conflicts with one
  already taken.

The accepted candidates are disjoint, so painting them gives an exact label image; each
is taken whole from the one block it came from. Ids are 1..n in (block, candidate) order.
The result depends only on the block results, never on the order they were computed in.

Example:
    >>> stitching = stitch(grid, load)                  # doctest: +SKIP
    >>> core = render_core(grid, stitching, load, 4)    # doctest: +SKIP
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from triageseg.pipeline.blocks import Block, BlockGrid, BlockResult, Box


class BlockCache:
    """A small LRU cache in front of a loader of block results (keeps memory bounded)."""

    def __init__(self, load: Callable[[int], BlockResult], size: int = 12):
        self._load = load
        self._size = max(1, int(size))
        self._items: collections.OrderedDict[int, BlockResult] = collections.OrderedDict()

    def __call__(self, index: int) -> BlockResult:
        if index in self._items:
            self._items.move_to_end(index)
            return self._items[index]
        result = self._load(index)
        if result.index != index:
            raise ValueError(f"loader returned block {result.index} for block {index}")
        self._items[index] = result
        while len(self._items) > self._size:
            self._items.popitem(last=False)
        return result


@dataclass(frozen=True, eq=False)
class Stitching:
    """Which candidates were kept, and their global ids."""

    luts: tuple[np.ndarray, ...]  # per block: uint32, candidate k -> global id (0: not kept), index 0 unused
    n_objects: int  # kept objects, numbered 1..n_objects
    candidates: int  # candidates over all blocks
    conflicted: int  # candidates that shared pixels with a candidate of another block
    cut: int  # kept objects that touch a cut side of their block (larger than the margin allows)

    def dtype(self) -> np.dtype:
        """uint16 when every id fits, else uint32 (as datasets.io.write_labels)."""
        return np.dtype(np.uint16 if self.n_objects <= np.iinfo(np.uint16).max else np.uint32)


def _intersect(a: Box, b: Box) -> Box | None:
    y0, y1, x0, x1 = max(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), min(a[3], b[3])
    return (y0, y1, x0, x1) if y0 < y1 and x0 < x1 else None


def _crop(result: BlockResult, box: Box) -> np.ndarray:
    oy, ox = result.outer[0], result.outer[2]
    return result.labels[box[0] - oy : box[1] - oy, box[2] - ox : box[3] - ox]


def _later_neighbours(grid: BlockGrid, block: Block) -> list[Block]:
    return [b for b in grid.neighbours(block) if b.index > block.index]


def conflicts(grid: BlockGrid, load: Callable[[int], BlockResult]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Candidate pairs of neighbouring blocks that share pixels.

    Returns:
        ``(u, v, counts)``: node ids of the conflicting pairs (node = offset of its block +
        candidate number - 1, blocks in index order) and the candidate count per block.
    """
    counts = [0] * len(grid)
    us, vs = [], []
    for block in grid.blocks:
        counts[block.index] = load(block.index).n
    offsets = np.concatenate([[0], np.cumsum(counts)])
    for block in grid.blocks:
        mine = load(block.index)
        for other in _later_neighbours(grid, block):
            box = _intersect(block.outer, other.outer)
            if box is None or mine.n == 0:
                continue
            theirs = load(other.index)
            if theirs.n == 0:
                continue
            a, b = _crop(mine, box), _crop(theirs, box)
            both = (a > 0) & (b > 0)
            if not both.any():
                continue
            pairs = np.unique(a[both].astype(np.int64) * (theirs.n + 1) + b[both])
            us.append(offsets[block.index] + pairs // (theirs.n + 1) - 1)
            vs.append(offsets[other.index] + pairs % (theirs.n + 1) - 1)
    u = np.concatenate(us) if us else np.zeros(0, np.int64)
    v = np.concatenate(vs) if vs else np.zeros(0, np.int64)
    return u.astype(np.int64), v.astype(np.int64), counts


def stitch(grid: BlockGrid, load: Callable[[int], BlockResult], *, cache: int = 12) -> Stitching:
    """Choose among the candidates of all blocks (see the module docstring) and number them.

    Args:
        grid: the block grid.
        load: block index -> its :class:`BlockResult` (from a journal, an object store, memory).
        cache: block results kept in memory at once.
    """
    load = load if isinstance(load, BlockCache) else BlockCache(load, cache)
    u, v, counts = conflicts(grid, load)
    total = int(sum(counts))
    context = np.zeros(total)
    whole = np.zeros(total, bool)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    for block in grid.blocks:
        result = load(block.index)
        context[offsets[block.index] : offsets[block.index + 1]] = result.context
        whole[offsets[block.index] : offsets[block.index + 1]] = result.whole
    keep = np.ones(total, bool)
    involved = np.unique(np.concatenate([u, v]))
    if involved.size:
        # adjacency (CSR) over the nodes that take part in a conflict
        edges = np.concatenate([np.stack([u, v], 1), np.stack([v, u], 1)])
        edges = edges[np.lexsort((edges[:, 1], edges[:, 0]))]
        starts = np.searchsorted(edges[:, 0], involved)
        ends = np.searchsorted(edges[:, 0], involved, side="right")
        where = dict(zip(involved.tolist(), zip(starts.tolist(), ends.tolist())))
        # node ids grow with (block, candidate), so sorting by node id breaks context ties that way
        order = involved[np.lexsort((involved, -context[involved], ~whole[involved]))]
        taken = np.zeros(total, bool)
        for node in order.tolist():
            s, e = where[node]
            if taken[edges[s:e, 1]].any():
                keep[node] = False
            else:
                taken[node] = True
    ids = np.cumsum(keep).astype(np.uint32) * keep
    luts = tuple(
        np.concatenate([[0], ids[offsets[i] : offsets[i + 1]]]).astype(np.uint32) for i in range(len(grid))
    )
    return Stitching(luts, int(keep.sum()), total, int(involved.size), int((~whole & keep).sum()))


def render_core(grid: BlockGrid, stitching: Stitching, load: Callable[[int], BlockResult], index: int) -> np.ndarray:
    """Final labels (global ids, uint32) of one block's core: the kept objects of it and its neighbours."""
    block = grid.blocks[index]
    y0, y1, x0, x1 = block.core
    out = np.zeros((y1 - y0, x1 - x0), np.uint32)
    for other in (block, *grid.neighbours(block)):
        box = _intersect(block.core, other.outer)
        if box is None:
            continue
        ids = stitching.luts[other.index][_crop(load(other.index), box)]
        target = out[box[0] - y0 : box[1] - y0, box[2] - x0 : box[3] - x0]
        np.copyto(target, ids, where=ids > 0)
    return out


def kept_objects(
    grid: BlockGrid, stitching: Stitching, load: Callable[[int], BlockResult]
) -> Iterator[tuple[int, np.ndarray, tuple[int, int], int]]:
    """Every kept object in id order: ``(id, mask, (top, left), area)``, its mask cropped to its box."""
    from scipy import ndimage as ndi

    for block in grid.blocks:
        lut = stitching.luts[block.index]
        if not lut.any():
            continue
        result = load(block.index)
        boxes = ndi.find_objects(result.labels)
        for k in np.flatnonzero(lut).tolist():
            box = boxes[k - 1]
            mask = result.labels[box] == k
            yield int(lut[k]), mask, (box[0].start + result.outer[0], box[1].start + result.outer[2]), int(result.area[k - 1])
