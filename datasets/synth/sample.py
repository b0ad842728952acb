"""One synthetic sample: a layout, then the modality's renderer."""

from __future__ import annotations

from functools import partial

import numpy as np

from triageseg.datasets.synth.brightfield import _render_brightfield
from triageseg.datasets.synth.fluorescence import _render_fluorescence
from triageseg.datasets.synth.he import _render_he
from triageseg.datasets.synth.ihc import _render_ihc
from triageseg.datasets.synth.layout import _place_nuclei
from triageseg.datasets.synth.styles import MAX_SIZE, MIN_SIZE, STYLES, _check_modality

_RENDERERS = {
    "fluorescence": _render_fluorescence,
    "brightfield": _render_brightfield,
    "he": _render_he,
    "ihc": _render_ihc,
}


def _check_size(size: int) -> None:
    if not MIN_SIZE <= int(size) <= MAX_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} and at most {MAX_SIZE} pixels, got {size}")


def synth_sample(
    modality: str, *, size: int = 256, rng: np.random.Generator, diameter: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one synthetic image and its instance labels.

    Args:
        modality: one of ``MODALITIES``.
        size: image side in pixels (nuclei sizes are in pixels, independent of it).
        rng: the random generator; the same generator state gives the same sample.
        diameter: the median nucleus diameter (px) wanted: the sample is drawn at the
            modality's own size on a canvas of ``size / zoom`` and resized by ``zoom``
            (bilinear up, smoothed down; each label pixel to the nucleus covering most of it
            under the same resize), so texture and blur scale with the
            nuclei as under another objective. None (default): the modality's own sizes,
            the samples of earlier versions bit for bit.

    Returns:
        (image uint8 HxWx3, labels uint32 HxW with consecutive ids 1..N, 0 = background).
        Labels never overlap and each nucleus is one 4-connected component.

    Raises:
        ValueError: unknown modality (the message lists the valid ones) or size < 16.
    """
    _check_modality(modality)
    _check_size(size)
    if diameter is None:
        labels, nrad = _place_nuclei(rng, int(size), STYLES[modality])
        return _RENDERERS[modality](rng, labels, nrad), labels
    return _zoomed(modality, int(size), rng, float(diameter))


def _zoomed(modality: str, size: int, rng: np.random.Generator, diameter: float) -> tuple[np.ndarray, np.ndarray]:
    """A sample whose nuclei have a median diameter near ``diameter``: drawn at base size, then resized."""
    from skimage.transform import resize

    from triageseg.segmenters.label_resize import resize_labels_like

    if not (2.0 <= diameter <= 1000.0):
        raise ValueError(f"diameter must be in [2, 1000] pixels, got {diameter}")
    r_lo, r_hi = STYLES[modality].radius
    zoom = diameter / (2.0 * np.sqrt(r_lo * r_hi))  # the style's typical diameter -> the one wanted
    canvas = int(np.clip(round(size / zoom), MIN_SIZE, MAX_SIZE))
    labels, nrad = _place_nuclei(rng, canvas, STYLES[modality], radius_center=np.sqrt(r_lo * r_hi))
    image = _RENDERERS[modality](rng, labels, nrad)
    if canvas == size:
        return image, labels
    image = resize(image.astype(np.float32), (size, size), order=1, anti_aliasing=zoom < 1, preserve_range=True)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    labels = resize_labels_like(labels, (size, size), partial(_resize_rows, anti_aliasing=zoom < 1))
    # ids stay consecutive: a nucleus lost when shrinking is dropped from the numbering
    ids = np.unique(labels)
    lut = np.zeros(int(labels.max()) + 1, np.uint32)
    lut[ids[ids > 0]] = np.arange(1, int((ids > 0).sum()) + 1, dtype=np.uint32)
    return image, lut[labels]


def _resize_rows(arr: np.ndarray, n_out: int, *, anti_aliasing: bool) -> np.ndarray:
    """The image's resize in :func:`_zoomed`, along the rows of ``arr`` only (its labels follow it)."""
    from skimage.transform import resize

    return resize(arr, (int(n_out), arr.shape[1]), order=1, anti_aliasing=anti_aliasing, preserve_range=True)
