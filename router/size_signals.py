"""The image a nucleus size is measured on (:func:`triageseg.router.size.estimate_diameter`'s ``signal``).

A float image where nuclei are bright: ``auto`` picks the channel (or the grey image) that
splits best (:func:`nucleus_signal`), ``haematoxylin`` unmixes the nuclear counterstain from
RGB (:func:`haematoxylin_signal`). Which one a modality uses is :data:`MODALITY_SIGNALS`
(:func:`signal_for`); a segmenter records how its size calibration was measured
(``SegmenterConfig.size_signal``, one of :data:`SIZE_SIGNAL_MODES`).
"""

from __future__ import annotations

import numpy as np

# The image the nuclei are measured on (estimate_diameter's signal): "auto" picks the channel (or the grey
# image) that splits best (nucleus_signal); "haematoxylin" is the nuclear counterstain unmixed from RGB
# (skimage.color.rgb2hed). In IHC the DAB chromogen marks a protein, often membranes and cytoplasm,
# and splits better than the counterstain, so "auto" measured the brown tissue: on the synthetic IHC training
# images of the demo the estimate's scatter around its own median was 0.77 / 1.48 octave (median / p95)
# with "auto" and 0.13 / 1.23 with "haematoxylin". In H&E, lilac cytoplasm filling the space between
# nuclei (cellular fields) pulls "auto" low and stroma does not (log2(estimate / true), 16 images each at
# 14 px: -0.40 in cellular fields, -0.10 in stroma), so a mix of both has no one calibration; haematoxylin
# is biased alike in both (-0.35, -0.32) and the calibration takes it out (demo training images: scatter
# p95 0.41 against 1.67 with "auto").
# "haematoxylin-v1" is the haematoxylin measured as before the pyramid descent (router.size._descend), for
# the segmenters calibrated with it.
SIGNALS = ("auto", "haematoxylin", "haematoxylin-v1")
MODALITY_SIGNALS = {"ihc": "haematoxylin", "he": "haematoxylin"}
# How a segmenter's size_calibration was measured (SegmenterConfig.size_signal): "auto" for every image
# (bundles trained before the per-modality signal), "modality" (each image's modality's signal, the
# haematoxylin at native resolution: bundles trained before the descent) or "modality-pyramid" (the same,
# the haematoxylin measured down the pyramid: what train records now, SIZE_SIGNAL_MODE). A segmenter's
# calibration is only valid for the estimate it was measured with, so an older bundle keeps its estimate.
SIZE_SIGNAL_MODES = ("auto", "modality", "modality-pyramid")
SIZE_SIGNAL_MODE = "modality-pyramid"


def signal_for(modality: str | None, mode: str = SIZE_SIGNAL_MODE) -> str:
    """The signal (one of :data:`SIGNALS`) an image of ``modality`` is measured on, under a segmenter's ``mode``."""
    if mode not in SIZE_SIGNAL_MODES:
        raise ValueError(f"unknown size signal mode {mode!r}; valid: {', '.join(SIZE_SIGNAL_MODES)}")
    if mode == "auto":
        return "auto"
    signal = MODALITY_SIGNALS.get(modality or "", "auto")
    return "haematoxylin-v1" if mode == "modality" and signal == "haematoxylin" else signal


def nucleus_signal(image: np.ndarray) -> tuple[np.ndarray, bool]:
    """(float32 image where nuclei are bright, whether it was inverted: nuclei dark on a bright background).

    Nuclei are the minority phase, so the median pixel is background: a median nearer the
    bright end means dark objects on a bright background (stained brightfield, H&E). Of the
    channels (and their mean), the one whose two Otsu classes
    are best apart (between-class variance over total variance) is kept: the red channel
    separates haematoxylin from eosin, the blue one DAB from the background.
    """
    from skimage.filters import threshold_otsu

    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 2:
        img = img[..., None]
    step = max(1, max(img.shape[:2]) // 256)
    # the sample's channels as contiguous planes: every reduction and histogram below runs along memory
    planes = np.ascontiguousarray(img[::step, ::step].transpose(2, 0, 1))
    grey = planes.mean(axis=0)  # (r + g) + b, as a mean over the channel axis adds them
    lo, hi = np.percentile(grey, [1, 99])
    dark = float(np.median(grey)) > 0.5 * float(lo + hi)  # the background (the majority) is the bright end
    best, best_eta = -1, -1.0
    candidates = list(planes) + ([grey] if planes.shape[0] > 1 else [])
    for c, ch in enumerate(candidates):
        var = float(ch.var())
        if var <= 1e-8:
            continue
        thr = threshold_otsu(ch)
        hi = ch > thr
        w1 = float(hi.mean())
        if not 0 < w1 < 1:
            continue
        between = w1 * (1 - w1) * (float(ch[hi].mean()) - float(ch[~hi].mean())) ** 2
        if between / var > best_eta:
            best, best_eta = c, between / var
    signal = img.mean(axis=2) if best in (-1, img.shape[2]) else img[..., best]
    if dark:
        signal = 1.0 - signal
    return np.ascontiguousarray(signal, dtype=np.float32), dark


def haematoxylin_signal(image: np.ndarray) -> np.ndarray | None:
    """Haematoxylin optical density (``rgb2hed``) scaled to [0, 1] by its 0.5 / 99.5 percentiles; nuclei bright.

    None for an image that is not colour (grey, or grey replicated to three channels): there is
    no stain to unmix, and the caller measures the ``auto`` signal instead.
    """
    from skimage.color import rgb2hed

    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 3 or img.shape[2] != 3:
        return None
    step = max(1, max(img.shape[:2]) // 256)
    sample = img[::step, ::step]
    if float(np.abs(sample - sample.mean(axis=2, keepdims=True)).max()) < 0.02:
        return None
    h = rgb2hed(np.clip(img, 0.0, 1.0))[..., 0].astype(np.float32)
    lo, hi = np.percentile(h[::step, ::step], [0.5, 99.5])
    return np.ascontiguousarray(np.clip((h - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0), dtype=np.float32)
