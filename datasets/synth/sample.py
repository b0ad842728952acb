"""One synthetic sample: a layout, then the modality's renderer."""

from __future__ import annotations

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


def synth_sample(modality: str, *, size: int = 256, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw one synthetic image and its instance labels.

    Args:
        modality: one of ``MODALITIES``.
        size: image side in pixels (nuclei sizes are in pixels, independent of it).
        rng: the random generator; the same generator state gives the same sample.

    Returns:
        (image uint8 HxWx3, labels uint32 HxW with consecutive ids 1..N, 0 = background).
        Labels never overlap and each nucleus is one 4-connected component.

    Raises:
        ValueError: unknown modality (the message lists the valid ones) or size < 16.
    """
    _check_modality(modality)
    _check_size(size)
    labels, nrad = _place_nuclei(rng, int(size), STYLES[modality])
    return _RENDERERS[modality](rng, labels, nrad), labels

