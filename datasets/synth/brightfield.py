"""Stained brightfield: absorbed light, dark nuclei on a light background (Beer-Lambert).

The DSB 2018 stained-brightfield images (its "purple" classes) are mostly hematoxylin-
stained cells and thin sections: purple nuclei with chromatin granules on a white or
lilac background, pale purple cytoplasm around them, and a few grey images. Sections
with an eosin counterstain look like (and are routed as) H&E, so brightfield keeps to
cells on glass. Our old generator also drew brown DAB-only nuclei;
DAB is now its own modality (IHC), so brightfield is hematoxylin or grey only.
:data:`BRIGHTFIELD_RANGES` documents the stain amounts (OD base 10 per unit vector).
"""

from __future__ import annotations

import numpy as np

from triageseg.datasets.synth.textures import (
    _HEMATOXYLIN,
    _absorbance_to_rgb,
    _cell_bodies,
    _illumination,
    _jitter_stain,
    _profile,
    _smooth_noise,
    _spots,
    _to_uint8,
)

BRIGHTFIELD_RANGES = {
    "nucleus_od": (0.15, 1.2),  # OD at a nucleus's centre
    "background_od": (0.0, 0.2),  # OD of the background (glass .. lilac tissue)
}


def _render_brightfield(rng: np.random.Generator, labels: np.ndarray, nrad: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    size = labels.shape[0]
    n = int(labels.max())
    grey = rng.random() < 0.25
    nuc_vec = _jitter_stain(rng, np.ones(3) if grey else _HEMATOXYLIN, 0.06)
    # The background takes the nuclear stain faintly (cells on glass, no eosin tissue: that is H&E).
    bg_vec = nuc_vec
    lo, hi = BRIGHTFIELD_RANGES["nucleus_od"]
    dens = np.clip(rng.uniform(0.3, 0.8) * rng.lognormal(0.0, 0.3, n + 1), lo, hi).astype(np.float32)
    dens[0] = 0.0
    inside = labels > 0
    granules = _spots(rng, inside, density=rng.uniform(0.005, 0.03), sigma=rng.uniform(0.7, 1.2))
    granular = 1.0 + rng.uniform(0.1, 0.35) * _smooth_noise(rng, labels.shape, rng.uniform(0.8, 1.5))
    granular += rng.uniform(0.0, 0.5) * granules
    nuc_od = dens[labels] * _profile(nrad, labels, rng.uniform(0.5, 0.9), 0.5) * granular
    cyto_od = rng.uniform(0.0, 0.15) * _cell_bodies(rng, labels, rng.uniform(4, 9))
    bg_lo, bg_hi = BRIGHTFIELD_RANGES["background_od"]
    bg_od = rng.uniform(bg_lo, bg_hi * 0.6) * (1.0 + 0.3 * _smooth_noise(rng, labels.shape, 6.0))
    od = (nuc_od[..., None] * nuc_vec + (cyto_od + np.clip(bg_od, bg_lo, bg_hi))[..., None] * bg_vec)
    white = rng.uniform(0.85, 1.0) * _illumination(rng, size, rng.uniform(0.05, 0.35))
    rgb = _absorbance_to_rgb(od.astype(np.float32), white[..., None])
    rgb = ndimage.gaussian_filter(rgb, (rng.uniform(0.6, 2.0),) * 2 + (0,))
    rgb += rng.normal(0.0, rng.uniform(0.005, 0.03), rgb.shape).astype(np.float32)
    return _to_uint8(rgb)
