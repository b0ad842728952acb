"""What a batch run leaves in its output folder, and the checks that keep it safe to resume.

Any batch path (the local one in :mod:`triageseg.pipeline.local.batch`, the Ray one in
:mod:`triageseg.pipeline.cluster.distributed`) calls these: :func:`check_outputs_apart` (no output
overwrites or shadows an input), :func:`output_settings` / :func:`check_settings` (a resumed
run uses the settings the outputs were made with), :func:`verify_output` (an existing label
file opens and has its input's shape), :func:`write_failures` and :class:`RoutingJournal`
(every label file written keeps its ``routing.csv`` row, even when the process is killed).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from triageseg.datasets.atomic import write_text_atomic
from triageseg.datasets.errors import DataError

ROUTING_COLUMNS = (
    "file", "output", "modality", "confidence", "ood_score", "used_model", "decision", "objects", "seconds", "mode",
    "quality", "diameter", "scale", "size_source",
)
ROUTING_CSV = "routing.csv"
SEGMENT_CONFIG = "segment_config.json"
FAILURES_CSV = "failures.csv"
JOURNAL = ".routing-journal.jsonl"
# Settings that decide what the label images are: a resumed run must use the same ones.
OUTPUT_SETTINGS = ("bundle", "modality", "tile_size", "tta", "channel", "page", "level", "diameter")


class OutputConflict(DataError):
    """An output folder that would overwrite or shadow an input, or holds outputs made with other settings."""


def _n_objects(labels: np.ndarray) -> int:
    return int(len(np.unique(labels)) - (1 if (labels == 0).any() else 0))


def _read_routing(path: Path) -> dict[str, dict]:
    """Rows of an existing routing.csv keyed by output name (for resumed runs)."""
    if not path.is_file():
        return {}
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, csv.Error, UnicodeDecodeError):
        return {}
    return {output_stem(r.get("output", "")): r for r in rows if r.get("output")}


def read_routing(path: str | os.PathLike) -> dict[str, dict]:
    """Rows of an existing routing.csv keyed by output name; {} when there is none.

    Raises:
        OutputConflict: the file cannot be read (not UTF-8, not a CSV with an ``output``
            column): a rerun would replace it by the rows of this run only, so the error
            says how to get every row back (delete it and rerun: rows are rebuilt from the
            label files, see :func:`rebuild_rows`).
    """
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            columns = reader.fieldnames or []
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        problem = str(err)
    else:
        if "output" in columns:
            return {output_stem(r["output"]): r for r in rows if r.get("output")}
        problem = f"no 'output' column (columns: {', '.join(columns) or 'none'})"
    raise OutputConflict(path, f"unreadable ({problem}); every label file keeps its own row, so delete it and "
                               "rerun the same command: routing.csv is rebuilt from the label files")


def output_stem(output: str) -> str:
    """The image name of a label file name: ``a.tif`` -> ``a``, ``a.ome.zarr`` -> ``a``."""
    name = Path(output).name
    return name[: -len(".ome.zarr")] if name.lower().endswith(".ome.zarr") else Path(name).stem


def label_record(row: Mapping[str, Any]) -> dict:
    """What a label file stores about itself (the ``record`` of :func:`~triageseg.datasets.io.write_labels`): its routing.csv row.

    ``seconds`` is left empty (not known until the file is written); ``quality`` is
    formatted as in routing.csv.
    """
    cells = {k: row.get(k, "") for k in ROUTING_COLUMNS}
    quality = cells["quality"]
    cells["quality"] = "" if quality is None else (f"{quality:.3f}" if isinstance(quality, (float, np.floating)) else quality)
    cells["seconds"] = ""
    return {"routing": {k: "" if v is None else v for k, v in cells.items()}}


def rebuild_rows(out_dir: str | os.PathLike, rows: dict[str, dict]) -> list[str]:
    """Add to ``rows`` the routing row of every verified label file in ``out_dir`` that has none; the names added.

    Each label file carries its own row (:func:`label_record`), so rows lost from
    routing.csv (the file deleted, or overwritten by another run's) come back. A label
    file without a record (written before records were) or that does not verify is left
    out. ``rows`` is changed in place; the caller writes routing.csv.
    """
    from triageseg.datasets.tiffrecord import read_record

    added = []
    for target in sorted(Path(out_dir).glob("*.tif")):
        if target.stem in rows:
            continue
        record = read_record(target)
        row = record.get("routing") if record else None
        if not isinstance(row, dict) or row.get("output") != target.name or verify_output(target, None):
            continue
        rows[target.stem] = {k: str(row.get(k, "")) for k in ROUTING_COLUMNS}
        added.append(target.stem)
    return added


def _write_routing(path: Path, rows: dict[str, dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=ROUTING_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for name in sorted(rows):
        writer.writerow(rows[name])
    write_text_atomic(path, buf.getvalue())


def routing_row(path, name: str, modality: str, confidence: float | None, used_model: str, decision: str,
                mode: str = "memory", ood_score: float | None = None, size=None) -> dict:
    """The routing.csv columns known before segmenting (``objects`` and ``seconds`` come after).

    ``ood_score`` is the router's out-of-distribution score (empty without OOD statistics);
    an image skipped as an unknown modality has ``used_model`` ``""`` and no ``output``.
    ``size`` is anything with ``diameter``, ``scale`` and ``size_source`` (a ``Decision``):
    the size decision, recorded the same on every path.
    """
    return {
        **size_columns(size),
        "file": str(path),
        "output": f"{name}.tif" if used_model else "",
        "modality": modality,
        "confidence": "" if confidence is None else f"{confidence:.4f}",
        "ood_score": "" if ood_score is None or ood_score != ood_score else f"{ood_score:.4f}",
        "used_model": used_model,
        "decision": decision,
        "mode": mode,
    }


def size_columns(size) -> dict:
    """routing.csv's ``diameter``, ``scale`` and ``size_source`` of a size decision (empty when none)."""
    diameter = getattr(size, "diameter", None)
    scale = getattr(size, "scale", None)
    return {"diameter": "" if diameter is None else f"{diameter:.2f}",
            "scale": "" if scale is None else f"{scale:.4g}",
            "size_source": getattr(size, "size_source", "") or ""}


# ------------------------------------------------------------------ checks any batch path can call


def check_outputs_apart(
    inputs: Sequence[str | os.PathLike],
    names: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    folders: Sequence[str | os.PathLike] = (),
    recursive: bool = False,
) -> None:
    """Refuse an output folder whose outputs would overwrite or shadow an input.

    Refused: an output file that is an input; a label file written beside an input of the
    same name (the next run would read it as an input, or mistake the input for done); an
    output folder that is one of ``folders`` (folder inputs: its label images would be
    inputs of the next run) or, with ``recursive``, inside one of them.

    Raises:
        OutputConflict: naming the input or folder and the output.
    """
    from triageseg.datasets.io import image_id

    out = Path(out_dir).resolve()
    for folder in folders:
        where = Path(folder).resolve()
        if out == where:
            raise OutputConflict(out_dir, f"the output folder (--out) is the input folder {folder}: label images "
                                          "written there would be read as inputs by the next run; choose another")
        if recursive and where in out.parents:
            raise OutputConflict(out_dir, f"the output folder (--out) is inside the input folder {folder}, which is "
                                          "read with --recursive: the next run would segment its own outputs; "
                                          "choose one outside it")
    resolved = {Path(p).resolve(): Path(p) for p in inputs}
    fixed = [out / ROUTING_CSV, out / SEGMENT_CONFIG, out / FAILURES_CSV]
    for path, name in zip(inputs, names, strict=True):
        for target in (out / f"{name}.tif", out / f"{name}.rois.zip", out / "overlays" / f"{name}.png", *fixed):
            if target in resolved:
                raise OutputConflict(resolved[target], f"the output {target} would overwrite the input "
                                                       f"{resolved[target]}; choose another output folder (--out)")
        source = Path(path).resolve()
        if source.parent == out and image_id(source.name) == name:
            raise OutputConflict(path, f"the output {name}.tif would be written beside this input, in the same "
                                       "folder with the same name; choose another output folder (--out)")


def output_settings(
    bundle: str | os.PathLike,
    *,
    modality: str | None = None,
    tile_size: int | None = None,
    tta: bool = False,
    channel: int | None = None,
    page: int | None = None,
    level: int = 0,
    diameter: float | None = None,
) -> dict[str, Any]:
    """The settings that decide what the label images are (``OUTPUT_SETTINGS``), as recorded in segment_config.json."""
    return {"bundle": os.path.abspath(bundle), "modality": modality, "tile_size": tile_size, "tta": bool(tta),
            "channel": channel, "page": page, "level": level, "diameter": diameter}


def check_settings(out_dir: str | os.PathLike, settings: Mapping[str, Any], *, overwrite: bool = False) -> None:
    """Refuse to resume into ``out_dir`` when its label images were made with other settings.

    The settings of the outputs are those recorded in ``segment_config.json``; a folder
    without label images, or ``overwrite`` (every input is redone), has nothing to protect.

    Raises:
        OutputConflict: naming each differing setting, then and now.
    """
    out_dir = Path(out_dir)
    path = out_dir / SEGMENT_CONFIG
    if overwrite or not path.is_file() or not any(out_dir.glob("*.tif")):
        return
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        recorded = None
    if not isinstance(recorded, dict):
        raise OutputConflict(path, "unreadable record of the settings the outputs here were made with; pass "
                                   "--overwrite to redo every input, or choose another output folder (--out)")
    diffs = [f"{key}: {recorded.get(key)!r} then, {value!r} now" for key, value in settings.items()
             if recorded.get(key) != value]
    if diffs:
        raise OutputConflict(out_dir, "holds outputs made with other settings (" + "; ".join(diffs) + "); rerun "
                                      "with those settings to resume, pass --overwrite to redo every input with "
                                      "the new ones, or choose another output folder (--out)")


def verify_output(path: str | os.PathLike, shape: Sequence[int] | None) -> str | None:
    """Why the label file at ``path`` cannot count as the output for an input of ``shape``; None when it can.

    Reads the TIFF structure and a few tiles, not the whole image: the file must open;
    every pyramid level's IFD must read and its image data lie within the file (a cut-off
    write is caught); the first and last tile or strip of every level must decode; a
    pyramidal file must hold its OME-XML (written last, so the first thing a cut loses);
    level 0's height and width must be ``shape``.
    """
    import tifffile

    from triageseg.datasets.omezarr import is_zarr, verify_zarr

    if is_zarr(path):
        return verify_zarr(path, shape)
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if size == 0:
        return "empty file (0 bytes)"
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            found = (int(page.imagelength), int(page.imagewidth))
            problem = _check_levels(tif, page, size)
    except Exception as err:  # noqa: BLE001 - tifffile raises many types for broken files
        return f"not a readable TIFF ({err})"
    if problem:
        return problem
    if shape is not None and found != tuple(shape[:2]):
        return f"shape {found} differs from its input's {tuple(shape[:2])}"
    return None


def _check_levels(tif, page, size: int) -> str | None:
    """The problem of the first damaged pyramid level of ``tif`` (level 0 = ``page``), or None."""
    import xml.etree.ElementTree as ET

    import tifffile

    levels = [page]
    for i, offset in enumerate(page.subifds or ()):
        if not 0 < int(offset) < size:
            return f"truncated ({size} bytes; pyramid level {i + 1} starts at byte {offset})"
        tif.filehandle.seek(int(offset))
        try:
            levels.append(tifffile.TiffPage(tif, index=(0, i)))
        except Exception as err:  # noqa: BLE001
            return f"pyramid level {i + 1} unreadable ({err})"
    for level, lvl in enumerate(levels):
        extents = list(zip(lvl.dataoffsets, lvl.databytecounts, strict=True))
        end = max((int(o) + int(n) for o, n in extents), default=0)
        if end > size:
            return f"truncated ({size} bytes; the image data of level {level} runs to byte {end})"
        for index in {0, len(extents) - 1} if extents else ():
            offset, count = (int(v) for v in extents[index])
            if count == 0:
                continue
            tif.filehandle.seek(offset)
            try:
                lvl.decode(tif.filehandle.read(count), index, jpegtables=lvl.jpegtables)
            except Exception as err:  # noqa: BLE001 - codecs raise their own types (DeflateError...)
                return f"pyramid level {level} does not decode ({type(err).__name__}: {err})"
    if len(levels) > 1:  # our pyramids are OME-TIFFs: without the OME-XML, readers lose the levels
        description = page.description or ""
        try:
            ET.fromstring(description)
        except ET.ParseError:
            return "its OME-XML metadata is missing or cut off (truncated file)"
    return None


def write_failures(out_dir: str | os.PathLike, failures: Sequence[tuple[Path, str]]) -> Path | None:
    """List ``failures`` (file, problem) in ``out_dir/failures.csv``; without failures an older list is removed."""
    path = Path(out_dir) / FAILURES_CSV
    if not failures:
        path.unlink(missing_ok=True)
        return None
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["file", "problem"])
    writer.writerows((str(p), problem) for p, problem in failures)
    write_text_atomic(path, buf.getvalue())
    return path


