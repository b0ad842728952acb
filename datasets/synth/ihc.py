"""IHC: DAB (brown) over part of the cells, hematoxylin (blue) counterstain on every nucleus.

Immunohistochemistry stains one protein brown with DAB and counterstains all nuclei
blue with hematoxylin (skimage's ``immunohistochemistry()`` sample is one; measured,
never trained on). What is drawn:

- hematoxylin nuclei, paler and bluer than in H&E, in stroma with faint blue fibres;
- positive regions (glands, tumour nests: a smooth random field picks them) where the
  cells' cytoplasm and membranes take DAB, so the brown follows the cell outlines
  *around* the nuclei; a fraction of nuclei is DAB-positive as well (nuclear markers);
- white glass and lumina, scanner blur and JPEG.

The labels are the nuclei only, never the brown cells: that is the point of the modality.
:data:`IHC_RANGES` documents the stain amounts (OD base 10 per unit stain vector).
"""

from __future__ import annotations

import numpy as np

from triageseg.datasets.synth.textures import (
    _DAB,
    _HEMATOXYLIN,
    _absorbance_to_rgb,
    _cells,
    _illumination,
    _jitter_stain,
    _jpeg,
    _profile,
    _smooth_noise,
    _to_uint8,
)

IHC_RANGES = {
    "nucleus_hematoxylin": (0.12, 0.7),  # OD of hematoxylin at a nucleus's centre
    "dab": (0.0, 1.2),  # OD of DAB anywhere (cytoplasm, membrane, positive nuclei)
    "positive_area": (0.15, 0.8),  # fraction of the image in DAB-positive regions
}


def _dab_od(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """DAB OD: cytoplasm and membranes of cells in positive regions, plus some positive nuclei."""
    from scipy import ndimage

    n = int(labels.max())
    _, membrane = _cells(labels, rng.uniform(4.0, 12.0))
    # Positive regions are cellular (glands, nests): where nuclei are dense, plus chance.
    crowd = ndimage.gaussian_filter((labels > 0).astype(np.float32), 10.0)
    crowd = (crowd - crowd.mean()) / max(float(crowd.std()), 1e-6)
    region = _smooth_noise(rng, labels.shape, rng.uniform(20.0, 45.0)) + rng.uniform(0.5, 1.5) * crowd
    area = rng.uniform(*IHC_RANGES["positive_area"])
    positive = ndimage.gaussian_filter((region > np.quantile(region, 1.0 - area)).astype(np.float32), 2.0)
    # Positive epithelium is continuous: the cytoplasm fills the region between the nuclei.
    cyto = (labels == 0).astype(np.float32)
    dab = positive * (
        rng.uniform(0.15, 0.55) * cyto * (1.0 + 0.3 * _smooth_noise(rng, labels.shape, 1.5))
        + rng.uniform(0.1, 0.5) * membrane
    )
    nuclear = (rng.random(n + 1) < rng.uniform(0.0, 0.4)) * rng.uniform(0.2, 0.8, n + 1)
    nuclear[0] = 0.0
    dab += nuclear[labels].astype(np.float32) * (0.8 + 0.2 * positive)
    dab += positive * rng.uniform(0.0, 0.1) * (labels > 0)  # a diffuse blush over nuclei in positive cells
    lo, hi = IHC_RANGES["dab"]
    return np.clip(dab, lo, hi).astype(np.float32)


def _render_ihc(rng: np.random.Generator, labels: np.ndarray, nrad: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    size = labels.shape[0]
    n = int(labels.max())
    shape = labels.shape
    h_vec = _jitter_stain(rng, _HEMATOXYLIN * np.array([0.9, 1.0, 1.25]), 0.05)  # Mayer's: bluer than in H&E
    d_vec = _jitter_stain(rng, _DAB, 0.05)
    lo, hi = IHC_RANGES["nucleus_hematoxylin"]
    dens = np.clip(rng.uniform(0.2, 0.5) * rng.lognormal(0.0, 0.25, n + 1), lo, hi).astype(np.float32)
    dens[0] = 0.0
    chromatin = 1.0 + rng.uniform(0.1, 0.3) * _smooth_noise(rng, shape, rng.uniform(0.8, 1.4))
    hema = dens[labels] * _profile(nrad, labels, rng.uniform(0.6, 0.9), 0.5) * chromatin
    # Stroma: faint blue-grey fibres; lumina and glass stay white.
    fibres = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), (rng.uniform(0.8, 1.5), 6.0))
    fibres = np.exp(-((fibres / (0.25 * max(float(fibres.std()), 1e-6))) ** 2))
    stroma = rng.uniform(0.01, 0.05) + rng.uniform(0.02, 0.1) * fibres
    holes = _smooth_noise(rng, shape, rng.uniform(12, 30)) > rng.uniform(1.2, 2.8)
    holes &= ndimage.gaussian_filter((labels > 0).astype(np.float32), 4.0) < 0.03
    stroma = np.where(holes, 0.0, stroma)
    dab = np.where(holes, 0.0, _dab_od(rng, labels))
    od = np.maximum(hema, stroma)[..., None] * h_vec + dab[..., None] * d_vec
    od *= rng.uniform(0.8, 1.2)
    white = rng.uniform(0.88, 1.0) * _illumination(rng, size, rng.uniform(0.0, 0.12))
    rgb = _absorbance_to_rgb(od.astype(np.float32), white[..., None])
    rgb = ndimage.gaussian_filter(rgb, (rng.uniform(0.4, 1.2),) * 2 + (0,))
    rgb += rng.normal(0.0, rng.uniform(0.003, 0.015), rgb.shape).astype(np.float32)
    if rng.random() < 0.7:
        rgb = _jpeg(rgb, int(rng.integers(60, 96)))
    return _to_uint8(rgb)
