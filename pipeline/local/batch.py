"""Many image files on this machine: read-ahead, worker processes, routing.csv, resume.

:func:`segment_files` is what ``triageseg segment`` runs: it reads one image ahead in a
thread (reading and routing overlap with the segmenter), decodes and writes in worker
processes, writes every output atomically and skips inputs whose outputs exist and
verify, so an interrupted run resumes where it stopped.

What keeps a run safe (outputs apart from inputs, settings checked on resume, label
files verified, the routing journal) is in :mod:`triageseg.pipeline.local.records`, which a
distributed path calls too.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from triageseg.datasets.atomic import write_json_atomic
from triageseg.datasets.errors import DataError
from triageseg.pipeline.blockwise.large import BlockOptions, segment_large_file, use_blocks
from triageseg.pipeline.local.outlock import out_dir_lock
from triageseg.pipeline.local.records import (  # noqa: F401 - re-exported: the names batch callers import
    FAILURES_CSV,
    JOURNAL,
    OUTPUT_SETTINGS,
    ROUTING_COLUMNS,
    ROUTING_CSV,
    SEGMENT_CONFIG,
    OutputConflict,
    RoutingJournal,
    _n_objects,
    _read_routing,
    _write_routing,
    check_outputs_apart,
    check_settings,
    label_record,
    output_settings,
    read_routing,
    rebuild_rows,
    routing_row,
    verify_output,
    write_failures,
)
from triageseg.pipeline.local.remake import Extras, missing_outputs, remake_outputs, write_extras
from triageseg.postprocess.watershed import watershed
from triageseg.router.policy import UNKNOWN_DECISION

# Returned by the reader thread for an image that goes block-wise (read block by block later, never whole).
_BLOCKWISE = object()
# Without --workers, decode (watershed + writes) in one thread, overlapped with the next image's network.
DECODE_THREAD = True


@dataclass
class BatchReport:
    """Outcome of :func:`segment_files`."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failures: list[tuple[Path, str]] = field(default_factory=list)
    incomplete: list[tuple[Path, str]] = field(default_factory=list)  # existing outputs that failed verification
    unknown: list[tuple[Path, str]] = field(default_factory=list)  # (input, decision) called an unknown modality
    unknown_skipped: list[Path] = field(default_factory=list)  # of those, the ones skipped (--unknown skip)
    remade: list[Path] = field(default_factory=list)  # outputs made from the label files of skipped inputs
    rebuilt: int = 0  # routing.csv rows rebuilt from the label files
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
    """Segment files with ``pipe`` (a :class:`~triageseg.pipeline.local.single.Pipeline`) into ``out_dir``: ``<name>.tif`` labels plus ``routing.csv``.

    Reading runs one image ahead in a thread and the watershed (plus writing) runs in
    ``workers`` processes, so the segmenter's device is not left waiting on the CPU.
    Outputs are written atomically; inputs whose label file exists and verifies (it opens
    and has the input's height and width) are skipped unless ``overwrite``, so an
    interrupted run resumes where it stopped. The settings are recorded in
    ``segment_config.json`` and a resumed run must use the same ones. Failures skipped
    under ``on_error="skip"`` are listed in ``failures.csv``. SIGTERM stops the run like
    Ctrl-C: the worker processes are shut down and finished rows kept (and a worker whose
    parent dies exits). Outputs asked for but missing or damaged beside a verified label
    file are made from it; rows missing from ``routing.csv`` are rebuilt from the label
    files (each stores its row). A second run into ``out_dir`` is refused while one runs.

    Args:
        inputs: image files.
        out_dir: output folder.
        modality: force this specialist (skip the router).
        overwrite: redo inputs whose label file already exists, whatever settings made it.
        on_error: ``"fail"`` stops at the first bad input; ``"skip"`` records it and goes on.
        workers: processes for watershed + writing (0: in this process).
        overlays: also write ``overlays/<name>.png`` with outlines on the image (a subfolder,
            so ``out_dir`` stays a folder of label images that ``evaluate`` can read).
        rois: also write ``<name>.rois.zip`` (ImageJ/Fiji ROI set). ``blocks.geojson``: also
            ``<name>.geojson`` (QuPath outlines), in memory and block-wise.
        channel: channel to use for images with 2 or more than 3 channels (or for the pages
            of a 2-4 page TIFF without axis metadata).
        page: plane to read from multi-page TIFFs (see :func:`~triageseg.datasets.io.read_image`).
        names: output names (without extension), one per input; default the input stems.
        progress: called with each input path when it is done.
        blocks: :class:`~triageseg.pipeline.blockwise.large.BlockOptions`: when an image is large enough
            to go block-wise (``mode`` = ``blocks`` in routing.csv) and how.

    Raises:
        OutputConflict: another run is writing into ``out_dir``; ``routing.csv`` is
            unreadable; an output would overwrite or shadow an input, or ``out_dir`` holds
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
                               diameter=pipe.diameter,
                               channel=channel, page=page, level=blocks.level)
    out_dir.mkdir(parents=True, exist_ok=True)
    with out_dir_lock(out_dir):  # a second run into out_dir is refused: it would lose this run's rows
        check_settings(out_dir, settings, overwrite=overwrite)
        write_json_atomic(out_dir / SEGMENT_CONFIG, {**settings, "device": pipe.device_name,
                                                      "batch_size": pipe.batch_size, "workers": workers,
                                                      "n_inputs": len(paths), **blocks.to_config()})
        return _segment_locked(pipe, paths, names, out_dir, modality=modality, overwrite=overwrite,
                               on_error=on_error, workers=workers, extras=Extras(overlays, rois, blocks.geojson),
                               channel=channel, page=page, progress=progress, blocks=blocks)


def _segment_locked(pipe, paths, names, out_dir: Path, *, modality, overwrite, on_error, workers, extras: Extras,
                    channel, page, progress, blocks: BlockOptions) -> BatchReport:
    """:func:`segment_files` once the output folder is locked and its settings checked."""
    report = BatchReport()
    journal = RoutingJournal(out_dir)
    rows = journal.recover(read_routing(out_dir / ROUTING_CSV))
    report.rebuilt = len(rebuild_rows(out_dir, rows))  # rows lost from routing.csv, from their label files
    if report.rebuilt:
        _write_routing(out_dir / ROUTING_CSV, rows)
    todo, done = _plan(paths, names, out_dir, rows, report, overwrite=overwrite, page=page, level=blocks.level,
                       suffix=blocks.suffix)
    start = time.perf_counter()
    _remake(done, out_dir, rows, report, extras=extras, channel=channel, page=page, blocks=blocks,
            on_error=on_error, progress=progress)
    try:
        with _sigterm_as_interrupt():
            _run(pipe, todo, out_dir, rows, journal, report, modality=modality, on_error=on_error, workers=workers,
                 extras=extras, channel=channel, page=page, progress=progress, blocks=blocks)
    finally:
        journal.close()
    journal.clear()  # the run was not interrupted: routing.csv holds every row
    write_failures(out_dir, report.failures)
    report.seconds = time.perf_counter() - start
    return report


def _plan(paths, names, out_dir: Path, rows: dict[str, dict], report: BatchReport, *, overwrite: bool,
          page: int | None, level: int = 0, suffix: str = ".tif") -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """(to segment, done): the inputs without a verified label file (all of them with ``overwrite``), the others."""
    from triageseg.datasets.lazy import image_size
    from triageseg.datasets.shapes import image_shape

    todo: list[tuple[Path, str]] = []
    done: list[tuple[Path, str]] = []
    for p, n in zip(paths, names):
        target = out_dir / f"{n}{suffix}"
        if target.exists() and not overwrite:
            try:
                problem = verify_output(target, image_size(p, level=level) if level or str(p).endswith(".zarr")
                                        else image_shape(p, page=page))
            except DataError:
                problem = ""  # the input itself is bad: segmenting it again reports why
            if problem is None:
                report.skipped.append(p)
                done.append((p, n))
                continue
            if problem:
                report.incomplete.append((target, problem))
        rows.pop(n, None)
        todo.append((p, n))
    return todo, done


def _remake(done, out_dir: Path, rows: dict[str, dict], report: BatchReport, *, extras: Extras, channel, page,
            blocks: BlockOptions, on_error: str, progress) -> None:
    """Make the outputs of skipped inputs that are asked for now but missing or damaged, from their label files."""
    for path, name in done:
        try:
            blockwise = use_blocks(path, blocks)
            kinds = missing_outputs(out_dir, name, extras.kinds(blockwise=blockwise))
            if kinds:
                report.remade += remake_outputs(
                    path, name, out_dir, kinds, rows.get(name), blockwise=blockwise, level=blocks.level,
                    read_input=lambda p: read_input(p, channel=channel, page=page))
        except Exception as err:  # noqa: BLE001 - reported per file, policy decides
            _fail(report, path, err, on_error)
        if progress:
            progress(path)


def _run(pipe, todo, out_dir: Path, rows: dict[str, dict], journal: RoutingJournal, report: BatchReport, *,
         modality, on_error, workers, extras: Extras, channel, page, progress, blocks: BlockOptions) -> None:
    """Segment ``todo``: read ahead, run the segmenter here, decode and write aside (:func:`_decoders`)."""
    routing_path = out_dir / ROUTING_CSV
    pool, in_flight = _decoders(workers)
    pending: list[tuple[Path, str, dict, Future]] = []

    def record(name: str, row: dict, n_objects: int, quality: float | None = None, *, write: bool = True) -> None:
        row["objects"] = n_objects
        row["quality"] = format_quality(quality)
        row["seconds"] = f"{time.perf_counter() - row.pop('_t0'):.3f}"
        if row["decision"].startswith(UNKNOWN_DECISION):
            report.unknown.append((Path(row["file"]), row["decision"]))
        rows[name] = row
        if not row["used_model"]:  # skipped as an unknown modality: a row, no label file
            report.unknown_skipped.append(Path(row["file"]))
            _write_routing(routing_path, rows)
            return
        report.rows.append(row)
        report.written.append(out_dir / (row.get("output") or f"{name}.tif"))
        if write:
            _write_routing(routing_path, rows)
            journal.done(name)

    def finish_first() -> None:
        path, name, row, fut = pending[0]
        try:
            n_objects, quality = fut.result()
        except Exception as err:  # noqa: BLE001 - reported per file, policy decides
            pending.pop(0)
            _fail(report, path, err, on_error)
        else:
            pending.pop(0)
            record(name, row, n_objects, quality)
        if progress:
            progress(path)

    def settle() -> None:
        # the decode thread keeps the sequential order: a row recorded here waits for the images before it
        if workers == 0:
            while pending:
                finish_first()

    def prepare(path: Path):
        # runs in the reader thread: reading and routing overlap with the segmenter
        if use_blocks(path, blocks):
            return _BLOCKWISE
        image, pixel_size = read_input(path, channel=channel, page=page)
        return image, pixel_size, pipe.decide(image, modality, pixel_size=pixel_size)

    try:
        for path, name, loaded in _prefetch(todo, prepare):
            t0 = time.perf_counter()
            if loaded is _BLOCKWISE:  # a huge image: block by block, streamed to disk (pipeline.blockwise.large)
                try:
                    if page is not None:
                        raise DataError(path, "page selection is not available for images segmented block-wise")
                    row = segment_large_file(pipe, path, out_dir, name, modality=modality, channel=channel,
                                             options=blocks, before_write=lambda r, n=name: journal.start(
                                                 n, r, out_dir / f"{n}{blocks.suffix}"))
                except Exception as err:  # noqa: BLE001
                    settle()
                    _fail(report, path, err, on_error)
                else:
                    settle()
                    row["_t0"] = t0
                    record(name, row, row.pop("objects"), row.pop("quality", None))
                if progress:
                    progress(path)
                continue
            try:
                if isinstance(loaded, BaseException):
                    raise loaded
                image, pixel_size, d = loaded
                mod, conf, used, decision, score = d[:5]
                probs = None if not used else pipe.probabilities(image, used, d.scale)
            except Exception as err:  # noqa: BLE001
                settle()
                _fail(report, path, err, on_error)
                if progress:
                    progress(path)
                continue
            row = {**routing_row(path, name, mod, conf, used, decision, ood_score=score, size=d), "_t0": t0}
            if probs is None:  # an unknown modality under --unknown skip
                settle()
                record(name, row, 0)
                if progress:
                    progress(path)
                continue
            job = (probs, pipe.params(used, d.scale), out_dir, name, pixel_size, image if extras.overlays else None,
                   extras.kinds(blockwise=False), pipe.quality_model(used), conf, row)
            journal.start(name, row, out_dir / f"{name}.tif")
            if pool is not None:
                pending.append((path, name, row, pool.submit(_decode_and_write, *job)))
                # keep memory bounded: at most 2 jobs per worker (1 for the thread) in flight
                while len(pending) > in_flight:
                    finish_first()
                continue
            try:
                n_objects, quality = _decode_and_write(*job)
            except Exception as err:  # noqa: BLE001
                _fail(report, path, err, on_error)
                if progress:
                    progress(path)
                continue
            record(name, row, n_objects, quality)
            if progress:
                progress(path)
        while pending:
            finish_first()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
            if pending:  # interrupted: keep the rows of the jobs the workers finished
                _keep_finished(pending, record, routing_path, rows, journal)


def _decoders(workers: int):
    """(executor for :func:`_decode_and_write` or None, how many jobs may be in flight).

    ``workers`` processes, two jobs each in flight. Without workers, one thread decodes
    (watershed + writes) the previous image while the network runs on the next: the same
    function on the same inputs, one image at a time, rows in input order. The thread runs at
    a lower priority, or on its own core from 4 cores on
    (:func:`~triageseg.segmenters.threads.network_threads`). None: decode in line.
    """
    from triageseg.segmenters.threads import decode_thread_init

    if workers > 0:  # spawn, not fork: forking a process that holds torch threads can deadlock
        return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init, initargs=(os.getpid(),)), 2 * workers
    if DECODE_THREAD:
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode", initializer=decode_thread_init), 1
    return None, 0


def _keep_finished(pending, record, routing_path: Path, rows: dict[str, dict], journal: RoutingJournal) -> None:
    kept = []
    for _path, name, row, fut in pending:
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            record(name, row, *fut.result(), write=False)
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


def _worker_init(parent_pid: int | None = None) -> None:
    # Ctrl-C reaches the whole process group: the main process shuts the workers down
    # after their current job, so a worker must not die of it mid-write.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if parent_pid is not None:  # a SIGKILLed main process leaves no orphan worker behind
        from triageseg.pipeline.local.procs import die_with_parent

        die_with_parent(parent_pid)
    from triageseg.segmenters.backends import limit_worker_threads

    limit_worker_threads()  # one thread per worker: the network process has the other cores


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


def format_quality(quality: float | None) -> str:
    """The routing.csv cell of a predicted quality: 3 decimals, empty when unknown."""
    return "" if quality is None else f"{quality:.3f}"


def _fail(report: BatchReport, path: Path, err: BaseException, on_error: str) -> None:
    message = str(err)
    if isinstance(err, DataError) and err.path is not None:
        message = err.problem if Path(err.path) == path else str(err)
    if on_error == "fail":
        if isinstance(err, DataError):
            raise err if err.path is not None else type(err)(path, err.problem)
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


def _decode_and_write(probs, params, out_dir, name, pixel_size, image, kinds=(), quality=None,
                      confidence=None, row=None) -> tuple[int, float | None]:
    """Watershed + atomic writes; runs in a worker process.

    ``kinds`` are the outputs besides the label file (:class:`~triageseg.pipeline.local.remake.Extras`);
    ``quality`` is the segmenter's :class:`~triageseg.postprocess.quality.QualityModel` (or
    None) and ``confidence`` the router's; the predicted quality is computed here, where the
    probabilities and the labels both are. ``row`` (the routing row so far) is stored,
    completed, in the label file, so routing.csv can be rebuilt from the label files.

    Returns:
        (number of objects, predicted quality or None).
    """
    from triageseg.datasets.io import write_labels
    from triageseg.postprocess.quality import predict_quality

    labels = watershed(probs, params)
    out_dir = Path(out_dir)
    row = dict(row or {})
    write_extras(out_dir, name, kinds, labels, image=image, modality=str(row.get("modality", "")),
                 pixel_size=pixel_size)
    score = predict_quality(quality, probs, labels, router_confidence=confidence)
    n_objects = _n_objects(labels)
    # the label file last: its presence marks the input as done for a resumed run
    write_labels(out_dir / f"{name}.tif", labels, pixel_size=pixel_size,
                 record=label_record({**row, "objects": n_objects, "quality": score}))
    return n_objects, score
