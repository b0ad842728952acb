"""Many image files on this machine: read-ahead, worker processes, routing.csv, resume.

:func:`segment_files` is what ``triageseg segment`` runs: it reads one image ahead in a
thread (reading and routing overlap with the segmenter), decodes and writes in worker
processes, writes every output atomically and skips inputs whose outputs exist and
verify, so an interrupted run resumes where it stopped.

What keeps a run safe is in small functions any batch path can call (a distributed one
too): :func:`check_outputs_apart` (no output overwrites or shadows an input),
:func:`output_settings` / :func:`check_settings` (a resumed run uses the settings the
outputs were made with), :func:`verify_output` (an existing label file opens and has its
input's shape) and :class:`RoutingJournal` (every label file written keeps its
``routing.csv`` row, even when the process is killed).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from triageseg.datasets.atomic import write_json_atomic, write_text_atomic
from triageseg.datasets.errors import DataError
from triageseg.pipeline.large import BlockOptions, segment_large_file, use_blocks
from triageseg.pipeline.outputs import write_overlay, write_rois
from triageseg.postprocess.watershed import watershed

ROUTING_COLUMNS = ("file", "output", "modality", "confidence", "used_model", "decision", "objects", "seconds", "mode")
ROUTING_CSV = "routing.csv"
SEGMENT_CONFIG = "segment_config.json"
FAILURES_CSV = "failures.csv"
JOURNAL = ".routing-journal.jsonl"
# Settings that decide what the label images are: a resumed run must use the same ones.
OUTPUT_SETTINGS = ("bundle", "modality", "tile_size", "tta", "channel", "page", "level")
# Returned by the reader thread for an image that goes block-wise (read block by block later, never whole).
_BLOCKWISE = object()


class OutputConflict(DataError):
    """An output folder that would overwrite or shadow an input, or holds outputs made with other settings."""


@dataclass
class BatchReport:
    """Outcome of :func:`segment_files`."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failures: list[tuple[Path, str]] = field(default_factory=list)
    incomplete: list[tuple[Path, str]] = field(default_factory=list)  # existing outputs that failed verification
    rows: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def per_model(self) -> dict[str, int]:
        """Images per segmenter used in this run."""
        counts: dict[str, int] = {}
        for row in self.rows:
            counts[row["used_model"]] = counts.get(row["used_model"], 0) + 1
        return dict(sorted(counts.items()))


