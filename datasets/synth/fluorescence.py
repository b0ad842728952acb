"""Fluorescence: emitted light on a dark background, as a widefield camera records a DNA stain.

What real nuclear-stain images show (measured on the DSB 2018 test image and the U2OS
Hoechst image that stardist and mahotas ship; never trained on) and is drawn here:

- a per-nucleus intensity spread of up to ~100x: most nuclei (G1) dim, G2 about twice
  as bright, a few small mitotic or apoptotic nuclei condensed and 3-12x brighter, and
  some barely stained ones; the brightest saturate the camera (1-3 % of nucleus pixels);
- chromatin texture: fine speckles, a brighter rim of heterochromatin, dark nucleoli;
- out-of-focus nuclei (blurred, dimmer, still labelled: they are nuclei);
- camera physics: a signal in photons (300-10000 per unit intensity, Poisson), a dark
  offset and read noise (Gaussian), an uneven background, and small unlabelled debris.

Every range below is documented in :data:`FLUO_RANGES` and checked by the tests.
"""

from __future__ import annotations

import numpy as np

from triageseg.datasets.synth.textures import _cell_bodies, _illumination, _smooth_noise, _spots, _to_uint8

# Documented ranges (tests check that the renderer stays inside them).
FLUO_RANGES = {
    "nucleus_brightness": (0.01, 1.0),  # per-nucleus mean emission relative to the brightest, before noise
    "photons": (300.0, 10000.0),  # photons per unit intensity (Poisson)
    "background": (0.0, 0.2),  # offset + autofluorescence relative to the display maximum
    "saturated_nucleus_fraction": (0.0, 0.08),  # nucleus pixels clipped at 255
}


def _nucleus_brightness(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """Per-nucleus emission (index 0 = background = 0), spread over up to ~100x."""
    n = int(labels.max())
    area = np.bincount(labels.ravel(), minlength=n + 1).astype(np.float32)
    # DNA content: G1 (1x) or G2 (2x) with a lognormal spread of staining and size.
    bright = rng.lognormal(0.0, rng.uniform(0.1, 0.3), n + 1).astype(np.float32)
    bright *= np.where(rng.random(n + 1) < rng.uniform(0.05, 0.3), 2.0, 1.0).astype(np.float32)
    # Condensed chromatin (mitotic, apoptotic): the small nuclei, much brighter.
    small = area <= np.percentile(area[1:], 35) if n > 0 else np.zeros(n + 1, bool)
    condensed = small & (rng.random(n + 1) < rng.uniform(0.0, 0.15))
    bright[condensed] *= rng.uniform(3.0, 12.0, int(condensed.sum())).astype(np.float32)
    faint = rng.random(n + 1) < rng.uniform(0.0, 0.06)  # barely stained nuclei
    bright[faint] *= rng.uniform(0.08, 0.4, int(faint.sum())).astype(np.float32)
    bright[0] = 0.0
    top = float(bright.max()) if n > 0 else 1.0
    lo, hi = FLUO_RANGES["nucleus_brightness"]
    return np.clip(bright / max(top, 1e-6), lo, hi).astype(np.float32) * (labels.max() > 0)


def _chromatin(rng: np.random.Generator, labels: np.ndarray, nrad: np.ndarray) -> np.ndarray:
    """Multiplicative texture inside nuclei: speckles, a bright rim, dark nucleoli (1 outside)."""
    inside = labels > 0
    tex = np.ones(labels.shape, np.float32)
    speckle = _smooth_noise(rng, labels.shape, rng.uniform(0.6, 1.2))
    rim = np.exp(-(((1.0 - np.clip(nrad, 0.0, 1.0)) / 0.18) ** 2))  # heterochromatin at the envelope
    nucleoli = _spots(rng, inside & (nrad < 0.7), density=rng.uniform(0.002, 0.008), sigma=rng.uniform(1.0, 2.0))
    tex[inside] = (
        1.0
        + rng.uniform(0.02, 0.12) * speckle[inside]
        + rng.uniform(0.0, 0.25) * rim[inside]
        - rng.uniform(0.1, 0.35) * nucleoli[inside]
    )
    # Smooth interior falloff: thicker in the middle, so nuclei are brighter there.
    tex[inside] *= 0.75 + 0.25 * np.sqrt(np.clip(1.0 - nrad[inside] ** 2, 0.0, 1.0))
    return np.clip(tex, 0.05, None)


def _render_fluorescence(rng: np.random.Generator, labels: np.ndarray, nrad: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    size = labels.shape[0]
    n = int(labels.max())
    bright = _nucleus_brightness(rng, labels)
    signal = bright[labels] * _chromatin(rng, labels, nrad)
    # Out-of-focus nuclei: another focal plane, blurred and dimmer (still labelled).
    blurred = rng.random(n + 1) < rng.uniform(0.0, 0.15)
    blurred[0] = False
    if blurred.any():
        away = blurred[labels]
        soft = ndimage.gaussian_filter(np.where(away, signal * rng.uniform(0.6, 0.9), 0.0), rng.uniform(1.5, 3.5))
        signal = np.where(away, 0.0, signal) + soft.astype(np.float32)
    glow = rng.uniform(0.0, 0.06) * (float(bright[1:].mean()) if n else 0.2)  # cytoplasmic autofluorescence
    signal += glow * _cell_bodies(rng, labels, rng.uniform(3, 7))
    # Debris: small bright unlabelled specks away from nuclei.
    far = ndimage.distance_transform_edt(labels == 0) > 3
    signal += rng.uniform(0.1, 1.0) * _spots(rng, far, density=rng.uniform(0.0, 2e-4), sigma=rng.uniform(0.7, 1.5))
    signal *= _illumination(rng, size, rng.uniform(0.05, 0.3))  # mostly flat-field corrected
    signal = ndimage.gaussian_filter(signal, rng.uniform(0.5, 1.5))  # the optics' point spread
    background = rng.uniform(0.005, 0.08) * (1.0 + 0.3 * _smooth_noise(rng, labels.shape, size / 6))
    # Exposure: the brightest nuclei saturate; photons and read noise in units of the display maximum.
    scale = 1.0
    if n:
        nuc = signal[labels > 0]
        q_sat, q_mid = np.percentile(nuc, [rng.uniform(98.5, 99.95), 50.0])
        # Users expose so that ordinary nuclei are visible (>= 8 % of the range), even if
        # that saturates more of the brightest (at most 8 % of nucleus pixels).
        q_cap = np.percentile(nuc, 92.0)
        scale = min(max(1.0 / max(q_sat, 1e-6), 0.08 / max(q_mid, 1e-6)), 1.0 / max(q_cap, 1e-6))
    photons = float(np.exp(rng.uniform(*np.log(FLUO_RANGES["photons"]))))
    counts = rng.poisson(np.clip(signal * scale + background, 0.0, None) * photons).astype(np.float32)
    gray = counts / photons + rng.normal(0.0, rng.uniform(0.002, 0.015), labels.shape).astype(np.float32)
    gray += rng.uniform(0.0, 0.06)  # camera offset
    tint = np.ones(3, np.float32)
    if rng.random() < 0.3:  # some images are false-coloured (e.g. DAPI in blue)
        tint = np.array([(0.3, 0.5, 1.0), (0.3, 1.0, 0.4), (1.0, 0.4, 0.9)][rng.integers(3)], np.float32)
    return _to_uint8(gray[..., None] * tint)
