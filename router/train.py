"""Training the router: a short, class-balanced loop on augmented thumbnails.

``train_router`` reads modality labels from ``modalities.csv`` (through
:class:`~triageseg.datasets.layout.Dataset`), trains on the ``train`` split, picks the
best epoch, fits the softmax temperature on ``val`` and the OOD statistics on ``train``
with their threshold calibrated on ``val`` (:mod:`triageseg.router.calibrate`), scores
``test`` (:mod:`triageseg.router.evaluate`), and writes the router run folder
(``config.json``, ``model.safetensors``, ``ood.json``, ``ood.safetensors``,
``history.json``, ``history.csv``, ``curves.png``: :mod:`triageseg.router.history`).

Speed: every training image is read once and kept as a uint8 "base" thumbnail at twice
the router's input size. Each step draws a class-balanced batch of bases and augments
it in torch (random crop with aspect jitter, zoom-out onto a background canvas,
flips, 90-degree rotations, small brightness/contrast/gamma changes). All of these keep
the modality (colours are never swapped) while hiding the image size, the aspect ratio
and the scale from the classifier.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from triageseg.bundle import provenance, update_manifest
from triageseg.datasets.errors import DataError
from triageseg.router.calibrate import _nll, fit_router_ood, fit_temperature
from triageseg.router.evaluate import RouterEval, evaluate_router, format_confusion, score_predictions
from triageseg.router.history import write_history, write_router_curves
from triageseg.router.model import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_MODEL,
    RouterConfig,
    background_colour,
    create_router,
    make_thumbnail,
    normalise,
    resolve_device,
    save_router,
    to_tensor,
)
from triageseg.router.reference import save_reference

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from triageseg.datasets.layout import Sample


@dataclass(frozen=True)
class RouterResult:
    """What :func:`train_router` did."""

    run_dir: Path  # router run folder written
    config: RouterConfig  # the saved configuration (temperature, mean/std filled in)
    epochs_run: int  # epochs completed (fewer than asked when the time budget ran out)
    best_epoch: int  # epoch whose weights were kept (best validation accuracy, then loss)
    steps: int  # optimiser steps taken
    seconds: float  # wall time of the whole call
    train_seconds: float  # wall time of the training loop alone
    val_accuracy: float | None  # best epoch's validation accuracy (None without a val split)
    test: RouterEval | None  # scores on the test split through classify() (None without one)
    ood: dict[str, Any] | None = None  # the OOD method and threshold (None: not fitted, fewer than 2 val images)
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per epoch

    @property
    def test_accuracy(self) -> float | None:
        """Accuracy on the test split, or None."""
        return None if self.test is None else self.test.accuracy


# --------------------------------------------------------------------------- data


def _load_split(samples: Sequence[Sample], size: int, progress: bool, what: str, *, as_uint8: bool,
                also: int | None = None):
    """Read each image once: thumbnails (N x S x S x 3; uint8 to save memory, or float32 in
    [0, 1] exactly as ``classify`` makes them) and background colours (N x 3); with ``also``,
    uint8 thumbnails of that side too (the router's input size, for the OOD statistics)."""
    from tqdm.auto import tqdm

    from triageseg.datasets.io import read_image

    thumbs = np.empty((len(samples), size, size, 3), np.uint8 if as_uint8 else np.float32)
    small = np.empty((len(samples), also, also, 3), np.uint8) if also else None
    fills = np.empty((len(samples), 3), np.float32)
    for i, s in enumerate(tqdm(samples, desc=f"reading {what}", disable=None if progress else True, leave=False)):
        image = read_image(s.image_path)
        fills[i] = background_colour(image)
        thumb = make_thumbnail(image, size, fill=fills[i])
        thumbs[i] = np.round(thumb * 255) if as_uint8 else thumb
        if small is not None:
            small[i] = np.round(make_thumbnail(image, also, fill=fills[i]) * 255)
    return (thumbs, fills) if small is None else (thumbs, fills, small)


def augment_batch(
    bases: torch.Tensor, fills: torch.Tensor, size: int, generator: torch.Generator
) -> torch.Tensor:
    """Modality-preserving augmentation of ``B x 3 x L x L`` bases in [0, 1] -> ``B x 3 x size x size``.

    Per image: a random crop (10-100 % of the area, aspect 1:3 to 3:1) resized with its
    aspect kept onto a canvas of the image's background colour (zoomed out to 50-100 %
    of the canvas 30 % of the time, placed at a random offset), random flips and
    90-degree rotations, then contrast 0.85-1.15, brightness +-0.06 and gamma 0.8-1.25.
    """
    import torch
    import torch.nn.functional as F

    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    n, _, side, _ = bases.shape
    out = torch.empty((n, 3, size, size), dtype=bases.dtype)
    for i in range(n):
        area = u(0.1, 1.0)
        log_r = math.log(3.0) if float(torch.rand((), generator=generator)) < 0.2 else math.log(4 / 3)
        ratio = math.exp(u(-log_r, log_r))
        ch = max(8, min(side, round(side * math.sqrt(area * ratio))))
        cw = max(8, min(side, round(side * math.sqrt(area / ratio))))
        top = int(torch.randint(0, side - ch + 1, (), generator=generator))
        left = int(torch.randint(0, side - cw + 1, (), generator=generator))
        crop = bases[i : i + 1, :, top : top + ch, left : left + cw]
        zoom = u(0.5, 1.0) if float(torch.rand((), generator=generator)) < 0.3 else 1.0
        k = size * zoom / max(ch, cw)
        th, tw = max(1, min(size, round(ch * k))), max(1, min(size, round(cw * k)))
        crop = F.interpolate(crop, size=(th, tw), mode="bilinear", antialias=k < 1, align_corners=False)
        canvas = fills[i].view(3, 1, 1).expand(3, size, size).clone()
        oy = int(torch.randint(0, size - th + 1, (), generator=generator))
        ox = int(torch.randint(0, size - tw + 1, (), generator=generator))
        canvas[:, oy : oy + th, ox : ox + tw] = crop[0]
        if float(torch.rand((), generator=generator)) < 0.5:
            canvas = canvas.flip(2)
        if float(torch.rand((), generator=generator)) < 0.5:
            canvas = canvas.flip(1)
        canvas = torch.rot90(canvas, int(torch.randint(0, 4, (), generator=generator)), dims=(1, 2))
        mean = canvas.mean()
        canvas = (canvas - mean) * u(0.85, 1.15) + mean + u(-0.06, 0.06)
        canvas = canvas.clamp(0, 1) ** u(0.8, 1.25)
        out[i] = canvas
    return out


# --------------------------------------------------------------------------- training


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread inside the block (restored after).

    The augmentation is many small ops; with two threads each op pays the thread
    hand-off, which made it ~10-100x slower on a busy 2-core machine (measured).
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _holdout(train: list[Sample], rng: np.random.Generator) -> tuple[list[Sample], list[Sample]]:
    """Split ~15 % of each modality off ``train`` for validation (classes with >= 3 images)."""
    keep, val = [], []
    by_class: dict[str, list[Sample]] = {}
    for s in train:
        by_class.setdefault(s.modality, []).append(s)
    for members in by_class.values():
        order = rng.permutation(len(members))
        n_val = max(1, round(0.15 * len(members))) if len(members) >= 3 else 0
        val += [members[i] for i in order[:n_val]]
        keep += [members[i] for i in order[n_val:]]
    return keep, val


def lr_at(step: int, total_steps: int, warmup: int, lr: float) -> float:
    """The router's learning rate at optimiser step ``step`` (0-based): linear warm-up, then cosine to zero."""
    return lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total_steps)))


