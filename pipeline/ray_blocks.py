"""The block path as Ray tasks: one huge image spread over a cluster, labels identical to the local block path.

:func:`segment_large_file_ray` does what :func:`~triageseg.pipeline.large.segment_large_file`
does, with the costly steps as Ray work on the cluster and the same journal beside the
output (``out_dir/.<name>.blocks/``, on storage every node reads: a shared folder):

```
scan + route     one CPU task: normalisation statistics and overview (scan_image), then
                 the routing decision from the overview and crops (Pipeline.decide_overview)
bands            bands of whole probability chunk rows, to a pool of BandActors (each holds
                 the segmenter, loaded once): each band runs the probability stream from its
                 first row (the stream starts at any row and gives the same rows bit for bit)
                 and writes its rows into the journal's ProbabilityStore (zarr); the driver
                 records the chunk checksums each band returns (one writer of the store's state)
block decodes    decode_block of every unfinished block as a CPU task reading windows of the
                 store; the driver saves each returned BlockResult in the journal
numbering +      the local segment_large_file on the now complete journal: nothing is computed
rendering        again, the objects are numbered, the cores rendered and the label file written
```

The block function (:func:`~triageseg.pipeline.blocks.decode_block`) and the probability
stream are the units both paths schedule, and the journal is the same, so the labels are
the local block path's, id for id, and a run interrupted on the cluster resumes locally
(or the other way round).

Not yet (see the README's cluster section): bands and blocks of several slides
interleaved, a probability store on object storage (``s3://``: the store's checksums read
its chunk files), the label pyramid written by block tasks.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from triageseg.pipeline.large import BlockOptions, _fingerprint, open_source, segment_large_file
from triageseg.pipeline.journal import Journal, claim_outputs
from triageseg.pipeline.probstore import CHUNK_COLS, CHUNK_ROWS, ProbabilityStore, _compute_run

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

        self.folder = Path(folder)
        self.shape = (int(shape[0]), int(shape[1]))
        self.classes = int(classes)
        self.n_chunk_rows = math.ceil(self.shape[0] / CHUNK_ROWS)
        self.n_chunk_cols = math.ceil(self.shape[1] / CHUNK_COLS)
        self._state = self.folder.parent / f"{self.folder.name}.json"
        self.array = zarr.open_array(self.folder, mode="r" if finished else "r+")
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
    """Probability bands of huge images with one segmenter, loaded once per actor (``Pipeline.probability_stream``)."""

    def __init__(self, bundle: str, pipeline: dict, threads: int = 1):
        import torch

        from triageseg.pipeline.single import Pipeline

        torch.set_num_threads(max(1, int(threads)))  # the local run's thread count: the same probabilities
        self.pipe = Pipeline(bundle, **pipeline)

    def band(self, path: str, level: int, norm: dict, model: str, scale: float | None, folder: str,
             shape: tuple[int, int], y0: int, y1: int) -> dict:
        from triageseg.pipeline.blocks import NormStats

        stats = NormStats.from_dict(norm)
        with open_source(path, level=level) as (source, _):
            width = int(shape[1])

            def read_rows(a: int, b: int) -> np.ndarray:
                return stats.apply(source[a:b, 0:width], name=str(path))

            stream = self.pipe.probability_stream(model, scale=scale, name=str(path))  # at the image's own scale
            return compute_band(stream, read_rows, folder, shape, y0, y1)


def _scan_and_route(bundle: str, pipeline: dict, path: str, level: int, channel, modality) -> dict:
    """The journal state of an image: normalisation statistics and the routing decision (one task)."""
    from triageseg.pipeline.blocks import scan_image
    from triageseg.pipeline.large import _mean_pixel
    from triageseg.pipeline.single import Pipeline

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


def _decode(folder: str, shape: tuple[int, int], grid_dict: dict, index: int, params: dict) -> bytes:
    """One block decoded from the finished store (a CPU task); its owned objects, serialised."""
    from triageseg.pipeline.blocks import BlockGrid, decode_block
    from triageseg.postprocess.watershed import WatershedParams

    grid = BlockGrid(tuple(grid_dict["shape"]), int(grid_dict["margin"]), tuple(map(tuple, grid_dict["rows"])),
                     tuple(map(tuple, grid_dict["cols"])))
    store = _BandStore(folder, shape, finished=True)
    result = decode_block(store.read, grid.blocks[index], params=WatershedParams.from_dict(params), margin=grid.margin)
    return result.to_bytes()


def segment_large_file_ray(
    pipe,
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    name: str,
    *,
    modality: str | None = None,
    channel: int | None = None,
    options: BlockOptions = BlockOptions(),
    actors: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    band_chunk_rows: int = BAND_CHUNK_ROWS,
    before_write: Callable[[dict], None] | None = None,
) -> dict:
    """:func:`~triageseg.pipeline.large.segment_large_file` with the scan, bands and block decodes on Ray.

    Ray must be initialised; ``out_dir`` must be a folder every node reads and writes
    (the journal lives there). Returns what ``segment_large_file`` returns.
    """
    import ray

    path, out_dir = Path(path).resolve(), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"device": "cuda" if gpus_per_actor > 0 else "cpu", "tile_size": pipe.tile_size,
                "overlap": pipe.overlap, "batch_size": pipe.batch_size, "tta": pipe.tta, "unknown": pipe.unknown,
                "backend": pipe.backend, "precision": pipe.precision, "diameter": pipe.diameter,
                "use_pixel_size": pipe.use_pixel_size}
    bundle = str(Path(pipe.path).resolve())
    with claim_outputs(out_dir, name):
        journal = Journal(out_dir / f".{name}.blocks", _fingerprint(pipe, path, options, modality, channel))
        if journal.state is None:
            task = ray.remote(num_cpus=1, max_retries=-1)(_scan_and_route)
            state = ray.get(task.remote(bundle, settings, str(path), options.level, channel, modality))
            if state.pop("skipped"):  # an unknown modality under --unknown skip: the local path writes its row
                journal.remove()
                state = None
            else:
                journal.set_state(state)
        if journal.state is not None:
            _bands_and_blocks(pipe, journal, path, options, settings, actors=actors, cpus=cpus_per_actor,
                              gpus=gpus_per_actor, band_chunk_rows=band_chunk_rows)
    # numbering, rendering and the label file: the local path on the complete journal (nothing computed again)
    return segment_large_file(pipe, path, out_dir, name, modality=modality, channel=channel, options=options,
                              before_write=before_write)


def _bands_and_blocks(pipe, journal: Journal, path: Path, options: BlockOptions, settings: dict, *, actors: int,
                      cpus: float, gpus: float, band_chunk_rows: int) -> None:
    """Fill the journal: probability bands on an actor pool, then the unfinished blocks as CPU tasks."""
    import ray
    from ray.util import ActorPool

    from triageseg.pipeline.blocks import BlockResult, plan_blocks

    state = journal.state
    with open_source(path, level=options.level) as (source, _):
        shape = (int(source.shape[0]), int(source.shape[1]))
    store = ProbabilityStore(journal.folder / "probs.zarr", shape)
    bands = band_spans(store.missing(), shape[0], band_chunk_rows)
    if bands:
        # a lost actor is restarted and its band retried (a band writes the same bytes again), as Ray Data's pools are
        remote = ray.remote(num_cpus=cpus, num_gpus=gpus or None, max_restarts=-1, max_task_retries=-1)(BandActor)
        bundle = str(Path(pipe.path).resolve())
        band_actors = [remote.remote(bundle, settings, max(1, int(cpus))) for _ in range(max(1, min(actors, len(bands))))]
        args = (str(path), options.level, state["norm"], state["used_model"], state.get("scale"), str(store.folder),
                shape)
        try:
            # each band's checksums recorded as it finishes: a run killed now resumes at the unfinished bands
            for sums in ActorPool(band_actors).map_unordered(lambda actor, span: actor.band.remote(*args, *span), bands):
                _record(store, sums)
        finally:
            for actor in band_actors:
                ray.kill(actor)
    if not store.complete:
        raise ValueError(f"{path}: probability rows {store.missing()} missing after the band tasks")
    grid = plan_blocks(shape, block_size=options.block_size, margin=options.margin)
    params = pipe.params(state["used_model"], state.get("scale")).to_dict()  # area thresholds follow the scale
    done = journal.done()
    decode = ray.remote(num_cpus=1, max_retries=-1)(_decode)  # retried on a lost worker or node
    pending = [decode.remote(str(store.folder), shape, grid.to_dict(), b.index, params)
               for b in grid.blocks if b.index not in done]
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        journal.save(BlockResult.from_bytes(ray.get(ready[0])))


def segment_slides(pipe, big: list[dict], out: str, journal, report, options, blocks, *, modality, channel,
                   on_error: str, log: Callable[[str], None]) -> None:
    """Huge images of a :func:`~triageseg.pipeline.distributed.segment_files_ray` run, one after another.

    Each is segmented as Ray tasks (:func:`segment_large_file_ray`); its routing.csv row goes
    to the run's ``journal`` and ``report``, a failure to ``on_error`` as for the other images.
    """
    from triageseg.datasets.errors import DataError
    from triageseg.pipeline.batch import _fail, format_quality
    from triageseg.pipeline.distributed import _as_input, pool_size
    from triageseg.ray_cluster import cluster_info, is_uri

    blocks = BlockOptions() if blocks is None else blocks
    low, high = pool_size(options, cluster_info())
    for item in big:
        t0 = time.perf_counter()
        try:
            if is_uri(out):
                raise DataError(item["file"], "block-wise images on Ray need --out on a shared folder (the block "
                                              "journal lives beside the labels), not a URI")
            log(f"blocks: {item['file']}, {high} band actor(s)")
            row = segment_large_file_ray(pipe, item["source"], out, item["name"], modality=modality, channel=channel,
                                         options=blocks, actors=high, cpus_per_actor=options.cpus_per_actor,
                                         gpus_per_actor=options.gpus_per_actor)
        except Exception as err:  # noqa: BLE001 - reported per file, policy decides
            if on_error == "fail":
                journal.flush()
            _fail(report, _as_input(item["file"]), err, on_error)
            continue
        row["file"] = item["file"]
        row["quality"] = format_quality(row.get("quality"))
        row["seconds"] = f"{time.perf_counter() - t0:.3f}"
        journal.add(item["name"], row)
        if row.get("used_model"):
            report.rows.append(row)
            report.written.append(Path(out) / row["output"])
        else:
            report.unknown_skipped.append(_as_input(item["file"]))
