"""Layout: ellipses with perturbed boundaries dropped at random or around cluster centres.

Candidates may overlap their neighbours a little; a contested pixel goes to the nucleus
whose centre is relatively closer (smaller normalised radius), which gives touching nuclei
with a natural shared boundary and never an overlap. Each nucleus keeps its largest
4-connected piece, and is dropped when that is too small.
"""

from __future__ import annotations

import numpy as np

from triageseg.datasets.synth.styles import NucleusStyle

def _place_nuclei(
    rng: np.random.Generator, size: int, style: NucleusStyle, radius_center: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return (labels uint32 consecutive 1..N, normalised radius float32; >1 outside nuclei).

    ``radius_center`` fixes the image's typical nucleus radius (drawn from the style's range
    otherwise); ``synth_sample(diameter=...)`` uses it, then resizes the image.
    """
    from scipy import ndimage

    h = w = size
    labels = np.zeros((h, w), np.uint32)
    nrad = np.full((h, w), np.inf, np.float32)
    # The image-level draws that make two images of one modality look different.
    r_lo, r_hi = style.radius
    r_center = rng.uniform(r_lo, r_hi)  # this image's typical size (magnification / cell type)
    if radius_center is not None:  # the draw above is kept: the rest of the stream is unchanged
        r_center = float(radius_center)
    coverage = rng.uniform(*style.coverage)
    clustered = rng.uniform(*style.clustered)
    target = coverage * h * w
    n_clusters = max(1, int(rng.poisson(1 + coverage * h * w / (400 * r_center**2) * 4)))
    cluster_xy = rng.uniform(0, size, (n_clusters, 2))
    flow = _flow(rng, size, r_center, style.aligned) if style.aligned[1] > 0 else None
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
        if flow is not None and rng.random() < flow[0]:  # along the flow where it is
            theta = float(flow[1][min(max(int(cy), 0), h - 1), min(max(int(cx), 0), w - 1)]) + rng.normal(0.0, 0.15)
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


def _flow(rng: np.random.Generator, size: int, r_center: float,
          aligned: tuple[float, float]) -> tuple[float, np.ndarray]:
    """(share of nuclei that follow it, orientation field in radians): a direction bending smoothly over the image.

    The field bends by up to about a radian over 6-15 nucleus radii, as streams of stroma and the
    palisades of glands curve in sections.
    """
    from triageseg.datasets.synth.textures import _smooth_noise

    share = rng.uniform(*aligned)
    bend = rng.uniform(0.3, 1.2) * _smooth_noise(rng, (size, size), rng.uniform(6.0, 15.0) * r_center)
    return share, (rng.uniform(0.0, np.pi) + bend).astype(np.float32)


def alignment(labels: np.ndarray) -> float:
    """How parallel neighbouring nuclei lie: 0 when their long axes point anywhere, 1 when parallel.

    The mean of cos(2 x angle difference) over the pairs of elongated nuclei (long axis over
    1.3x the short) within four median radii of each other; 0.0 without such a pair. The
    realism check measures it on real and synthetic images alike (``benchmarks/realism.py``).
    """
    from scipy.spatial import cKDTree
    from skimage.measure import regionprops

    props = [p for p in regionprops(np.asarray(labels, np.int32)) if p.area >= 20]
    long = [p for p in props if p.axis_major_length > 1.3 * max(p.axis_minor_length, 1.0)]
    if len(long) < 2:
        return 0.0
    radius = float(np.sqrt(np.median([p.area for p in props]) / np.pi))
    pairs = cKDTree(np.array([p.centroid for p in long])).query_pairs(4 * radius, output_type="ndarray")
    if len(pairs) == 0:
        return 0.0
    theta = np.array([p.orientation for p in long])
    return float(np.mean(np.cos(2 * (theta[pairs[:, 0]] - theta[pairs[:, 1]]))))


def _keep_connected(
    labels: np.ndarray, nrad: np.ndarray, intended: np.ndarray, ndimage
) -> tuple[np.ndarray, np.ndarray]:
    """Keep each nucleus's largest 4-connected piece; drop small remains; relabel 1..N."""
    from triageseg.segmenters.label_resize import stray_pieces

    n = int(labels.max())
    if n == 0:
        return labels, nrad
    keep = np.zeros(n + 1, bool)
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        mine = labels[sl] == i
        stray = stray_pieces(mine)
        if stray is not None:
            labels[sl][stray] = 0
            nrad[sl][stray] = np.inf
            mine &= ~stray
        area = int(mine.sum())
        keep[i] = area >= max(12, 0.5 * intended[i - 1])
    lut = np.zeros(n + 1, np.uint32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
    labels = lut[labels]
    nrad[labels == 0] = np.inf
    return labels, nrad

