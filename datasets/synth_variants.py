"""Shifted domains built on top of the synthetic generator, for fine-tuning tests and benchmarks.

The renderers of :mod:`triageseg.datasets.synth` are used as they are; these variants only
transform what they draw, so a bundle trained on the generator meets images it has not seen:

- ``ihc``: an H&E field re-stained as immunohistochemistry: the eosin absorbance becomes
  DAB (brown) and the hematoxylin is kept (blue nuclei in brown tissue), by colour
  deconvolution with scikit-image's ``rgb2hed`` / ``hed2rgb``;
- ``zoom``: a fluorescence field drawn at half the size and enlarged 2x (nuclei twice as
  large, their texture and noise blurred), i.e. a higher magnification.
"""

from __future__ import annotations

import numpy as np

VARIANTS = ("ihc", "zoom")


def ihc_from_he(image: np.ndarray) -> np.ndarray:
    """An H&E uint8 RGB image re-stained as IHC: eosin -> DAB (brown), hematoxylin kept; uint8 RGB."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(np.asarray(image, np.float64) / 255.0)
    ihc = np.stack([hed[..., 0], np.zeros_like(hed[..., 0]), 1.6 * hed[..., 1]], axis=-1)
    return np.clip(np.round(hed2rgb(ihc) * 255), 0, 255).astype(np.uint8)


def variant_sample(variant: str, *, size: int = 256, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One image (uint8 HxWx3) and its instance labels (uint32) of a shifted domain.

    Raises:
        ValueError: unknown variant (the message lists the valid ones).
    """
    from triageseg.datasets.synth import synth_sample

    if variant == "ihc":
        image, labels = synth_sample("he", size=size, rng=rng)
        return ihc_from_he(image), labels
    if variant == "zoom":
        from skimage.transform import resize

        half = max(16, size // 2)
        image, labels = synth_sample("fluorescence", size=half, rng=rng)
        big = resize(image, (size, size, 3), order=1, preserve_range=True, anti_aliasing=False)
        lab = resize(labels, (size, size), order=0, preserve_range=True, anti_aliasing=False)
        return np.clip(np.round(big), 0, 255).astype(np.uint8), lab.astype(np.uint32)
    raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
