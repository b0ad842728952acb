"""``triageseg train all``: router, one specialist per modality, the generalist, watershed tuning."""

from __future__ import annotations

import click

from triageseg.cli.groups import diameter_option, train


@train.command("all")
@click.option("--data", "data_root", required=True, type=click.Path(exists=True, file_okay=False),
              help="Dataset folder (images/, labels/, modalities.csv, splits.csv).")
@click.option("--out", "bundle_dir", required=True, type=click.Path(file_okay=False), help="Bundle folder to write.")
@click.option("--budget", type=float, default=1.0, show_default=True,
              help="Training budget multiplier; 1 trains the whole bundle in about 6 minutes on 2 CPU cores.")
@click.option("--modalities", default=None, help="Comma-separated subset of the dataset's modalities.")
@click.option("--no-generalist", is_flag=True, help="Skip the generalist (the low-confidence fallback).")
@click.option("--specialist-split", type=click.Choice(["equal", "images"]), default="equal", show_default=True,
              help="How the specialists share their steps: equally, or in proportion to their training images.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--train-diameter", type=float, default=None, callback=diameter_option,
              help="Nucleus diameter (px) the segmenters are trained at; default: the training images' median.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train_all(data_root, bundle_dir, budget, modalities, no_generalist, specialist_split, seed, device, train_diameter,
              quiet):
    """Train a whole bundle: router, specialists, generalist, tuned watershed parameters."""
    from triageseg.workflow import Budget, train_bundle

    mods = [m.strip() for m in modalities.split(",") if m.strip()] if modalities else None
    summary = train_bundle(data_root, bundle_dir, budget=Budget(scale=budget, specialist_split=specialist_split),
                           device=device, seed=seed, generalist=not no_generalist, modalities=mods,
                           progress=not quiet, log=click.echo, train_diameter=train_diameter)
    click.echo(f"bundle written to {bundle_dir}: " + ", ".join(f"{k} {v} s" for k, v in summary["seconds"].items()))
