"""The scale-space alternative of the size estimate (``estimate_diameter(method="log")``).

Blobs of the Laplacian of Gaussian over scales, each level filtered on the image downsampled so
that its sigma is 1.5 to 3 pixels; the diameter is the median scale of the strongest blobs. Far
worse than the mask estimate on textured images (texture and noise answer at small scales), kept
as the measured alternative (benchmarks/bench_scale.py).
"""

from __future__ import annotations

import math

import numpy as np

from triageseg.router.size import MAX_DIAMETER, MIN_BLOBS, MIN_DIAMETER, SizeEstimate, _downsample2

# Sigmas per octave of the scale space.
LEVELS_PER_OCTAVE = 4


def blobs(signal: np.ndarray, *, min_diameter: float, max_diameter: float) -> tuple[np.ndarray, np.ndarray]:
    """(sigma in full-resolution pixels, response) of the scale-space maxima of ``signal``.

    Level ``k`` is filtered on the image downsampled by ``f = 2^floor(log2(sigma_k / 1.5))``,
    so every sigma is 1.5 to 3 pixels of the image it runs on; a level is compared with its
    scale neighbours computed at its own resolution.
    """
    from scipy import ndimage as ndi

    sig_lo, sig_hi = min_diameter / (2 * math.sqrt(2)), max_diameter / (2 * math.sqrt(2))
    n = int(math.ceil(LEVELS_PER_OCTAVE * math.log2(sig_hi / sig_lo))) + 1
    sigmas = sig_lo * 2.0 ** (np.arange(n) / LEVELS_PER_OCTAVE)
    octave = np.maximum(0, np.floor(np.log2(sigmas / 1.5))).astype(int)
    pyramid = [signal]
    sigmas_out, responses = [], []
    for o in np.unique(octave):
        while len(pyramid) <= o:
            pyramid.append(_downsample2(pyramid[-1]))
        img, factor = pyramid[o], 2.0**o
        if min(img.shape) < 8:
            break
        levels = np.nonzero(octave == o)[0]
        idx = list(range(max(0, levels[0] - 1), min(n, levels[-1] + 2)))
        stack = np.stack([-((s / factor) ** 2) * ndi.gaussian_laplace(img, s / factor, mode="reflect")
                          for s in sigmas[idx]])
        peak = (ndi.maximum_filter(stack, size=(3, 3, 3), mode="nearest") == stack) & (stack > 0)
        peak[:, 0], peak[:, -1], peak[:, :, 0], peak[:, :, -1] = False, False, False, False
        for i, k in enumerate(idx):
            if octave[k] != o:
                continue
            ys, xs = np.nonzero(peak[i])
            if ys.size:
                responses.append(stack[i][ys, xs])
                sigmas_out.append(np.full(ys.size, sigmas[k]))
    if not responses:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(sigmas_out), np.concatenate(responses)


def estimate_log(signal: np.ndarray, *, strongest: float = 0.25) -> SizeEstimate:
    max_diameter = min(240.0, 0.5 * min(signal.shape))
    if max_diameter <= 4.0:
        return SizeEstimate(None, 0)
    sig, resp = blobs(signal, min_diameter=4.0, max_diameter=max_diameter)
    if resp.size == 0:
        return SizeEstimate(None, 0)
    top = float(np.percentile(resp, 99))
    keep = resp >= strongest * top
    if int(keep.sum()) < MIN_BLOBS or top < 0.02:
        return SizeEstimate(None, int(keep.sum()))
    diameter = float(np.median(sig[keep])) * 2 * math.sqrt(2)
    return SizeEstimate(float(np.clip(diameter, MIN_DIAMETER, MAX_DIAMETER)), int(keep.sum()))
