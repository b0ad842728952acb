"""``triageseg train segmenter`` and ``triageseg train generalist``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from triageseg.cli.groups import train

# CLI flag -> TrainConfig field; a flag given on the command line overrides --config.
_OVERRIDES = {
    "epochs": "epochs",
    "steps_per_epoch": "steps_per_epoch",
    "batch_size": "batch_size",
    "crop_size": "crop_size",
    "lr": "lr",
    "seed": "seed",
    "encoder": "encoder",
    "encoder_weights": "encoder_weights",
    "init_from": "init_from",
    "time_budget": "time_budget_s",
    "max_val_images": "max_val_images",
    "boundary_weight": "boundary_weight",
    "aug_strength": "aug_strength",
    "scale": "scale",
    "freeze_bn": "freeze_bn",
}


def _train_options(func):
    """Options shared by ``train segmenter`` and ``train generalist``."""
    options = [
        click.option("--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
                     help="Dataset folder (images/, labels/, modalities.csv, splits.csv)."),
        click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
                     help="Bundle folder to write into (created if missing)."),
        click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="TrainConfig JSON (e.g. a tuning sweep's best_config.json); flags override it."),
        click.option("--epochs", type=click.IntRange(min=1), help="Number of epochs."),
        click.option("--steps-per-epoch", type=click.IntRange(min=1), help="Optimiser steps per epoch."),
        click.option("--batch-size", type=click.IntRange(min=1), help="Crops per step."),
        click.option("--crop-size", type=click.IntRange(min=32), help="Training crop side (multiple of 32)."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Peak learning rate."),
        click.option("--seed", type=int, help="Random seed."),
        click.option("--encoder", help="smp encoder name (default efficientnet-b3)."),
        click.option("--encoder-weights", type=click.Path(dir_okay=False),
                     help="Local file (safetensors or torch state dict) to initialise the encoder from."),
        click.option("--init-from", type=click.Path(exists=True),
                     help="Run folder or model.safetensors of the same architecture to fine-tune from."),
        click.option("--time-budget", type=click.FloatRange(min=0, min_open=True),
                     help="Stop training after this many seconds, then tune and save."),
        click.option("--max-val-images", type=click.IntRange(min=1), help="Validation images per epoch."),
        click.option("--boundary-weight", type=click.FloatRange(min=0, min_open=True),
                     help="Cross-entropy weight of the boundary class."),
        click.option("--aug-strength", type=click.FloatRange(min=0), help="Augmentation strength (0 = crops only)."),
        click.option("--scale", type=click.FloatRange(0.25, 4.0),
                     help="Resize images by this factor for the network (e.g. 1.4 for nuclei 1.4x smaller than the "
                          "others); saved with the model and applied at inference."),
        click.option("--freeze-bn/--no-freeze-bn", default=None,
                     help="Keep BatchNorm statistics fixed (for fine-tuning with --init-from on one modality)."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps."),
        click.option("--workers", type=click.IntRange(min=0), help="DataLoader workers (default: 0 on CPU)."),
        click.option("--resume", is_flag=True, help="Continue an interrupted run from its last checkpoint."),
        click.option("--overwrite", is_flag=True,
                     help="Delete the checkpoint of an interrupted run and start afresh (without it, such a rerun "
                          "is refused)."),
        click.option("--quiet", is_flag=True, help="No progress bars or per-epoch lines."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _run(modality: str | None, *, data: Path, out: Path, config_path: Path | None, device: str,
         workers: int | None, resume: bool, overwrite: bool, quiet: bool, **flags: Any) -> None:
    from triageseg.bundle import segmenter_dir
    from triageseg.datasets.atomic import write_json_atomic
    from triageseg.segmenters.train import TrainConfig, train_segmenter_into_bundle

    changes = {field: flags[flag] for flag, field in _OVERRIDES.items() if flags.get(flag) is not None}
    if config_path is not None:
        config = TrainConfig.from_json(config_path, modality=modality, **changes)
    else:
        config = TrainConfig(modality=modality).replace(**changes)
    if config.encoder_weights is not None:
        config = config.replace(encoder_weights=str(Path(config.encoder_weights).resolve()))
    if config.init_from is not None:
        config = config.replace(init_from=str(Path(config.init_from).resolve()))
    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite exclude each other")
    result = train_segmenter_into_bundle(
        config, data, out, device=device, resume=resume, overwrite=overwrite, progress=not quiet, num_workers=workers
    )
    # written with the model, not before: an interrupted run leaves the old model's files as they were
    write_json_atomic(segmenter_dir(out, config.run_name) / "train_config.json", config.to_dict())
    budget = " (stopped by the time budget)" if result.stopped_by_budget else ""
    click.echo(
        f"{config.run_name}: {result.epochs_completed} epochs{budget}, best epoch {result.best_epoch}, "
        f"val mean F1 {result.best_val_mean_f1:.4f} (tuned watershed {result.val_mean_f1_tuned:.4f}) "
        f"-> {result.run_dir}"
    )
    click.echo(f"training curves: {result.run_dir / 'curves.png'}")


@train.command("segmenter")
@click.option("--modality", default=None,
              help="Modality to specialise in (as in the dataset's modalities.csv); default: the --config's.")
@_train_options
def segmenter_cmd(modality: str | None, **kwargs: Any) -> None:
    """Train one modality specialist (smp Unet) into BUNDLE/segmenters/<modality>.

    Validates each epoch by tiled prediction + watershed + mean F1, keeps the best
    epoch, tunes the watershed parameters on the validation split and writes
    config.json, model.safetensors, postprocess.json, quality.json (the quality
    estimate's regressor), history.csv/json and curves.png.

    Example: triageseg train segmenter --data data/synth --modality he --out bundle
             triageseg train segmenter --data data/synth --out bundle --config tune_out/he/best_config.json
    """
    if modality is None:
        from triageseg.bundle import read_json

        if kwargs.get("config_path") is None:
            raise click.UsageError("--modality is required unless --config names one")
        modality = read_json(kwargs["config_path"]).get("modality")
        if not modality:
            raise click.UsageError(f"{kwargs['config_path']} names no modality; pass --modality "
                                   "(or use `train generalist`)")
    _run(modality, **kwargs)


@train.command("generalist")
@_train_options
def generalist_cmd(**kwargs: Any) -> None:
    """Train one model on all modalities into BUNDLE/segmenters/_generalist.

    The baseline the routed specialists must beat, and the fallback for images the
    router is unsure about. Same options as ``train segmenter``.

    Example: triageseg train generalist --data data/synth --out bundle --epochs 10
    """
    _run(None, **kwargs)
