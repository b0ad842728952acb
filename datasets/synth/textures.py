"""Shared textures and optics: random fields, illumination, radial profiles, stains (Beer-Lambert)."""

from __future__ import annotations

import numpy as np

# Stain absorbance directions (RGB optical density per unit concentration).
_HEMATOXYLIN = np.array([0.65, 0.70, 0.29])
_EOSIN = np.array([0.07, 0.99, 0.11])
_DAB = np.array([0.27, 0.57, 0.78])
# Stain vectors as estimated from real slides (the Macenko method's usual reference):
# real eosin absorbs more blue, real hematoxylin more red, than the Ruifrok vectors.
_HEMATOXYLIN_SLIDE = np.array([0.5626, 0.7201, 0.4062])
_EOSIN_SLIDE = np.array([0.2159, 0.8012, 0.5581])

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


def _cells(labels: np.ndarray, grow: float) -> tuple[np.ndarray, np.ndarray]:
    """(cell territories around each nucleus, soft membrane mask) from the nuclei."""
    from scipy import ndimage
    from skimage.segmentation import expand_labels, find_boundaries

    cells = expand_labels(labels, distance=grow)
    membrane = find_boundaries(cells, mode="inner") & (labels == 0) & (cells > 0)
    return cells, ndimage.gaussian_filter(membrane.astype(np.float32), 0.8) * 2.5


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _absorbance_to_rgb(od: np.ndarray, white: np.ndarray) -> np.ndarray:
    return white * np.exp(-od * np.log(10.0))


def _jitter_stain(rng: np.random.Generator, vec: np.ndarray, amount: float) -> np.ndarray:
    v = np.clip(vec + rng.normal(0, amount, 3), 0.02, None)
    return (v / np.linalg.norm(v)).astype(np.float32)



def _spots(rng: np.random.Generator, mask: np.ndarray, *, density: float, sigma: float) -> np.ndarray:
    """Gaussian spots of peak ~1 at random pixels of ``mask`` (``density`` spots per pixel), float32.

    Nucleoli, chromatin granules, debris and red blood cells are all drawn this way: one
    uniform draw per pixel and one blur, whatever the number of spots.
    """
    from scipy import ndimage

    seeds = (rng.random(mask.shape, dtype=np.float32) < density) & mask
    spots = ndimage.gaussian_filter(seeds.astype(np.float32), sigma)
    return np.clip(spots * (2.0 * np.pi * sigma * sigma), 0.0, 1.5)


def _jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    """float RGB in [0, 1] through a JPEG round trip at ``quality`` (whole-slide scanners store JPEG)."""
    import imagecodecs

    data = imagecodecs.jpeg8_encode(_to_uint8(rgb), level=int(quality))
    return imagecodecs.jpeg8_decode(data).astype(np.float32) / 255.0


def _fold(rng: np.random.Generator, shape: tuple[int, int], width: float) -> np.ndarray:
    """A tissue fold: a soft band (0..1) along a random wavy line, where tissue lies twice."""
    h, w = shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    c = rng.uniform(0.2, 0.8) * np.array([h, w])
    d = (x - c[1]) * np.sin(theta) - (y - c[0]) * np.cos(theta)
    along = (x - c[1]) * np.cos(theta) + (y - c[0]) * np.sin(theta)
    d += rng.uniform(0.0, 0.5) * width * np.sin(along / rng.uniform(10.0, 40.0) + rng.uniform(0, 6.3))
    return np.clip(1.0 - np.abs(d) / (0.5 * width), 0.0, 1.0) ** 0.5
