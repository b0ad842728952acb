"""Huge images block by block: lazy array -> blocks with margins -> candidate nuclei per block.

The image is cut into a grid of **cores** that tile it exactly; each core is read with a
**margin** of context on every side that has a neighbour (its *outer* region). One block:

1. read the outer region from the array-like source (NumPy, zarr, :class:`~triageseg.datasets.lazy.LazyImage`);
2. normalise it with the image's global statistics (:class:`NormStats`, from a subsample
   of the whole image), so every block is scaled the same way;
3. class probabilities (the caller's function, e.g. ``Pipeline.probabilities``), watershed;
4. keep the **candidates**: objects whose centroid lies in the core grown by half the
   margin. Each candidate records whether it is *whole* (it does not touch a side of the
   outer region that cuts through the image) and its *context*: how far its centroid lies
   from the nearest such side (how much of its surroundings the block saw).

:func:`segment_block` is the unit a scheduler runs (here in a loop with a journal, on a
Ray cluster as tasks); :mod:`triageseg.pipeline.stitch` chooses among the candidates of
neighbouring blocks so every nucleus is taken whole, once, and numbers them.

Example:
    >>> grid = plan_blocks((768, 768), block_size=256, margin=48)
    >>> len(grid.blocks), grid.blocks[4].core, grid.blocks[4].outer
    (9, (256, 512, 256, 512), (208, 560, 208, 560))
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from triageseg.datasets.errors import DataError
from triageseg.postprocess.quality import pixel_sums
from triageseg.postprocess.watershed import WatershedParams, watershed

Box = tuple[int, int, int, int]  # y0, y1, x0, x1 (half-open)
# Default context around each core: twice the diameter of nuclei up to 32 px across. 64 px also
# keeps the outer regions of a 2 x 2 grid on a 4000 px image within the whole image's tile count.
DEFAULT_MARGIN = 64
DEFAULT_BLOCK_SIZE = 2048
# Objects farther than this from every cut side have "all the context there is".
_FAR = 1 << 30


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


# --------------------------------------------------------------------------- normalisation


@dataclass(frozen=True)
class NormStats:
    """Global intensity scaling of one image: channel choice and the (low, high) percentile values."""

    low: float  # mapped to 0
    high: float  # mapped to 1 (high <= low: a constant image, all zeros)
    channel: int | tuple[int, ...] | None = None  # as for datasets.io.normalize_image

    def apply(self, raw: np.ndarray, *, name: str = "<array>") -> np.ndarray:
        """Raw pixels of a region -> float32 HxWx3 in [0, 1], exactly as the in-memory reader scales the whole image."""
        from triageseg.datasets.io import _select_channels, _validate_dtype

        out = _select_channels(_validate_dtype(np.asarray(raw), name), self.channel, name)
        if self.high <= self.low:
            return np.zeros_like(out)
        out -= self.low
        out /= self.high - self.low
        return np.clip(out, 0.0, 1.0, out=out)

    def to_dict(self) -> dict:
        """JSON-ready."""
        ch = list(self.channel) if isinstance(self.channel, tuple) else self.channel
        return {"low": self.low, "high": self.high, "channel": ch}

    @classmethod
    def from_dict(cls, d: dict) -> NormStats:
        """Inverse of :meth:`to_dict`."""
        ch = d.get("channel")
        return cls(float(d["low"]), float(d["high"]), tuple(ch) if isinstance(ch, list) else ch)


def _windows(length: int, step: int) -> list[tuple[int, int]]:
    return [(s, min(length, s + step)) for s in range(0, length, step)]


def scan_image(
    source,
    *,
    channel: int | Sequence[int] | None = None,
    percentiles: tuple[float, float] = (1.0, 99.8),
    window: int = 2048,
    name: str = "<array>",
) -> tuple[NormStats, np.ndarray]:
    """One pass over a (lazy) image: global normalisation statistics and an overview.

    The percentiles come from the strided subsample the in-memory reader uses (every
    ``H // 1000``-th row and ``W // 1000``-th column, or every pixel of a small image), so
    an image that also fits in memory is scaled identically both ways. That subsample,
    normalised, is also the overview the router's thumbnail is made from (at most about
    2000 x 2000 pixels). Every pixel is read once (to refuse NaN anywhere and to find the
    extremes a near-constant image falls back on); only the subsample is kept.

    Args:
        source: array-like HxW or HxWxC (channels last) sliceable as ``source[y0:y1, x0:x1]``.
        channel: see :func:`triageseg.datasets.io.normalize_image`.
        percentiles: (low, high) in percent.
        window: side of the regions read at a time (bounds memory).
        name: what to call the image in error messages.

    Returns:
        ``(NormStats, overview)``; the overview is float32 hxwx3 in [0, 1].

    Raises:
        DataError: empty image, NaN/inf, unsupported dtype or channel layout.
    """
    from triageseg.datasets.io import _select_channels, _validate_dtype

    h, w = int(source.shape[0]), int(source.shape[1])
    if h < 1 or w < 1:
        raise DataError(name, f"empty image (shape {tuple(source.shape)})")
    if len(source.shape) == 3 and source.shape[2] == 2 and channel is None:
        raise DataError(name, f"image has 2 channels (shape {tuple(source.shape)}); choose one with channel=<index>")
    lo_p, hi_p = percentiles
    if not 0.0 <= lo_p < hi_p <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles!r}")
    dense = h * w * 3 <= 4_000_000  # as normalize_image: small images use every pixel
    sy, sx = (1, 1) if dense else (max(1, h // 1000), max(1, w // 1000))
    sample = np.zeros((math.ceil(h / sy), math.ceil(w / sx), 3), np.float32)
    lo_all, hi_all = math.inf, -math.inf
    for y0, y1 in _windows(h, window):
        for x0, x1 in _windows(w, window):
            raw = _validate_dtype(np.asarray(source[y0:y1, x0:x1]), name)
            picked = _select_channels(raw[(-y0) % sy :: sy, (-x0) % sx :: sx], channel, name)
            sample[math.ceil(y0 / sy) : math.ceil(y0 / sy) + picked.shape[0],
                   math.ceil(x0 / sx) : math.ceil(x0 / sx) + picked.shape[1]] = picked
            lo, hi = _extremes(raw, channel)
            lo_all, hi_all = min(lo_all, lo), max(hi_all, hi)
    lo, hi = (float(v) for v in np.percentile(sample, (lo_p, hi_p)))
    if hi <= lo:
        lo, hi = lo_all, hi_all
    stats = NormStats(lo, hi, _channel_spec(channel))
    return stats, stats.apply(sample, name=name)


def _extremes(raw: np.ndarray, channel) -> tuple[float, float]:
    """Min and max of the channels ``_select_channels`` would keep (without converting the region to float)."""
    if raw.ndim == 2:
        kept, zero_filled = raw, False
    elif channel is None:
        kept, zero_filled = (raw[..., :3] if raw.shape[2] == 4 else raw), False
    else:
        chans = [int(channel)] if isinstance(channel, (int, np.integer)) else [int(c) for c in channel]
        kept, zero_filled = raw[..., chans], 1 < len(chans) < 3  # missing colours are zero
    lo, hi = float(kept.min()), float(kept.max())
    return (min(lo, 0.0), max(hi, 0.0)) if zero_filled else (lo, hi)


def _channel_spec(channel) -> int | tuple[int, ...] | None:
    if channel is None or isinstance(channel, (int, np.integer)):
        return None if channel is None else int(channel)
    return tuple(int(c) for c in channel)


# --------------------------------------------------------------------------- one block


@dataclass(frozen=True, eq=False)
class BlockResult:
    """Candidate nuclei of one block, in the block's outer region.

    ``labels`` holds only the candidates, numbered 1..n; the table arrays have one entry
    per candidate (index ``k`` is label ``k + 1``); coordinates are in the whole image.
    """

    index: int  # the block's index in the grid
    outer: Box  # where ``labels`` lies in the image
    labels: np.ndarray  # uint32, the outer region's size, candidates only
    area: np.ndarray  # int64 pixels per candidate
    centroid: np.ndarray  # float64 (n, 2): y, x in image coordinates
    context: np.ndarray  # float64 pixels from the centroid to the nearest cut side of the outer region
    whole: np.ndarray  # bool: the candidate touches no cut side (it is not cut off)
    # postprocess.quality.pixel_sums of the block's core (each image pixel counted in one block)
    sums: np.ndarray = field(default_factory=lambda: np.zeros(6))

    @property
    def n(self) -> int:
        """Number of candidates."""
        return int(self.area.size)

    def to_bytes(self) -> bytes:
        """Compressed serialisation (npz in zstd) for a journal file or an object store."""
        import imagecodecs

        buf = io.BytesIO()
        np.savez(buf, index=self.index, outer=np.asarray(self.outer, np.int64), labels=self.labels,
                 area=self.area, centroid=self.centroid, context=self.context, whole=self.whole, sums=self.sums)
        # zstd at level 1: ~10x faster to read back than the zip deflate of savez_compressed, and smaller
        return imagecodecs.zstd_encode(buf.getvalue(), level=1)

    @classmethod
    def from_bytes(cls, data: bytes) -> BlockResult:
        """Inverse of :meth:`to_bytes`."""
        import imagecodecs

        with np.load(io.BytesIO(imagecodecs.zstd_decode(data))) as z:
            # journal entries of an earlier version have no sums (their quality signals count as empty)
            sums = z["sums"] if "sums" in z.files else np.zeros(6)
            return cls(int(z["index"]), tuple(int(v) for v in z["outer"]), z["labels"], z["area"], z["centroid"],
                       z["context"], z["whole"], sums)

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically to ``path``."""
        from triageseg.datasets.atomic import atomic_path

        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike) -> BlockResult:
        """Read a result written by :meth:`save`."""
        return cls.from_bytes(Path(path).read_bytes())


