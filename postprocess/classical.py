"""The "no learning" baseline: Otsu threshold + distance-transform watershed.

Used by the accuracy benchmark to show what the learned segmenters add. It is the
classical CellProfiler-style pipeline:

1. A nuclear signal channel: gray intensity (default; on the synthetic modalities it
   beats the hematoxylin optical density of ``skimage.color.rgb2hed``, which is
   available as ``channel="hematoxylin"``).
2. Gaussian smoothing, Otsu threshold. Polarity is automatic: nuclei are the
   minority of the field of view, so if the bright side covers more than half of
   the image the dark side is taken (dark nuclei on a light background).
3. Holes filled, specks removed.
4. Touching nuclei split by a watershed on the distance to background, seeded at
   its local maxima at least ``min_distance`` apart.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

_EIGHT = np.ones((3, 3), bool)
CHANNELS = ("gray", "hematoxylin")


def nuclear_signal(image: np.ndarray, *, channel: str = "gray") -> np.ndarray:
    """A float32 HxW map where nuclei differ most from their surroundings.

    Args:
        image: HxWx3 (or HxW) float image in [0, 1].
        channel: ``"gray"`` (mean of the channels) or ``"hematoxylin"`` (optical
            density of the hematoxylin stain; high on nuclei).

    Raises:
        ValueError: bad shape or channel name.
    """
    img = _check_image(image)
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r}; valid: {', '.join(CHANNELS)}")
    if img.ndim == 2:
        return img
    if channel == "gray":
        return img.mean(axis=-1, dtype=np.float32)
    from skimage.color import rgb2hed

    return rgb2hed(np.clip(img, 0.0, 1.0))[..., 0].astype(np.float32)


def classical_segment(
    image: np.ndarray,
    *,
    channel: str = "gray",
    sigma: float = 1.0,
    min_distance: int = 5,
    min_size: int = 15,
) -> np.ndarray:
    """Segment nuclei without learning (Otsu + distance-transform watershed).

    Args:
        image: HxWx3 float32 image in [0, 1] (as ``datasets.read_image`` returns), or HxW.
        channel: nuclear signal, see :func:`nuclear_signal`.
        sigma: Gaussian smoothing before thresholding, pixels (0 = none).
        min_distance: minimum distance between two nucleus centres, pixels.
        min_size: objects smaller than this (pixels) are removed.

    Returns:
        HxW uint32 labels, 0 = background, objects numbered 1..n.

    Raises:
        ValueError: bad image shape/dtype or option values.

    Example:
        >>> img = np.zeros((32, 32, 3), np.float32); img[8:20, 8:20] = 1.0
        >>> int(classical_segment(img).max())
        1
    """
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_otsu
    from skimage.segmentation import watershed

    if sigma < 0 or min_distance < 1 or min_size < 0:
        raise ValueError(f"need sigma >= 0, min_distance >= 1, min_size >= 0; got {sigma}, {min_distance}, {min_size}")
    signal = nuclear_signal(image, channel=channel)
    if sigma > 0:
        signal = ndi.gaussian_filter(signal, sigma)
    if float(signal.max()) - float(signal.min()) < 1e-6:
        return np.zeros(signal.shape, np.uint32)  # a constant image holds no nuclei
    mask = signal > threshold_otsu(signal)
    if mask.mean() > 0.5:  # nuclei are the minority: take the other side
        mask = ~mask
    mask = ndi.binary_fill_holes(mask)
    comps, n = ndi.label(mask, structure=_EIGHT)
    if n == 0:
        return np.zeros(mask.shape, np.uint32)
    sizes = np.bincount(comps.ravel())
    keep = sizes >= max(min_size, 1)
    keep[0] = False
    mask = keep[comps]
    comps = np.where(mask, comps, 0)
    dist = ndi.distance_transform_edt(mask)
    peaks = peak_local_max(dist, min_distance=int(min_distance), labels=comps, exclude_border=False)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # A component that got no peak (flat, tiny) is seeded as a whole.
    unseeded = np.ones(n + 1, bool)
    unseeded[comps[markers > 0]] = False
    unseeded[0] = False
    extra = unseeded[comps]
    markers[extra] = comps[extra] + len(peaks)
    labels = watershed(-dist, markers, mask=mask, connectivity=2)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= max(min_size, 1)
    keep[0] = False
    return ((np.cumsum(keep) * keep).astype(np.uint32))[labels]


def _check_image(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] != 3):
        raise ValueError(f"expected an HxWx3 (or HxW) image, got shape {img.shape}")
    if img.dtype.kind not in "fui":
        raise ValueError(f"expected a numeric image, got dtype {img.dtype}")
    if img.dtype.kind in "ui":
        img = img.astype(np.float32) / float(max(np.iinfo(img.dtype).max, 1))
    return img.astype(np.float32, copy=False)
