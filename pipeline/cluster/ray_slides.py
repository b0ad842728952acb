"""Many huge images at once on a Ray cluster: the scheduler of the block path's Ray units.

:class:`SlideRun` runs the units of :mod:`~triageseg.pipeline.cluster.ray_blocks` (scan task, band
actors, decode tasks) and a finish task per slide, all slides interleaved, from one
driver loop: a ``ray.wait`` over the work in flight, each band's chunk checksums recorded
in its slide's store state (the driver is its one writer; decode tasks write their own
block files, so no object passes through the driver), the next steps queued.
:class:`SlidesThread` runs it beside the Ray Data pass over a run's small images, so
slides and small images share one run.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from triageseg.pipeline.blockwise.blocks import plan_blocks
from triageseg.pipeline.blockwise.journal import Journal, claim_outputs, journal_location
from triageseg.pipeline.blockwise.large import BlockOptions, _fingerprint, open_source, segment_large_file
from triageseg.pipeline.blockwise.location import child
from triageseg.pipeline.blockwise.probstore import ProbabilityStore
from triageseg.pipeline.cluster.ray_blocks import (
    BAND_CHUNK_ROWS,
    BandActor,
    _decode,
    _record,
    _scan_and_route,
    band_spans,
)
from triageseg.pipeline.local.records import routing_row


def _finish(bundle: str, settings: dict, path: str, out_dir: str, name: str, modality, channel,
            options: BlockOptions, key: dict, journal_at=None) -> dict:
    """Numbering, rendering and the label file of a slide whose journal is complete (a CPU task); its row.

    An OME-Zarr label pyramid is written by band tasks this task starts
    (:class:`~triageseg.pipeline.cluster.ray_blocks.RayLabelTasks`).

    The task's Pipeline has the driver's settings, so the journal's key is the driver's: a
    key that differs would make segment_large_file start the slide again here, on one CPU,
    so it is refused instead.
    """
    from triageseg.pipeline.local.single import Pipeline

    pipe = Pipeline(bundle, **settings)
    here = json.loads(json.dumps(_fingerprint(pipe, Path(path), options, modality, channel)))
    if here != key:
        changed = sorted(k for k in {*here, *key} if here.get(k) != key.get(k))
        raise ValueError(f"{path}: the finishing task sees another journal key ({', '.join(changed)} differ) than "
                         "the driver; is the input or the bundle on a folder every node reads the same?")
    from triageseg.datasets.zarrpyramid import label_tasks
    from triageseg.pipeline.cluster.ray_blocks import RayLabelTasks

    # an OME-Zarr's pyramid bands as Ray tasks (a TIFF is written here, strip by strip)
    with label_tasks(RayLabelTasks() if options.format == "ome-zarr" else None):
        return segment_large_file(pipe, path, out_dir, name, modality=modality, channel=channel, options=options,
                                  journal_at=journal_at)


@dataclass
class _Slide:
    """One slide of a run, from its lock to its label file."""

    item: dict  # index, file, name, source (the resolved path)
    t0: float
    lock: contextlib.ExitStack
    journal: Journal
    key: dict
    state: dict | None = None
    shape: tuple[int, int] = (0, 0)
    store: ProbabilityStore | None = None
    bands: int = 0  # bands queued or in flight
    blocks: int = 0  # block decodes queued or in flight
    failed: bool = False


@dataclass
class SlideStats:
    """Where the band actors' time went (for the share of time they sat idle)."""

    actors_started: int = 0
    actor_seconds: float = 0.0  # actors' lives, from their start to their stop, summed (start and loads included)
    band_seconds: float = 0.0  # seconds the actors spent computing bands, summed
    bands: int = 0
    blocks: int = 0

    @property
    def idle_share(self) -> float:
        """The share of the actors' lives not spent on bands (actor start and model loads count as idle)."""
        return 1.0 - self.band_seconds / self.actor_seconds if self.actor_seconds > 0 else 0.0


