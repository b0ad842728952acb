"""Numbering the objects of all blocks and rendering each core: there is nothing else to stitch.

Every object of the image is owned, whole, by exactly one block
(:func:`~triageseg.pipeline.blockwise.blocks.decode_block`: the block whose core holds its first
pixel), so the blocks' objects are disjoint and together are the whole image's labels.
Global ids are 1..n in (block, first pixel) order; a core's final labels are painted
from the owned objects of every block whose box meets it (its neighbours, or farther
for a component larger than the margin). The one exception: a foreground component
larger than a grown window may be (:data:`~triageseg.pipeline.blockwise.blocks.GROW_LIMIT`, e.g. a
slide whose foreground is one piece) is decoded in a limited window by each block it
spans, and those decodings may differ; it is counted (``Numbering.oversized``) and the
later block's objects are painted over the earlier's.

Example:
    >>> numbering = number_blocks(grid, load)                # doctest: +SKIP
    >>> core = render_core(grid, numbering, load, 4)         # doctest: +SKIP
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from triageseg.pipeline.blockwise.blocks import BlockGrid, BlockResult, Box


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
class Numbering:
    """Global ids of the blocks' objects: block ``i``'s object ``k`` is ``offsets[i] + k``."""

    offsets: np.ndarray  # int64 per block: ids before it
    boxes: tuple[Box, ...]  # per block: the box of its objects
    n_objects: int  # objects, numbered 1..n_objects
    grown: int  # components decoded in a grown window (larger than the margin)
    oversized: int  # components larger than a grown window may be (decoded in a limited window)

    def dtype(self) -> np.dtype:
        """uint16 when every id fits, else uint32 (as datasets.io.write_labels)."""
        return np.dtype(np.uint16 if self.n_objects <= np.iinfo(np.uint16).max else np.uint32)


def _intersect(a: Box, b: Box) -> Box | None:
    y0, y1, x0, x1 = max(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), min(a[3], b[3])
    return (y0, y1, x0, x1) if y0 < y1 and x0 < x1 else None


def number_blocks(grid: BlockGrid, load: Callable[[int], BlockResult]) -> Numbering:
    """Consecutive global ids for the objects of all blocks, in block order.

    Args:
        grid: the block grid.
        load: block index -> its :class:`~triageseg.pipeline.blockwise.blocks.BlockResult`.
    """
    counts, boxes, grown, oversized = [], [], 0, 0
    for block in grid.blocks:
        result = load(block.index)
        counts.append(result.n)
        boxes.append(result.box)
        grown += result.grown
        oversized += result.oversized
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return Numbering(offsets, tuple(boxes), int(sum(counts)), grown, oversized)


def render_core(grid: BlockGrid, numbering: Numbering, load: Callable[[int], BlockResult], index: int) -> np.ndarray:
    """Final labels (global ids, uint32) of one block's core."""
    y0, y1, x0, x1 = core = grid.blocks[index].core
    out = np.zeros((y1 - y0, x1 - x0), np.uint32)
    for other, box in enumerate(numbering.boxes):
        part = _intersect(core, box) if box[1] > box[0] else None
        if part is None:
            continue
        result = load(other)
        ids = result.labels[part[0] - box[0] : part[1] - box[0], part[2] - box[2] : part[3] - box[2]]
        target = out[part[0] - y0 : part[1] - y0, part[2] - x0 : part[3] - x0]
        np.copyto(target, ids + np.uint32(numbering.offsets[other]), where=ids > 0)
    return out


def kept_objects(
    grid: BlockGrid, numbering: Numbering, load: Callable[[int], BlockResult]
) -> Iterator[tuple[int, np.ndarray, tuple[int, int], int]]:
    """Every object in id order: ``(id, mask, (top, left), area)``, its mask cropped to its box."""
    from scipy import ndimage as ndi

    for block in grid.blocks:
        result = load(block.index)
        if not result.n:
            continue
        slices = ndi.find_objects(result.labels)
        for k in range(1, result.n + 1):
            sl = slices[k - 1]
            yield (int(numbering.offsets[block.index]) + k, result.labels[sl] == k,
                   (sl[0].start + result.box[0], sl[1].start + result.box[2]), int(result.area[k - 1]))
