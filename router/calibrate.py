"""What the router learns after training: the softmax temperature and the OOD statistics.

Both are fitted on the trained model's outputs: the temperature on the validation logits
(:func:`fit_temperature`), the OOD statistics on the training split's whole-image thumbnails
with their threshold calibrated on the validation split (:func:`fit_router_ood`, methods in
:mod:`triageseg.router.ood`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from triageseg.router.model import RouterConfig, router_outputs
from triageseg.router.ood import DEFAULT_METHOD, KEEP, OODModel, ViewSet, fit_ood

if TYPE_CHECKING:  # pragma: no cover
    import torch


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(labels)), labels].mean())


def fit_temperature(
    logits: np.ndarray, labels: np.ndarray, *, bounds: tuple[float, float] = (0.5, 20.0)
) -> float:
    """Temperature ``T`` minimising the negative log-likelihood of ``softmax(logits / T)``.

    The NLL is convex in ``1 / T``, so a golden-section search over ``1 / T`` finds the
    optimum; ``T`` is kept within ``bounds``. The lower bound matters: when every
    validation image is classified right with a margin (the synthetic data), the NLL
    keeps falling as ``T -> 0`` and says nothing about how much sharper to go, so the
    router is never sharpened more than 2x beyond its (label-smoothed) training output.

    Args:
        logits: ``N x C`` float array of raw classifier outputs.
        labels: ``N`` integer class indices.
        bounds: smallest and largest allowed temperature.

    Returns:
        The fitted temperature (1.0 for no samples). ``T > 1`` softens an over-confident model.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"expected logits N x C and labels N, got {logits.shape} and {labels.shape}")
    if len(labels) == 0:
        return 1.0
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels must be in [0, {logits.shape[1] - 1}], got range {labels.min()}..{labels.max()}")
    lo, hi = 1.0 / bounds[1], 1.0 / bounds[0]  # search over beta = 1 / T
    f = lambda beta: _nll(logits, labels, 1.0 / beta)  # noqa: E731
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(80):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    beta = (a + b) / 2
    # The search interval's ends are candidates too (a monotone NLL pins T to a bound).
    best = min((f(x), x) for x in (lo, beta, hi))[1]
    return float(1.0 / best)


def fit_router_ood(
    model: torch.nn.Module,
    config: RouterConfig,
    train_thumbs: np.ndarray,
    train_labels: np.ndarray,
    val_thumbs: np.ndarray,
    *,
    method: str = DEFAULT_METHOD,
    keep: float = KEEP,
    device: str | torch.device | None = None,
) -> OODModel:
    """Fit the OOD statistics of a trained router (see :func:`triageseg.router.ood.fit_ood`).

    Args:
        model: the trained router (best epoch).
        config: its configuration (temperature fitted).
        train_thumbs: whole-image thumbnails of the training images, ``N x S x S x 3`` in [0, 1]
            (uint8 thumbnails are divided by 255), exactly as :func:`~triageseg.router.model.classify`
            makes them.
        train_labels: class index per training thumbnail.
        val_thumbs: the validation images' thumbnails (threshold calibration).
        method: OOD method (:data:`triageseg.router.ood.METHODS`).
        keep: share of validation images the threshold keeps.
        device: where to run the router.
    """
    def views(thumbs: np.ndarray) -> ViewSet:
        thumbs = np.asarray(thumbs)
        if thumbs.dtype == np.uint8:
            thumbs = thumbs.astype(np.float32) / 255
        logits, feats = router_outputs(model, config, thumbs, device=device)
        return ViewSet(logits, feats, thumbs)

    return fit_ood(views(train_thumbs), np.asarray(train_labels), views(val_thumbs), config.class_names,
                   method=method, temperature=config.temperature, keep=keep)


__all__ = ["fit_router_ood", "fit_temperature"]