class SlideRun:
    """Many huge images as interleaved Ray work: scan tasks, one band actor pool, decode tasks, finish tasks.

    Ray must be initialised and ``out`` must be a folder every node reads and writes. The
    slides' journals live beside their labels, or under ``scratch`` (a shared folder or an
    object-store URI such as ``s3://bucket/prefix``:
    :func:`~triageseg.pipeline.blockwise.journal.journal_location`).
    :meth:`run` calls ``on_done(item, row)`` with each finished slide's routing.csv row
    (``seconds`` included) and ``on_fail(item, error)`` with each failure (it may raise to
    stop the run: the actors are stopped, the journals kept for a rerun).
    """

    def __init__(self, pipe, out: str | os.PathLike, options: BlockOptions, *, modality=None, channel=None,
                 actors: int = 1, cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0,
                 band_chunk_rows: int = BAND_CHUNK_ROWS, max_tasks: int | None = None, scratch=None,
                 log: Callable[[str], None] = lambda _m: None, on_done=None, on_fail=None, stop=None):
        import ray

        self.pipe, self.out, self.options = pipe, Path(out), options
        self.modality, self.channel = modality, channel
        self.max_actors, self.cpus, self.gpus = max(1, int(actors)), cpus_per_actor, gpus_per_actor
        self.band_chunk_rows = band_chunk_rows
        self.scratch = None if scratch is None else os.fspath(scratch)
        self.max_tasks = max_tasks or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        self.log, self.on_done, self.on_fail, self.stop = log, on_done, on_fail, stop
        self.bundle = str(Path(pipe.path).resolve())
        self.settings = {"device": "cuda" if gpus_per_actor > 0 else "cpu", "tile_size": pipe.tile_size,
                         "overlap": pipe.overlap, "batch_size": pipe.batch_size, "tta": pipe.tta,
                         "unknown": pipe.unknown, "backend": pipe.backend, "precision": pipe.precision,
                         "prob_dtype": getattr(pipe, "prob_dtype", "float32"),
                         "diameter": pipe.diameter, "use_pixel_size": pipe.use_pixel_size}
        self.stats = SlideStats()
        self.waiting: deque = deque()  # items not opened yet
        self.open: dict[int, _Slide] = {}  # slides opened and not finished, by id
        self.max_open = 2 * self.max_actors + 2  # slides open at once (locks, journals): enough to feed the actors
        self.scanning = 0  # scans queued or in flight
        self.pending: dict = {}  # ObjectRef -> (kind, slide, band actor or None)
        self.bands: deque = deque()  # (slide, (y0, y1)) waiting for an actor
        self.tasks: deque = deque()  # (kind, slide, thunk -> ObjectRef) waiting for a task slot; scans first
        self.idle: list = []  # band actors with nothing to do
        self.born: dict = {}  # band actor -> when it was started
        self.running = 0  # tasks in flight

    # ---- the loop

    def run(self, items: list[dict]) -> None:
        """Segment ``items`` (``index``, ``file``, ``name``, ``source``), interleaved."""
        import ray

        self._remote = {
            "scan": ray.remote(num_cpus=1, max_retries=-1)(_scan_and_route),
            "decode": ray.remote(num_cpus=1, max_retries=-1)(_decode),  # retried on a lost worker or node
            "finish": ray.remote(num_cpus=1, max_retries=-1)(_finish),
            # a lost actor is restarted and its band retried (a band writes the same bytes again)
            "actor": ray.remote(num_cpus=self.cpus, num_gpus=self.gpus or None, max_restarts=-1,
                                max_task_retries=-1)(BandActor),
        }
        self.waiting.extend(items)
        try:
            while self.waiting or self.pending or self.bands or self.tasks:
                if self.stop is not None and self.stop.is_set():
                    return
                self._dispatch()
                if not self.pending:
                    continue
                ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=1.0)
                for ref in ready:
                    self._returned(ref)
        finally:
            self._stop_actors(self.idle + [a for _, _, a in self.pending.values() if a is not None])
            for slide in self.open.values():
                slide.lock.close()

    def _dispatch(self) -> None:
        """Bands to actors (started as needed), new slides while few bands wait, tasks to free slots.

        Idle actors are stopped when no band waits: one holding a CPU could starve a scan or
        a decode (or a restarted actor, after a node was lost) of it.
        """
        while self.bands and (self.idle or len(self.born) < self.max_actors):
            slide, span = self.bands.popleft()
            if slide.failed:
                continue
            actor = self.idle.pop() if self.idle else self._start_actor()
            state = slide.state
            ref = actor.band.remote(str(slide.item["source"]), self.options.level, state["norm"], state["used_model"],
                                    state.get("scale"), str(slide.store.folder), slide.shape, *span)
            self.pending[ref] = ("band", slide, actor)
        if not self.bands and self.idle:
            self._stop_actors(self.idle)
            self.idle = []
        # the next slides are opened (scanned) while the current ones' bands run, so the actors go on
        while (self.waiting and len(self.open) < self.max_open and len(self.bands) < 2 * self.max_actors
               and self.scanning < self.max_actors):
            self._open(self.waiting.popleft())
        while self.tasks and self.running < self.max_tasks:
            kind, slide, submit = self.tasks.popleft()
            if slide.failed:
                self.scanning -= kind == "scan"
                continue
            self.pending[submit()] = (kind, slide, None)
            self.running += 1

    def _start_actor(self):
        actor = self._remote["actor"].remote(self.bundle, self.settings, max(1, int(self.cpus)))
        self.born[actor] = time.perf_counter()
        self.stats.actors_started += 1
        return actor

    def _stop_actors(self, actors) -> None:
        import ray

        for actor in actors:
            born = self.born.pop(actor, None)
            if born is not None:
                self.stats.actor_seconds += time.perf_counter() - born
                ray.kill(actor)

    def _returned(self, ref) -> None:
        """A band, scan, decode or finish is back: record it and queue what follows."""
        import ray

        kind, slide, actor = self.pending.pop(ref)
        if actor is not None:
            self.idle.append(actor)
        else:
            self.running -= 1
            self.scanning -= kind == "scan"
        try:
            value = ray.get(ref)
        except Exception as err:  # noqa: BLE001 - a failure of this slide (retries are Ray's, for lost nodes)
            cause = getattr(err, "cause", None)  # a task's own error (a DataError naming the file), not Ray's wrapper
            self._fail(slide, cause if isinstance(cause, Exception) else err)
            return
        if slide.failed:
            return
        try:
            getattr(self, f"_{kind}_done")(slide, value)
        except Exception as err:  # noqa: BLE001 - a damaged journal, a store left incomplete
            self._fail(slide, err)

    # ---- one slide's steps

    def _open(self, item: dict) -> None:
        """Claim the slide's outputs and open its journal; its scan queued, or its bands when scanned before."""
        path = Path(item["source"])
        lock = contextlib.ExitStack()
        slide = None
        try:
            lock.enter_context(claim_outputs(self.out, item["name"]))
            key = _fingerprint(self.pipe, path, self.options, self.modality, self.channel)
            journal = Journal(journal_location(self.out, item["name"], self.scratch), key)
            slide = _Slide(item, time.perf_counter(), lock, journal, json.loads(json.dumps(key)))
            self.open[id(slide)] = slide
            if slide.journal.state is None:
                self.scanning += 1
                self.tasks.appendleft(("scan", slide, lambda: self._remote["scan"].remote(
                    self.bundle, self.settings, str(path), self.options.level, self.channel, self.modality)))
            else:
                self._plan(slide, slide.journal.state)
        except Exception as err:  # noqa: BLE001 - a bad file, another run holding the lock
            lock.close()
            self.open.pop(id(slide), None)
            self._report_failure(item, err)

    def _scan_done(self, slide: _Slide, state: dict) -> None:
        if state.pop("skipped"):  # an unknown modality under --unknown skip: a row, no label file
            slide.journal.remove()
            row = routing_row(Path(slide.item["source"]), slide.item["name"], state["modality"], state["confidence"],
                              state["used_model"], state["decision"], mode="blocks", ood_score=state["ood_score"])
            self._done(slide, {**row, "objects": 0})
            return
        slide.journal.set_state(state)
        self._plan(slide, state)

    def _plan(self, slide: _Slide, state: dict) -> None:
        """Queue the slide's unfinished bands (or, with none, its unfinished blocks)."""
        with open_source(slide.item["source"], level=self.options.level) as (source, _):
            slide.shape = (int(source.shape[0]), int(source.shape[1]))
        slide.state = state
        slide.store = ProbabilityStore(child(slide.journal.folder, "probs.zarr"), slide.shape,
                                       dtype=getattr(self.pipe, "prob_dtype", "float32"))
        bands = band_spans(slide.store.missing(), slide.shape[0], self.band_chunk_rows)
        grid = plan_blocks(slide.shape, block_size=self.options.block_size, margin=self.options.margin)
        todo = len(grid) - len(slide.journal.done() & set(range(len(grid))))
        self.log(f"blocks: {slide.item['file']}: {len(bands)} of "
                 f"{len(band_spans([(0, slide.shape[0])], slide.shape[0], self.band_chunk_rows))} band(s), "
                 f"{todo} of {len(grid)} block(s) to do")
        slide.bands = len(bands)
        self.bands.extend((slide, span) for span in bands)
        if not bands:
            self._decodes(slide)

    def _band_done(self, slide: _Slide, value: tuple[dict, float]) -> None:
        sums, seconds = value
        _record(slide.store, sums)
        self.stats.band_seconds += seconds
        self.stats.bands += 1
        slide.bands -= 1
        if slide.bands == 0:
            self._decodes(slide)

    def _decodes(self, slide: _Slide) -> None:
        """Queue the decode of every unfinished block of a slide whose probabilities are complete."""
        if not slide.store.complete:
            raise ValueError(f"{slide.item['file']}: probability rows {slide.store.missing()} missing after the "
                             "band tasks")
        grid = plan_blocks(slide.shape, block_size=self.options.block_size, margin=self.options.margin)
        state = slide.state
        params = self.pipe.params(state["used_model"], state.get("scale")).to_dict()  # thresholds follow the scale
        done = slide.journal.done()
        args = (str(slide.store.folder), slide.shape, grid.to_dict())
        todo = [b.index for b in grid.blocks if b.index not in done]
        slide.blocks = len(todo)
        for index in todo:
            self.tasks.append(("decode", slide, lambda i=index: self._remote["decode"].remote(*args, i, params)))
        if not todo:
            self._finish(slide)

    def _decode_done(self, slide: _Slide, _index: int) -> None:
        self.stats.blocks += 1
        slide.blocks -= 1
        if slide.blocks == 0:
            self._finish(slide)

    def _finish(self, slide: _Slide) -> None:
        """Queue the finish task; the driver lets go of the slide's lock first (the task takes it)."""
        slide.lock.close()
        item, settings = slide.item, {**self.settings, "device": self.pipe.device_name}  # the driver's key
        self.tasks.append(("finish", slide, lambda: self._remote["finish"].remote(
            self.bundle, settings, str(item["source"]), str(self.out), item["name"], self.modality, self.channel,
            self.options, slide.key, None if self.scratch is None else str(slide.journal.folder))))

    def _finish_done(self, slide: _Slide, row: dict) -> None:
        self._done(slide, row)

    def _done(self, slide: _Slide, row: dict) -> None:
        slide.lock.close()
        self.open.pop(id(slide), None)
        row = {**row, "seconds": f"{time.perf_counter() - slide.t0:.3f}"}
        if self.on_done is not None:
            self.on_done(slide.item, row)

    def _fail(self, slide: _Slide, err: BaseException) -> None:
        if slide.failed:
            return
        slide.failed = True  # its queued bands and tasks are dropped, its results in flight ignored
        slide.lock.close()
        self.open.pop(id(slide), None)
        self._report_failure(slide.item, err)

    def _report_failure(self, item: dict, err: BaseException) -> None:
        if self.on_fail is None:
            raise err
        self.on_fail(item, err)