class RoutingJournal:
    """Append-only log of the routing rows of jobs in flight (``.routing-journal.jsonl`` in the output folder).

    A row is logged before its label file is written and marked done once ``routing.csv``
    holds it. A run killed in between (SIGKILL, a crash) leaves label files without rows:
    :meth:`recover` at the start of the next run puts their rows into ``routing.csv``
    (objects counted from the label file; the time taken is not known).
    """

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / JOURNAL
        self._fh = None

    def start(self, name: str, row: Mapping[str, Any], target: Path) -> None:
        """Log ``row`` before the label file ``target`` is written (its current mtime tells an old file apart)."""
        before = target.stat().st_mtime_ns if target.exists() else None
        self._append({"name": name, "row": {k: v for k, v in row.items() if not k.startswith("_")}, "before": before})

    def done(self, name: str) -> None:
        """Mark the row of ``name`` as held by routing.csv."""
        self._append({"name": name, "done": True})

    def _append(self, entry: dict) -> None:
        if self._fh is None:
            self._fh = self.path.open("a", encoding="utf-8")
        self._fh.write(json.dumps(entry, default=str) + "\n")
        self._fh.flush()  # in the OS's hands: survives the process being killed

    def recover(self, rows: dict[str, dict]) -> dict[str, dict]:
        """Add to ``rows`` (routing.csv's, by name) the rows of label files written without one; save and clear."""
        from triageseg.datasets.io import read_labels

        if not self.path.is_file():
            return rows
        started: dict[str, dict] = {}
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # the last line of a killed run may be cut short
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                continue
            if entry.get("done"):
                started.pop(entry["name"], None)
            elif isinstance(entry.get("row"), dict):
                started[entry["name"]] = entry
        changed = False
        for name, entry in started.items():
            target = self.out_dir / f"{name}.tif"
            if not target.is_file() or target.stat().st_mtime_ns == entry.get("before"):
                continue  # never written, or still the file of an earlier run
            try:
                labels = read_labels(target)
            except DataError:
                continue  # a broken label file: verification redoes its input
            rows[name] = {**entry["row"], "objects": _n_objects(labels), "seconds": ""}
            changed = True
        if changed:
            _write_routing(self.out_dir / ROUTING_CSV, rows)
        self.clear()
        return rows

    def close(self) -> None:
        """Close the log file (it stays on disk)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def clear(self) -> None:
        """Remove the log: every row it held is in routing.csv."""
        self.close()
        self.path.unlink(missing_ok=True)


# ------------------------------------------------------------------ what to review first

REVIEW_CSV = "review.csv"
REVIEW_COLUMNS = ("file", "output", "quality", "modality", "confidence", "used_model", "decision", "objects")


def review_rows(rows: Sequence[Mapping[str, Any]], *, n: int | None = None,
                below: float | None = None) -> list[dict]:
    """The rows with the lowest predicted ``quality`` first (rows without one are left out).

    Args:
        rows: ``routing.csv`` rows (``quality`` a number or empty).
        n: keep at most this many.
        below: keep only rows whose quality is below this.
    """
    scored = []
    for row in rows:
        try:
            quality = float(row.get("quality", ""))
        except (TypeError, ValueError):
            continue
        if below is None or quality < below:
            scored.append((quality, str(row.get("output", "")), dict(row)))
    scored.sort(key=lambda t: (t[0], t[1]))
    picked = [r for _, _, r in scored]
    return picked if n is None else picked[:n]


def write_review(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``review.csv`` (atomically): the :data:`REVIEW_COLUMNS` of ``rows``, in their order."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=REVIEW_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in REVIEW_COLUMNS})
    write_text_atomic(path, buf.getvalue())
    return Path(path)
