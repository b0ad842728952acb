"""Fluorescence: emitted light on a dark background (heterogeneous intensities, chromatin, noise)."""

from __future__ import annotations

import numpy as np

from triageseg.datasets.synth.textures import _cell_bodies, _illumination, _profile, _smooth_noise, _to_uint8

def _render_fluorescence(rng: np.random.Generator, labels: np.ndarray, nrad: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    size = labels.shape[0]
    n = int(labels.max())
    bright = rng.lognormal(0.0, rng.uniform(0.2, 0.5), n + 1).astype(np.float32)
    dim = rng.random(n + 1) < rng.uniform(0.0, 0.15)  # some nuclei barely stained
    bright[dim] *= rng.uniform(0.2, 0.4, int(dim.sum()))
    bright[0] = 0.0
    chromatin = 1.0 + rng.uniform(0.05, 0.3) * _smooth_noise(rng, labels.shape, rng.uniform(0.8, 2.0))
    signal = bright[labels] * _profile(nrad, labels, rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.8)) * chromatin
    # Cytoplasmic autofluorescence makes cells glow faintly around some nuclei.
    signal += rng.uniform(0.0, 0.12) * _cell_bodies(rng, labels, rng.uniform(3, 7))
    signal += rng.uniform(0.01, 0.08)
    signal *= _illumination(rng, size, rng.uniform(0.1, 0.6))
    signal = ndimage.gaussian_filter(signal, rng.uniform(0.5, 1.8))
    photons = rng.uniform(15, 400)  # photons at unit intensity: dim and noisy to bright and clean
    signal = rng.poisson(np.clip(signal, 0, None) * photons).astype(np.float32) / photons
    signal += rng.normal(0.0, rng.uniform(0.005, 0.03), signal.shape).astype(np.float32)
    top = np.percentile(signal, 99.9) * rng.uniform(0.8, 1.4)
    gray = signal / max(float(top), 1e-6)
    tint = np.ones(3, np.float32)
    if rng.random() < 0.3:  # some images are false-coloured (e.g. DAPI in blue)
        tint = np.array([(0.3, 0.5, 1.0), (0.3, 1.0, 0.4), (1.0, 0.4, 0.9)][rng.integers(3)], np.float32)
    return _to_uint8(gray[..., None] * tint)

