"""Shared textures and optics: random fields, illumination, radial profiles, stains (Beer-Lambert)."""

from __future__ import annotations

import numpy as np

# Stain absorbance directions (RGB optical density per unit concentration).
_HEMATOXYLIN = np.array([0.65, 0.70, 0.29])
_EOSIN = np.array([0.07, 0.99, 0.11])
_DAB = np.array([0.27, 0.57, 0.78])

def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with correlation length ~sigma (float32)."""
    from scipy import ndimage

    h, w = shape
    f = max(1, int(sigma // 2))  # draw coarse and upsample: cheap even for large sigma
    small = rng.standard_normal((h // f + 3, w // f + 3)).astype(np.float32)
    small = ndimage.gaussian_filter(small, sigma / f, mode="wrap")
    field = ndimage.zoom(small, f, order=1)[:h, :w] if f > 1 else small[:h, :w]
    field -= field.mean()
    std = field.std()
    return field / std if std > 0 else field


def _illumination(rng: np.random.Generator, size: int, strength: float) -> np.ndarray:
    """Smooth multiplicative illumination field, mean ~1, from a tilt, a vignette and a blob."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1) - 0.5
    gy, gx = rng.normal(0, 1, 2)
    cy, cx = rng.uniform(-0.5, 0.5, 2)
    vignette = (y - cy) ** 2 + (x - cx) ** 2
    field = 1.0 + strength * (
        0.6 * (gy * y + gx * x) - 1.2 * vignette + 0.3 * _smooth_noise(rng, (size, size), size / 4)
    )
    return np.clip(field, 0.2, None).astype(np.float32)


def _profile(nrad: np.ndarray, labels: np.ndarray, floor: float, power: float) -> np.ndarray:
    """Radial intensity profile inside nuclei: `floor` at the rim, 1 at the centre; 0 outside."""
    inside = labels > 0
    prof = np.zeros(labels.shape, np.float32)
    prof[inside] = floor + (1.0 - floor) * np.clip(1.0 - nrad[inside] ** 2, 0.0, 1.0) ** power
    return prof


def _cell_bodies(rng: np.random.Generator, labels: np.ndarray, radius: float) -> np.ndarray:
    """Soft cytoplasm mask around nuclei (float32 in [0, 1]), irregular via noise."""
    from scipy import ndimage

    fg = (labels > 0).astype(np.float32)
    halo = ndimage.gaussian_filter(fg, radius)
    halo += 0.15 * _smooth_noise(rng, labels.shape, 3.0)
    return np.clip((halo - 0.08) * 4.0, 0.0, 1.0)


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _absorbance_to_rgb(od: np.ndarray, white: np.ndarray) -> np.ndarray:
    return white * np.exp(-od * np.log(10.0))


def _jitter_stain(rng: np.random.Generator, vec: np.ndarray, amount: float) -> np.ndarray:
    v = np.clip(vec + rng.normal(0, amount, 3), 0.02, None)
    return (v / np.linalg.norm(v)).astype(np.float32)

