"""Many image files on this machine: read-ahead, worker processes, routing.csv, resume.

:func:`segment_files` is what ``triageseg segment`` runs: it reads one image ahead in a
thread (reading and routing overlap with the segmenter), decodes and writes in worker
processes, writes every output atomically and skips inputs whose outputs exist, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import csv
import io
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from triageseg.datasets.atomic import write_text_atomic
from triageseg.datasets.errors import DataError
from triageseg.pipeline.outputs import write_overlay, write_rois
from triageseg.postprocess.watershed import watershed

ROUTING_COLUMNS = ("file", "output", "modality", "confidence", "used_model", "decision", "objects", "seconds")


@dataclass
class BatchReport:
    """Outcome of :func:`segment_files`."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failures: list[tuple[Path, str]] = field(default_factory=list)
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
    names: Sequence[str] | None = None,
    progress: Callable[[Path], None] | None = None,
) -> BatchReport:
    """Segment files with ``pipe`` (a :class:`~triageseg.pipeline.single.Pipeline`) into ``out_dir``: ``<name>.tif`` labels plus ``routing.csv``.

    Reading runs one image ahead in a thread and the watershed (plus writing) runs in
    ``workers`` processes, so the segmenter's device is not left waiting on the CPU.
    Outputs are written atomically; inputs whose outputs exist are skipped unless
    ``overwrite``, so an interrupted run resumes where it stopped.

    Args:
        inputs: image files.
        out_dir: output folder.
        modality: force this specialist (skip the router).
        overwrite: redo inputs whose label file already exists.
        on_error: ``"fail"`` stops at the first bad input; ``"skip"`` records it and goes on.
        workers: processes for watershed + writing (0: in this process).
        overlays: also write ``overlays/<name>.png`` with outlines on the image (a subfolder,
            so ``out_dir`` stays a folder of label images that ``evaluate`` can read).
        rois: also write ``<name>.rois.zip`` (ImageJ/Fiji ROI set).
        channel: channel to use for images with 2 or more than 3 channels.
        names: output names (without extension), one per input; default the input stems.
        progress: called with each input path when it is done.
    """
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in inputs]
    names = output_names(paths, names)
    if modality is not None:
        pipe.check_modality(modality)  # fail fast, before any file is read

    report = BatchReport()
    routing_path = out_dir / "routing.csv"
    previous = _read_routing(routing_path)
    todo: list[tuple[Path, str]] = []
    for p, n in zip(paths, names):
        target = out_dir / f"{n}.tif"
        if target.exists() and not overwrite:
            report.skipped.append(p)
            if progress:
                progress(p)
        else:
            previous.pop(n, None)
            todo.append((p, n))

    start = time.perf_counter()
    # spawn, not fork: forking a process that holds torch threads can deadlock
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) if workers > 0 else None
    pending: list[tuple[Path, str, dict, Future | None, object]] = []

    def finish(item) -> None:
        path, name, row, fut, value = item
        try:
            n_objects = fut.result() if fut is not None else value
        except Exception as err:  # noqa: BLE001 - reported per file, policy decides
            _fail(report, path, err, on_error)
        else:
            row["objects"] = n_objects
            row["seconds"] = f"{time.perf_counter() - row.pop('_t0'):.3f}"
            report.rows.append(row)
            report.written.append(out_dir / f"{name}.tif")
            previous[name] = row
            _write_routing(routing_path, previous)
        if progress:
            progress(path)

    def prepare(path: Path):
        # runs in the reader thread: reading and routing overlap with the segmenter
        image, pixel_size = read_input(path, channel=channel)
        return image, pixel_size, pipe.decide(image, modality)

    try:
        for path, name, loaded in _prefetch(todo, prepare):
            t0 = time.perf_counter()
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
            job = (probs, pipe.params(used), out_dir, name, pixel_size, image if (overlays or rois) else None, overlays, rois)
            if pool is not None:
                pending.append((path, name, row, pool.submit(_decode_and_write, *job), None))
                # keep memory bounded: at most 2 jobs per worker in flight
                while len(pending) > 2 * workers:
                    finish(pending.pop(0))
            else:
                try:
                    value = _decode_and_write(*job)
                except Exception as err:  # noqa: BLE001
                    _fail(report, path, err, on_error)
                    if progress:
                        progress(path)
                    continue
                finish((path, name, row, None, value))
        while pending:
            finish(pending.pop(0))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    report.seconds = time.perf_counter() - start
    return report


def output_names(inputs: Sequence, names: Sequence[str] | None = None) -> list[str]:
    """Output names (without extension), one per input; default the input stems.

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


def read_input(path: str | os.PathLike, *, channel: int | None = None) -> tuple[np.ndarray, tuple[float, float] | None]:
    """The normalised HxWx3 image and the pixel size (microns, or None) of one input file."""
    from triageseg.datasets.io import read_image, read_pixel_size

    return read_image(path, channel=channel), read_pixel_size(path)


def routing_row(path, name: str, modality: str, confidence: float | None, used_model: str, decision: str) -> dict:
    """The routing.csv columns known before segmenting (``objects`` and ``seconds`` come after)."""
    return {
        "file": str(path),
        "output": f"{name}.tif",
        "modality": modality,
        "confidence": "" if confidence is None else f"{confidence:.4f}",
        "used_model": used_model,
        "decision": decision,
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
