"""Global normalisation of a huge image: one pass for the percentiles and an overview.

Every block (and every band of probability rows) of a huge image is scaled with the same
statistics, taken from the strided subsample the in-memory reader uses, so an image that
also fits in memory is scaled identically both ways. Re-exported by
:mod:`triageseg.pipeline.blockwise.blocks`.

Example:
    >>> norm, overview = scan_image(np.zeros((64, 64), np.uint8))
    >>> norm.apply(np.zeros((2, 2), np.uint8)).shape
    (2, 2, 3)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from triageseg.datasets.errors import DataError


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
