"""Synthetic nuclei images in three imaging modalities, with exact instance labels.

Each sample is drawn in two steps:

1. **Layout** (``_place_nuclei``): ellipses with perturbed boundaries (a few random
   Fourier harmonics on the radius) are dropped at random or around cluster centres.
   Candidates may overlap their neighbours a little; a contested pixel goes to the
   nucleus whose centre is relatively closer (smaller normalised radius), which gives
   touching nuclei with a natural shared boundary and never an overlap. Each nucleus
   keeps its largest 4-connected piece, and is dropped when that is too small.
2. **Rendering** (``_render_*``): physics-flavoured and vectorised per image.
   Fluorescence is emitted light (dark background, heterogeneous intensities,
   chromatin texture, uneven illumination, blur, Poisson and Gaussian noise).
   Brightfield and H&E are absorbed light (Beer-Lambert with stain vectors,
   Ruifrok & Johnston 2001 for hematoxylin/eosin, the model behind
   ``skimage.color.hed2rgb``): dark nuclei on a light background, or purple
   nuclei in pink eosin tissue with fibres and empty spaces.

Every random draw comes from the ``numpy.random.Generator`` passed in, so a seed
gives the same dataset bit for bit.

Example:
    >>> rng = np.random.default_rng(0)
    >>> image, labels = synth_sample("he", size=128, rng=rng)
    >>> image.shape, image.dtype, labels.dtype
    ((128, 128, 3), dtype('uint8'), dtype('uint32'))
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from triageseg.datasets.errors import DataError

MODALITIES = ("fluorescence", "brightfield", "he")
# Largest image side: drawing one image takes ~80 bytes per pixel (~5 GB at 8192 x 8192).
MIN_SIZE, MAX_SIZE = 16, 8192
# Like the 2018 Data Science Bowl: fluorescence is the large majority.
DEFAULT_WEIGHTS = {"fluorescence": 0.6, "brightfield": 0.2, "he": 0.2}
SPLITS = ("train", "val", "test")

# Stain absorbance directions (RGB optical density per unit concentration).
_HEMATOXYLIN = np.array([0.65, 0.70, 0.29])
_EOSIN = np.array([0.07, 0.99, 0.11])
_DAB = np.array([0.27, 0.57, 0.78])


@dataclass(frozen=True)
class NucleusStyle:
    """How the nuclei of one modality are sized, shaped and spread (pixels at 1x)."""

    radius: tuple[float, float]  # range of the mean semi-axis of a nucleus
    aspect: tuple[float, float]  # range of long/short semi-axis ratio
    roughness: float  # amplitude of the boundary perturbation (0 = perfect ellipse)
    coverage: tuple[float, float]  # range of the image fraction covered by nuclei
    clustered: tuple[float, float]  # range of the fraction of nuclei placed around cluster centres
    cluster_spread: float  # spread of a cluster in nucleus radii
    max_overlap: float  # largest fraction of a candidate that may fall on earlier nuclei


STYLES = {
    "fluorescence": NucleusStyle(
        radius=(5.0, 13.0),
        aspect=(1.0, 1.7),
        roughness=0.06,
        coverage=(0.06, 0.35),
        clustered=(0.1, 0.7),
        cluster_spread=1.6,
        max_overlap=0.25,
    ),
    "brightfield": NucleusStyle(
        radius=(7.0, 15.0),
        aspect=(1.0, 1.8),
        roughness=0.09,
        coverage=(0.08, 0.30),
        clustered=(0.2, 0.7),
        cluster_spread=1.5,
        max_overlap=0.25,
    ),
    "he": NucleusStyle(
        radius=(4.5, 10.0),
        aspect=(1.0, 2.8),
        roughness=0.12,
        coverage=(0.15, 0.40),
        clustered=(0.4, 0.9),
        cluster_spread=1.4,
        max_overlap=0.3,
    ),
}


def _check_modality(modality: str) -> None:
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; valid modalities: {', '.join(MODALITIES)}")


# --------------------------------------------------------------------------- layout


def _place_nuclei(rng: np.random.Generator, size: int, style: NucleusStyle) -> tuple[np.ndarray, np.ndarray]:
    """Return (labels uint32 consecutive 1..N, normalised radius float32; >1 outside nuclei)."""
    from scipy import ndimage

    h = w = size
    labels = np.zeros((h, w), np.uint32)
    nrad = np.full((h, w), np.inf, np.float32)
    # The image-level draws that make two images of one modality look different.
    r_lo, r_hi = style.radius
    r_center = rng.uniform(r_lo, r_hi)  # this image's typical size (magnification / cell type)
    coverage = rng.uniform(*style.coverage)
    clustered = rng.uniform(*style.clustered)
    target = coverage * h * w
    n_clusters = max(1, int(rng.poisson(1 + coverage * h * w / (400 * r_center**2) * 4)))
    cluster_xy = rng.uniform(0, size, (n_clusters, 2))
    k_harm = np.arange(2, 6)
    covered, next_id, attempts = 0.0, 1, 0
    intended: list[float] = []
    max_attempts = 40 + int(8 * target / (np.pi * r_center**2))
    while covered < target and attempts < max_attempts:
        attempts += 1
        r = float(np.clip(r_center * rng.lognormal(0.0, 0.18), 0.6 * r_lo, 1.2 * r_hi))
        aspect = rng.uniform(*style.aspect)
        a, b = r * np.sqrt(aspect), r / np.sqrt(aspect)
        theta = rng.uniform(0, np.pi)
        amp = style.roughness * rng.standard_normal(4) / np.sqrt(k_harm - 1)
        phase = rng.uniform(0, 2 * np.pi, 4)
        if rng.random() < clustered:
            cy, cx = cluster_xy[rng.integers(n_clusters)] + rng.normal(0, style.cluster_spread * r, 2)
        else:
            cy, cx = rng.uniform(0, size, 2)
        half = int(np.ceil(a * (1 + np.abs(amp).sum()))) + 1
        y0, y1 = max(int(cy) - half, 0), min(int(cy) + half + 1, h)
        x0, x1 = max(int(cx) - half, 0), min(int(cx) + half + 1, w)
        if y1 - y0 < 2 or x1 - x0 < 2:
            continue
        dy = (np.arange(y0, y1, dtype=np.float32) - cy)[:, None]
        dx = (np.arange(x0, x1, dtype=np.float32) - cx)[None, :]
        cos_t, sin_t = np.cos(theta), np.sin(theta)
        u = (dx * cos_t + dy * sin_t) / a
        v = (-dx * sin_t + dy * cos_t) / b
        phi = np.arctan2(v, u)
        rmod = 1.0 + (amp[:, None, None] * np.cos(k_harm[:, None, None] * phi + phase[:, None, None])).sum(0)
        nr = np.sqrt(u * u + v * v) / rmod
        inside = nr <= 1.0
        area = int(inside.sum())
        if area < 12:
            continue
        box_nr = nrad[y0:y1, x0:x1]
        if np.count_nonzero(inside & (box_nr <= 1.0)) > style.max_overlap * area:
            continue
        win = inside & (nr < box_nr)
        labels[y0:y1, x0:x1][win] = next_id
        box_nr[win] = nr[win]
        intended.append(area)
        next_id += 1
        covered += area * 0.9
    return _keep_connected(labels, nrad, np.array(intended, float), ndimage)


def _keep_connected(
    labels: np.ndarray, nrad: np.ndarray, intended: np.ndarray, ndimage
) -> tuple[np.ndarray, np.ndarray]:
    """Keep each nucleus's largest 4-connected piece; drop small remains; relabel 1..N."""
    n = int(labels.max())
    if n == 0:
        return labels, nrad
    keep = np.zeros(n + 1, bool)
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        mine = labels[sl] == i
        pieces, count = ndimage.label(mine)
        if count > 1:
            sizes = np.bincount(pieces.ravel())
            sizes[0] = 0
            stray = mine & (pieces != sizes.argmax())
            labels[sl][stray] = 0
            nrad[sl][stray] = np.inf
            area = sizes.max()
        else:
            area = int(mine.sum())
        keep[i] = area >= max(12, 0.5 * intended[i - 1])
    lut = np.zeros(n + 1, np.uint32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
    labels = lut[labels]
    nrad[labels == 0] = np.inf
    return labels, nrad


# --------------------------------------------------------------------------- textures


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


# --------------------------------------------------------------------------- renderers


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


def _absorbance_to_rgb(od: np.ndarray, white: np.ndarray) -> np.ndarray:
    return white * np.exp(-od * np.log(10.0))


def _jitter_stain(rng: np.random.Generator, vec: np.ndarray, amount: float) -> np.ndarray:
    v = np.clip(vec + rng.normal(0, amount, 3), 0.02, None)
    return (v / np.linalg.norm(v)).astype(np.float32)


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


_RENDERERS = {"fluorescence": _render_fluorescence, "brightfield": _render_brightfield, "he": _render_he}


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


# --------------------------------------------------------------------------- dataset


def _allocate(n: int, weights: np.ndarray) -> np.ndarray:
    """Integer counts summing to n, proportional to weights, at least 1 each when n allows."""
    exact = weights / weights.sum() * n
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")  # largest remainders first
    counts[order[: n - counts.sum()]] += 1
    if n >= len(counts):
        while (counts == 0).any():  # every requested modality gets at least one image
            counts[np.argmax(counts)] -= 1
            counts[np.argmin(counts)] += 1
    return counts


def _split_counts(m: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """(train, val, test) for m images: val and test get at least one each when m >= 3."""
    _, f_val, f_test = fractions
    if m <= 1:
        return m, 0, 0
    if m == 2:
        return 1, 1, 0
    n_val = max(1, int(round(m * f_val))) if f_val > 0 else 0
    n_test = max(1, int(round(m * f_test))) if f_test > 0 else 0
    while n_val + n_test > m - 1:  # keep at least one training image
        if n_test >= n_val and n_test > 0:
            n_test -= 1
        else:
            n_val -= 1
    return m - n_val - n_test, n_val, n_test


def _parse_weights(weights, modalities: Sequence[str]) -> np.ndarray:
    if weights is None:
        return np.array([DEFAULT_WEIGHTS.get(m, 0.2) for m in modalities], float)
    if isinstance(weights, dict):
        extra = sorted(set(weights) - set(modalities))
        if extra:
            raise ValueError(
                f"weights for modalities not generated: {', '.join(extra)}; generated: {', '.join(modalities)}"
            )
        w = np.array([float(weights.get(m, 0.0)) for m in modalities], float)
    else:
        w = np.asarray(weights, float)
        if w.shape != (len(modalities),):
            raise ValueError(f"weights must have one value per modality ({len(modalities)}), got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {w.tolist()}")
    return w


def make_dataset(
    out: str | os.PathLike,
    *,
    n: int = 100,
    size: int = 256,
    modalities: Sequence[str] = MODALITIES,
    seed: int = 0,
    weights: dict[str, float] | Sequence[float] | None = None,
    splits: tuple[float, float, float] = (0.7, 0.15, 0.15),
    overwrite: bool = False,
) -> Path:
    """Write a synthetic dataset in the DESIGN layout and return its folder.

    Writes ``images/<id>.png`` (uint8 RGB), ``labels/<id>.tif``, ``modalities.csv``,
    ``splits.csv`` and ``synth.json`` (the parameters). Ids are ``<modality>_<nnnn>``
    numbered per modality. Image ``i`` of a modality is drawn from its own generator
    seeded by ``(seed, modality, i)``, so it does not depend on ``n`` or the weights.
    Splits are stratified by modality; each modality gets at least one val and one
    test image when it has 3 or more images.

    Args:
        out: output folder (created; must not already hold images unless ``overwrite``).
        n: number of images.
        size: image side in pixels.
        modalities: which of ``MODALITIES`` to generate.
        seed: random seed.
        weights: modality proportions (dict or one value per modality); default is
            DSB-like imbalance, fluorescence 0.6, brightfield 0.2, he 0.2.
        splits: (train, val, test) fractions.
        overwrite: replace the images, labels and index of an existing dataset in ``out``.

    Raises:
        ValueError: unknown modality (listing the valid ones), bad n, size, weights or splits.
        DataError: ``out`` already holds a dataset and ``overwrite`` is False.
    """
    from triageseg.datasets.atomic import atomic_path, write_json_atomic
    from triageseg.datasets.io import write_labels
    from triageseg.datasets.layout import write_index

    modalities = tuple(modalities)
    if not modalities:
        raise ValueError(f"no modality given; valid modalities: {', '.join(MODALITIES)}")
    for m in modalities:
        _check_modality(m)
    if len(set(modalities)) != len(modalities):
        raise ValueError(f"modalities repeated: {', '.join(modalities)}")
    if int(n) < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    _check_size(size)  # before any folder is made
    fractions = tuple(float(f) for f in splits)
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"splits must be three non-negative fractions (train, val, test) summing to 1, got {splits!r}")
    w = _parse_weights(weights, modalities)
    out = Path(out)
    images_dir, labels_dir = out / "images", out / "labels"
    existing = [p for d in (images_dir, labels_dir) if d.is_dir() for p in d.iterdir()]
    if existing and not overwrite:
        raise DataError(
            out,
            f"already holds a dataset ({len(existing)} files in images/ and labels/); "
            "choose an empty folder or pass overwrite=True (CLI: --overwrite)",
        )
    for p in existing:
        if p.is_file():
            p.unlink()
    images_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)

    import imagecodecs

    counts = _allocate(int(n), w)
    mod_index = {m: MODALITIES.index(m) for m in modalities}
    split_rng = np.random.default_rng([int(seed), 1_000_003])
    modality_of: dict[str, str] = {}
    split_of: dict[str, str] = {}
    for m, count in zip(modalities, counts, strict=True):
        ids = [f"{m}_{i:04d}" for i in range(count)]
        for i, sample_id in enumerate(ids):
            rng = np.random.default_rng([int(seed), mod_index[m], i])
            image, labels = synth_sample(m, size=size, rng=rng)
            with atomic_path(images_dir / f"{sample_id}.png") as tmp:
                tmp.write_bytes(imagecodecs.png_encode(image, level=3))
            write_labels(labels_dir / f"{sample_id}.tif", labels)
            modality_of[sample_id] = m
        n_train, n_val, _ = _split_counts(count, fractions)  # type: ignore[arg-type]
        order = split_rng.permutation(count)
        for rank, j in enumerate(order):
            split_of[ids[j]] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    write_index(out, modalities=modality_of, splits=split_of)
    write_json_atomic(
        out / "synth.json",
        {
            "generator": "triageseg.datasets.synth",
            "n": int(n),
            "size": int(size),
            "modalities": list(modalities),
            "seed": int(seed),
            "weights": dict(zip(modalities, (w / w.sum()).round(6).tolist(), strict=True)),
            "counts": dict(zip(modalities, counts.tolist(), strict=True)),
            "splits": dict(zip(SPLITS, fractions, strict=True)),
        },
    )
    return out


def describe_styles() -> dict:
    """The per-modality nucleus styles as plain dicts (for docs and provenance)."""
    return {m: dataclasses.asdict(s) for m, s in STYLES.items()}