def segment_files(
    pipe,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    modality: str | None = None,
    overwrite: bool = False,
    on_error: str = "fail",
    workers: int = 0,
    overlays: bool = False,
    rois: bool = False,
    channel: int | None = None,
    page: int | None = None,
    names: Sequence[str] | None = None,
    progress: Callable[[Path], None] | None = None,
    blocks: BlockOptions | None = None,
) -> BatchReport:
    """Segment files with ``pipe`` (a :class:`~triageseg.pipeline.single.Pipeline`) into ``out_dir``: ``<name>.tif`` labels plus ``routing.csv``.

    Reading runs one image ahead in a thread and the watershed (plus writing) runs in
    ``workers`` processes, so the segmenter's device is not left waiting on the CPU.
    Outputs are written atomically; inputs whose label file exists and verifies (it opens
    and has the input's height and width) are skipped unless ``overwrite``, so an
    interrupted run resumes where it stopped. The settings are recorded in
    ``segment_config.json`` and a resumed run must use the same ones. Failures skipped
    under ``on_error="skip"`` are listed in ``failures.csv``. SIGTERM stops the run like
    Ctrl-C: the worker processes are shut down and finished rows kept.

    Args:
        inputs: image files.
        out_dir: output folder.
        modality: force this specialist (skip the router).
        overwrite: redo inputs whose label file already exists, whatever settings made it.
        on_error: ``"fail"`` stops at the first bad input; ``"skip"`` records it and goes on.
        workers: processes for watershed + writing (0: in this process).
        overlays: also write ``overlays/<name>.png`` with outlines on the image (a subfolder,
            so ``out_dir`` stays a folder of label images that ``evaluate`` can read).
        rois: also write ``<name>.rois.zip`` (ImageJ/Fiji ROI set).
        channel: channel to use for images with 2 or more than 3 channels (or for the pages
            of a 2-4 page TIFF without axis metadata).
        page: plane to read from multi-page TIFFs (see :func:`~triageseg.datasets.io.read_image`).
        names: output names (without extension), one per input; default the input stems.
        progress: called with each input path when it is done.
        blocks: :class:`~triageseg.pipeline.large.BlockOptions`: when an image is large enough
            to go block-wise (``mode`` = ``blocks`` in routing.csv) and how.

    Raises:
        OutputConflict: an output would overwrite or shadow an input, or ``out_dir`` holds
            outputs made with other settings (and not ``overwrite``).
        DataError: a bad input under ``on_error="fail"``; two inputs with one output name.
    """
    blocks = BlockOptions() if blocks is None else blocks
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be a non-negative integer, got {workers!r}")
    out_dir = Path(out_dir)
    paths = [Path(p) for p in inputs]
    names = output_names(paths, names)
    check_outputs_apart(paths, names, out_dir)
    if modality is not None:
        pipe.check_modality(modality)  # fail fast, before any file is read
    settings = output_settings(pipe.path, modality=modality, tile_size=pipe.tile_size, tta=pipe.tta,
                               channel=channel, page=page, level=blocks.level)
    check_settings(out_dir, settings, overwrite=overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / SEGMENT_CONFIG, {**settings, "device": str(pipe.device), "batch_size": pipe.batch_size,
                                                  "workers": workers, "n_inputs": len(paths),
                                                  **blocks.to_config()})

    report = BatchReport()
    journal = RoutingJournal(out_dir)
    rows = journal.recover(_read_routing(out_dir / ROUTING_CSV))
    todo = _plan(paths, names, out_dir, rows, report, overwrite=overwrite, page=page, level=blocks.level,
                 progress=progress)
    start = time.perf_counter()
    try:
        with _sigterm_as_interrupt():
            _run(pipe, todo, out_dir, rows, journal, report, modality=modality, on_error=on_error, workers=workers,
                 overlays=overlays, rois=rois, channel=channel, page=page, progress=progress, blocks=blocks)
    finally:
        journal.close()
    journal.clear()  # the run was not interrupted: routing.csv holds every row
    write_failures(out_dir, report.failures)
    report.seconds = time.perf_counter() - start
    return report


def _plan(paths, names, out_dir: Path, rows: dict[str, dict], report: BatchReport, *, overwrite: bool,
          page: int | None, level: int = 0, progress) -> list[tuple[Path, str]]:
    """The inputs to segment: those without a verified output (all of them with ``overwrite``)."""
    from triageseg.datasets.lazy import image_size
    from triageseg.datasets.shapes import image_shape

    todo: list[tuple[Path, str]] = []
    for p, n in zip(paths, names):
        target = out_dir / f"{n}.tif"
        if target.exists() and not overwrite:
            try:
                problem = verify_output(target, image_size(p, level=level) if level else image_shape(p, page=page))
            except DataError:
                problem = ""  # the input itself is bad: segmenting it again reports why
            if problem is None:
                report.skipped.append(p)
                if progress:
                    progress(p)
                continue
            if problem:
                report.incomplete.append((target, problem))
        rows.pop(n, None)
        todo.append((p, n))
    return todo


