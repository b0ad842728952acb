"""Summary statistics that say how real a microscopy image looks (for bench_real.py).

The same numbers are computed on real and synthetic images, so the generator can be
compared with the microscopes it imitates without training on, or tuning to, any
real label. Nuclei for the per-nucleus statistics come from the same classical
segmentation on both sides (Otsu + watershed on the nuclear signal), so a bias of that
segmentation cancels in the comparison.

Stained images: optical density per stain as ``skimage.color.rgb2hed`` separates them
(median and 95th percentile of H, E and DAB), the mean RGB. Fluorescence: the background
level, the saturated fraction, the spread of per-nucleus mean intensity (95th / 5th
percentile over nuclei, background subtracted), how the light falls towards the edge
(``rim_core``: over nuclei of at least 60 px whose core is 0.02 above the background, the
median of the mean signal within 1.5 px of the edge over that of the core, where the
distance to the edge is at least 0.6 of its largest; both background subtracted). Both:
gradient energy (mean gradient magnitude after a 1-pixel blur) and texture energy inside
nuclei (std of the image minus its 2-pixel blur, relative to the nucleus-background contrast).

Stained images, the tissue between the nuclei (non-white pixels over 3 px from a nucleus:
stroma or cytoplasm, what a segmenter must call background): the hematoxylin share of its
H + E (each above its 1st percentile; lilac cytoplasm high, pink stroma low), and the std
of its H in a fine band (image minus its 1-pixel blur: granules) and a mottle band (1- minus
4-pixel blur), both relative to the nucleus contrast.

All images, the shape of the nuclei (``elongation``): the 90th percentile over nuclei of at
least 30 px of the long axis over the short one (of the ellipse with the same second moments).

All images, how the nuclei lie (``alignment``): the mean of cos(2 x angle difference) over
pairs of elongated nuclei (long axis over 1.3x the short) within four median radii of each
other; 0 when axes point anywhere, 1 when neighbours are parallel (tissue streams, glands).
"""

from __future__ import annotations

import numpy as np

from triageseg.datasets.synth.layout import alignment

STAINED = ("he", "ihc", "brightfield")


