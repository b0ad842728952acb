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
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from triageseg import bundle
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
from triageseg.router.size import SIZE_SIGNAL_MODE, signal_for
from triageseg.segmenters.config import TrainConfig, TrainResult
from triageseg.segmenters.data import (
    CropDataset,
    canonical_diameter,
    size_calibration,
    to_diameter,
    RangeSampler,
    balanced,
    check_has_objects,
    select_samples,
    worker_init,
)
from triageseg.segmenters.model import SegmenterConfig
from triageseg.segmenters.steps import lr_at, seed_everything, train_epoch  # noqa: F401 - lr_at re-exported
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
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[int], None] | None = None,
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
    diameter = None
    if config.size_triage:
        diameter = config.diameter or canonical_diameter([lab for _, lab in train_data])
    # each image measured on its modality's signal, as the pipeline will measure it (SegmenterConfig.size_signal)
    signals = [signal_for(s.modality or config.modality) for s in train_samples]
    calibration = size_calibration(train_data, signals) if diameter is not None else 1.0
    if diameter is not None:  # every image at the training set's nucleus size (size triage brings others to it)
        train_data, val_data = to_diameter(train_data, diameter), to_diameter(val_data, diameter)
        log(f"{name}: images resized to a median nucleus diameter of {diameter:g} px")
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

    # ---- model and optimiser, state (fresh or resumed)
    seg_config = config.segmenter_config()
    if diameter is not None:  # what the network sees: the diameter at its own scale
        seg_config = dataclasses.replace(seg_config, diameter=round(diameter * config.scale, 2),
                                         size_calibration=calibration, size_signal=SIZE_SIGNAL_MODE)
    model, optimizer, scaler = _build_model(seg_config, config, dev, log)
    cuda = dev.type == "cuda"
    if resume and ckpt_path.is_file():
        st = _resume(ckpt_path, config, model, optimizer, scaler, log)
    else:
        st = _RunState()
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
        train = train_epoch(model, optimizer, scaler, batches, config, dev, global_step=global_step,
                             desc=f"{name} {epoch + 1}/{config.epochs}", progress=progress,
                             deadline=None if config.time_budget_s is None
                             else t_start + config.time_budget_s - st.elapsed_before,
                             should_stop=should_stop, on_step=on_step)
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
        write_history(ckpt_dir, st.history, None, name=name)  # the run folder keeps the old model's until the end
        log(_epoch_line(name, config, row, improved))
        if report is not None:
            metrics = {k: (math.nan if v is None else v) for k, v in row.items() if k != "epoch"}
            metrics["best_val_mean_f1"] = st.best_f1
            report(st.epoch, metrics, run_dir)
        if stopped_by_budget:
            why = ("stopped" if should_stop is not None and should_stop()
                   else f"time budget of {config.time_budget_s:.0f}s reached")
            log(f"{name}: {why} after epoch {st.epoch}")
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


def _build_model(seg_config: SegmenterConfig, config: TrainConfig, dev, log: Callable[[str], None]):
    """(model on ``dev``, AdamW, GradScaler or None), seeded; initialised from files when the config says so."""
    import torch

    from triageseg.segmenters.model import create_segmenter, load_encoder_weights

    seed_everything(config.seed)
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
    return model, optimizer, scaler


def _resume(ckpt_path: Path, config: TrainConfig, model, optimizer, scaler, log: Callable[[str], None]) -> _RunState:
    """Restore model, optimiser, scaler and RNG states from a checkpoint made with the same config."""
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
    log(f"resuming {config.run_name} from epoch {st.epoch} (best val F1 {st.best_f1:.4f} at epoch {st.best_epoch})")
    return st


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
    write_history(run_dir, st.history, results, name=name)
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
