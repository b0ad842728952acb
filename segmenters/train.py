"""Training a specialist (or the generalist): a function, not a trainer class.

``train_segmenter`` runs: sampled, augmented crops -> Unet -> class-weighted CE + Dice
-> AdamW with a warmed-up cosine schedule; after each epoch it validates by the real
decode (tiled predict -> watershed -> mean F1), writes an atomic checkpoint, the
history files and calls ``report``. At the end the best epoch's weights get their
watershed parameters tuned on the validation images and the run folder is written.

Reproducibility: the crops of global sample ``i`` are drawn from a generator seeded by
``(seed, i)``, so the data an epoch sees does not depend on worker count or on where
a run was interrupted; the checkpoint keeps model, optimiser, scaler, step and the
Python/NumPy/torch RNG states, so ``resume=True`` reaches the same weights as an
uninterrupted run (exactly, on CPU).

Example:
    >>> cfg = TrainConfig(modality="he", epochs=5, steps_per_epoch=20, crop_size=128)  # doctest: +SKIP
    >>> result = train_segmenter(cfg, "data/synth", "bundle/segmenters/he")            # doctest: +SKIP
    >>> result.val_mean_f1_tuned                                                        # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from triageseg import bundle
from triageseg.datasets.atomic import write_json_atomic
from triageseg.datasets.errors import DataError
from triageseg.segmenters.checkpoint import (  # noqa: F401 - CHECKPOINT_* and save_checkpoint re-exported
    CHECKPOINT_DIR,
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    RESUMABLE_CHANGES,
    config_differences,
    load_checkpoint,
    refuse_or_discard,
    rng_states,
    save_checkpoint,
    set_rng_states,
)
from triageseg.segmenters.data import (
    CropDataset,
    RangeSampler,
    balanced,
    check_has_objects,
    select_samples,
    worker_init,
)
from triageseg.segmenters.model import DEFAULT_DECODER_CHANNELS, SegmenterConfig
from triageseg.segmenters.validation import (  # noqa: F401 - CLASS_NAMES, HISTORY_FIELDS, validate re-exported
    CLASS_NAMES,
    HISTORY_FIELDS,
    jsonable,
    make_val_targets,
    validate,
    validate_epoch,
    write_history,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch


ReportFn = Callable[[int, dict[str, float], Path], None]


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one specialist (or generalist) training run; saved beside the model."""

    modality: str | None = None  # modality to train on; None = all modalities (the generalist)
    encoder: str = "efficientnet-b3"  # smp encoder name (see segmenters.model.valid_encoders)
    encoder_weights: str | None = None  # local file to initialise the encoder from; None = scratch
    init_from: str | None = None  # run folder or model.safetensors to start the whole Unet from (fine-tuning)
    decoder_channels: tuple[int, ...] = DEFAULT_DECODER_CHANNELS  # Unet decoder widths (5)
    epochs: int = 20  # number of epochs (validation + checkpoint after each)
    steps_per_epoch: int = 50  # optimiser steps per epoch
    batch_size: int = 8  # crops per step
    crop_size: int = 256  # side of the square training crops (multiple of 32)
    lr: float = 1e-3  # peak learning rate of AdamW
    weight_decay: float = 1e-4  # AdamW weight decay
    warmup_epochs: float = 1.0  # linear warm-up length in epochs, then cosine decay
    min_lr_ratio: float = 0.01  # final learning rate as a fraction of lr
    boundary_weight: float = 5.0  # cross-entropy weight of the boundary class (others 1)
    dice_weight: float = 1.0  # weight of the soft Dice term added to the cross-entropy
    boundary_width: int = 2  # boundary width of the targets (postprocess.targets.make_targets)
    boundary_mode: str = "touching"  # boundary mode of the targets (postprocess.targets.make_targets)
    aug_strength: float = 1.0  # multiplies every augmentation magnitude; 0 = crops only
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    bn_momentum: float = 0.1  # BatchNorm running-stat momentum while training (EfficientNet's own 0.01 lags short runs)
    scale: float = 1.0  # resize images (and labels) by this factor for the network; saved in the model config
    freeze_bn: bool = False  # keep BatchNorm statistics fixed (eval-mode BN; scale and shift still train): fine-tuning
    seed: int = 0  # seeds weights init, crop sampling and augmentation
    tile_size: int = 512  # inference tile size (validation and the saved model)
    overlap: int = 64  # inference tile overlap in pixels
    val_batch_size: int = 4  # tiles per forward pass during validation
    max_val_images: int = 16  # validation images used per epoch and for tuning (balanced over modalities)
    time_budget_s: float | None = None  # stop training cleanly after this many seconds (then tune + save)
    amp: bool = True  # mixed precision on CUDA (bf16 where supported, else fp16 + GradScaler)
    tune_postprocess: bool = True  # tune watershed parameters on the validation images at the end

    def __post_init__(self) -> None:
        object.__setattr__(self, "decoder_channels", tuple(int(c) for c in self.decoder_channels))
        positive = ("epochs", "steps_per_epoch", "batch_size", "crop_size", "val_batch_size", "max_val_images")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.crop_size % 32:
            raise ValueError(f"crop_size must be a multiple of 32, got {self.crop_size}")
        if len(self.decoder_channels) != 5 or min(self.decoder_channels) < 1:
            raise ValueError(f"decoder_channels must be 5 positive widths, got {self.decoder_channels}")
        if not self.lr > 0 or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ValueError(f"need lr > 0, weight_decay >= 0, warmup_epochs >= 0; got {self.lr}, "
                             f"{self.weight_decay}, {self.warmup_epochs}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.boundary_weight <= 0 or self.dice_weight < 0 or self.aug_strength < 0 or self.grad_clip < 0:
            raise ValueError("boundary_weight must be > 0 and dice_weight, aug_strength, grad_clip >= 0")
        if not 0 < self.bn_momentum <= 1:
            raise ValueError(f"bn_momentum must be in (0, 1], got {self.bn_momentum}")
        if self.boundary_width < 1:
            raise ValueError(f"boundary_width must be >= 1, got {self.boundary_width}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ValueError(f"time_budget_s must be positive or None, got {self.time_budget_s}")
        if self.encoder_weights is not None and str(self.encoder_weights).lower() == "imagenet":
            raise ValueError("encoder_weights must be a local file path: hub weights ('imagenet') are never used")
        if self.modality is not None and not str(self.modality).strip():
            raise ValueError("modality must be a name or None (generalist)")
        # Builds (and so validates) the model config: tile size, overlap, decoder.
        self.segmenter_config()

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (validated); unknown names are refused listing the valid ones."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; valid: {sorted(names)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of the fields."""
        d = dataclasses.asdict(self)
        d["decoder_channels"] = list(self.decoder_channels)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str | os.PathLike | None = None) -> TrainConfig:
        """Build from a dict (e.g. a tuning sweep's best config); unknown keys are refused."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise DataError(source, f"unknown TrainConfig keys {unknown}; valid: {sorted(names)}")
        try:
            return cls(**dict(d))
        except (TypeError, ValueError) as err:
            raise DataError(source, f"invalid TrainConfig ({err})") from None

    def to_json(self, path: str | os.PathLike) -> None:
        """Write the config as JSON, atomically."""
        write_json_atomic(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | os.PathLike, **overrides: Any) -> TrainConfig:
        """Read a config written by :meth:`to_json`; ``overrides`` (e.g. ``modality``) replace its values.

        Raises:
            DataError: a missing or unreadable file, unknown keys or invalid values (naming the file).
        """
        d = bundle.read_json(path)
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown TrainConfig overrides {unknown}")
        return cls.from_dict({**d, **overrides}, source=path)

    def segmenter_config(self) -> SegmenterConfig:
        """The model config this training produces."""
        return SegmenterConfig(
            encoder=self.encoder,
            decoder_channels=self.decoder_channels,
            tile_size=self.tile_size,
            overlap=self.overlap,
            modality=self.modality,
            boundary_width=self.boundary_width,
            boundary_mode=self.boundary_mode,
            encoder_init=None if self.encoder_weights is None else str(self.encoder_weights),
            scale=self.scale,
        )

    @property
    def run_name(self) -> str:
        """Folder name of this model in a bundle: the modality, or ``_generalist``."""
        return self.modality if self.modality is not None else bundle.GENERALIST


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced (the run folder holds the same, on disk)."""

    run_dir: Path  # the run folder (config.json, model.safetensors, postprocess.json, history.*)
    best_epoch: int  # epoch whose weights were kept (1-based)
    best_val_mean_f1: float  # its validation mean F1 with default watershed parameters
    val_mean_f1_tuned: float  # validation mean F1 with the tuned parameters saved in postprocess.json
    params: Any  # the tuned WatershedParams
    history: list[dict[str, float]] = field(default_factory=list)  # one row per epoch (HISTORY_FIELDS)
    epochs_completed: int = 0  # epochs run, across resumptions
    stopped_by_budget: bool = False  # True when time_budget_s ended training early
    seconds: float = 0.0  # training wall time across resumptions (tuning excluded)
    provenance: dict[str, Any] = field(default_factory=dict)  # version, date, data, id hashes, seed


# ------------------------------------------------------------------------ helpers


def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate at optimiser step ``step`` (0-based): linear warm-up then cosine decay."""
    total = config.epochs * config.steps_per_epoch
    warm = min(total, round(config.warmup_epochs * config.steps_per_epoch))
    if step < warm:
        return config.lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _freeze_batchnorm(model: torch.nn.Module) -> None:
    """Put every BatchNorm layer in eval mode: normalise with the running statistics, leave them unchanged."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------- training


def train_segmenter(
    config: TrainConfig,
    data_root: str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    device: str | torch.device = "auto",
    resume: bool = False,
    report: ReportFn | None = None,
    progress: bool = True,
    num_workers: int | None = None,
    keep_checkpoint: bool = False,
    overwrite: bool = False,
) -> TrainResult:
    """Train one specialist (``config.modality``) or the generalist (``modality=None``).

    Until the run ends, everything it writes stays in ``run_dir/checkpoint`` (the live
    ``history.csv`` too), so a model already in ``run_dir`` is replaced only by a finished one.

    Args:
        config: hyperparameters.
        data_root: dataset folder in the DESIGN layout (split ``train`` trains, ``val`` validates).
        run_dir: run folder to write (``bundle/segmenters/<modality>`` in a bundle).
        device: ``auto|cpu|cuda|cuda:N|mps``.
        resume: continue from ``run_dir/checkpoint/last.pt`` when it exists (same config required).
        report: called as ``report(epoch, metrics, run_dir)`` after each epoch's checkpoint is
            written; metrics hold ``train_loss``, ``iou_background/interior/boundary``,
            ``val_mean_f1``, ``best_val_mean_f1``, ``lr``. An exception raised there stops the run
            (the checkpoint stays for ``resume``).
        progress: tqdm bar per epoch and one summary line per epoch (stderr).
        num_workers: DataLoader workers; ``None`` = 0 on CPU/MPS, up to 8 on CUDA.
        keep_checkpoint: keep ``run_dir/checkpoint`` after a successful run (default: removed).
        overwrite: without ``resume``, delete the checkpoint of an interrupted run and start
            afresh (otherwise such a checkpoint is refused, never deleted silently).

    Returns:
        :class:`TrainResult`; the run folder holds config.json, model.safetensors,
        postprocess.json, history.csv and history.json.

    Raises:
        DataError: unknown modality (listing those present), no training images or no
            objects in them, a checkpoint made with another config, the checkpoint of an
            interrupted run without ``resume`` or ``overwrite``, unreadable data.
    """
    import torch
    from tqdm.auto import tqdm

    from triageseg.datasets.layout import Dataset
    from triageseg.postprocess.quality import training_stats
    from triageseg.segmenters.model import create_segmenter, load_encoder_weights
    from triageseg.segmenters.predict import resolve_device

    def log(msg: str) -> None:
        if progress:
            tqdm.write(msg)

    run_dir = Path(run_dir)
    data_root = Path(data_root)
    dev = resolve_device(device)
    name = config.run_name
    ckpt_dir = run_dir / CHECKPOINT_DIR
    ckpt_path = ckpt_dir / CHECKPOINT_FILE
    if not resume and ckpt_path.is_file():
        refuse_or_discard(ckpt_path, config, overwrite=overwrite, log=log)

    # ---- data
    dataset = Dataset(data_root)
    train_samples, val_samples = select_samples(dataset, config, log)
    val_samples = balanced(val_samples, config.max_val_images)
    train_data = [dataset.load(s) for s in train_samples]
    check_has_objects(dataset.root, config, [lab for _, lab in train_data])
    val_data = [dataset.load(s) for s in val_samples]
    val = _ValData([img for img, _ in val_data], [lab for _, lab in val_data], [], None)
    val.targets = make_val_targets(val.labels, config=config)
    val.stats = training_stats([lab for _, lab in train_data])
    prov = bundle.provenance(
        data=str(data_root.resolve()),
        modality=config.modality,
        train_ids_sha256=Dataset.ids_hash(train_samples),
        val_ids_sha256=Dataset.ids_hash(val_samples),
        n_train=len(train_samples),
        n_val=len(val_samples),
        seed=config.seed,
        device=str(dev),
    )

    # ---- model and optimiser
    _seed_everything(config.seed)
    seg_config = config.segmenter_config()
    model = create_segmenter(seg_config)
    if config.encoder_weights is not None:
        counts = load_encoder_weights(model, config.encoder_weights)
        log(f"encoder initialised from {config.encoder_weights} ({counts['loaded']} tensors)")
    if config.init_from is not None:
        source = Path(config.init_from)
        bundle.load_into(model, source / bundle.WEIGHTS if source.is_dir() else source)
        log(f"model initialised from {source}")
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = config.bn_momentum
    cuda = dev.type == "cuda"
    model = model.to(dev, memory_format=torch.channels_last) if cuda else model.to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    use_fp16 = cuda and config.amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda") if use_fp16 else None

    # ---- state (fresh or resumed)
    st = _RunState()
    if resume and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path)
        diffs = config_differences(state["config"], config)
        if diffs:
            raise DataError(ckpt_path, "checkpoint was made with another config (" + "; ".join(diffs)
                            + "); resume with the same config or start afresh without --resume")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        st = _RunState(
            epoch=int(state["epoch"]), best_f1=float(state["best_f1"]), best_epoch=int(state["best_epoch"]),
            best_file=state["best_file"], history=list(state["history"]), elapsed_before=float(state["elapsed_s"]),
            quality_points=[dict(p) for p in state.get("quality_points", [])],
            quality_f1=[float(v) for v in state.get("quality_f1", [])],
        )
        set_rng_states(state["rng"])
        log(f"resuming {name} from epoch {st.epoch} (best val F1 {st.best_f1:.4f} at epoch {st.best_epoch})")
    else:
        if resume:
            log(f"no checkpoint in {ckpt_dir}; starting {name} from scratch")
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # a stale checkpoint of an earlier run

    per_epoch = config.steps_per_epoch * config.batch_size
    if num_workers is None:
        num_workers = min(8, max(1, (os.cpu_count() or 2) - 1)) if cuda else 0
    loader = torch.utils.data.DataLoader(
        CropDataset([d[0] for d in train_data], [d[1] for d in train_data], config, config.epochs * per_epoch),
        batch_size=config.batch_size,
        sampler=RangeSampler(st.epoch * per_epoch, config.epochs * per_epoch),
        num_workers=num_workers,
        pin_memory=cuda,
        worker_init_fn=worker_init if num_workers else None,
        # A private generator: creating the iterator must not consume the global torch RNG.
        generator=torch.Generator().manual_seed(config.seed),
    )
    batches = iter(loader)

    t_start = time.perf_counter()
    stopped_by_budget = False
    global_step = st.epoch * config.steps_per_epoch
    for epoch in range(st.epoch, config.epochs):
        t_epoch = time.perf_counter()
        train = _train_epoch(model, optimizer, scaler, batches, config, dev, global_step=global_step,
                             desc=f"{name} {epoch + 1}/{config.epochs}", progress=progress,
                             deadline=None if config.time_budget_s is None
                             else t_start + config.time_budget_s - st.elapsed_before)
        global_step, stopped_by_budget = train["global_step"], train["stopped"]
        check = validate_epoch(model, val.images, val.labels, config=config, stats=val.stats, targets=val.targets)
        st.quality_points.extend(check.signals)
        st.quality_f1.extend(check.image_f1)
        st.epoch = epoch + 1
        row = _history_row(st.epoch, train, check, seconds=time.perf_counter() - t_epoch)
        st.history.append(row)
        improved, old_best = check.mean_f1 > st.best_f1, None
        if improved:
            st.best_f1, st.best_epoch = check.mean_f1, st.epoch
            new_best = f"best-e{st.epoch:04d}.safetensors"
            bundle.save_weights(ckpt_dir / new_best, model.state_dict(), metadata={"epoch": str(st.epoch)})
            old_best, st.best_file = st.best_file, new_best
        save_checkpoint(ckpt_dir, {
            "format": CHECKPOINT_FORMAT,
            "config": config.to_dict(),
            "epoch": st.epoch,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "best_f1": st.best_f1,
            "best_epoch": st.best_epoch,
            "best_file": st.best_file,
            "history": st.history,
            "quality_points": st.quality_points,
            "quality_f1": st.quality_f1,
            "elapsed_s": st.elapsed_before + time.perf_counter() - t_start,
            "rng": rng_states(),
        })
        if improved and old_best and old_best != st.best_file:
            (ckpt_dir / old_best).unlink(missing_ok=True)
        write_history(ckpt_dir, st.history, None)  # the run folder keeps the old model's until the end
        log(_epoch_line(name, config, row, improved))
        if report is not None:
            metrics = {k: (math.nan if v is None else v) for k, v in row.items() if k != "epoch"}
            metrics["best_val_mean_f1"] = st.best_f1
            report(st.epoch, metrics, run_dir)
        if stopped_by_budget:
            log(f"{name}: time budget of {config.time_budget_s:.0f}s reached after epoch {st.epoch}")
            break
    del batches
    seconds = st.elapsed_before + time.perf_counter() - t_start
    if st.best_file is not None:
        bundle.load_into(model, ckpt_dir / st.best_file)
    params, tuned_f1 = _finish(model, config, val, st, seg_config, run_dir, prov=prov, log=log,
                               extra={"stopped_by_budget": stopped_by_budget, "seconds": round(seconds, 3)})
    if not keep_checkpoint:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return TrainResult(
        run_dir=run_dir,
        best_epoch=st.best_epoch,
        best_val_mean_f1=st.best_f1,
        val_mean_f1_tuned=tuned_f1,
        params=params,
        history=st.history,
        epochs_completed=st.epoch,
        stopped_by_budget=stopped_by_budget,
        seconds=seconds,
        provenance=prov,
    )


