"""The pictures of the HTML report, as PNG bytes: F1 against IoU, errors by area, outlines.

Plots are drawn by matplotlib's object API (a ``Figure`` rendered by Agg, imported when a
plot is drawn; pyplot, as slow again to import, is not needed). The outline pictures are
composed in NumPy and encoded by Pillow. Nothing here writes a file:
:mod:`triageseg.postprocess.report` inlines the bytes as ``data:`` URIs.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import numpy as np

GT_COLOUR = (0, 230, 64)  # ground-truth outlines: green
PRED_COLOUR = (255, 220, 0)  # predicted outlines: yellow (seen on dark fluorescence and on pink H&E)
MAX_SIDE = 480  # longest side of one outline panel, pixels (large images are shown subsampled)
MIN_SIDE = 240  # small images are enlarged (pixels repeated) until their longest side reaches this


def _figure(width: float, height: float):
    """A figure with one axes, outside pyplot (nothing global, nothing to close)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def _figure_png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf, metadata={"Software": None})
    return buf.getvalue()


def f1_curve_png(thresholds: Sequence[float], curves: Mapping[str, Sequence[float]], *, protocol: str) -> bytes:
    """Mean F1 against IoU threshold, one line per modality; a line named ``overall`` is drawn dashed black.

    Args:
        thresholds: the protocol's IoU thresholds (x axis).
        curves: name -> F1 at each threshold, as the protocol aggregates it.
        protocol: the protocol's name, for the title.
    """
    fig, ax = _figure(6.0, 3.8)
    for name, ys in curves.items():
        style = {"color": "black", "linestyle": "--", "linewidth": 2} if name == "overall" else {"linewidth": 1.6}
        ax.plot(list(thresholds), list(ys), marker="o", markersize=3, label=name, **style)
    ax.set_xlabel("IoU threshold")
    ax.set_ylabel("F1")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"F1 against IoU threshold ({protocol} protocol)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _figure_png(fig)


def errors_png(area_bins: Sequence[str], missed: Sequence[int], extra: Sequence[int], *, iou: float) -> bytes:
    """Bars of missed GT objects and extra predictions per object-area bin (Caicedo et al. 2019)."""
    fig, ax = _figure(6.0, 3.4)
    x = np.arange(len(area_bins))
    ax.bar(x - 0.2, list(missed), width=0.4, label="missed (GT area)", color="#d95f02")
    ax.bar(x + 0.2, list(extra), width=0.4, label="extra (predicted area)", color="#7570b3")
    ax.set_xticks(x, [f"{b} px" for b in area_bins])
    ax.set_ylabel("objects")
    ax.set_title(f"unmatched objects at IoU > {iou} by area", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _figure_png(fig)


def _outlines(labels: np.ndarray) -> np.ndarray:
    from skimage.segmentation import find_boundaries

    return find_boundaries(labels, mode="inner")


def _background(image: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    """``image`` (HxW or HxWx3, float in [0, 1]) as uint8 RGB, or black."""
    if image is None:
        return np.zeros((*shape, 3), np.uint8)
    img = np.asarray(image, np.float32)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return (np.clip(img[..., :3], 0, 1) * 255).round().astype(np.uint8)


def outlines_png(gt: np.ndarray, pred: np.ndarray, image: np.ndarray | None = None) -> bytes:
    """Two panels side by side: GT outlines (green) and predicted outlines (yellow), each on the image.

    Args:
        gt: ground-truth label image (HxW).
        pred: predicted label image, same shape.
        image: the image (HxW or HxWx3, float in [0, 1]) or None (outlines on black).
            Images with a side over :data:`MAX_SIDE` are shown subsampled (every n-th pixel),
            images under :data:`MIN_SIDE` enlarged (each pixel repeated).

    Raises:
        ValueError: shapes that differ.
    """
    from PIL import Image

    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape or gt.ndim != 2:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} must be the same 2-D shape")
    if image is not None and tuple(np.shape(image)[:2]) != gt.shape:
        raise ValueError(f"image {np.shape(image)} and labels {gt.shape} differ in shape")
    step = max(1, math.ceil(max(gt.shape) / MAX_SIDE))
    gt, pred = gt[::step, ::step], pred[::step, ::step]
    base = _background(None if image is None else np.asarray(image)[::step, ::step], gt.shape)
    panels = []
    for labels, colour in ((gt, GT_COLOUR), (pred, PRED_COLOUR)):
        panel = base.copy()
        panel[_outlines(labels)] = colour
        panels.append(panel)
    zoom = max(1, MIN_SIDE // max(gt.shape))
    if zoom > 1:
        panels = [p.repeat(zoom, axis=0).repeat(zoom, axis=1) for p in panels]
    gap = np.full((panels[0].shape[0], 6, 3), 255, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.concatenate([panels[0], gap, panels[1]], axis=1)).save(buf, format="PNG")
    return buf.getvalue()
