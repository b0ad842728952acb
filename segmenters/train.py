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

import csv
import dataclasses
import io
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from triageseg import bundle
from triageseg.datasets.atomic import atomic_path, write_json_atomic, write_text_atomic
from triageseg.datasets.errors import DataError
from triageseg.segmenters.model import (
    DEFAULT_DECODER_CHANNELS,
    HISTORY_CSV,
    HISTORY_JSON,
    SegmenterConfig,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from triageseg.postprocess.watershed import WatershedParams

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "last.pt"
CHECKPOINT_FORMAT = "triageseg-train-checkpoint-1"
CLASS_NAMES = ("background", "interior", "boundary")
HISTORY_FIELDS = (
    "epoch", "steps", "train_loss", "iou_background", "iou_interior", "iou_boundary", "val_mean_f1", "lr", "seconds",
)
# Config fields that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = ("time_budget_s",)
# Fraction of the training images held out for validation when the dataset has no val split.
FALLBACK_VAL_FRACTION = 0.15

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


# ----------------------------------------------------------------------------- data


class _CropDataset:
    """Global sample index -> (image tensor 3xSxS, target tensor SxS), a pure function of the index.

    Implements the torch map-style dataset protocol (``__getitem__`` / ``__len__``).
    """

    def __init__(self, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], config: TrainConfig, length: int):
        from triageseg.segmenters.augment import build_augmentation
        from triageseg.segmenters.scale import resize_image, resize_labels, scaled_shape

        if config.scale != 1.0:  # the network's pixel grid: resize once, crop from the resized images
            shapes = [scaled_shape(img.shape, config.scale) for img in images]
            images = [resize_image(img, shp) for img, shp in zip(images, shapes, strict=True)]
            labels = [resize_labels(lab, shp) for lab, shp in zip(labels, shapes, strict=True)]
        self.images = list(images)
        self.labels = list(labels)
        self.config = config
        self.length = length
        self.transform = build_augmentation(config.modality, crop_size=config.crop_size, strength=config.aug_strength)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        import torch

        from triageseg.postprocess.targets import make_targets
        from triageseg.segmenters.augment import augment_sample

        rng = np.random.default_rng([self.config.seed, int(index)])
        which = int(rng.integers(len(self.images)))
        aug_seed = int(rng.integers(2**31 - 1))
        image, labels = augment_sample(self.transform, self.images[which], self.labels[which], seed=aug_seed)
        target = make_targets(labels, width=self.config.boundary_width, mode=self.config.boundary_mode)
        return (
            torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            torch.from_numpy(target.astype(np.int64)),
        )


class _RangeSampler:
    """Yields the global sample indices ``start, ..., stop - 1`` in order (torch Sampler protocol)."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def _worker_init(_worker_id: int) -> None:
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover
        pass


def _balanced(samples: Sequence[Any], limit: int) -> list[Any]:
    """Up to ``limit`` samples taken round-robin over modalities (sorted ids within each)."""
    groups: dict[str, list[Any]] = {}
    for s in sorted(samples, key=lambda s: s.id):
        groups.setdefault(s.modality or "", []).append(s)
    out: list[Any] = []
    queues = [groups[k] for k in sorted(groups)]
    while len(out) < limit and any(queues):
        for q in queues:
            if q and len(out) < limit:
                out.append(q.pop(0))
    return out


def _select_samples(dataset: Any, config: TrainConfig, log: Callable[[str], None]) -> tuple[list[Any], list[Any]]:
    """Train and validation samples for ``config.modality``; errors list what the dataset has."""
    if config.modality is not None and config.modality not in dataset.modalities:
        have = ", ".join(dataset.modalities) if dataset.modalities else "none (no modalities.csv)"
        raise DataError(dataset.root, f"no images of modality {config.modality!r}; the dataset has: {have}")
    train = dataset.select(split="train", modality=config.modality)
    val = dataset.select(split="val", modality=config.modality)
    if not train:
        splits = sorted({s.split or "none" for s in dataset.samples})
        raise DataError(
            dataset.root,
            f"no training images (split 'train') for modality {config.modality or 'any'}; splits present: "
            + ", ".join(splits),
        )
    if not val:
        if len(train) < 2:
            raise DataError(
                dataset.root, "no validation images (split 'val') and too few training images to hold some out"
            )
        order = np.random.default_rng(config.seed).permutation(len(train))
        n_val = max(1, round(FALLBACK_VAL_FRACTION * len(train)))
        val = [train[i] for i in sorted(order[:n_val])]
        train = [train[i] for i in sorted(order[n_val:])]
        log(f"note: no 'val' split; holding out {n_val} of the training images for validation")
    return train, val


# ------------------------------------------------------------------------ helpers


def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate at optimiser step ``step`` (0-based): linear warm-up then cosine decay."""
    total = config.epochs * config.steps_per_epoch
    warm = min(total, round(config.warmup_epochs * config.steps_per_epoch))
    if step < warm:
        return config.lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _rng_states() -> dict[str, Any]:
    import torch

    np_state = np.random.get_state()
    states: dict[str, Any] = {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [np_state[0], [int(v) for v in np_state[1]], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: Mapping[str, Any]) -> None:
    import torch

    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


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


def _history_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(HISTORY_FIELDS), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in HISTORY_FIELDS})
    return buf.getvalue()


