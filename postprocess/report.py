"""What people read: the per-modality text table and the self-contained HTML report."""

from __future__ import annotations

from triageseg.postprocess.folders import FolderReport
from triageseg.postprocess.metrics import ERROR_IOU, SPLIT_MERGE_IOU, EvalResult, get_protocol


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