@dataclass
class _ValData:
    """The validation images of a run, their labels and targets, and the training labels' statistics."""

    images: list[np.ndarray]
    labels: list[np.ndarray]
    targets: list[np.ndarray]
    stats: Any  # postprocess.quality.TrainingStats


@dataclass
class _RunState:
    """What a run carries from epoch to epoch (and through a checkpoint)."""

    epoch: int = 0  # epochs completed
    best_f1: float = -1.0
    best_epoch: int = 0
    best_file: str | None = None  # best weights so far, in the checkpoint folder
    history: list[dict[str, Any]] = field(default_factory=list)
    elapsed_before: float = 0.0  # training seconds of earlier, interrupted sessions
    quality_points: list[dict[str, float]] = field(default_factory=list)  # quality signals per (val image, epoch)
    quality_f1: list[float] = field(default_factory=list)  # their true mean F1


def _train_epoch(model, optimizer, scaler, batches, config: TrainConfig, dev, *, global_step: int, desc: str,
                 progress: bool, deadline: float | None) -> dict[str, Any]:
    """One epoch of optimiser steps; stops early (``stopped``) once ``perf_counter`` passes ``deadline``."""
    import torch
    from tqdm.auto import tqdm

    from triageseg.segmenters.losses import confusion_matrix, segmentation_loss
    from triageseg.segmenters.predict import autocast_context

    cuda = dev.type == "cuda"
    class_weights = (1.0, 1.0, config.boundary_weight)
    model.train()
    if config.freeze_bn:
        _freeze_batchnorm(model)
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
        if deadline is not None and time.perf_counter() > deadline:
            stopped = True
            break
    bar.close()
    return {"global_step": global_step, "stopped": stopped, "steps": steps, "loss": loss_sum / max(1, steps),
            "confusion": confusion, "lr": lr}


