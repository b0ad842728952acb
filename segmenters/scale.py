"""Per-modality input scale: bring nuclei to the size the network sees best.

Nuclei differ in size between modalities (in the synthetic data the median H&E nucleus
is 11 px across, fluorescence 15 px, brightfield 20 px; in DSB 2018 the spread is wider).
A specialist knows its modality, so it can resize its images by a fixed factor before the
network and resize the probabilities back afterwards: every specialist then sees nuclei
of about the same size, the size the shared base model learned on. The generalist does
not know the modality and runs at scale 1. Cellpose does the same with its ``diameter``.

The scale is set per segmenter (``train segmenter --scale``, or the tuning space);
``train all`` leaves it at 1, as 1.21 and 1.5 gained nothing on the synthetic H&E
(``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import math

import numpy as np

# Widest resize: nuclei of 4 px brought to 32, or of 480 px to 15 (size triage, router/size.py).
MIN_SCALE, MAX_SCALE = 1 / 32, 8.0


def check_scale(scale: float) -> float:
    """``scale`` as a float, refused outside ``[MIN_SCALE, MAX_SCALE]``."""
    value = float(scale)
    if not (MIN_SCALE <= value <= MAX_SCALE) or not math.isfinite(value):
        raise ValueError(f"scale must be in [{MIN_SCALE}, {MAX_SCALE}], got {scale!r}")
    return value


def scaled_shape(shape: tuple[int, ...], scale: float) -> tuple[int, int]:
    """(height, width) of an image of ``shape`` resized by ``scale`` (at least 1 pixel each)."""
    return max(1, int(round(shape[0] * scale))), max(1, int(round(shape[1] * scale)))


def _taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """(source index, weight), each ``n_out x k``: output pixel ``i`` is ``sum_k w[i, k] * in[idx[i, k]]``.

    Enlarging interpolates linearly between pixel centres; shrinking averages the input
    pixels an output pixel covers, each by its covered length (area averaging).
    """
    if n_out >= n_in:
        src = (np.arange(n_out, dtype=np.float64) + 0.5) * n_in / n_out - 0.5
        src = np.clip(src, 0, n_in - 1)
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        frac = src - i0
        idx = np.stack([i0, np.minimum(i0 + 1, n_in - 1)], axis=1)
        w = np.stack([1.0 - frac, frac], axis=1)
    else:
        r = n_in / n_out
        k = int(np.ceil(r)) + 1
        lo = np.arange(n_out, dtype=np.float64) * r
        first = np.floor(lo).astype(np.int64)
        idx = first[:, None] + np.arange(k)[None, :]
        left = np.maximum(idx, lo[:, None])
        right = np.minimum(idx + 1, lo[:, None] + r)
        w = np.clip(right - left, 0.0, None) / r
        idx = np.minimum(idx, n_in - 1)
    return idx.astype(np.int64), w.astype(np.float32)


def _apply_taps(arr: np.ndarray, idx: np.ndarray, w: np.ndarray, axis: int) -> np.ndarray:
    """``arr`` resampled along ``axis`` (0 or 1) by the taps; elementwise, so any band of rows gives the same values."""
    out = None
    # Along columns the weights repeat per channel: the weights as one row of W x C values multiply the rows of
    # a contiguous H x (W x C) view (a broadcast over a 3-wide last axis is 5x slower; the same products).
    channels = int(np.prod(arr.shape[2:], dtype=np.int64)) if axis == 1 else 1
    for j in range(idx.shape[1]):
        part = np.take(arr, idx[:, j], axis=axis)
        if axis == 0:
            wj = w[:, j].reshape((-1,) + (1,) * (arr.ndim - 1))
        else:
            wj = np.repeat(w[:, j], channels).reshape((1, -1))
            part = part.reshape(part.shape[0], -1)
        part *= wj  # np.take gave a new array: weighted and added in place (no temporaries)
        if out is None:
            out = part
        else:
            out += part
    return out if axis == 0 else out.reshape((arr.shape[0], idx.shape[0]) + arr.shape[2:])


ROW_CHUNK = 64  # output rows RowResizer.rows computes at once


class RowResizer:
    """Rows of an image resized to ``shape``, computed from the rows of the source that they need.

    Any band ``rows(y0, y1)`` is bit for bit the same rows of :func:`resize_image` of the
    whole image (each output value is the same weighted sum of the same inputs), which is
    what lets the block path (``pipeline.blockwise.large``) run a segmenter at a scale != 1.
    """

    def __init__(self, read_rows, src_shape: tuple[int, int], shape: tuple[int, int], *,
                 channels_first: bool = False):
        self._read = read_rows
        self.channels_first = bool(channels_first)  # rows are C x H x W (probabilities), not H x W x C
        self.src_shape = (int(src_shape[0]), int(src_shape[1]))
        self.shape = (int(shape[0]), int(shape[1]))
        self._iy, self._wy = _taps(self.src_shape[0], self.shape[0])
        self._ix, self._wx = _taps(self.src_shape[1], self.shape[1])

    def source_rows(self, y0: int, y1: int) -> tuple[int, int]:
        """The source rows ``[lo, hi)`` that output rows ``y0:y1`` are made from."""
        idx = self._iy[y0:y1]
        return int(idx.min()), int(idx.max()) + 1

    def rows(self, y0: int, y1: int) -> np.ndarray:
        """Output rows ``y0:y1`` (float32, H x W x C or H x W as the source; C x H x W with ``channels_first``).

        Computed :data:`ROW_CHUNK` output rows at a time into one array: the temporaries of
        the taps are those of a few rows, not of the band (on a slide's full-width bands
        they were several times the band's size). Channels first, each plane is resized on
        its own: the same products and sums as the H x W x C layout, so the same values bit
        for bit, without transposing the array (a 3 x 3133 x 3133 transpose took 0.9 s).
        """
        lo, hi = self.source_rows(y0, y1)
        src = np.asarray(self._read(lo, hi), dtype=np.float32)
        if self.channels_first:
            out = np.empty((src.shape[0], y1 - y0, self.shape[1]), np.float32)
            planes = [(src[c], out[c]) for c in range(src.shape[0])]
        else:
            out = np.empty((y1 - y0, self.shape[1]) + src.shape[2:], np.float32)
            planes = [(src, out)]
        for a in range(y0, y1, ROW_CHUNK):
            b = min(y1, a + ROW_CHUNK)
            for plane, dest in planes:
                part = _apply_taps(plane, self._iy[a:b] - lo, self._wy[a:b], axis=0)
                dest[a - y0 : b - y0] = _apply_taps(part, self._ix, self._wx, axis=1)
        return out


def resize_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """HxWxC (or HxW) float image resized to ``shape``: bilinear up, area-averaged down (see :class:`RowResizer`)."""
    h, w = int(shape[0]), int(shape[1])
    if image.shape[:2] == (h, w):
        return image
    src = np.asarray(image, dtype=np.float32)
    return RowResizer(lambda a, b: src[a:b], src.shape[:2], (h, w)).rows(0, h)


def resize_probabilities(probs: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(classes, h, w) probabilities resized to ``shape``, still summing to 1 at every pixel."""
    h, w = int(shape[0]), int(shape[1])
    if probs.shape[1:] == (h, w):
        return probs
    src = np.asarray(probs, dtype=np.float32)
    return _renormalise(RowResizer(lambda a, b: src[:, a:b], src.shape[1:], (h, w), channels_first=True).rows(0, h))


def _renormalise(out: np.ndarray) -> np.ndarray:
    """Resized (classes, h, w) float32 probabilities, clipped at 0 and divided by their sum in place (per pixel)."""
    np.clip(out, 0.0, None, out=out)
    out /= np.maximum(out.sum(axis=0, keepdims=True), 1e-12)
    return out


def resample_probability_stream(bands, src_shape: tuple[int, int], shape: tuple[int, int], *, start: int = 0):
    """Bands ``(y0, y1, probs)`` of probabilities on a ``src_shape`` grid -> bands on the ``shape`` grid.

    Each output band is bit for bit the same rows of :func:`resize_probabilities` of the
    whole array. ``bands`` must begin at or above :func:`first_source_row` of ``start``.

    Yields:
        ``(y0, y1, probs)`` for consecutive output rows from ``start`` to ``shape[0]``.
    """
    h = int(shape[0])
    buf: dict = {"top": None, "rows": None}  # source rows held, C x H x W

    def read(a: int, b: int) -> np.ndarray:
        return buf["rows"][:, a - buf["top"] : b - buf["top"]]

    resizer = RowResizer(read, src_shape, shape, channels_first=True)
    last_tap = resizer._iy.max(axis=1)  # the last source row each output row needs (non-decreasing)
    emitted = start
    for y0, y1, probs in bands:
        rows = np.asarray(probs, dtype=np.float32)
        del probs  # a band of a slide's width at the network's scale: gone before the next one is made
        if buf["rows"] is None:
            buf["top"], buf["rows"] = y0, rows
        else:
            if y0 != buf["top"] + buf["rows"].shape[1]:
                raise ValueError(f"probability bands are not consecutive: rows from {y0}")
            buf["rows"] = np.concatenate([buf["rows"], rows], axis=1)
        del rows
        ready = h if y1 >= src_shape[0] else int(np.searchsorted(last_tap, y1, side="left"))
        if ready > emitted:
            out = _renormalise(resizer.rows(emitted, ready))
            yield emitted, ready, out
            emitted = ready
            if emitted < h:  # drop the source rows no later output row needs
                keep = int(resizer._iy[emitted:].min())
                buf["rows"], buf["top"] = buf["rows"][:, keep - buf["top"] :], keep


def first_source_row(src_shape: tuple[int, int], shape: tuple[int, int], start: int) -> int:
    """The first row on the ``src_shape`` grid that output rows ``start:`` (on the ``shape`` grid) need."""
    if start >= shape[0]:
        return int(src_shape[0])
    idx, _ = _taps(int(src_shape[0]), int(shape[0]))
    return int(idx[start:].min())


def _resample_rows(arr: np.ndarray, n_out: int) -> np.ndarray:
    """(n, k) float rows resampled to (n_out, k) along the rows by :func:`resize_image`'s operator."""
    return resize_image(arr, (int(n_out), arr.shape[1]))


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Instance labels resized to ``shape`` as :func:`resize_image` resizes their image; ids unchanged.

    Each pixel goes to the nucleus (or background) with the largest share of it under the
    image's operator (:mod:`triageseg.segmenters.label_resize`), so the labels stay on the
    image: nearest neighbour put them a quarter pixel off it when shrinking by 2.
    """
    from triageseg.segmenters.label_resize import resize_labels_like

    return resize_labels_like(labels, shape, _resample_rows)
