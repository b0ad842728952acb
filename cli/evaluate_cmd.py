"""``triageseg evaluate PRED GT``: score predicted label images against ground truth."""

from __future__ import annotations

from pathlib import Path

import click

from triageseg.cli.groups import cli

# Kept here (not imported from postprocess.metrics) so `--help` stays import-light; a
# test checks they agree.
_PROTOCOLS = ("default", "caicedo2019", "dsb2018")


@cli.command("evaluate")
@click.argument("pred", type=click.Path(file_okay=False, path_type=Path))
@click.argument("gt", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--modalities",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="CSV",
    help="id,modality CSV for per-modality results (default: GT/modalities.csv when GT is a dataset root).",
)
@click.option(
    "--protocol",
    type=click.Choice(_PROTOCOLS),
    default="default",
    show_default=True,
    help="default: IoU >= 0.50:0.95, F1 from pooled counts; caicedo2019: BBBC039 paper; dsb2018: Kaggle AP.",
)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the results as JSON.")
@click.option(
    "--csv", "csv_out", type=click.Path(dir_okay=False, path_type=Path), help="Write per-image results as CSV."
)
@click.option(
    "--allow-missing",
    is_flag=True,
    help="Score ground truth without a prediction as empty and ignore predictions without ground truth.",
)
def evaluate_command(
    pred: Path,
    gt: Path,
    modalities: Path | None,
    protocol: str,
    json_out: Path | None,
    csv_out: Path | None,
    allow_missing: bool,
) -> None:
    """Score the label images in PRED against those in GT, paired by id.

    PRED and GT are folders of label images (.tif/.png); files are paired by id (the
    name without extension). GT may also be a dataset root holding labels/ (then its
    modalities.csv gives per-modality results). Prints a table per modality and
    overall: mean F1 over the IoU thresholds, F1 at 0.5/0.75/0.9, TP/FP/FN at 0.5 and
    object counts. An id present on one side only is an error unless --allow-missing.

    \b
    Example:
      triageseg evaluate out/ data/labels --modalities data/modalities.csv --json scores.json
    """
    from tqdm import tqdm

    from triageseg.datasets.atomic import write_json_atomic, write_text_atomic
    from triageseg.postprocess.metrics import evaluate_folders, format_table

    def progress(ids):
        return tqdm(ids, desc="evaluating", unit="image", leave=False, disable=None)

    report = evaluate_folders(
        pred, gt, modalities=modalities, protocol=protocol, allow_missing=allow_missing, progress=progress
    )
    click.echo(format_table(report))
    if json_out is not None:
        write_json_atomic(json_out, report.to_dict())
        click.echo(f"wrote {json_out}")
    if csv_out is not None:
        write_text_atomic(csv_out, report.to_csv())
        click.echo(f"wrote {csv_out}")