def _history_row(epoch: int, train: Mapping[str, Any], check: Any, *, seconds: float) -> dict[str, Any]:
    """One history row: training loss and IoU (of the training crops), validation loss, IoU and mean F1."""
    from triageseg.segmenters.losses import iou_per_class

    ious = iou_per_class(train["confusion"].numpy())
    return {
        "epoch": epoch,
        "steps": train["steps"],
        "train_loss": train["loss"],
        **{f"iou_{c}": jsonable(v) for c, v in zip(CLASS_NAMES, ious)},
        "val_loss": jsonable(check.loss),
        **{f"val_iou_{c}": jsonable(v) for c, v in zip(CLASS_NAMES, check.iou)},
        "val_mean_f1": check.mean_f1,
        "lr": train["lr"],
        "seconds": round(seconds, 3),
    }


def _epoch_line(name: str, config: TrainConfig, row: Mapping[str, Any], improved: bool) -> str:
    def fmt(v: float | None) -> str:
        return "nan" if v is None else f"{v:.3f}"

    return (f"{name} epoch {row['epoch']}/{config.epochs}  loss {row['train_loss']:.4f}  IoU bg/int/bnd "
            + "/".join(fmt(row[f"iou_{c}"]) for c in CLASS_NAMES)
            + f"  val loss {fmt(row['val_loss'])}  val IoU " + "/".join(fmt(row[f"val_iou_{c}"]) for c in CLASS_NAMES)
            + f"  val F1 {row['val_mean_f1']:.4f}{' *' if improved else ''}  lr {row['lr']:.2e}  {row['seconds']:.1f}s")


