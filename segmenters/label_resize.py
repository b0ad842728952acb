"""Instance labels resized the way their image is: each pixel goes to the nucleus that covers most of it.

Nearest-neighbour resizing takes one point of the source per output pixel. When an image is
shrunk by an even whole factor that point is not the output pixel's centre but one corner of
the source pixels it covers (for 2x: ``2i`` or ``2i + 1`` of the block ``[2i, 2i + 2)``,
whose centre is ``2i + 0.5``), so the labels come out a quarter of an output pixel off the
image, which is area-averaged around the true centre. For nuclei of 8 px that offset alone
costs IoU 0.1 (``benchmarks/RESULTS.md``: the synthetic zoom series at 0.5).

Here each nucleus's indicator (1 inside, 0 outside) is resampled with the image's own linear
operator, and a pixel goes to whichever of background and the nuclei has the largest share.
The operator is separable: one sparse matrix per axis (output x input), taken from the
resampling function itself (:func:`operator_matrix`), so the labels follow any linear resize
exactly (:func:`triageseg.segmenters.scale.resize_image`, or ``skimage.transform.resize``
with its anti-aliasing for the synthetic generator). Exact ties (an edge through the middle
of a 2 x 2 block) alternate on a checkerboard: even ``row + column`` takes the higher id,
odd the lower, so no tie rule grows or moves the nuclei. A nucleus that comes out in pieces
keeps its largest 4-connected piece.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage as ndi
from scipy import sparse

# Resample float32 rows: (n_in, k) -> (n_out, k) along the first axis, the same linear operator as the image's.
Resample1D = Callable[[np.ndarray, int], np.ndarray]

_COMB = 512  # impulses this far apart (input pixels) never share an output pixel for factors up to ~100
_TIE = 1e-5  # shares this close are a tie (float32 sums of the same weights)
_DENSE_MAX = 1 << 22  # an axis's matrix is kept dense up to this many entries (16 MB)


def operator_matrix(resample: Resample1D, n_in: int, n_out: int) -> sparse.csr_matrix:
    """The ``n_out x n_in`` matrix of a 1-D linear resampling, measured by resampling impulses.

    A comb of impulses :data:`_COMB` apart is resampled per call (one column per offset),
    so an 8192-px axis costs 512 columns of 8192 rows, not an 8192 x 8192 identity. Each
    output value is credited to the impulse nearest its centre's source position.
    """
    n_in, n_out = int(n_in), int(n_out)
    period = min(_COMB, n_in)
    comb = np.zeros((n_in, period), np.float32)
    cols = np.arange(period)
    for start in range(0, n_in, period):
        rows = start + cols
        ok = rows < n_in
        comb[rows[ok], cols[ok]] = 1.0
    resp = np.asarray(resample(comb, n_out), np.float64)  # n_out x period
    centre = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5  # each output pixel's centre in input pixels
    # the impulse of column c nearest output i: c + m * period
    m = np.rint((centre[:, None] - cols[None, :]) / period)
    src = cols[None, :] + m * period
    out_i, col = np.nonzero(np.abs(resp) > 1e-7)
    j = src[out_i, col].astype(np.int64)
    keep = (j >= 0) & (j < n_in)
    mat = sparse.csr_matrix((resp[out_i, col][keep], (out_i[keep], j[keep])), shape=(n_out, n_in))
    mat.sum_duplicates()
    return mat


class _Axis:
    """One axis's operator: its matrix and, per input pixel, the output rows it reaches."""

    def __init__(self, mat: sparse.csr_matrix):
        self.mat = mat.tocsr()
        # slicing a dense copy is ~10x faster than a sparse one
        self.dense = mat.toarray().astype(np.float32) if mat.shape[0] * mat.shape[1] <= _DENSE_MAX else None
        csc = mat.tocsc()
        n_in = mat.shape[1]
        self.lo = np.full(n_in, mat.shape[0], np.int64)
        self.hi = np.full(n_in, -1, np.int64)
        starts, ends = csc.indptr[:-1], csc.indptr[1:]
        has = ends > starts
        if has.any():
            self.lo[has] = np.minimum.reduceat(csc.indices, starts[has])
            self.hi[has] = np.maximum.reduceat(csc.indices, starts[has])

    def window(self, a: int, b: int) -> tuple[int, int, np.ndarray]:
        """Output rows ``[lo, hi)`` that input ``[a, b)`` reaches, and that block of the matrix (dense)."""
        lo, hi = int(self.lo[a:b].min()), int(self.hi[a:b].max()) + 1
        if hi <= lo:
            return 0, 0, np.zeros((0, b - a), np.float32)
        if self.dense is not None:
            return lo, hi, self.dense[lo:hi, a:b]
        return lo, hi, self.mat[lo:hi, a:b].toarray().astype(np.float32)


def resize_labels_like(labels: np.ndarray, shape: tuple[int, int], resample: Resample1D) -> np.ndarray:
    """Instance labels resized to ``shape`` with the linear operator ``resample``; ids unchanged.

    Args:
        labels: HxW integer labels, 0 = background.
        shape: (height, width) wanted.
        resample: the image's resampling along one axis (see :data:`Resample1D`).

    Returns:
        Labels of ``shape`` and the same dtype; a nucleus too small to win any pixel is gone.
    """
    h, w = int(shape[0]), int(shape[1])
    labels = np.asarray(labels)
    if labels.shape == (h, w):
        return labels
    ry = _Axis(operator_matrix(resample, labels.shape[0], h))
    rx = ry if (labels.shape[1], w) == (labels.shape[0], h) else _Axis(operator_matrix(resample, labels.shape[1], w))
    total = np.zeros((h, w), np.float32)  # the nuclei's summed shares: background's share is 1 - total
    best = np.zeros((h, w), np.float32)
    best_id = np.zeros((h, w), labels.dtype)
    even = ((np.arange(h)[:, None] + np.arange(w)[None, :]) % 2) == 0
    for k, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        y0, y1, ys = ry.window(sl[0].start, sl[0].stop)
        x0, x1, xs = rx.window(sl[1].start, sl[1].stop)
        if y1 <= y0 or x1 <= x0:
            continue
        share = ys @ (labels[sl] == k).astype(np.float32) @ xs.T
        win = (slice(y0, y1), slice(x0, x1))
        total[win] += share
        cur = best[win]
        # ids come in increasing order: a tie goes to this (higher) id on even pixels only
        take = (share > cur + _TIE) | ((np.abs(share - cur) <= _TIE) & even[win] & (share > _TIE))
        cur[take] = share[take]
        best_id[win][take] = k
    background = 1.0 - total
    keep = (best > background + _TIE) | ((np.abs(best - background) <= _TIE) & even)
    out = np.where(keep, best_id, 0).astype(labels.dtype)
    return _largest_pieces(out)


def stray_pieces(mask: np.ndarray) -> np.ndarray | None:
    """The pixels of ``mask`` outside its largest 4-connected piece, or None when it is one piece (or empty)."""
    pieces, count = ndi.label(mask)
    if count <= 1:
        return None
    sizes = np.bincount(pieces.ravel())
    sizes[0] = 0
    return mask & (pieces != sizes.argmax())


def _largest_pieces(labels: np.ndarray) -> np.ndarray:
    """Each label reduced to its largest 4-connected piece (the rest becomes background), in place."""
    for k, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        stray = stray_pieces(labels[sl] == k)
        if stray is not None:
            labels[sl][stray] = 0
    return labels
