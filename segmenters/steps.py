"""One epoch of optimiser steps: the learning-rate schedule, BatchNorm handling, the step loop.

``train_segmenter`` calls :func:`train_epoch` once per epoch between validations; the
crops come from the run's DataLoader iterator, so the data an epoch sees is fixed by the
global sample indices (:mod:`triageseg.segmenters.data`).
"""

from __future__ import annotations

import math
import random
import time
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from triageseg.segmenters.config import TrainConfig


def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate at optimiser step ``step`` (0-based): linear warm-up then cosine decay."""
    total = config.epochs * config.steps_per_epoch
    warm = min(total, round(config.warmup_epochs * config.steps_per_epoch))
    if step < warm:
        return config.lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def freeze_batchnorm(model: torch.nn.Module) -> None:
    """Put every BatchNorm layer in eval mode: normalise with the running statistics, leave them unchanged."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_epoch(model, optimizer, scaler, batches, config: TrainConfig, dev, *, global_step: int, desc: str,
                 progress: bool, deadline: float | None, should_stop=None, on_step=None) -> dict[str, Any]:
    """One epoch of optimiser steps; stops early (``stopped``) once ``perf_counter`` passes ``deadline``.

    ``should_stop()`` returning True stops it the same way (a user's Stop button); ``on_step(global_step)``
    is called after every optimiser step (a progress bar outside tqdm).
    """
    import torch
    from tqdm.auto import tqdm

    from triageseg.segmenters.losses import confusion_matrix, segmentation_loss
    from triageseg.segmenters.predict import autocast_context

    cuda = dev.type == "cuda"
    class_weights = (1.0, 1.0, config.boundary_weight)
    model.train()
    if config.freeze_bn:
        freeze_batchnorm(model)
    confusion = torch.zeros(3, 3, dtype=torch.int64)
    loss_sum, steps, stopped = 0.0, 0, False
    lr = lr_at(config, global_step)
    bar = tqdm(total=config.steps_per_epoch, desc=desc, leave=False, disable=not progress, unit="step")
    for _ in range(config.steps_per_epoch):
        x, y = next(batches)
        x = x.to(dev, non_blocking=True)
        y = y.to(dev, non_blocking=True)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        lr = lr_at(config, global_step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast_context(dev, config.amp):
            logits = model(x)
        loss = segmentation_loss(logits, y, class_weights=class_weights, dice_weight=config.dice_weight)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        global_step += 1
        steps += 1
        loss_value = float(loss.detach())
        loss_sum += loss_value
        confusion += confusion_matrix(logits.detach(), y, 3)
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}")
        bar.update(1)
        if on_step is not None:
            on_step(global_step)
        if (deadline is not None and time.perf_counter() > deadline) or (should_stop is not None and should_stop()):
            stopped = True
            break
    bar.close()
    return {"global_step": global_step, "stopped": stopped, "steps": steps, "loss": loss_sum / max(1, steps),
            "confusion": confusion, "lr": lr}