def _gray(image: np.ndarray) -> np.ndarray:
    g = image.astype(np.float32)
    g = g.mean(-1) if g.ndim == 3 else g
    lo, hi = np.percentile(g, [0.1, 99.9])
    return np.clip((g - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def _nuclei(image: np.ndarray, stained: bool) -> np.ndarray:
    from triageseg.postprocess.classical import classical_segment

    if image.dtype == np.uint8:
        img = image.astype(np.float32) / 255.0
    else:
        img = image.astype(np.float32)
        img = (img - img.min()) / max(float(img.max() - img.min()), 1e-6)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return classical_segment(img, channel="hematoxylin" if stained else "gray")


def image_stats(image: np.ndarray, modality: str) -> dict[str, float]:
    """The realism statistics of one image (uint8 RGB, or a 2-D fluorescence image of any dtype)."""
    from scipy import ndimage

    stained = modality in STAINED
    gray = _gray(image)
    if stained:
        from skimage.color import rgb2hed

        hed = rgb2hed(image[..., :3])
        labels = _nuclei(image, True)
        signal = hed[..., 0]  # hematoxylin: nuclei high, whatever else absorbs (DAB, eosin)
    else:
        # Otsu on the log image: dim nuclei beside saturated ones are found too.
        labels = _nuclei(np.log(gray + 0.02), False)
        signal = gray
    fg = labels > 0
    bg_level = float(np.median(signal[~fg])) if (~fg).any() else 0.0
    contrast = max(float(np.median(signal[fg])) - bg_level, 1e-3) if fg.any() else 1.0
    hp = gray - ndimage.gaussian_filter(gray, 2.0)
    stats = {
        "grad": float(np.hypot(*np.gradient(ndimage.gaussian_filter(gray, 1.0))).mean()),
        "texture": float(hp[fg].std() / contrast) if fg.any() else 0.0,
        "nuclei_frac": float(fg.mean()),
        "alignment": alignment(labels),  # datasets.synth.layout.alignment
    }
    ratios = _elongations(labels)
    if ratios.size:
        stats["elongation"] = float(np.percentile(ratios, 90))
    if labels.max() > 0:
        means = ndimage.mean(signal, labels, np.arange(1, int(labels.max()) + 1)) - bg_level
        means = np.clip(means, 1e-3, None)
        stats["nucleus_range"] = float(np.percentile(means, 95) / np.percentile(means, 5))
    if stained:
        stats.update(_tissue_stats(image, hed, labels, contrast))
        for i, name in enumerate("HED"):
            stats[f"{name}_p50"], stats[f"{name}_p95"] = (float(v) for v in np.percentile(hed[..., i], [50, 95]))
        for i, name in enumerate("RGB"):
            stats[f"{name}_mean"] = float(image[..., i].mean())
    else:
        stats["background"] = float(np.median(gray[~fg])) if (~fg).any() else 0.0
        rim_core = _rim_core(gray, labels)
        if rim_core is not None:
            stats["rim_core"] = rim_core
        stats["saturated"] = float(np.mean(gray >= 0.999))
    return stats


def _rim_core(gray: np.ndarray, labels: np.ndarray) -> float | None:
    """Median over nuclei of (signal near the edge) / (signal in the core), background subtracted."""
    from scipy import ndimage

    fg = labels > 0
    bg = float(np.median(gray[~fg])) if (~fg).any() else 0.0
    dist = ndimage.distance_transform_edt(fg)
    ratios = []
    for i, box in enumerate(ndimage.find_objects(labels), 1):
        if box is None:
            continue
        mask = labels[box] == i
        if mask.sum() < 60:
            continue
        d, v = dist[box][mask], gray[box][mask] - bg
        core = float(v[d >= 0.6 * d.max()].mean())
        if core > 0.02:
            ratios.append(float(v[d <= 1.5].mean()) / core)
    return float(np.median(ratios)) if ratios else None


def _elongations(labels: np.ndarray) -> np.ndarray:
    """Long over short axis of each nucleus of at least 30 px."""
    from skimage.measure import regionprops

    return np.array([p.axis_major_length / p.axis_minor_length for p in regionprops(labels)
                     if p.area >= 30 and p.axis_minor_length > 2])


def _tissue_stats(image: np.ndarray, hed: np.ndarray, labels: np.ndarray, contrast: float) -> dict[str, float]:
    """Colour and texture of the tissue between the nuclei (see the module docstring)."""
    from scipy import ndimage

    fg = labels > 0
    od = -np.log10(np.clip(image[..., :3].astype(np.float32) / 255.0, 1.0 / 255.0, 1.0)).sum(-1)
    tissue = ~ndimage.binary_dilation(fg, iterations=3) & (od >= 0.25)  # OD sum < 0.25: glass, lumina, fat
    if tissue.sum() < 50:
        return {}
    h, e = hed[..., 0], hed[..., 1]
    hn, en = h - np.percentile(h, 1), e - np.percentile(e, 1)
    share = hn / np.clip(hn + en, 1e-4, None)
    fine = h - ndimage.gaussian_filter(h, 1.0)
    mottle = ndimage.gaussian_filter(h, 1.0) - ndimage.gaussian_filter(h, 4.0)
    return {
        "tissue_H_share": float(np.median(share[tissue])),
        "tissue_H_fine": float(fine[tissue].std() / contrast),
        "tissue_H_mottle": float(mottle[tissue].std() / contrast),
    }


def median_stats(images, modality: str) -> dict[str, float]:
    """Per-statistic median over images.

    The median, not the mean: on a few synthetic images (a dim field with one saturated
    nucleus) the classical segmentation takes the background for nuclei, the nucleus contrast
    falls near zero, and a ratio such as ``texture`` reaches 14-23 where the others give
    0.1-0.9; the mean of 16 samples was then 2.57.
    """
    rows = [image_stats(im, modality) for im in images]
    keys = sorted(set().union(*rows))
    return {k: float(np.median([r[k] for r in rows if k in r])) for k in keys}


def compare(real: dict[str, float], before: dict[str, float] | None, after: dict[str, float]) -> list[str]:
    """Lines of a real / before / after table; the closer of before and after to real is starred."""
    lines = [f"    {'statistic':<14}{'real':>10}{'before':>10}{'after':>10}"]
    for k in sorted(real):
        b = before.get(k) if before else None
        a = after.get(k)
        mark = ""
        if b is not None and a is not None:
            da, db = abs(a - real[k]), abs(b - real[k])
            mark = "  same" if da == db else "  after closer" if da < db else "  before closer"
        fmt = lambda v: f"{v:10.3f}" if v is not None else f"{'-':>10}"  # noqa: E731
        lines.append(f"    {k:<14}{fmt(real[k])}{fmt(b)}{fmt(a)}{mark}")
    return lines