def _run(pipe, todo, out_dir: Path, rows: dict[str, dict], journal: RoutingJournal, report: BatchReport, *,
         modality, on_error, workers, overlays, rois, channel, page, progress, blocks: BlockOptions) -> None:
    """Segment ``todo``: read ahead, run the segmenter here, decode and write here or in workers."""
    routing_path = out_dir / ROUTING_CSV
    # spawn, not fork: forking a process that holds torch threads can deadlock
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init) if workers > 0 else None
    pending: list[tuple[Path, str, dict, Future]] = []

    def record(name: str, row: dict, n_objects: int, *, write: bool = True) -> None:
        row["objects"] = n_objects
        row["seconds"] = f"{time.perf_counter() - row.pop('_t0'):.3f}"
        report.rows.append(row)
        report.written.append(out_dir / f"{name}.tif")
        rows[name] = row
        if write:
            _write_routing(routing_path, rows)
            journal.done(name)

    def finish_first() -> None:
        path, name, row, fut = pending[0]
        try:
            n_objects = fut.result()
        except Exception as err:  # noqa: BLE001 - reported per file, policy decides
            pending.pop(0)
            _fail(report, path, err, on_error)
        else:
            pending.pop(0)
            record(name, row, n_objects)
        if progress:
            progress(path)

    def prepare(path: Path):
        # runs in the reader thread: reading and routing overlap with the segmenter
        if use_blocks(path, blocks):
            return _BLOCKWISE
        image, pixel_size = read_input(path, channel=channel, page=page)
        return image, pixel_size, pipe.decide(image, modality)

    try:
        for path, name, loaded in _prefetch(todo, prepare):
            t0 = time.perf_counter()
            if loaded is _BLOCKWISE:  # a huge image: block by block, streamed to disk (pipeline.large)
                try:
                    if page is not None:
                        raise DataError(path, "page selection is not available for images segmented block-wise")
                    row = segment_large_file(pipe, path, out_dir, name, modality=modality, channel=channel,
                                             options=blocks, before_write=lambda r, n=name: journal.start(
                                                 n, r, out_dir / f"{n}.tif"))
                except Exception as err:  # noqa: BLE001
                    _fail(report, path, err, on_error)
                else:
                    row["_t0"] = t0
                    record(name, row, row.pop("objects"))
                if progress:
                    progress(path)
                continue
            try:
                if isinstance(loaded, BaseException):
                    raise loaded
                image, pixel_size, (mod, conf, used, decision) = loaded
                probs = pipe.probabilities(image, used)
            except Exception as err:  # noqa: BLE001
                _fail(report, path, err, on_error)
                if progress:
                    progress(path)
                continue
            row = {**routing_row(path, name, mod, conf, used, decision), "_t0": t0}
            job = (probs, pipe.params(used), out_dir, name, pixel_size, image if (overlays or rois) else None,
                   overlays, rois)
            journal.start(name, row, out_dir / f"{name}.tif")
            if pool is not None:
                pending.append((path, name, row, pool.submit(_decode_and_write, *job)))
                # keep memory bounded: at most 2 jobs per worker in flight
                while len(pending) > 2 * workers:
                    finish_first()
                continue
            try:
                n_objects = _decode_and_write(*job)
            except Exception as err:  # noqa: BLE001
                _fail(report, path, err, on_error)
                if progress:
                    progress(path)
                continue
            record(name, row, n_objects)
            if progress:
                progress(path)
        while pending:
            finish_first()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
            if pending:  # interrupted: keep the rows of the jobs the workers finished
                _keep_finished(pending, record, routing_path, rows, journal)


def _keep_finished(pending, record, routing_path: Path, rows: dict[str, dict], journal: RoutingJournal) -> None:
    kept = []
    for _path, name, row, fut in pending:
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            record(name, row, fut.result(), write=False)
            kept.append(name)
    if kept:
        with contextlib.suppress(OSError):  # if routing.csv cannot be written, the journal still holds them
            _write_routing(routing_path, rows)
            for name in kept:
                journal.done(name)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt in the main thread while the run lasts.

    Without it the process dies at once and its worker processes (and the resource
    tracker) are left running, and the rows of jobs the workers finished are lost.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _worker_init() -> None:
    # Ctrl-C reaches the whole process group: the main process shuts the workers down
    # after their current job, so a worker must not die of it mid-write.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def output_names(inputs: Sequence, names: Sequence[str] | None = None) -> list[str]:
    """Output names (without extension), one per input (a path or a URI); default the input stems.

    Raises:
        DataError: two inputs would write the same output.
    """
    names = list(names) if names is not None else [PurePosixPath(os.fspath(p)).stem for p in inputs]
    if len(names) != len(inputs):
        raise ValueError(f"{len(names)} names for {len(inputs)} inputs")
    seen: dict[str, object] = {}
    for p, n in zip(inputs, names):
        if n in seen:
            raise DataError(p, f"output name {n!r} is also that of {seen[n]}; rename one of them")
        seen[n] = p
    return names


