"""The block path as Ray tasks: huge images spread over a cluster, labels identical to the local block path.

This module holds the units (band actor, scan, decode); :mod:`~triageseg.pipeline.cluster.ray_slides`
schedules them. :class:`~triageseg.pipeline.cluster.ray_slides.SlideRun` does for many slides at once what
:func:`~triageseg.pipeline.blockwise.large.segment_large_file` does for one, with every costly step as
Ray work and the same journal beside each output (``out_dir/.<name>.blocks/``, on storage
every node reads: a shared folder), or under a scratch location (``--scratch``: a shared
folder or object storage, ``s3://bucket/prefix``; see
:func:`~triageseg.pipeline.blockwise.journal.journal_location`):

```
scan + route     one CPU task per slide: normalisation statistics and overview (scan_image),
                 then the routing decision from the overview and crops (Pipeline.decide_overview)
bands            bands of whole probability chunk rows, to ONE pool of BandActors shared by all
                 the run's slides (each actor holds the segmenters it met, loaded once): each band
                 runs the probability stream from its first row (the stream starts at any row and
                 gives the same rows bit for bit) and writes its rows into the slide's
                 ProbabilityStore (zarr); the driver records the chunk checksums each band
                 returns (one writer of the store's state)
block decodes    decode_block of every unfinished block as a CPU task reading windows of the
                 store and writing its BlockResult into the journal (a file per block)
finish           one CPU task: the local segment_large_file on the now complete journal (nothing
                 is computed again): the objects numbered, the cores rendered, the label file
                 written, its routing.csv row returned
```

Slides interleave: the driver queues every slide's bands as soon as its scan is back, the
actors take them in order, and a slide whose bands are done has its blocks decoded and its
labels written by CPU tasks while the actors go on with the next slide's bands. Actors
are started when bands wait and stopped when none do (an idle actor holding a CPU could
starve a scan or a decode of it). Lost workers and nodes cost only their work in
flight: tasks are retried (``max_retries=-1``), actors restarted and their band retried
(a band writes the same bytes again), and everything finished is in the journal, so a
rerun after the driver died resumes at the unfinished bands and blocks.

The block function (:func:`~triageseg.pipeline.blockwise.blocks.decode_block`) and the probability
stream are the units both paths schedule, and the journal is the same, so the labels are
the local block path's, id for id, and a run interrupted on the cluster resumes locally
(or the other way round).

On object storage the journal's files go through fsspec
(:mod:`~triageseg.pipeline.blockwise.location`): the bands write zarr chunks there, the
decodes read windows of them and write their block files there, each file one PUT, and
the chunk checksums are the store's own (ETag and size, from one listing per chunk row);
the labels still go to ``out_dir``, a shared folder (its lock and the label writer are local).

With ``--format ome-zarr`` the label pyramid is written by Ray tasks (:class:`RayLabelTasks`):
the finish task lays out the NGFF group, then every band of chunk rows (of level 0 and the
levels it makes, then of the coarser levels in stages) is a CPU task writing straight into
the zarr's temporary folder beside the output, renamed by the finish task when every band
is in. The bands are the local writer's own calls (:mod:`triageseg.datasets.zarrpyramid`),
so the zarr is the local block path's, array for array.

Not yet (see the README's cluster section): the numbering and the rendering of the cores
as tasks (one finish task per slide does them).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from triageseg.pipeline.blockwise.large import BlockOptions, open_source
from triageseg.pipeline.blockwise.location import location, parent, zarr_store
from triageseg.pipeline.blockwise.probstore import CHUNK_ROWS, ProbabilityStore, _compute_run

logger = logging.getLogger(__name__)

# Chunk rows of probabilities per band task (8 x 256 = 2048 rows: one block row at the default block size).
BAND_CHUNK_ROWS = 8


class _BandStore(ProbabilityStore):
    """A view of a journal's store for one band task: writes rows, records nothing (the driver does).

    Opening it neither verifies nor creates anything: the driver made and checked the store.
    """

    def __init__(self, folder: str | os.PathLike, shape: tuple[int, int], classes: int = 3, *,
                 finished: bool = False):
        import zarr

        self._set_geometry(folder, shape, classes)
        self.array = zarr.open_array(zarr_store(self.folder, read_only=finished), mode="r" if finished else "r+")
        # a finished store is read by block tasks: every row is there (the driver checked it)
        self._done = dict.fromkeys(range(self.n_chunk_rows), []) if finished else {}
        self.sums: dict[int, list[int | None]] = {}

    def _write_state(self) -> None:  # the driver writes the state, from the sums the bands return
        self.sums.update({r: v for r, v in self._done.items()})


def band_spans(missing: list[tuple[int, int]], height: int, chunk_rows: int = BAND_CHUNK_ROWS) -> list[tuple[int, int]]:
    """The unfinished rows cut into bands of at most ``chunk_rows`` whole chunk rows."""
    step = chunk_rows * CHUNK_ROWS
    return [(y, min(stop, y + step)) for start, stop in missing for y in range(start, stop, step)]


def compute_band(stream, read_rows: Callable[[int, int], np.ndarray], folder: str | os.PathLike,
                 shape: tuple[int, int], y0: int, y1: int) -> dict[int, list[int | None]]:
    """Rows ``y0:y1`` of the probabilities into the store at ``folder``; the chunk checksums to record."""
    store = _BandStore(folder, shape)
    _compute_run(stream, read_rows, store, y0, y1, None)
    return store.sums


def _record(store: ProbabilityStore, sums: dict) -> None:
    """Record the chunk rows a band task wrote (the driver is the one writer of the store's state)."""
    store._done.update({int(r): v for r, v in sums.items()})
    store._write_state()


class BandActor:
    """Probability bands of huge images; each segmenter loaded once per actor (``Pipeline.probability_stream``)."""

    def __init__(self, bundle: str, pipeline: dict, threads: int = 1):
        from triageseg.pipeline.local.single import Pipeline
        from triageseg.segmenters.threads import set_network_threads

        # the local run's thread count: the same probabilities (torch's, or the exported runtime's without torch)
        set_network_threads(threads)
        self.pipe = Pipeline(bundle, **pipeline)

    def band(self, path: str, level: int, norm: dict, model: str, scale: float | None, folder: str,
             shape: tuple[int, int], y0: int, y1: int) -> tuple[dict, float]:
        """Rows ``y0:y1`` of one image into its store: (the chunk checksums to record, seconds spent)."""
        t0 = time.perf_counter()
        return self._band(path, level, norm, model, scale, folder, shape, y0, y1), time.perf_counter() - t0

    def _band(self, path, level, norm, model, scale, folder, shape, y0, y1) -> dict:
        from triageseg.pipeline.blockwise.blocks import NormStats

        stats = NormStats.from_dict(norm)
        with open_source(path, level=level) as (source, _):
            width = int(shape[1])

            def read_rows(a: int, b: int) -> np.ndarray:
                return stats.apply(source[a:b, 0:width], name=str(path))

            stream = self.pipe.probability_stream(model, scale=scale, name=str(path))  # at the image's own scale
            return compute_band(stream, read_rows, folder, shape, y0, y1)


def _scan_and_route(bundle: str, pipeline: dict, path: str, level: int, channel, modality) -> dict:
    """The journal state of an image: normalisation statistics and the routing decision (one task)."""
    from triageseg.pipeline.blockwise.blocks import scan_image
    from triageseg.pipeline.blockwise.large import _mean_pixel
    from triageseg.pipeline.local.single import Pipeline

    pipe = Pipeline(bundle, **pipeline)
    with open_source(path, level=level) as (source, pixel_size):
        shape = (int(source.shape[0]), int(source.shape[1]))
        norm, overview = scan_image(source, channel=channel, name=str(path))

        def read_crop(top: int, left: int, height: int, width: int) -> np.ndarray:
            return norm.apply(source[top : top + height, left : left + width], name=str(path))

        # routing and size decided once per image, as the local block path does (Pipeline.decide_overview)
        d = pipe.decide_overview(overview, shape, read_crop, modality, pixel_size=_mean_pixel(pixel_size))
    return {"norm": norm.to_dict(), "modality": d.modality, "confidence": d.confidence, "used_model": d.used_model,
            "decision": d.decision, "ood_score": d.ood_score, "diameter": d.diameter, "scale": d.scale,
            "size_source": d.size_source, "skipped": bool(d.skipped)}


def _decode(folder: str, shape: tuple[int, int], grid_dict: dict, index: int, params: dict) -> int:
    """One block decoded from the finished store ``folder`` into its journal (a CPU task); the block's index.

    The task writes the block's file itself (atomically, beside the store): the owned
    objects never travel through the object store and the driver (a 100k x 100k slide has
    2,401 of them).
    """
    from triageseg.pipeline.blockwise.blocks import BlockGrid, decode_block
    from triageseg.pipeline.blockwise.journal import save_block
    from triageseg.postprocess.watershed import WatershedParams

    grid = BlockGrid(tuple(grid_dict["shape"]), int(grid_dict["margin"]), tuple(map(tuple, grid_dict["rows"])),
                     tuple(map(tuple, grid_dict["cols"])))
    store = _BandStore(folder, shape, finished=True)
    result = decode_block(store.read, grid.blocks[index], params=WatershedParams.from_dict(params), margin=grid.margin)
    save_block(parent(location(folder)), result)
    return index


class RayLabelTasks:
    """Label pyramid bands as Ray CPU tasks (:class:`~triageseg.datasets.zarrpyramid.LabelTasks`).

    Used inside a slide's finish task (:func:`~triageseg.datasets.zarrpyramid.label_tasks`):
    its output folder is one every node reads and writes. A band lost with its worker is
    run again (it writes the same chunks); the task waiting on the bands gives its CPU back
    while it waits, so the bands get it.
    """

    def map(self, fn: Callable, calls: list[tuple]) -> None:
        """Every ``fn(*args)`` of ``calls`` as a Ray task; returns when all are done (raises the first error)."""
        import ray

        remote = ray.remote(num_cpus=1, max_retries=-1)(fn)
        ray.get([remote.remote(*args) for args in calls])


def segment_large_file_ray(pipe, path: str | os.PathLike, out_dir: str | os.PathLike, name: str, *,
                           modality: str | None = None, channel: int | None = None,
                           options: BlockOptions = BlockOptions(), actors: int = 1, cpus_per_actor: float = 1.0,
                           gpus_per_actor: float = 0.0, band_chunk_rows: int = BAND_CHUNK_ROWS,
                           scratch: str | os.PathLike | None = None) -> dict:
    """:func:`~triageseg.pipeline.blockwise.large.segment_large_file` with every step on Ray (a one-slide ``SlideRun``).

    Ray must be initialised; ``out_dir`` must be a folder every node reads and writes
    (the journal lives there, or under ``scratch``: a shared folder or an object-store
    URI). Returns what ``segment_large_file`` returns.
    """
    from triageseg.pipeline.cluster.ray_slides import SlideRun

    rows: list[dict] = []
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    run = SlideRun(pipe, out_dir, options, modality=modality, channel=channel, actors=actors,
                   cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor, band_chunk_rows=band_chunk_rows,
                   scratch=scratch,
                   on_done=lambda _item, row: rows.append({k: v for k, v in row.items() if k != "seconds"}))
    source = str(Path(path).resolve())
    run.run([{"index": 0, "file": source, "name": name, "source": source}])
    return rows[0]


