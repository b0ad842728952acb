"""H&E histology: hematoxylin nuclei in eosin tissue with fibres and empty spaces."""

from __future__ import annotations

import numpy as np

from triageseg.datasets.synth.textures import (
    _EOSIN,
    _HEMATOXYLIN,
    _absorbance_to_rgb,
    _illumination,
    _jitter_stain,
    _profile,
    _smooth_noise,
    _to_uint8,
)

def _render_he(rng: np.random.Generator, labels: np.ndarray, nrad: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    size = labels.shape[0]
    n = int(labels.max())
    h_vec = _jitter_stain(rng, _HEMATOXYLIN, 0.06)
    e_vec = _jitter_stain(rng, _EOSIN, 0.06)
    shape = labels.shape
    # Eosin tissue: a smooth stroma field plus anisotropic fibres, with empty spaces.
    fibre_sigma = (rng.uniform(0.8, 1.5), rng.uniform(4.0, 10.0))
    if rng.random() < 0.5:
        fibre_sigma = fibre_sigma[::-1]
    fibres = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), fibre_sigma)
    fibres /= max(float(fibres.std()), 1e-6)
    tissue = rng.uniform(0.12, 0.4) * (1.0 + 0.25 * _smooth_noise(rng, shape, 8.0) + rng.uniform(0.1, 0.3) * fibres)
    holes = _smooth_noise(rng, shape, rng.uniform(10, 24)) > rng.uniform(0.9, 2.5)
    holes &= ndimage.gaussian_filter((labels > 0).astype(np.float32), 3.0) < 0.05
    tissue[holes] *= 0.08
    tissue = ndimage.gaussian_filter(tissue, 1.0)
    dens = rng.uniform(0.5, 1.0) * rng.lognormal(0.0, 0.3, n + 1).astype(np.float32)
    dens[0] = 0.0
    chromatin = 1.0 + rng.uniform(0.2, 0.5) * _smooth_noise(rng, shape, rng.uniform(0.7, 1.3))
    hema = dens[labels] * _profile(nrad, labels, rng.uniform(0.6, 0.95), 0.4) * chromatin
    hema += rng.uniform(0.02, 0.1) * (1.0 + 0.5 * _smooth_noise(rng, shape, 4.0)) * (tissue > 0.05)
    od = np.clip(hema, 0, None)[..., None] * h_vec + np.clip(tissue, 0, None)[..., None] * e_vec
    od *= rng.uniform(0.8, 1.3)  # staining strength varies between slides
    white = rng.uniform(0.9, 1.0) * _illumination(rng, size, rng.uniform(0.0, 0.15))
    rgb = _absorbance_to_rgb(od.astype(np.float32), white[..., None])
    rgb = ndimage.gaussian_filter(rgb, (rng.uniform(0.4, 1.3),) * 2 + (0,))
    rgb += rng.normal(0.0, rng.uniform(0.005, 0.02), rgb.shape).astype(np.float32)
    return _to_uint8(rgb)

