"""The configuration of a segmenter training run and what the run returns.

:class:`TrainConfig` is saved beside the model (``config.json: train``) and is what a
tuning sweep writes as ``best_config.json``; :class:`TrainResult` mirrors the run folder.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from triageseg import bundle
from triageseg.datasets.atomic import write_json_atomic
from triageseg.datasets.errors import DataError
from triageseg.segmenters.model import DEFAULT_DECODER_CHANNELS, DEFAULT_OVERLAP, DEFAULT_TILE_SIZE, SegmenterConfig


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
    size_triage: bool = True  # resize each image so its nuclei have the training set's median diameter (recorded)
    diameter: float | None = None  # with size_triage: train at this median nucleus diameter (px); None: the set's median
    freeze_bn: bool = False  # keep BatchNorm statistics fixed (eval-mode BN; scale and shift still train): fine-tuning
    seed: int = 0  # seeds weights init, crop sampling and augmentation
    tile_size: int = DEFAULT_TILE_SIZE  # largest inference tile (validation and the saved model)
    overlap: int = DEFAULT_OVERLAP  # inference tile overlap in pixels
    val_batch_size: int = 4  # tiles per forward pass during validation
    max_val_images: int = 16  # validation images used per epoch and for tuning (balanced over modalities)
    time_budget_s: float | None = None  # stop training cleanly after this many seconds (then tune + save)
    amp: bool = True  # mixed precision on CUDA (bf16 where supported, else fp16 + GradScaler)
    tune_postprocess: bool = True  # tune watershed parameters on the validation images at the end

    def __post_init__(self) -> None:
        object.__setattr__(self, "decoder_channels", tuple(int(c) for c in self.decoder_channels))
        if self.diameter is not None and not (2.0 <= float(self.diameter) <= 1000.0):
            raise ValueError(f"diameter must be in [2, 1000] pixels (or None), got {self.diameter!r}")
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
