"""Training loss (class-weighted cross-entropy + soft Dice) and per-class IoU bookkeeping.

The boundary class is a thin minority class that a plain cross-entropy learns to
ignore; its CE weight and the Dice term (which weighs every class equally whatever
its pixel count) keep it alive. Per-class IoU from a running confusion matrix lets
the training log show whether it is being learned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, *, eps: float = 1.0) -> torch.Tensor:
    """1 - mean over classes of the soft Dice of softmax(logits), pooled over the batch.

    Args:
        logits: ``(B, C, H, W)``.
        target: ``(B, H, W)`` integer class indices.
        eps: additive smoothing in pixels (keeps classes absent from the batch finite).
    """
    import torch

    probs = torch.softmax(logits.float(), dim=1)
    onehot = torch.nn.functional.one_hot(target.long(), probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    return 1.0 - ((2.0 * inter + eps) / (denom + eps)).mean()


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    class_weights: Sequence[float],
    dice_weight: float = 1.0,
) -> torch.Tensor:
    """Class-weighted cross-entropy + ``dice_weight`` x soft Dice.

    Args:
        logits: ``(B, C, H, W)`` raw network outputs.
        target: ``(B, H, W)`` class indices (postprocess.targets: 0 bg, 1 interior, 2 boundary).
        class_weights: CE weight per class (length C).
        dice_weight: weight of the Dice term (0 = CE only).
    """
    import torch

    if logits.dim() != 4 or target.dim() != 3 or logits.shape[0] != target.shape[0]:
        raise ValueError(
            f"logits (B,C,H,W) and target (B,H,W) expected, got {tuple(logits.shape)}, {tuple(target.shape)}"
        )
    if len(class_weights) != logits.shape[1]:
        raise ValueError(f"{len(class_weights)} class weights for {logits.shape[1]} classes")
    weight = torch.as_tensor(list(class_weights), dtype=torch.float32, device=logits.device)
    loss = torch.nn.functional.cross_entropy(logits.float(), target.long(), weight=weight)
    if dice_weight:
        loss = loss + dice_weight * soft_dice_loss(logits, target)
    return loss


def confusion_matrix(logits: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    """``classes x classes`` int64 counts, rows = target class, columns = predicted (argmax) class."""
    import torch

    pred = logits.argmax(dim=1).reshape(-1)
    idx = target.reshape(-1).long() * classes + pred
    return torch.bincount(idx, minlength=classes * classes).reshape(classes, classes).cpu()


def iou_per_class(confusion) -> list[float]:
    """IoU of each class from a confusion matrix (NaN for a class never seen nor predicted)."""
    import numpy as np

    cm = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    return [float(v) for v in iou]