def _write_history(run_dir: Path, rows: Sequence[Mapping[str, Any]], final: Mapping[str, Any] | None) -> None:
    write_text_atomic(run_dir / HISTORY_CSV, _history_csv(rows))
    write_json_atomic(run_dir / HISTORY_JSON, {"epochs": list(rows), "final": dict(final) if final else None})


def _jsonable(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def validate(
    model: torch.nn.Module,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    *,
    config: TrainConfig,
    params: WatershedParams | None = None,
) -> tuple[float, list[np.ndarray]]:
    """Mean F1 (default protocol) of ``model`` decoded by the watershed, and the probabilities.

    Args:
        model: the network, on the device to use.
        images: float32 HxWx3 validation images.
        labels: their ground-truth instance labels.
        config: tile size, overlap, batch size and AMP setting come from here.
        params: watershed parameters (``None`` = defaults).
    """
    from triageseg.postprocess.metrics import evaluate
    from triageseg.postprocess.watershed import watershed
    from triageseg.segmenters.predict import predict

    probs = [
        predict(model, img, tile_size=config.tile_size, overlap=config.overlap, batch_size=config.val_batch_size,
                amp=config.amp, scale=config.scale)
        for img in images
    ]
    preds = [watershed(p, params) for p in probs]
    return float(evaluate(list(labels), preds).mean_f1), probs


# --------------------------------------------------------------------- checkpoint


def _save_checkpoint(ckpt_dir: Path, state: dict[str, Any]) -> None:
    import torch

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(ckpt_dir / CHECKPOINT_FILE) as tmp:
        torch.save(state, str(tmp))


def _load_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means the file is unusable
        raise DataError(path, f"corrupt or unreadable training checkpoint ({err})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise DataError(path, f"not a triageseg training checkpoint (expected format {CHECKPOINT_FORMAT})")
    return state


def _refuse_or_discard(ckpt_path: Path, config: TrainConfig, *, overwrite: bool, log: Callable[[str], None]) -> None:
    """An interrupted run's checkpoint without ``resume``: refused, or deleted with ``overwrite`` (said so)."""
    try:
        state = _load_checkpoint(ckpt_path)
        where = f" (epoch {int(state['epoch'])} of {int(state['config']['epochs'])})"
    except (DataError, KeyError, TypeError, ValueError):
        where = ""
    if not overwrite:
        raise DataError(ckpt_path, f"checkpoint of an interrupted run{where}; continue it with resume=True "
                                   "(CLI: --resume) or start afresh with overwrite=True (CLI: --overwrite), "
                                   "which deletes it")
    log(f"note: deleting the checkpoint of an interrupted run{where} in {ckpt_path.parent}; starting "
        f"{config.run_name} afresh")
    shutil.rmtree(ckpt_path.parent, ignore_errors=True)


def _check_has_objects(root: Path, config: TrainConfig, labels: Sequence[np.ndarray]) -> None:
    """Refuse training labels without a single object: the model would learn to find nothing."""
    if not any(lab.any() for lab in labels):
        raise DataError(root, f"no objects to learn from: all {len(labels)} training label images of modality "
                              f"{config.modality or 'any'} are empty (all 0); check labels/ and splits.csv")


def _config_differences(saved: Mapping[str, Any], config: TrainConfig) -> list[str]:
    now = config.to_dict()
    return [
        f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}"
        for k in now
        if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]
    ]


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
    from triageseg.postprocess.watershed import WatershedParams, tune_watershed
    from triageseg.segmenters.losses import confusion_matrix, iou_per_class, segmentation_loss
    from triageseg.segmenters.model import create_segmenter, load_encoder_weights, save_segmenter
    from triageseg.segmenters.predict import autocast_context, resolve_device

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
        _refuse_or_discard(ckpt_path, config, overwrite=overwrite, log=log)

    # ---- data
    dataset = Dataset(data_root)
    train_samples, val_samples = _select_samples(dataset, config, log)
    val_samples = _balanced(val_samples, config.max_val_images)
    train_data = [dataset.load(s) for s in train_samples]
    _check_has_objects(dataset.root, config, [lab for _, lab in train_data])
    val_data = [dataset.load(s) for s in val_samples]
    val_images = [img for img, _ in val_data]
    val_labels = [lab for _, lab in val_data]
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
    class_weights = (1.0, 1.0, config.boundary_weight)

    # ---- state (fresh or resumed)
    start_epoch, best_f1, best_epoch, best_file = 0, -1.0, 0, None
    history: list[dict[str, Any]] = []
    elapsed_before = 0.0
    if resume and ckpt_path.is_file():
        state = _load_checkpoint(ckpt_path)
        diffs = _config_differences(state["config"], config)
        if diffs:
            raise DataError(ckpt_path, "checkpoint was made with another config (" + "; ".join(diffs)
                            + "); resume with the same config or start afresh without --resume")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch = int(state["epoch"])
        best_f1, best_epoch, best_file = float(state["best_f1"]), int(state["best_epoch"]), state["best_file"]
        history = list(state["history"])
        elapsed_before = float(state["elapsed_s"])
        _set_rng_states(state["rng"])
        log(f"resuming {name} from epoch {start_epoch} (best val F1 {best_f1:.4f} at epoch {best_epoch})")
    else:
        if resume:
            log(f"no checkpoint in {ckpt_dir}; starting {name} from scratch")
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # a stale checkpoint of an earlier run

    per_epoch = config.steps_per_epoch * config.batch_size
    if num_workers is None:
        num_workers = min(8, max(1, (os.cpu_count() or 2) - 1)) if cuda else 0
    loader = torch.utils.data.DataLoader(
        _CropDataset([d[0] for d in train_data], [d[1] for d in train_data], config, config.epochs * per_epoch),
        batch_size=config.batch_size,
        sampler=_RangeSampler(start_epoch * per_epoch, config.epochs * per_epoch),
        num_workers=num_workers,
        pin_memory=cuda,
        worker_init_fn=_worker_init if num_workers else None,
        # A private generator: creating the iterator must not consume the global torch RNG.
        generator=torch.Generator().manual_seed(config.seed),
    )
    batches = iter(loader)

    t_start = time.perf_counter()
    stopped_by_budget = False
    global_step = start_epoch * config.steps_per_epoch
    epochs_done = start_epoch
    for epoch in range(start_epoch, config.epochs):
        t_epoch = time.perf_counter()
        model.train()
        if config.freeze_bn:
            _freeze_batchnorm(model)
        confusion = torch.zeros(3, 3, dtype=torch.int64)
        loss_sum, steps = 0.0, 0
        lr = lr_at(config, global_step)
        bar = tqdm(total=config.steps_per_epoch, desc=f"{name} {epoch + 1}/{config.epochs}", leave=False,
                   disable=not progress, unit="step")
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
            elapsed = elapsed_before + time.perf_counter() - t_start
            if config.time_budget_s is not None and elapsed > config.time_budget_s:
                stopped_by_budget = True
                break
        bar.close()

        val_f1, _ = validate(model, val_images, val_labels, config=config)
        ious = iou_per_class(confusion.numpy())
        epochs_done = epoch + 1
        row = {
            "epoch": epochs_done,
            "steps": steps,
            "train_loss": loss_sum / max(1, steps),
            **{f"iou_{c}": _jsonable(v) for c, v in zip(CLASS_NAMES, ious)},
            "val_mean_f1": val_f1,
            "lr": lr,
            "seconds": round(time.perf_counter() - t_epoch, 3),
        }
        history.append(row)
        improved, old_best = val_f1 > best_f1, None
        if improved:
            best_f1, best_epoch = val_f1, epochs_done
            new_best = f"best-e{epochs_done:04d}.safetensors"
            bundle.save_weights(ckpt_dir / new_best, model.state_dict(), metadata={"epoch": str(epochs_done)})
            old_best, best_file = best_file, new_best
        _save_checkpoint(ckpt_dir, {
            "format": CHECKPOINT_FORMAT,
            "config": config.to_dict(),
            "epoch": epochs_done,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "best_f1": best_f1,
            "best_epoch": best_epoch,
            "best_file": best_file,
            "history": history,
            "elapsed_s": elapsed_before + time.perf_counter() - t_start,
            "rng": _rng_states(),
        })
        if improved and old_best and old_best != best_file:
            (ckpt_dir / old_best).unlink(missing_ok=True)
        _write_history(ckpt_dir, history, None)  # the run folder keeps the old model's until the end
        log(
            f"{name} epoch {epochs_done}/{config.epochs}  loss {row['train_loss']:.4f}  IoU bg/int/bnd "
            + "/".join("nan" if v is None else f"{v:.3f}" for v in (row["iou_background"], row["iou_interior"],
                                                                       row["iou_boundary"]))
            + f"  val F1 {val_f1:.4f}{' *' if improved else ''}  lr {lr:.2e}  {row['seconds']:.1f}s"
        )
        if report is not None:
            metrics = {k: (math.nan if v is None else v) for k, v in row.items() if k != "epoch"}
            metrics["best_val_mean_f1"] = best_f1
            report(epochs_done, metrics, run_dir)
        if stopped_by_budget:
            log(f"{name}: time budget of {config.time_budget_s:.0f}s reached after epoch {epochs_done}")
            break
    del batches
    seconds = elapsed_before + time.perf_counter() - t_start

    # ---- best weights, tuned post-processing, run folder
    if best_file is not None:
        bundle.load_into(model, ckpt_dir / best_file)
    params, tuned_f1 = WatershedParams(), best_f1
    if config.tune_postprocess:
        default_f1, probs = validate(model, val_images, val_labels, config=config)
        cand, cand_f1 = tune_watershed(probs, val_labels)
        params, tuned_f1 = (cand, float(cand_f1)) if cand_f1 >= default_f1 else (WatershedParams(), default_f1)
        log(f"{name}: watershed tuned on {len(val_images)} val images: mean F1 {default_f1:.4f} -> {tuned_f1:.4f}")
    results = {
        "best_epoch": best_epoch,
        "val_mean_f1_default": best_f1,
        "val_mean_f1_tuned": tuned_f1,
        "n_val_images": len(val_images),
        "epochs_completed": epochs_done,
        "stopped_by_budget": stopped_by_budget,
        "seconds": round(seconds, 3),
    }
    model_cpu = model.to("cpu", memory_format=torch.contiguous_format)
    save_segmenter(run_dir, model_cpu, seg_config, params=params, train=config.to_dict(), provenance=prov,
                   results=results)
    _write_history(run_dir, history, results)
    if not keep_checkpoint:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return TrainResult(
        run_dir=run_dir,
        best_epoch=best_epoch,
        best_val_mean_f1=best_f1,
        val_mean_f1_tuned=tuned_f1,
        params=params,
        history=history,
        epochs_completed=epochs_done,
        stopped_by_budget=stopped_by_budget,
        seconds=seconds,
        provenance=prov,
    )


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
