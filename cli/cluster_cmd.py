"""``triageseg data cluster``: propose modality labels for unlabelled images (scikit-learn)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from triageseg.cli.groups import data


@data.command("cluster")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--k", "k", type=click.IntRange(min=1), default=None,
              help="Number of modalities (default: chosen by silhouette score, 2..8).")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Proposal CSV (id,modality). Default FOLDER/modalities.proposed.csv.")
@click.option("--sheet", "sheet", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Contact sheet PNG, one row per cluster. Default FOLDER/modalities.proposed.png.")
@click.option("--names", type=click.Choice(["guess", "cluster"]), default="guess", show_default=True,
              help="Name clusters by a simple look-alike rule (fluorescence-like ...) or cluster_<i>.")
@click.option("--per-cluster", default=8, show_default=True, type=click.IntRange(min=1),
              help="Images per contact-sheet row.")
@click.option("--seed", default=0, show_default=True, type=int, help="k-means seed.")
@click.option("--overwrite", is_flag=True, help="Allow --out to replace an existing modalities.csv.")
def cluster_cmd(folder: Path, k: int | None, out: Path | None, sheet: Path | None, names: str,
                per_cluster: int, seed: int, overwrite: bool) -> None:
    """Cluster the images of FOLDER by colour, intensity and texture; propose modalities.

    FOLDER is a dataset (images/ ...) or a plain folder of images. Review the contact
    sheet, rename the clusters in the proposal, then save it as modalities.csv. An
    existing modalities.csv is never replaced unless --overwrite; when there is one,
    the adjusted Rand index between its labels and the clusters is printed.
    """
    from triageseg.router.discovery import discover_modalities

    started = time.perf_counter()
    result = discover_modalities(folder, k=k, out=out, sheet=sheet, per_cluster=per_cluster, names=names,
                                 seed=seed, overwrite=overwrite, progress=True)
    scores = ", ".join(f"k={kk}: {v:.3f}" for kk, v in sorted(result.silhouette.items()))
    click.echo(f"{len(result.ids)} images -> {result.k} clusters" + (f" (silhouette {scores})" if scores else ""))
    crosstab = result.crosstab()
    for row, (name, size) in enumerate(result.sizes().items()):
        known = ", ".join(f"{m} {n}" for m, n in sorted(crosstab[name].items()))
        click.echo(f"  sheet row {row}: {name:<20} {size:5d} images" + (f"   known: {known}" if known else ""))
    if result.ari is not None:
        click.echo(f"adjusted Rand index vs modalities.csv: {result.ari:.3f}")
    click.echo(f"wrote {result.csv_path} and {result.sheet_path} [{time.perf_counter() - started:.1f} s]")
