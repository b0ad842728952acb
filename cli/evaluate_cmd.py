"""``triageseg evaluate PRED GT``: score predicted label images against ground truth."""

from __future__ import annotations

from pathlib import Path

import click

from triageseg.cli.groups import cli

# Kept here (not imported from postprocess.metrics) so `--help` stays import-light; a
# test checks they agree.
_PROTOCOLS = ("default", "caicedo2019", "dsb2018")


@cli.command("evaluate")
@click.argument("pred", type=click.Path(file_okay=False, path_type=Path), required=False)
@click.argument("gt", type=click.Path(file_okay=False, path_type=Path), required=False)
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
@click.option("--report", "report_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a self-contained HTML report: the table, F1 against IoU, router confusion (when PRED has "
                   "routing.csv), error analysis and the --worst images outlined.")
@click.option("--worst", type=click.IntRange(min=0), default=6, show_default=True,
              help="Images with the lowest F1 shown in --report.")
@click.option("--images", "images_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Images for --report's outlines (default: images/ beside GT's labels/; none: outlines on black).")
@click.option(
    "--allow-missing",
    is_flag=True,
    help="Score ground truth without a prediction as empty and ignore predictions without ground truth.",
)
@click.option("--bundle", "bundle_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Segment --data's --split with this bundle and score it (instead of PRED GT).")
@click.option("--data", "data_root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Dataset root for --bundle.")
@click.option("--split", default="test", show_default=True, help="Split of --data to score with --bundle.")
@click.option("--device", default="auto", show_default=True, help="Device for --bundle: auto, cpu, cuda, cuda:N, mps.")
@click.option("--save-predictions", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="With --bundle: also write the routed label images and overlays here.")
def evaluate_command(
    pred: Path | None,
    gt: Path | None,
    modalities: Path | None,
    protocol: str,
    json_out: Path | None,
    csv_out: Path | None,
    report_out: Path | None,
    worst: int,
    images_dir: Path | None,
    allow_missing: bool,
    bundle_dir: Path | None,
    data_root: Path | None,
    split: str,
    device: str,
    save_predictions: Path | None,
) -> None:
    """Score the label images in PRED against those in GT, paired by id.

    PRED and GT are folders of label images (.tif/.png); files are paired by id (the
    name without extension). GT may also be a dataset root holding labels/ (then its
    modalities.csv gives per-modality results). Prints a table per modality and
    overall: mean F1 over the IoU thresholds, F1 at 0.5/0.75/0.9, TP/FP/FN at 0.5 and
    object counts. An id present on one side only is an error unless --allow-missing.

    With --report report.html, also writes one self-contained HTML page (pictures
    inlined): the table, F1 against IoU threshold per modality, the router's confusion
    matrix when PRED holds the routing.csv of `triageseg segment`, the error analysis of
    Caicedo et al. 2019 and the --worst images with ground truth and prediction outlined.

    \b
    With --bundle B --data DIR [--split test], segments that split with the bundle
    and prints the same tables for the routed pipeline and for the generalist alone,
    plus the router's accuracy and confusion matrix.

    \b
    Example:
      triageseg evaluate out/ data/labels --modalities data/modalities.csv --json scores.json
      triageseg evaluate out/ data/ --report report.html --worst 8
      triageseg evaluate --bundle bundle/ --data data/ --split test
    """
    if bundle_dir is not None or data_root is not None:
        if bundle_dir is None or data_root is None or pred is not None or gt is not None:
            raise click.UsageError("use either PRED GT, or --bundle B --data DIR [--split S]")
        if images_dir is not None:
            raise click.UsageError("--images is for PRED GT; with --bundle the images come from --data")
        _evaluate_bundle(bundle_dir, data_root, split, protocol, device, json_out, csv_out, save_predictions,
                         report_out, worst)
        return
    if pred is None or gt is None:
        raise click.UsageError("PRED and GT are required (or --bundle B --data DIR)")
    from tqdm import tqdm

    from triageseg.datasets.atomic import write_json_atomic, write_text_atomic
    from triageseg.postprocess.folders import evaluate_folders
    from triageseg.postprocess.report import check_report_path, format_table

    if report_out is not None:
        check_report_path(report_out)  # fail before the work, not after it

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
    if report_out is not None:
        _write_folder_report(report_out, report, pred, gt, images_dir, worst)


def _write_folder_report(path: Path, report, pred: Path, gt: Path, images_dir: Path | None, worst: int) -> None:
    from triageseg.postprocess.report import ROUTING_CSV, images_beside, read_routing, write_report

    routing_csv = pred / ROUTING_CSV
    routing = read_routing(routing_csv) if routing_csv.is_file() else None
    images = images_dir if images_dir is not None else images_beside(gt)
    sources = {"predictions": str(pred), "ground truth": str(gt),
               "images": str(images) if images is not None else "none (outlines on black)"}
    if routing is not None:
        sources["routing"] = str(routing_csv)
    write_report(path, report, routing=routing, images=images, worst=worst, sources=sources)
    click.echo(f"wrote {path}")


def _evaluate_bundle(bundle_dir, data_root, split, protocol, device, json_out, csv_out, save_predictions,
                     report_out=None, worst=6) -> None:
    import tempfile

    from triageseg.datasets.atomic import write_json_atomic, write_text_atomic
    from triageseg.postprocess.report import check_report_path, format_table
    from triageseg.workflow import evaluate_bundle, format_comparison, scores_to_dict, write_bundle_report

    if report_out is not None:
        check_report_path(report_out)
    with tempfile.TemporaryDirectory(prefix="triageseg-evaluate-") as tmp:
        # The report outlines the worst images from their label files: keep the predictions somewhere.
        pred_dir = save_predictions if save_predictions is not None or report_out is None else Path(tmp)
        scores = evaluate_bundle(bundle_dir, data_root, split=split, protocol=protocol, device=device,
                                 out_dir=pred_dir)
        if report_out is not None:
            write_bundle_report(report_out, scores, data_root, pred_dir, worst=worst)
    click.echo(format_table(scores.routed, title=f"routed pipeline, split {split}"))
    if scores.generalist is not None:
        click.echo("")
        click.echo(format_table(scores.generalist, title=f"generalist alone, split {split}"))
    click.echo("")
    click.echo(format_comparison(scores))
    if json_out is not None:
        write_json_atomic(json_out, scores_to_dict(scores))
        click.echo(f"wrote {json_out}")
    if csv_out is not None:
        write_text_atomic(csv_out, scores.routed.to_csv())
        click.echo(f"wrote {csv_out}")
    if report_out is not None:
        click.echo(f"wrote {report_out}")