def segment_block(
    source,
    block: Block,
    *,
    probabilities: Callable[[np.ndarray], np.ndarray],
    params: WatershedParams,
    norm: NormStats,
    margin: int,
    name: str = "<array>",
) -> BlockResult:
    """Segment one block: read its outer region, normalise, probabilities, watershed, candidates.

    Args:
        source: array-like image, HxW or HxWxC, sliceable as ``source[y0:y1, x0:x1]``.
        block: a block of :func:`plan_blocks` for this image.
        probabilities: normalised HxWx3 float32 image -> 3xHxW class probabilities
            (e.g. ``functools.partial(pipe.probabilities, used_model="he")``).
        params: watershed parameters.
        norm: the image's global normalisation (:func:`scan_image`).
        margin: the grid's margin (candidates reach half of it beyond the core).
        name: what to call the image in error messages.

    Returns:
        The block's :class:`BlockResult`.

    Raises:
        ValueError: probabilities of the wrong shape.
        DataError: unreadable region, NaN/inf pixels.
    """
    y0, y1, x0, x1 = block.outer
    image = norm.apply(source[y0:y1, x0:x1], name=name)
    probs = np.asarray(probabilities(image))
    if probs.shape != (3, y1 - y0, x1 - x0):
        raise ValueError(f"block {block.index}: probabilities have shape {probs.shape}, expected {(3, y1 - y0, x1 - x0)}")
    labels = watershed(probs, params)
    cy0, cy1, cx0, cx1 = block.core
    core = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
    return dataclasses.replace(select_candidates(labels, block, margin=margin),
                               sums=pixel_sums(probs[:, core[0], core[1]], labels[core]))


