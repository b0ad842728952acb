"""``triageseg finetune``: fine-tune a bundle's specialist on corrected images into a new bundle."""

from __future__ import annotations

from pathlib import Path

import click

from triageseg.cli.groups import cli


@cli.command("finetune")
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The bundle to start from (never modified).")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Corrections dataset (images/, labels/, modalities.csv, splits.csv), e.g. from napari's "
                   "'Add to training set'.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The new bundle to write (beside the old one).")
@click.option("--modality", default=None,
              help="Modality to fine-tune (default: the dataset's only one). A name the bundle does not know "
                   "adds a specialist (from the generalist) and a router class.")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), default=5.0, show_default=True,
              help="Time budget for the whole fine-tune; training stops at about 75 % of it.")
@click.option("--steps", type=click.IntRange(min=2), default=None,
              help="Optimiser steps (default: from the number of corrected images, 60-400).")
@click.option("--resume", is_flag=True, help="Continue an interrupted fine-tune into the same --out.")
@click.option("--overwrite", is_flag=True,
              help="Delete an interrupted fine-tune (or an existing --out bundle) and start afresh.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def finetune_cmd(bundle, data, out, modality, minutes, steps, resume, overwrite, device, seed, quiet):
    """Fine-tune one modality's specialist on corrected images; write a NEW bundle naming its parent.

    Scores the model on the corrections' val images before and after (the training images when
    none is in val), keeps the parent's specialist when fine-tuning made it worse, and records
    the parent, the data and its checksum in the new bundle.json.

    Example: triageseg finetune --bundle bundle --data corrections --out bundle-ft1 --minutes 5
    """
    from tqdm.auto import tqdm

    from triageseg.finetune import finetune

    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite exclude each other")
    bar = None if quiet else tqdm(total=1, desc="finetune", unit="step")

    def progress(done: int, total: int, text: str) -> None:
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.set_description(text)
            bar.refresh()

    try:
        res = finetune(bundle, data, out, modality=modality, minutes=minutes, progress=progress, resume=resume,
                       overwrite=overwrite, steps=steps, device=device, seed=seed,
                       log=None if quiet else (lambda m: tqdm.write(m)))
    finally:
        if bar is not None:
            bar.close()
    what = "new specialist" if res.new_modality else "specialist"
    click.echo(f"{res.modality} ({what}, from {res.init_from}): val mean F1 {res.val_f1_before:.4f} -> "
               f"{res.val_f1_after:.4f} on {res.n_val or res.n_train} {res.val_source} "
               f"({res.epochs_completed} epochs{', stopped early' if res.stopped else ''}; kept {res.kept})")
    if res.router:
        click.echo("router: " + ", ".join(f"{k} {v}" for k, v in res.router.items()))
    click.echo(f"new bundle: {res.out} (parent {res.parent} unchanged)")
