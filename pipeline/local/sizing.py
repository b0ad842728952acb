"""Size triage's probe: the segmenter itself checks the estimated nucleus size on one small crop.

The classical estimate (:func:`triageseg.router.size.estimate_diameter`) measures the
nuclei's masks; clumps of touching nuclei and textured nuclei bias it. The segmenter knows
nuclei: run at the estimated scale on one crop that the network sees at ``side`` x ``side``
pixels (1/16 of a 512 x 512 image's work at 128), its decoded objects (those not cut by the
crop's edge) give the median diameter again. Where the two disagree the probe's wins, and
a second round at the corrected scale settles it (Cellpose 3 refines its size model's
estimate by one segmentation the same way, on the whole image).

The crop is the candidate (the image's centre and its four quarter points) with the most
foreground in the classical mask's sense (the largest spread of the nucleus signal), so an
image with few nuclei is probed where they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

# Side of the crop as the network sees it (pixels), and how many rounds at most.
PROBE_SIDE = 128
PROBE_ROUNDS = 2
# A probe closer than this to the size it ran at (octaves) confirms it: no further round.
AGREE_OCTAVES = 0.2


def _interior_diameter(labels: np.ndarray) -> float | None:
    """Median equivalent diameter of the objects not touching the border (None: none)."""
    from triageseg.router.size import median_diameter

    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    inner = labels.copy()
    inner[np.isin(inner, edge)] = 0
    return median_diameter(inner)


def probe_diameter(
    pipe,
    used_model: str,
    diameter: float,
    shape: tuple[int, int],
    read_crop: Callable[[int, int, int, int], np.ndarray],
    *,
    side: int = PROBE_SIDE,
    rounds: int = PROBE_ROUNDS,
) -> float:
    """``diameter`` checked by the segmenter on one crop (see the module docstring); the diameter to use.

    Args:
        pipe: the :class:`~triageseg.pipeline.local.single.Pipeline`.
        used_model: the segmenter the image goes to (it must know its training diameter).
        diameter: the classical estimate (calibrated), native pixels.
        shape: the image's (H, W).
        read_crop: ``(top, left, height, width) -> normalised HxWx3`` crop of the image.
    """
    from triageseg.postprocess.watershed import watershed
    from triageseg.router.size import nucleus_signal
    from triageseg.segmenters.scale import MAX_SCALE, MIN_SCALE

    train = pipe.size_config(used_model)[0]
    h, w = int(shape[0]), int(shape[1])
    d = float(diameter)
    for _ in range(rounds):
        scale = float(np.clip(train / d, MIN_SCALE, MAX_SCALE))
        c = int(min(h, w, max(32, round(side / scale))))
        best, best_spread = None, -1.0
        for fy, fx in ((0.5, 0.5), (0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75)):
            top, left = int(min(max(0, fy * h - c / 2), h - c)), int(min(max(0, fx * w - c / 2), w - c))
            crop = read_crop(top, left, c, c)
            sig = nucleus_signal(crop[:: max(1, c // 64), :: max(1, c // 64)])[0]
            spread = float(np.percentile(sig, 95) - np.percentile(sig, 5))
            if spread > best_spread:
                best, best_spread = crop, spread
        probs = pipe.probabilities(best, used_model, scale)
        found = _interior_diameter(watershed(probs, pipe.params(used_model, scale)))
        if found is None:
            break
        agree = abs(math.log2(found / d)) < AGREE_OCTAVES
        d = found
        if agree:
            break
    return d
