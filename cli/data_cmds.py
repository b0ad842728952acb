"""``triageseg data synth`` and ``triageseg data import``: write a dataset in the DESIGN layout."""

from __future__ import annotations

import time
from pathlib import Path

import click

from triageseg.cli.groups import data

# Kept here (not imported from datasets.synth) so `--help` stays import-light; a test
# checks they agree.
_MODALITIES = ("fluorescence", "brightfield", "he", "ihc")
_MAX_SIZE = 8192  # datasets.synth.MAX_SIZE


def _summary(root: Path, seconds: float) -> str:
    from triageseg.datasets.layout import Dataset

    ds = Dataset(root)
    parts = []
    for modality, splits in sorted(ds.counts().items()):
        inner = " ".join(f"{s} {splits[s]}" for s in ("train", "val", "test", "none") if s in splits)
        parts.append(f"{modality} {sum(splits.values())} ({inner})")
    return f"{len(ds)} images in {root}: " + ", ".join(parts) + f" [{seconds:.1f} s]"


def _parse_modalities(ctx, param, value: str | None):
    if value is None:
        return _MODALITIES
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [n for n in names if n not in _MODALITIES]
    if bad or not names:
        raise click.BadParameter(
            f"unknown modality {', '.join(bad) or '(none)'}; valid: {', '.join(_MODALITIES)}", ctx=ctx, param=param
        )
    return names


def _parse_weights(ctx, param, value: str | None):
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}", ctx=ctx, param=param) from None


def _parse_range(ctx, param, value):
    """MIN,MAX of --diameter-range, refused before anything is drawn."""
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected MIN,MAX in pixels, got {value!r}", ctx=ctx, param=param) from None
    if not (2.0 <= lo <= hi <= 1000.0):
        raise click.BadParameter(f"need 2 <= MIN <= MAX <= 1000 pixels, got {value!r}", ctx=ctx, param=param)
    return lo, hi


@data.command("synth")
@click.option(
    "--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output dataset folder."
)
@click.option("--n", "n", default=100, show_default=True, type=click.IntRange(min=1), help="Number of images.")
@click.option("--size", default=256, show_default=True, type=click.IntRange(16, _MAX_SIZE),
              help=f"Image side in pixels (at most {_MAX_SIZE}).")
@click.option(
    "--modalities",
    callback=_parse_modalities,
    default=None,
    metavar="A,B,C",
    help=f"Comma-separated modalities to generate (default: {','.join(_MODALITIES)}).",
)
@click.option(
    "--weights",
    callback=_parse_weights,
    default=None,
    metavar="W1,W2,...",
    help="Modality proportions, one per modality in --modalities order (default 0.55,0.15,0.15,0.15, DSB-like).",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed (same seed, same dataset).")
@click.option("--overwrite", is_flag=True, help="Replace a dataset already in --out.")
@click.option("--diameter-range", "diameter_range", callback=lambda ctx, p, v: _parse_range(ctx, p, v), default=None,
              metavar="MIN,MAX", help="Median nucleus diameter per image in pixels, drawn log-uniform in this range "
                                      "(default: each modality's own sizes).")
def synth_cmd(out: Path, n: int, size: int, modalities: tuple[str, ...], weights, seed: int, overwrite: bool,
              diameter_range) -> None:
    """Generate a synthetic nuclei dataset (fluorescence, brightfield, H&E, IHC) with labels and splits.

    Writes images/<id>.png, labels/<id>.tif, modalities.csv, splits.csv and synth.json.
    """
    from triageseg.datasets.synth import make_dataset

    started = time.perf_counter()
    root = make_dataset(out, n=n, size=size, modalities=modalities, seed=seed, weights=weights, overwrite=overwrite,
                        diameter_range=diameter_range)
    click.echo(_summary(root, time.perf_counter() - started))


@data.command("import")
@click.argument("fmt", metavar="FORMAT", type=click.Choice(["dsb2018", "bbbc039"]))
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--classes",
    "classes",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="dsb2018 only: classes.csv (filename,foreground,background) giving each image's modality "
    "(default: SRC/classes.csv when present, else modality 'unknown').",
)
@click.option(
    "--seed", default=0, show_default=True, type=int, help="Seed of the split drawn when the source has none."
)
@click.option("--overwrite", is_flag=True, help="Replace DST if it is not empty.")
def import_cmd(fmt: str, src: Path, dst: Path, classes: Path | None, seed: int, overwrite: bool) -> None:
    """Import a public dataset (FORMAT: dsb2018 stage1_train or bbbc039) from SRC into DST.

    The source is only read. DST gets the triageseg layout plus import.json, which
    records the source and every decision (overlap rule, split, unknown modalities).
    """
    import json

    from triageseg.datasets.importers import import_bbbc039, import_dsb2018

    started = time.perf_counter()
    if fmt == "dsb2018":
        root = import_dsb2018(src, dst, classes_csv=classes, seed=seed, overwrite=overwrite)
    else:
        if classes is not None:
            raise click.BadParameter("--classes applies to dsb2018 only", param_hint="--classes")
        root = import_bbbc039(src, dst, seed=seed, overwrite=overwrite)
    click.echo(_summary(root, time.perf_counter() - started))
    for note in json.loads((root / "import.json").read_text(encoding="utf-8")).get("notes", []):
        click.echo(f"note: {note}")
