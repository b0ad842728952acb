"""Stained brightfield: absorbed light, dark nuclei on a light background (Beer-Lambert)."""

from __future__ import annotations

import numpy as np

from triageseg.datasets.synth.textures import (
    _DAB,
    _HEMATOXYLIN,
    _absorbance_to_rgb,
    _cell_bodies,
    _illumination,
    _jitter_stain,
    _profile,
    _smooth_noise,
    _to_uint8,
)

def _render_brightfield(rng: np.random.Generator, labels: np.ndarray, nrad: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    size = labels.shape[0]
    n = int(labels.max())
    stain_choice = rng.integers(3)
    nuc_vec = _jitter_stain(rng, [np.ones(3), _HEMATOXYLIN, _DAB][stain_choice], 0.05)
    bg_vec = _jitter_stain(rng, np.array([0.2, 0.3, 0.9]) if rng.random() < 0.4 else np.ones(3), 0.05)
    dens = rng.uniform(0.25, 0.8) * rng.lognormal(0.0, 0.25, n + 1).astype(np.float32)
    dens[0] = 0.0
    granular = 1.0 + rng.uniform(0.1, 0.4) * _smooth_noise(rng, labels.shape, rng.uniform(0.8, 1.5))
    nuc_od = dens[labels] * _profile(nrad, labels, rng.uniform(0.5, 0.9), 0.5) * granular
    cyto_od = rng.uniform(0.0, 0.12) * _cell_bodies(rng, labels, rng.uniform(4, 9))
    bg_od = rng.uniform(0.0, 0.08) * (1.0 + 0.3 * _smooth_noise(rng, labels.shape, 6.0))
    od = (nuc_od[..., None] * nuc_vec + (cyto_od + bg_od)[..., None] * bg_vec).astype(np.float32)
    white = rng.uniform(0.85, 1.0) * _illumination(rng, size, rng.uniform(0.05, 0.35))
    rgb = _absorbance_to_rgb(od, white[..., None])
    rgb = ndimage.gaussian_filter(rgb, (rng.uniform(0.6, 2.0),) * 2 + (0,))
    rgb += rng.normal(0.0, rng.uniform(0.005, 0.03), rgb.shape).astype(np.float32)
    return _to_uint8(rgb)

