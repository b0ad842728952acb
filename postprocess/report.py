"""What people read: the per-modality text table and the self-contained HTML report.

:func:`format_table` is what ``triageseg evaluate`` prints. :func:`write_report` writes
one HTML file that holds everything inline (pictures as ``data:`` URIs, the style in the
page, no script, no link): the same table, F1 against IoU threshold per modality, the
router's confusion matrix when the predictions came with a ``routing.csv``, the error
analysis of Caicedo et al. 2019 and the K images with the lowest F1, ground truth and
prediction outlined side by side. Every text put into the page is escaped.
"""

from __future__ import annotations

import base64
import csv
import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from triageseg.datasets.errors import DataError
from triageseg.postprocess.folders import FolderReport
from triageseg.postprocess.metrics import (
    AREA_BINS,
    ERROR_IOU,
    SPLIT_MERGE_IOU,
    CaicedoErrors,
    EvalResult,
    ImageResult,
    get_protocol,
    match_image,
)

ROUTING_CSV = "routing.csv"  # what `triageseg segment` writes beside the label images
UNKNOWN_ROUTE = "unknown modality"  # the column of images the router refused as unlike every trained modality

def format_table(report: FolderReport | EvalResult, *, title: str | None = None) -> str:
    """A plain-text table: one row per modality (if any) and one for all images.

    Columns: images, GT/predicted objects, mean F1 (mean AP too for dsb2018), F1 at
    IoU 0.5 / 0.75 / 0.9, and TP/FP/FN at IoU 0.5.
    """
    if isinstance(report, EvalResult):
        rows = [("overall", report)]
        proto_name = report.protocol
    else:
        rows = list(report.per_modality.items()) + [("overall", report.overall)]
        proto_name = report.protocol
    proto = get_protocol(proto_name)
    dsb = proto.name == "dsb2018"
    head = ["", "images", "objects gt/pred", "mean F1"] + (["mean AP"] if dsb else [])
    head += ["F1@0.5", "F1@0.75", "F1@0.9", "TP@0.5", "FP@0.5", "FN@0.5"]
    table = [head]
    for name, res in rows:
        row = [name, str(res.n_images), f"{res.n_true}/{res.n_pred}", f"{res.mean_f1:.4f}"]
        if dsb:
            row.append(f"{res.mean_ap:.4f}")
        row += [f"{res.f1_at(t):.4f}" for t in (0.5, 0.75, 0.9)]
        row += [str(int(res.tp[0])), str(int(res.fp[0])), str(int(res.fn[0]))]
        table.append(row)
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines = [title] if title else []
    lines.append(f"protocol {proto.name}: {proto.description}")
    for k, row in enumerate(table):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    overall = report if isinstance(report, EvalResult) else report.overall
    if overall.caicedo is not None:
        err = overall.caicedo
        bins = ", ".join(f"{b}: {m}/{e}" for b, m, e in zip(err.area_bins, err.missed, err.extra))
        lines.append(f"errors at IoU > {ERROR_IOU} (missed/extra by area bin, px) {bins}; "
                     f"splits {err.splits}, merges {err.merges} (IoU > {SPLIT_MERGE_IOU})")
    if isinstance(report, FolderReport) and (report.missing_pred or report.missing_gt):
        lines.append(f"missing predictions (scored empty): {len(report.missing_pred)}; "
                     f"predictions without ground truth (ignored): {len(report.missing_gt)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- inputs of the HTML report


def read_routing(path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """The rows of a ``routing.csv`` (as ``triageseg segment`` writes it), keyed by image id.

    The id is the ``output`` column without extension (the label file's id).

    Raises:
        DataError: unreadable file, or no ``output`` / ``modality`` column.
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            fields = [f.strip() for f in (reader.fieldnames or [])]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(path, f"cannot read: {getattr(err, 'strerror', None) or err}") from None
    if "output" not in fields or "modality" not in fields:
        raise DataError(path, f"expected routing.csv columns 'output' and 'modality', found {fields}")
    out = {}
    for row in rows:
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None}
        if row.get("output"):
            out[Path(row["output"]).stem] = row
    return out


def confusion_from_routing(
    routing: Mapping[str, Mapping[str, str]], modality_of: Mapping[str, str | None]
) -> tuple[dict[str, dict[str, int]], int]:
    """Router confusion (true modality -> routed modality -> count) of the evaluated ids.

    Rows without a confidence (a modality forced with ``--modality``) or without a routed
    modality are not routing decisions and are left out; a row whose decision is
    ``unknown modality`` counts in that column.

    Returns:
        (confusion, number of evaluated ids left out: no row, no true modality, forced).
    """
    confusion: dict[str, dict[str, int]] = {}
    left_out = 0
    for key, true in modality_of.items():
        row = routing.get(key)
        if row is None or true in (None, "", "unknown") or not row.get("confidence") or not row.get("modality"):
            left_out += 1
            continue
        routed = UNKNOWN_ROUTE if row.get("decision", "").startswith(UNKNOWN_ROUTE) else row["modality"]
        cells = confusion.setdefault(str(true), {})
        cells[routed] = cells.get(routed, 0) + 1
    return confusion, left_out


def images_beside(gt_dir: str | os.PathLike) -> Path | None:
    """The images of a dataset whose labels are ``gt_dir``: ``gt_dir/images`` for a dataset root,
    ``images/`` beside a folder called ``labels``; None when there is none."""
    gt_dir = Path(gt_dir)
    for candidate in (gt_dir / "images", gt_dir.parent / "images" if gt_dir.name == "labels" else None):
        if candidate is not None and candidate.is_dir():
            return candidate
    return None


def check_report_path(path: str | os.PathLike) -> Path:
    """Refuse a report path that cannot be written, before any work is done.

    Raises:
        DataError: the path is a folder, or its nearest existing parent is not a writable folder.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(path, "is a folder; give the report a file name such as report.html")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise DataError(path, f"cannot write the report: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(path, f"cannot write the report: folder {parent} is not writable")
    return path


def error_analysis(report: FolderReport) -> dict[str, CaicedoErrors] | None:
    """Caicedo et al. 2019 errors per image id, whatever protocol ``report`` was scored with.

    Under ``caicedo2019`` they are the report's own; under another protocol every image is
    matched again with ``caicedo2019`` (predictions dilated by a 3x3 square) from its label
    files. None when the report does not know the files of every image.
    """
    if report.protocol == "caicedo2019":
        return {r.id: r.errors for r in report.overall.per_image}
    ids = [r.id for r in report.overall.per_image]
    if not report.gt_files or any(key not in report.gt_files for key in ids):
        return None
    return {key: match_image(*_labels(report, key), protocol="caicedo2019", id=key).errors for key in ids}


def _labels(report: FolderReport, key: str):
    import numpy as np

    from triageseg.datasets.io import read_labels

    gt = read_labels(report.gt_files[key])
    pred_file = report.pred_files.get(key)
    if pred_file is None:
        return gt, np.zeros_like(gt)
    pred = read_labels(pred_file)
    if pred.shape != gt.shape:
        raise DataError(pred_file, f"shape {pred.shape} differs from ground truth {report.gt_files[key]} "
                                   f"shape {gt.shape}")
    return gt, pred


def worst_images(report: FolderReport, k: int) -> list[ImageResult]:
    """The ``k`` images with the lowest per-image mean F1 (ties by id), lowest first."""
    return sorted(report.overall.per_image, key=lambda r: (r.mean_f1, str(r.id)))[: max(0, int(k))]


# --------------------------------------------------------------------------- the HTML report

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1100px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ccc; }
pre { background: #f6f6f6; padding: 10px; overflow-x: auto; font-size: 13px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.note { color: #555; font-size: 13px; } .card { margin: 16px 0 24px; }
.card img, .plot img { max-width: 100%; image-rendering: pixelated; }
"""


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _table(head: Sequence, rows: Sequence[Sequence], *, shade: Sequence[Sequence[float]] | None = None) -> str:
    """An HTML table of escaped cells; ``shade`` (0..1 per body cell, first column excluded) tints cells."""
    out = ["<table>", "<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr>"]
    for i, row in enumerate(rows):
        cells = [f"<td>{_esc(row[0])}</td>"]
        for j, cell in enumerate(row[1:]):
            style = ""
            if shade is not None:
                alpha = round(0.6 * float(shade[i][j]), 3)
                style = f' style="background: rgba(31, 119, 180, {alpha})"'
            cells.append(f"<td{style}>{_esc(cell)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _f1_section(report: FolderReport) -> str:
    from triageseg.postprocess.report_figures import f1_curve_png

    curves = {name: res.f1.tolist() for name, res in report.per_modality.items()}
    curves["overall"] = report.overall.f1.tolist()
    png = f1_curve_png(report.overall.thresholds, curves, protocol=report.protocol)
    return "<h2>F1 against IoU threshold</h2>\n" + f'<div class="plot">{_img(png, "F1 against IoU threshold")}</div>'


def _confusion_section(confusion: Mapping[str, Mapping[str, int]], left_out: int) -> str:
    trues = sorted(confusion)
    routed = sorted({m for row in confusion.values() for m in row} | set(trues), key=lambda m: (m == UNKNOWN_ROUTE, m))
    rows, shade = [], []
    total = correct = 0
    for t in trues:
        counts = [int(confusion[t].get(m, 0)) for m in routed]
        n = max(1, sum(counts))
        rows.append([t, *counts, sum(counts)])
        shade.append([c / n for c in counts] + [0.0])
        total += sum(counts)
        correct += int(confusion[t].get(t, 0))
    parts = ['<h2 id="confusion">Router confusion matrix</h2>',
             '<p class="note">rows: the true modality (modalities.csv); columns: where the router sent the '
             "image.</p>", _table(["true \\ routed", *routed, "images"], rows, shade=shade)]
    if total:
        parts.append(f"<p>router accuracy: {correct}/{total} = {correct / total:.3f}</p>")
    if left_out:
        parts.append(f'<p class="note">{left_out} evaluated image(s) left out: no routing row, no true modality, '
                     "or a modality forced with --modality.</p>")
    return "\n".join(parts)


def _errors_section(report: FolderReport, errors: Mapping[str, CaicedoErrors] | None) -> str:
    from triageseg.postprocess.report_figures import errors_png

    head = '<h2 id="errors">Error analysis (Caicedo et al. 2019)</h2>'
    if errors is None:
        return head + '\n<p class="note">not available: the label files of these results are not known.</p>'
    groups = {name: [r.id for r in res.per_image] for name, res in report.per_modality.items()}
    groups["overall"] = [r.id for r in report.overall.per_image]
    rows, total = [], None
    for name, ids in groups.items():
        summed = errors[ids[0]]
        for key in ids[1:]:
            summed = summed + errors[key]
        rows.append([name, *summed.missed, sum(summed.missed), *summed.extra, sum(summed.extra), summed.splits,
                     summed.merges])
        total = summed
    bins = list(AREA_BINS)
    table = _table(["", *(f"missed {b}" for b in bins), "missed", *(f"extra {b}" for b in bins), "extra",
                    "splits", "merges"], rows)
    note = ("" if report.protocol == "caicedo2019" else
            f" Matched with the caicedo2019 protocol (not {_esc(report.protocol)}, the table's).")
    png = errors_png(AREA_BINS, total.missed, total.extra, iou=ERROR_IOU)
    return "\n".join([
        head,
        f'<p class="note">Predictions dilated by a 3x3 square. Missed: GT objects without a prediction at IoU > '
        f"{ERROR_IOU}, by GT area (px); extra: predictions without a GT object at IoU > {ERROR_IOU}, by predicted "
        f"area. Split: a GT object overlapped by two or more predictions at IoU > {SPLIT_MERGE_IOU}; merge: a "
        f"prediction overlapping two or more GT objects at IoU > {SPLIT_MERGE_IOU}.{note}</p>",
        table,
        f'<div class="plot">{_img(png, "missed and extra objects by area")}</div>',
    ])


def _image_files(images: str | os.PathLike | Mapping[str, str | os.PathLike] | None) -> dict[str, Path] | None:
    if images is None:
        return None
    if isinstance(images, Mapping):
        return {str(k): Path(v) for k, v in images.items()}
    from triageseg.datasets.io import IMAGE_SUFFIXES
    from triageseg.datasets.layout import list_files

    folder = Path(images)
    if not folder.is_dir():
        raise DataError(folder, "images folder not found" if not folder.exists() else "not a folder")
    return list_files(folder, IMAGE_SUFFIXES, "image")


# Routing columns shown under a worst image when routing.csv has them (ood_score and quality come with issue 13).
_ROUTING_SHOWN = ("modality", "confidence", "decision", "used_model", "ood_score", "quality")


def _worst_section(report: FolderReport, k: int, image_files: dict[str, Path] | None,
                   routing: Mapping[str, Mapping[str, str]] | None,
                   errors: Mapping[str, CaicedoErrors] | None) -> str:
    from triageseg.datasets.io import read_image
    from triageseg.postprocess.report_figures import outlines_png

    chosen = worst_images(report, k)
    parts = [f'<h2 id="worst">The {len(chosen)} images with the lowest F1</h2>',
             '<p class="note">Ordered by per-image mean F1 over the IoU thresholds, lowest first. Left: ground truth '
             "(green outlines); right: prediction (yellow outlines).</p>"]
    if image_files is None:
        parts.append('<p class="note">No images were given (--images DIR, or images/ beside a dataset\'s labels/): '
                     "outlines are drawn on black.</p>")
    if not report.gt_files:
        return "\n".join(parts + ['<p class="note">not available: the label files of these results are not '
                                  "known.</p>"])
    for r in chosen:
        gt, pred = _labels(report, r.id)
        image, note = None, ""
        if image_files is not None:
            path = image_files.get(r.id)
            if path is None:
                note = "no image with this id: outlines on black"
            else:
                image = read_image(path)
                if image.shape[:2] != gt.shape:
                    raise DataError(path, f"image shape {image.shape[:2]} differs from its ground truth "
                                          f"{report.gt_files[r.id]} shape {gt.shape}")
        facts = [f"modality {report.modality_of.get(r.id) or '-'}", f"mean F1 {r.mean_f1:.4f}",
                 f"objects gt/pred {r.n_true}/{r.n_pred}",
                 f"TP/FP/FN at IoU {r.thresholds[0]:.2f}: {int(r.tp[0])}/{int(r.fp[0])}/{int(r.fn[0])}"]
        if errors is not None:
            e = errors[r.id]
            facts.append(f"missed {sum(e.missed)}, extra {sum(e.extra)}, splits {e.splits}, merges {e.merges}")
        row = (routing or {}).get(r.id)
        if row:
            facts.append("routing: " + ", ".join(f"{c} {row[c]}" for c in _ROUTING_SHOWN if row.get(c)))
        if r.id in report.missing_pred:
            facts.append("no prediction file (scored as empty)")
        if note:
            facts.append(note)
        parts += ['<div class="card">', f"<h3>{_esc(r.id)}</h3>", f'<p class="note">{_esc("; ".join(facts))}</p>',
                  _img(outlines_png(gt, pred, image), f"{r.id}: ground truth and prediction outlines"), "</div>"]
    return "\n".join(parts)


def render_report(
    report: FolderReport,
    *,
    routing: Mapping[str, Mapping[str, str]] | None = None,
    confusion: Mapping[str, Mapping[str, int]] | None = None,
    images: str | os.PathLike | Mapping[str, str | os.PathLike] | None = None,
    worst: int = 6,
    title: str = "triageseg evaluation report",
    sources: Mapping[str, str] | None = None,
) -> str:
    """The report as one self-contained HTML page (see the module docstring).

    Args:
        report: the folder evaluation; its ``gt_files`` / ``pred_files`` give the label
            images of the error analysis (under protocols other than caicedo2019) and of
            the worst images.
        routing: ``routing.csv`` rows by image id (:func:`read_routing`); gives the confusion
            matrix (with the true modalities of ``report``) and the routing of each worst image.
        confusion: true -> routed -> count, when known otherwise (``evaluate --bundle``,
            the demo); takes precedence over the one from ``routing``.
        images: folder of the images (or id -> image file); None: outlines on black.
        worst: how many of the lowest-F1 images to show (0: no such section).
        title: the page's title.
        sources: label -> text shown under the title (e.g. the PRED and GT folders).

    Raises:
        DataError: an unreadable label or image file, or an image whose shape differs from its labels.
    """
    image_files = _image_files(images)
    left_out = 0
    if confusion is None and routing is not None:
        confusion, left_out = confusion_from_routing(routing, report.modality_of)
    errors = error_analysis(report)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{_esc(title)}</title>",
             f"<style>{_STYLE}</style></head><body>", f"<h1>{_esc(title)}</h1>"]
    for label, text in (sources or {}).items():
        parts.append(f'<p class="note">{_esc(label)}: {_esc(text)}</p>')
    parts += ['<h2 id="scores">Scores per modality</h2>', f"<pre>{_esc(format_table(report))}</pre>",
              _f1_section(report)]
    if confusion:
        parts.append(_confusion_section(confusion, left_out))
    elif routing is not None:
        parts.append('<p class="note">The routing rows say where each image was sent, but no evaluated image has '
                     "a routing decision and a true modality (modalities.csv, --modalities): no confusion matrix.</p>")
    parts.append(_errors_section(report, errors))
    if worst > 0:
        parts.append(_worst_section(report, worst, image_files, routing, errors))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(path: str | os.PathLike, report: FolderReport, **options) -> Path:
    """Write :func:`render_report` (same options) to ``path``, atomically.

    Raises:
        DataError: bad input (see :func:`render_report`), or a path that cannot be written.
    """
    from triageseg.datasets.atomic import write_text_atomic

    path = check_report_path(path)
    text = render_report(report, **options)
    try:
        write_text_atomic(path, text)
    except OSError as err:
        raise DataError(path, f"cannot write the report: {err.strerror or err}") from None
    return path