def train_router(
    data_root: str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    epochs: int = 30,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    device: str = "auto",
    time_budget_s: float | None = None,
    progress: bool = True,
    image_size: int = DEFAULT_IMAGE_SIZE,
    model_name: str = DEFAULT_MODEL,
    weights: str | os.PathLike | None = None,
    weight_decay: float = 0.05,
    label_smoothing: float = 0.1,
    bundle: str | os.PathLike | None = None,
    report: Callable[[int, dict[str, Any]], None] | None = None,
) -> RouterResult:
    """Train the modality router on a dataset folder and write its run folder.

    Args:
        data_root: dataset in the DESIGN layout with ``modalities.csv`` (and ``splits.csv``;
            without a ``val`` split, 15 % of each modality's training images are held out).
        run_dir: router run folder to write (``<bundle>/router`` in a bundle).
        epochs: passes over the training split (each draws as many class-balanced images
            as the split holds, at least one batch).
        batch_size: images per step.
        lr: peak AdamW learning rate (linear warm-up over the first 5 %, cosine decay).
        seed: seeds sampling, augmentation and initialisation.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...
        time_budget_s: stop after the epoch that exhausts this many seconds of training (a safety
            net for slow machines). The learning-rate schedule follows the steps, never the clock,
            so a run the budget does not stop is the same on every machine (the best epoch so far
            is kept when it does).
        progress: show progress bars.
        image_size: thumbnail side (a multiple of the ViT patch, 16).
        model_name: timm ViT architecture.
        weights: optional local weights file to initialise from (see ``create_router``).
        weight_decay: AdamW weight decay.
        label_smoothing: cross-entropy label smoothing (temperature scaling undoes its softening).
        bundle: bundle whose ``bundle.json`` registers the router; default ``run_dir``'s
            parent when ``run_dir`` is named ``router`` (the bundle layout), else none.
        report: called as ``report(epoch, metrics)`` after each epoch.

    Returns:
        A :class:`RouterResult` (accuracies, timings, history).

    Raises:
        DataError: no modality labels, fewer than two modalities in the training split.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from triageseg.datasets.layout import Dataset

    t_start = time.perf_counter()
    data_root, run_dir = Path(data_root), Path(run_dir)
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    dataset = Dataset(data_root)
    labelled = [s for s in dataset.samples if s.modality is not None]
    if not labelled:
        raise DataError(data_root / "modalities.csv", "no image has a modality label; the router needs modalities.csv")
    rng = np.random.default_rng(seed)
    train = [s for s in dataset.select(split="train") if s.modality is not None]
    val = [s for s in dataset.select(split="val") if s.modality is not None]
    test = [s for s in dataset.select(split="test") if s.modality is not None]
    if not train:
        raise DataError(data_root / "splits.csv", "no labelled image in the train split")
    if not val:
        train, val = _holdout(train, rng)
    class_names = tuple(sorted({s.modality for s in train}))
    if len(class_names) < 2:
        raise DataError(data_root / "modalities.csv", f"the train split has only modality {list(class_names)}; need >= 2")
    unseen = sorted({s.modality for s in val + test} - set(class_names))
    if unseen:
        warnings.warn(f"modalities {unseen} appear in val/test but not in train; the router cannot predict them")

    torch.manual_seed(seed)
    dev = resolve_device(device)
    config = RouterConfig(class_names=class_names, model_name=model_name, image_size=image_size)
    model = create_router(config, weights=weights).to(dev)  # before reading: a bad name fails fast
    base_size = 2 * image_size
    bases_np, fills_np, train_thumbs = _load_split(train, base_size, progress, "train", as_uint8=True, also=image_size)
    val_np, _ = _load_split(val, image_size, progress, "val", as_uint8=False)
    # Per-channel mean/std of the training thumbnails, accumulated per image (no big float copy).
    s1 = np.zeros(3)
    s2 = np.zeros(3)
    for b in bases_np:
        x = b.reshape(-1, 3).astype(np.float64) / 255
        s1 += x.mean(0)
        s2 += (x**2).mean(0)
    mean = s1 / len(bases_np)
    std = np.sqrt(np.maximum(s2 / len(bases_np) - mean**2, 0.0))
    config = config.replace(mean=tuple(np.round(mean, 4)), std=tuple(np.round(np.maximum(std, 0.05), 4)))

    bases = torch.from_numpy(bases_np).permute(0, 3, 1, 2)  # uint8, converted per batch
    fills = torch.from_numpy(fills_np)
    labels = torch.tensor([class_names.index(s.modality) for s in train])
    val_x = to_tensor(val_np, config)
    val_y = np.array([class_names.index(s.modality) if s.modality in class_names else -1 for s in val])
    counts = torch.bincount(labels, minlength=len(class_names)).float()
    sample_weight = (1.0 / counts)[labels]  # class-balanced sampling

    steps_per_epoch = max(1, math.ceil(len(train) / batch_size))
    total_steps = epochs * steps_per_epoch
    warmup = max(1, round(0.05 * total_steps))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token")) else decay).append(p)
    optimiser = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    gen = torch.Generator().manual_seed(seed)
    use_amp = dev.type == "cuda"

    def val_logits(m: torch.nn.Module) -> np.ndarray:
        m.eval()
        out = []
        with torch.inference_mode():
            for start in range(0, len(val_x), 64):
                out.append(m(val_x[start : start + 64].to(dev)).float().cpu().numpy())
        m.train()
        return np.concatenate(out) if out else np.zeros((0, len(class_names)), np.float32)

    history: list[dict[str, Any]] = []
    best_key, best_state, best_epoch = None, None, 0
    step = 0
    t_train = time.perf_counter()
    model.train()
    bar = tqdm(range(1, epochs + 1), desc="router", disable=None if progress else True, leave=False)
    for epoch in bar:
        t_epoch = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        for _ in range(steps_per_epoch):
            lr_now = lr_at(step, total_steps, warmup, lr)
            for group in optimiser.param_groups:
                group["lr"] = lr_now
            idx = torch.multinomial(sample_weight, batch_size, replacement=True, generator=gen)
            with _one_thread():
                x = augment_batch(bases[idx].float() / 255, fills[idx], image_size, gen)
            x, y = normalise(x, config).to(dev), labels[idx].to(dev)
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            step += 1
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)

        vl = val_logits(model)
        known = val_y >= 0
        val_loss = _nll(vl[known], val_y[known], 1.0) if known.any() else float("nan")
        val_pred = vl.argmax(1) if len(vl) else np.zeros(0, np.int64)
        ev = score_predictions(
            class_names, [s.id for s in val], [s.modality for s in val],
            [class_names[k] for k in val_pred], [0.0] * len(val),
        )
        row = {
            "epoch": epoch,
            "steps": step,
            "lr": round(lr_now, 8),
            "train_loss": round(loss_sum / seen, 5),
            "train_accuracy": round(correct / seen, 5),
            "val_loss": round(val_loss, 5),
            "val_accuracy": round(ev.accuracy, 5) if len(val) else None,
            "seconds": round(time.perf_counter() - t_epoch, 3),
            "val_confusion": ev.confusion.tolist(),
        }
        history.append(row)
        key = (ev.accuracy if len(val) else 0.0, -val_loss if known.any() else 0.0)
        if best_key is None or key >= best_key:
            best_key, best_state, best_epoch = key, copy.deepcopy(model.state_dict()), epoch
        bar.set_postfix(loss=row["train_loss"], val_acc=row["val_accuracy"])
        write_history(run_dir, history, {"status": "training", "class_names": list(class_names)})
        if report is not None:
            report(epoch, row)
        if time_budget_s and time.perf_counter() - t_train >= time_budget_s:
            break
    bar.close()
    train_seconds = time.perf_counter() - t_train

    model.load_state_dict(best_state)
    model.eval()
    vl = val_logits(model)
    known = val_y >= 0
    temperature = fit_temperature(vl[known], val_y[known]) if known.any() else 1.0
    config = config.replace(temperature=round(temperature, 5))
    save_router(run_dir, model, config)
    ood = _fit_ood(model, config, train_thumbs, labels.numpy(), val_np[val_y >= 0], dev, run_dir)  # known kinds only
    # features of a sample of the training thumbnails: a fine-tune can add a class without the data
    save_reference(run_dir, model, config, train_thumbs, labels.numpy(), seed=seed, device=dev)
    val_accuracy = history[best_epoch - 1]["val_accuracy"]
    test_eval = evaluate_router(model, config, test, device=dev) if test else None
    seconds = time.perf_counter() - t_start
    summary = {
        "status": "done",
        "class_names": list(class_names),
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "steps": step,
        "temperature": config.temperature,
        "val_accuracy": val_accuracy,
        "val_nll_before_temperature": round(_nll(vl[known], val_y[known], 1.0), 5) if known.any() else None,
        "val_nll_after_temperature": round(_nll(vl[known], val_y[known], temperature), 5) if known.any() else None,
        "test": test_eval.to_dict() if test_eval else None,
        "train_seconds": round(train_seconds, 2),
        "seconds": round(seconds, 2),
        "device": str(dev),
        "n_train": len(train),
        "n_val": len(val),
        "n_test": len(test),
        "ood": ood,
    }
    write_history(run_dir, history, summary)
    write_router_curves(run_dir, history, best_epoch)

    if bundle is None and run_dir.name == "router":
        bundle = run_dir.parent
    if bundle is not None:
        update_manifest(
            bundle,
            modalities=list(class_names),
            provenance={
                "router": provenance(
                    data=str(data_root.resolve()),
                    train_ids_sha256=dataset.ids_hash(train),
                    seed=seed,
                    epochs=len(history),
                    best_epoch=best_epoch,
                    device=str(dev),
                    temperature=config.temperature,
                    val_accuracy=val_accuracy,
                    test_accuracy=None if test_eval is None else test_eval.accuracy,
                )
            },
            ood=ood,
        )
    return RouterResult(
        run_dir=run_dir,
        config=config,
        epochs_run=len(history),
        best_epoch=best_epoch,
        steps=step,
        seconds=seconds,
        train_seconds=train_seconds,
        val_accuracy=val_accuracy,
        test=test_eval,
        history=history,
        ood=ood,
    )


def _fit_ood(model, config: RouterConfig, train_thumbs: np.ndarray, train_labels: np.ndarray, val_thumbs: np.ndarray,
             device, run_dir: Path) -> dict[str, Any] | None:
    """Fit and save the OOD statistics (``ood.json`` + ``ood.safetensors``); their summary, or None.

    Without 2 validation images the threshold cannot be calibrated: the router is saved
    without OOD statistics (any left from an earlier router are removed) and a warning says so.
    """
    from triageseg.router.ood import OOD_JSON, OOD_WEIGHTS, save_ood

    if len(val_thumbs) < 2:
        for name in (OOD_JSON, OOD_WEIGHTS):
            (run_dir / name).unlink(missing_ok=True)
        warnings.warn(f"{run_dir}: fewer than 2 validation images; the router has no OOD check (unknown modality)")
        return None
    ood = fit_router_ood(model, config, train_thumbs, train_labels, val_thumbs, device=device)
    save_ood(run_dir, ood)
    return ood.summary()


__all__ = [
    "RouterEval",  # re-exported (router/evaluate.py), like the names below from where they moved

    "RouterResult",
    "augment_batch",
    "evaluate_router",
    "fit_temperature",
    "format_confusion",
    "score_predictions",
    "train_router",
]