def select_candidates(labels: np.ndarray, block: Block, *, margin: int) -> BlockResult:
    """The candidates among a block's instance labels (see the module docstring), renumbered 1..n."""
    y0, y1, x0, x1 = block.outer
    if labels.shape != (y1 - y0, x1 - x0):
        raise ValueError(f"block {block.index}: labels have shape {labels.shape}, expected {(y1 - y0, x1 - x0)}")
    n = int(labels.max(initial=0))
    empty = BlockResult(block.index, block.outer, np.zeros(labels.shape, np.uint32), np.zeros(0, np.int64),
                        np.zeros((0, 2)), np.zeros(0), np.zeros(0, bool))
    if n == 0:
        return empty
    flat = labels.ravel()
    area = np.bincount(flat, minlength=n + 1)
    rows, cols = np.indices(labels.shape, dtype=np.float64)
    cy = np.bincount(flat, rows.ravel(), minlength=n + 1) / np.maximum(area, 1) + y0
    cx = np.bincount(flat, cols.ravel(), minlength=n + 1) / np.maximum(area, 1) + x0
    reach = margin // 2
    cy0, cy1, cx0, cx1 = block.core
    inside = (cy >= cy0 - reach) & (cy < cy1 + reach) & (cx >= cx0 - reach) & (cx < cx1 + reach) & (area > 0)
    inside[0] = False
    keep = np.flatnonzero(inside)
    if keep.size == 0:
        return empty
    top, bottom, left, right = block.cut
    far = np.full(keep.size, float(_FAR))
    context = np.minimum.reduce([
        cy[keep] - y0 if top else far, y1 - cy[keep] if bottom else far,
        cx[keep] - x0 if left else far, x1 - cx[keep] if right else far,
    ])
    boxes = ndi.find_objects(labels)
    h, w = labels.shape
    whole = np.array([
        not ((top and boxes[k - 1][0].start == 0) or (bottom and boxes[k - 1][0].stop == h)
             or (left and boxes[k - 1][1].start == 0) or (right and boxes[k - 1][1].stop == w))
        for k in keep.tolist()
    ], bool)
    lut = np.zeros(n + 1, np.uint32)
    lut[keep] = np.arange(1, keep.size + 1, dtype=np.uint32)
    return BlockResult(block.index, block.outer, lut[labels], area[keep].astype(np.int64),
                       np.stack([cy[keep], cx[keep]], axis=1), context.astype(np.float64), whole)
