"""``triageseg train router``: train the modality router into a bundle."""

from __future__ import annotations

from pathlib import Path

import click

from triageseg.cli.groups import train


@train.command("router")
@click.option("--data", "data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Dataset folder (images/, modalities.csv, splits.csv).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Bundle folder; the router goes to BUNDLE/router and bundle.json is updated.")
@click.option("--epochs", default=30, show_default=True, type=click.IntRange(min=1),
              help="Passes over the (class-balanced) training split.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1), help="Images per step.")
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Peak AdamW learning rate (warm-up, cosine decay).")
@click.option("--image-size", default=112, show_default=True, type=click.IntRange(min=16),
              help="Thumbnail side in pixels (multiple of the ViT patch, 16).")
@click.option("--model", "model_name", default="vit_tiny_patch16_224", show_default=True,
              help="timm ViT architecture (pretrained=False).")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Local weights file to start from (.safetensors); never downloads.")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--time-budget", "time_budget", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop after the epoch that passes this many seconds (the learning rate follows the epochs; "
                   "the best epoch so far is kept).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train_router_cmd(
    data: Path, out: Path, epochs: int, batch_size: int, lr: float, image_size: int, model_name: str,
    weights: Path | None, seed: int, device: str, time_budget: float | None, quiet: bool,
) -> None:
    """Train the ViT modality router on DATA and write it into the bundle OUT.

    Writes OUT/router/{config.json, model.safetensors, history.json, history.csv};
    prints validation and test accuracy and the test confusion matrix.
    """
    from triageseg.bundle import router_dir
    from triageseg.router.train import format_confusion, train_router

    result = train_router(
        data, router_dir(out), epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device,
        time_budget_s=time_budget, progress=not quiet, image_size=image_size, model_name=model_name,
        weights=weights, bundle=out,
    )
    cfg = result.config
    click.echo(
        f"router: {cfg.model_name} @ {cfg.image_size}px, classes {', '.join(cfg.class_names)}; "
        f"{result.epochs_run} epochs ({result.steps} steps) in {result.train_seconds:.1f} s, "
        f"best epoch {result.best_epoch}, temperature {cfg.temperature:g}"
    )
    val = "n/a" if result.val_accuracy is None else f"{result.val_accuracy:.3f}"
    click.echo(f"val accuracy {val}")
    if result.ood is not None:
        click.echo(f"out-of-distribution check: {result.ood['method']}, threshold {result.ood['threshold']:.4g} "
                   f"(keeps {result.ood['keep']:.0%} of in-distribution images, calibrated on "
                   f"{result.ood['n_val']} validation images)")
    else:
        click.echo("out-of-distribution check: off (fewer than 2 validation images)")
    if result.test is not None:
        click.echo(f"test accuracy {result.test.accuracy:.3f} on {len(result.test.ids)} images")
        click.echo(format_confusion(result.test))
    click.echo(f"wrote {result.run_dir} (training curves: {result.run_dir / 'curves.png'}) [{result.seconds:.1f} s]")