def _finish(model, config: TrainConfig, val: _ValData, st: _RunState, seg_config: SegmenterConfig, run_dir: Path,
            *, prov: Mapping[str, Any], log: Callable[[str], None], extra: Mapping[str, Any]) -> tuple[Any, float]:
    """Best weights in ``model``: tune the watershed, fit the quality model, write the run folder.

    Returns:
        (watershed parameters, validation mean F1 with them).
    """
    import torch

    from triageseg.postprocess.watershed import WatershedParams, tune_watershed
    from triageseg.segmenters.model import save_segmenter

    name = config.run_name
    params, tuned_f1 = WatershedParams(), st.best_f1
    points, f1s = list(st.quality_points), list(st.quality_f1)
    if config.tune_postprocess:
        check = validate_epoch(model, val.images, val.labels, config=config, stats=val.stats, targets=val.targets)
        cand, cand_f1 = tune_watershed(check.probs, val.labels)
        params, tuned_f1 = (cand, float(cand_f1)) if cand_f1 >= check.mean_f1 else (WatershedParams(), check.mean_f1)
        log(f"{name}: watershed tuned on {len(val.images)} val images: mean F1 {check.mean_f1:.4f} -> {tuned_f1:.4f}")
        if params != WatershedParams():  # the decode inference will run: its signals and F1 too
            check = validate_epoch(model, val.images, val.labels, config=config, params=params, stats=val.stats,
                                   probs=check.probs, targets=val.targets)
        points.extend(check.signals)
        f1s.extend(check.image_f1)
    results = {
        "best_epoch": st.best_epoch,
        "val_mean_f1_default": st.best_f1,
        "val_mean_f1_tuned": tuned_f1,
        "n_val_images": len(val.images),
        "epochs_completed": st.epoch,
        **extra,
    }
    model_cpu = model.to("cpu", memory_format=torch.contiguous_format)
    save_segmenter(run_dir, model_cpu, seg_config, params=params, train=config.to_dict(), provenance=prov,
                   results=results)
    _fit_quality(run_dir, points, f1s, val, st, log=log, name=name)
    write_history(run_dir, st.history, {**results, "name": name})
    return params, tuned_f1