def segment_slides(pipe, big: list[dict], out: str, journal, report, options, blocks, *, modality, channel,
                   on_error: str, log: Callable[[str], None], stop=None) -> SlideStats:
    """The huge images of a :func:`~triageseg.pipeline.cluster.distributed.segment_files_ray` run, all at once.

    Each routing.csv row goes to the run's ``journal`` and ``report``, a failure to
    ``on_error`` as for the other images. ``stop`` (a ``threading.Event``): set, the run
    stops at its next step (the small images' pass failed).
    """
    from triageseg.datasets.errors import DataError
    from triageseg.pipeline.cluster.distributed import _as_input, pool_size
    from triageseg.pipeline.local.batch import _fail, format_quality
    from triageseg.ray_cluster import cluster_info, is_uri

    blocks = BlockOptions() if blocks is None else blocks
    if is_uri(out):
        for item in big:
            _fail(report, _as_input(item["file"]), DataError(item["file"], "block-wise images on Ray need --out on a "
                  "shared folder (the labels are written there; --scratch may put the block journal on object "
                  "storage), not a URI"), on_error)
        return SlideStats()
    # every CPU a band actor: a CPU kept for the decodes idles while the bands run (a 16000 x 16000 slide on two
    # nodes of 1 CPU: with one band actor one node idled through the bands; with two, 0.96x the local block path)
    low, high = pool_size(options, cluster_info(), spare_cpu=False)
    log(f"blocks: {len(big)} image(s), up to {high} band actor(s)")

    def done(item: dict, row: dict) -> None:
        row["file"] = item["file"]
        row["quality"] = format_quality(row.get("quality"))
        journal.add(item["name"], row)
        if row.get("used_model"):
            report.rows.append(row)
            report.written.append(Path(out) / row["output"])
        else:
            report.unknown_skipped.append(_as_input(item["file"]))

    def failed(item: dict, err: BaseException) -> None:
        if on_error == "fail":
            journal.flush()
        _fail(report, _as_input(item["file"]), err, on_error)

    run = SlideRun(pipe, out, blocks, modality=modality, channel=channel, actors=high,
                   cpus_per_actor=options.cpus_per_actor or 1.0, gpus_per_actor=options.gpus_per_actor,
                   band_chunk_rows=getattr(options, "band_chunk_rows", BAND_CHUNK_ROWS),
                   scratch=getattr(options, "scratch", None), log=log, on_done=done,
                   on_fail=failed, stop=stop)
    run.run(big)
    return run.stats


class SlidesThread:
    """The block-wise images of a run (:func:`segment_slides`) in a driver thread, beside the small images' pass."""

    def __init__(self, pipe, big: list[dict], out: str, journal, report, options, blocks, *, modality, channel,
                 on_error: str, log: Callable[[str], None]):
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.report, self.journal = report, journal
        self.thread = None
        if big:
            args = (pipe, big, out, journal, report, options, blocks)
            kwargs = {"modality": modality, "channel": channel, "on_error": on_error, "log": log, "stop": self.stop}
            self.thread = threading.Thread(target=self._run, args=args, kwargs=kwargs, name="triageseg-slides",
                                           daemon=True)
            self.thread.start()

    def _run(self, *args, **kwargs) -> None:
        try:
            self.report.slides = segment_slides(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 - raised in the caller's thread by join()
            self.error = err

    def join(self) -> None:
        """Wait for the slides; raise what stopped them (a bad slide under ``--on-error fail``)."""
        if self.thread is None:
            return
        try:
            while self.thread.is_alive():
                self.thread.join(timeout=0.5)  # short waits: Ctrl-C still reaches the driver
        except BaseException:
            self.stop.set()
            raise
        finally:
            self.journal.flush()
        if self.error is not None:
            raise self.error