def read_input(path: str | os.PathLike, *, channel: int | None = None,
               page: int | None = None) -> tuple[np.ndarray, tuple[float, float] | None]:
    """The normalised HxWx3 image and the pixel size (microns, or None) of one input file."""
    from triageseg.datasets.io import read_image, read_pixel_size

    return read_image(path, channel=channel, page=page), read_pixel_size(path)


def routing_row(path, name: str, modality: str, confidence: float | None, used_model: str, decision: str,
                mode: str = "memory") -> dict:
    """The routing.csv columns known before segmenting (``objects`` and ``seconds`` come after)."""
    return {
        "file": str(path),
        "output": f"{name}.tif",
        "modality": modality,
        "confidence": "" if confidence is None else f"{confidence:.4f}",
        "used_model": used_model,
        "decision": decision,
        "mode": mode,
    }


def _fail(report: BatchReport, path: Path, err: BaseException, on_error: str) -> None:
    message = str(err)
    if isinstance(err, DataError) and err.path is not None:
        message = err.problem if Path(err.path) == path else str(err)
    if on_error == "fail":
        if isinstance(err, DataError):
            raise err
        raise DataError(path, f"{type(err).__name__}: {message}") from err
    report.failures.append((path, message))


def _prefetch(todo: Iterable[tuple[Path, str]], prepare: Callable[[Path], object], depth: int = 2):
    """Run ``prepare`` one or two inputs ahead in a thread; yields (path, name, result | error)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def reader() -> None:
        for path, name in todo:
            if stop.is_set():
                break
            try:
                item = prepare(path)
            except Exception as err:  # noqa: BLE001 - handed to the consumer
                item = err
            q.put((path, name, item))
        q.put(None)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not None:
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


def _decode_and_write(probs, params, out_dir, name, pixel_size, image, overlays, rois) -> int:
    """Watershed + atomic writes; runs in a worker process. Returns the number of objects."""
    from triageseg.datasets.io import write_labels

    labels = watershed(probs, params)
    out_dir = Path(out_dir)
    if overlays:
        write_overlay(out_dir / "overlays" / f"{name}.png", image, labels)
    if rois:
        write_rois(out_dir / f"{name}.rois.zip", labels)
    # the label file last: its presence marks the input as done for a resumed run
    write_labels(out_dir / f"{name}.tif", labels, pixel_size=pixel_size)
    return _n_objects(labels)


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
    return {Path(r.get("output", "")).stem: r for r in rows if r.get("output")}


def _write_routing(path: Path, rows: dict[str, dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=ROUTING_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for name in sorted(rows):
        writer.writerow(rows[name])
    write_text_atomic(path, buf.getvalue())


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
) -> dict[str, Any]:
    """The settings that decide what the label images are (``OUTPUT_SETTINGS``), as recorded in segment_config.json."""
    return {"bundle": os.path.abspath(bundle), "modality": modality, "tile_size": tile_size, "tta": bool(tta),
            "channel": channel, "page": page, "level": level}


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

    Reads the TIFF structure only (no pixels): the file must open, its image data must lie
    within the file (a cut-off write is caught) and its height and width must be ``shape``.
    """
    import tifffile

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
            extents = zip(page.dataoffsets, page.databytecounts, strict=True)
            end = max((int(o) + int(n) for o, n in extents), default=0)
    except Exception as err:  # noqa: BLE001 - tifffile raises many types for broken files
        return f"not a readable TIFF ({err})"
    if end > size:
        return f"truncated ({size} bytes; its image data runs to byte {end})"
    if shape is not None and found != tuple(shape[:2]):
        return f"shape {found} differs from its input's {tuple(shape[:2])}"
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