def _fit_quality(run_dir: Path, points: list, f1s: list, val: _ValData, st: _RunState, *,
                 log: Callable[[str], None], name: str) -> None:
    """Fit and write ``quality.json`` from the (signals, true F1) of every validation image at every epoch."""
    from triageseg.postprocess.quality import QUALITY_JSON, fit_quality

    (run_dir / QUALITY_JSON).unlink(missing_ok=True)  # never leave an older model's beside new weights
    if len(points) < 2:
        log(f"{name}: note: {len(points)} validation point(s), no quality model fitted")
        return
    quality = fit_quality(points, f1s, stats=val.stats,
                          info={"n_images": len(val.images), "epochs": st.epoch, "target": "per-image mean F1, "
                                "default protocol", "points": "every validation image at every epoch + the final "
                                "tuned decode"})
    quality.save(run_dir / QUALITY_JSON)
    rho = quality.fit.get("spearman_in_fit")
    log(f"{name}: quality model fitted on {len(points)} points ({len(val.images)} images x epochs): signals "
        f"{', '.join(quality.signals) or 'none'}; Spearman in fit "
        + ("n/a" if rho is None else f"{rho:.3f}"))


def train_segmenter_into_bundle(
    config: TrainConfig,
    data_root: str | os.PathLike,
    bundle_dir: str | os.PathLike,
    **kwargs: Any,
) -> TrainResult:
    """Train into ``bundle_dir/segmenters/<modality|_generalist>`` and record it in ``bundle.json``.

    Keyword arguments go to :func:`train_segmenter`. The run's provenance is stored under
    ``provenance.segmenters.<name>`` of the manifest (other entries are kept).
    """
    bundle_dir = Path(bundle_dir)
    run_dir = bundle.segmenter_dir(bundle_dir, config.run_name)
    result = train_segmenter(config, data_root, run_dir, **kwargs)
    manifest_path = bundle_dir / bundle.MANIFEST
    current = bundle.read_json(manifest_path) if manifest_path.is_file() else {}
    segs = dict((current.get("provenance") or {}).get("segmenters") or {})
    segs[config.run_name] = result.provenance
    bundle.update_manifest(bundle_dir, provenance={"segmenters": segs})
    return result
