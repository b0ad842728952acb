"""Folder evaluation: pair prediction and ground-truth label files by id, score them per modality.

:func:`evaluate_folders` reads two folders (or a dataset root) and returns a
:class:`FolderReport`; :func:`report_from_results` groups per-image results that were
scored elsewhere (``evaluate --bundle``, the demo) into the same report. Matching and the
protocols are in :mod:`triageseg.postprocess.metrics`; the table and the HTML report in
:mod:`triageseg.postprocess.report`.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from triageseg.postprocess.metrics import EvalResult, ImageResult, aggregate, get_protocol, match_image


@dataclass(frozen=True, eq=False)
class FolderReport:
    """Scores of a folder of predictions against a folder of ground truth."""

    protocol: str  # protocol name
    overall: EvalResult  # all images
    per_modality: dict[str, EvalResult]  # modality -> its images (empty without modalities)
    modality_of: dict[str, str | None] = field(default_factory=dict)  # image id -> modality
    missing_pred: tuple[str, ...] = ()  # GT ids without prediction (scored as empty)
    missing_gt: tuple[str, ...] = ()  # prediction ids without GT (ignored)
    gt_files: dict[str, Path] = field(default_factory=dict)  # image id -> its GT label file, when read from files
    pred_files: dict[str, Path] = field(default_factory=dict)  # image id -> its predicted label file (if any)

    def to_dict(self) -> dict:
        """The ``triageseg evaluate --json`` layout."""
        missing = set(self.missing_pred)
        per_image = []
        for r in self.overall.per_image:
            entry = {"id": r.id, "modality": self.modality_of.get(r.id), **_drop_id(r.to_dict())}
            if r.id in missing:
                entry["missing_prediction"] = True
            per_image.append(entry)
        return {
            "protocol": self.protocol,
            "thresholds": list(self.overall.thresholds),
            "overall": self.overall.summary(),
            "per_modality": {name: res.summary() for name, res in self.per_modality.items()},
            "per_image": per_image,
        }


    def to_csv(self) -> str:
        """One row per image: id, modality, object counts, mean F1 (and mean AP for
        dsb2018), F1 at every threshold, TP/FP/FN at IoU 0.5."""
        import io

        thresholds = self.overall.thresholds
        dsb = self.protocol == "dsb2018"
        head = ["id", "modality", "n_true", "n_pred", "mean_f1"] + (["mean_ap"] if dsb else [])
        head += [f"f1@{t:.2f}" for t in thresholds] + ["tp@0.50", "fp@0.50", "fn@0.50"]
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(head)
        for r in self.overall.per_image:
            row = [r.id, self.modality_of.get(r.id) or "", r.n_true, r.n_pred, f"{r.mean_f1:.6f}"]
            row += [f"{r.mean_ap:.6f}"] if dsb else []
            row += [f"{v:.6f}" for v in r.f1] + [int(r.tp[0]), int(r.fp[0]), int(r.fn[0])]
            writer.writerow(row)
        return buf.getvalue()


def _drop_id(d: dict) -> dict:
    d.pop("id", None)
    return d


def read_modalities(path: str | os.PathLike) -> dict[str, str]:
    """Read an ``id,modality`` CSV (the dataset's ``modalities.csv``) into a dict.

    Read as :func:`triageseg.datasets.layout.read_index_csv` reads it: a spreadsheet's
    byte-order mark and spaces around names are accepted.

    Raises:
        DataError: unreadable file, missing columns, empty fields or conflicting rows.
    """
    from triageseg.datasets.errors import DataError
    from triageseg.datasets.layout import read_index_csv

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found" if not path.exists() else "not a file")
    return read_index_csv(path, "modality")


def _label_files(folder: Path) -> dict[str, Path]:
    from triageseg.datasets.errors import DataError
    from triageseg.datasets.layout import LABEL_SUFFIXES, list_files

    if not folder.exists():
        raise DataError(folder, "folder not found")
    if not folder.is_dir():
        raise DataError(folder, "not a folder")
    return list_files(folder, LABEL_SUFFIXES, "label")


def _id_list(ids: Sequence[str], limit: int = 10) -> str:
    ids = sorted(ids)
    more = f" (+{len(ids) - limit} more)" if len(ids) > limit else ""
    return ", ".join(ids[:limit]) + more


def evaluate_folders(
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    *,
    modalities: str | os.PathLike | Mapping[str, str] | None = None,
    protocol: str = "default",
    allow_missing: bool = False,
    progress=None,
) -> FolderReport:
    """Pair prediction and ground-truth label files by id and score them.

    Files are paired by id (file name without extension). ``gt_dir`` may be a folder of
    label images or a dataset root holding ``labels/`` (then its ``modalities.csv`` is
    used when ``modalities`` is not given).

    Args:
        pred_dir: folder of predicted label images.
        gt_dir: folder of ground-truth label images, or a dataset root.
        modalities: ``id,modality`` CSV path or a dict; enables per-modality results.
            Every scored id must have a modality.
        protocol: one of :data:`PROTOCOLS`.
        allow_missing: score a GT image without prediction as an empty prediction and
            ignore predictions without GT, instead of failing.
        progress: optional callable wrapping the list of ids (e.g. ``tqdm``).

    Returns:
        :class:`FolderReport`.

    Raises:
        DataError: missing folder, unpaired ids (unless ``allow_missing``), no pairs,
            a label file that cannot be read, shapes that differ, ids without modality.
    """
    from triageseg.datasets.errors import DataError
    from triageseg.datasets.io import read_labels

    get_protocol(protocol)
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    if (gt_dir / "labels").is_dir() and not _label_files(gt_dir):  # a dataset root
        if modalities is None and (gt_dir / "modalities.csv").is_file():
            modalities = gt_dir / "modalities.csv"
        gt_dir = gt_dir / "labels"
    preds = _label_files(pred_dir)
    gts = _label_files(gt_dir)
    missing_pred = tuple(sorted(set(gts) - set(preds)))
    missing_gt = tuple(sorted(set(preds) - set(gts)))
    if not allow_missing and (missing_pred or missing_gt):
        parts = []
        if missing_pred:
            parts.append(f"no prediction for ground-truth ids: {_id_list(missing_pred)}")
        if missing_gt:
            parts.append(f"no ground truth (in {gt_dir}) for predicted ids: {_id_list(missing_gt)}")
        raise DataError(pred_dir, "; ".join(parts) + " (--allow-missing scores missing predictions as "
                                                    "empty and ignores predictions without ground truth)")
    ids = sorted(gts)
    if not ids:
        raise DataError(gt_dir, "no label images found")
    modality_of: dict[str, str | None] = {key: None for key in ids}
    if modalities is not None:
        source = modalities if isinstance(modalities, Mapping) else read_modalities(modalities)
        unknown = [key for key in ids if key not in source]
        if unknown:
            where = modalities if not isinstance(modalities, Mapping) else None
            raise DataError(where, f"no modality for ids: {_id_list(unknown)}")
        modality_of = {key: str(source[key]) for key in ids}
    results = []
    for key in progress(ids) if progress else ids:
        gt = read_labels(gts[key])
        if key in preds:
            pred = read_labels(preds[key])
            if pred.shape != gt.shape:
                raise DataError(preds[key], f"shape {pred.shape} differs from ground truth "
                                            f"{gts[key]} shape {gt.shape}")
        else:
            pred = np.zeros_like(gt)
        results.append(match_image(gt, pred, protocol=protocol, id=key))
    report = report_from_results(
        results,
        modality_of,
        protocol=protocol,
        missing_pred=missing_pred if allow_missing else (),
        missing_gt=missing_gt if allow_missing else (),
    )
    return with_files(report, {key: gts[key] for key in ids}, {key: preds[key] for key in ids if key in preds})


def with_files(report: FolderReport, gt_files: Mapping[str, Path], pred_files: Mapping[str, Path]) -> FolderReport:
    """``report`` knowing where each image's GT and predicted label files are (for the HTML report)."""
    import dataclasses

    return dataclasses.replace(report, gt_files={k: Path(v) for k, v in gt_files.items()},
                               pred_files={k: Path(v) for k, v in pred_files.items()})


def report_from_results(
    per_image: Sequence[ImageResult],
    modality_of: Mapping[str, str | None] | None = None,
    *,
    protocol: str = "default",
    missing_pred: Sequence[str] = (),
    missing_gt: Sequence[str] = (),
) -> FolderReport:
    """Group per-image results (from :func:`match_image` with ``id=``) into a report.

    Args:
        per_image: results of one protocol, each with its image ``id``.
        modality_of: image id -> modality. Results are also aggregated per modality
            when at least one id has one (ids without one go to ``"unknown"``).
        protocol: the protocol the results were scored with.
        missing_pred: GT ids that had no prediction (already scored as empty).
        missing_gt: prediction ids that had no GT (not scored).

    Returns:
        :class:`FolderReport` (``format_table`` prints it, ``to_dict`` is the
        ``evaluate --json`` layout).

    Raises:
        ValueError: no results, or results of another protocol.
    """
    per_image = tuple(per_image)
    modality_of = dict(modality_of or {})
    modality_of = {r.id: modality_of.get(r.id) for r in per_image}
    per_modality: dict[str, EvalResult] = {}
    if any(m is not None for m in modality_of.values()):
        modality_of = {key: ("unknown" if m is None else str(m)) for key, m in modality_of.items()}
        for name in sorted(set(modality_of.values())):
            subset = [r for r in per_image if modality_of[r.id] == name]
            per_modality[name] = aggregate(subset, protocol=protocol)
    return FolderReport(
        protocol=get_protocol(protocol).name,
        overall=aggregate(per_image, protocol=protocol),
        per_modality=per_modality,
        modality_of=modality_of,
        missing_pred=tuple(missing_pred),
        missing_gt=tuple(missing_gt),
    )
