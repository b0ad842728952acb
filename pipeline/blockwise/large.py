"""Huge images end to end: lazy file -> overview routing -> probabilities on disk -> blocks -> labels on disk.

:func:`segment_blocks` is the block path for any array-like image (array in, label file
out): the class probabilities once per pixel on the whole image's tile grid, band by band,
into a :class:`~triageseg.pipeline.blockwise.probstore.ProbabilityStore` in a :class:`Journal`
beside the output; then :func:`~triageseg.pipeline.blockwise.blocks.decode_block` over the grid
(each finished block kept in the journal), the objects numbered
(:mod:`triageseg.pipeline.blockwise.stitch`), and the labels streamed to a tiled pyramidal TIFF (and
optionally a GeoJSON of outlines) that appear under their names only when complete. The
labels equal the in-memory path's up to the numbering. An interrupted run resumes from
the finished probability rows and blocks (checked: :mod:`triageseg.pipeline.blockwise.probstore`,
:mod:`triageseg.pipeline.blockwise.journal`); the journal is removed on success.

:func:`segment_large_file` adds what a file needs: a lazy reader (TIFF / BigTIFF /
OME-TIFF / SVS at a pyramid level), one pass for the normalisation statistics and the
overview, routing from the overview plus full-resolution crops, and the ``routing.csv``
row. :meth:`Pipeline.segment_files <triageseg.pipeline.local.single.Pipeline.segment_files>`
sends images above :attr:`BlockOptions.threshold_mp` here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from triageseg.datasets.errors import DataError
from triageseg.pipeline.blockwise.blocks import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_MARGIN,
    GROW_LIMIT,
    BlockGrid,
    BlockResult,
    NormStats,
    decode_block,
    plan_blocks,
    scan_image,
)
from triageseg.pipeline.blockwise.journal import (  # noqa: F401 - Journal, JOURNAL_FORMAT re-exported (the block path's API)
    JOURNAL_FORMAT,
    Journal,
    claim_outputs,
    content_fingerprint,
    journal_location,
)
from triageseg.pipeline.blockwise.location import child
from triageseg.pipeline.blockwise.probstore import ProbabilityStore, Stream, compute_probabilities
from triageseg.pipeline.blockwise.stitch import BlockCache, kept_objects, number_blocks, render_core
from triageseg.pipeline.local.records import label_record, routing_row
from triageseg.postprocess.watershed import WatershedParams

logger = logging.getLogger(__name__)

# 4096 x 4096: the largest image the in-memory path handles in about 2.6 GiB.
DEFAULT_THRESHOLD_MP = 16.8
_OUTPUT_TILE = 512
LABEL_FORMATS = {"ome-tiff": ".tif", "ome-zarr": ".ome.zarr"}  # segment --format -> label file suffix


@dataclass(frozen=True)
class BlockOptions:
    """When and how an image goes block-wise (``segment --block-size --block-margin --blocks-above --level --geojson``)."""

    block_size: int = DEFAULT_BLOCK_SIZE  # target side of a block core in pixels
    margin: int = DEFAULT_MARGIN  # context around each core, >= 2x the largest nucleus diameter
    threshold_mp: float = DEFAULT_THRESHOLD_MP  # images above this many megapixels go block-wise (0: all, inf: none)
    level: int = 0  # pyramid level of TIFF inputs; > 0 always reads block-wise
    geojson: bool = False  # also write <name>.geojson (QuPath outlines) for block-wise images
    progress: bool = False  # a progress bar over the blocks of each image
    format: str = "ome-tiff"  # label files: "ome-tiff" (<name>.tif) or "ome-zarr" (<name>.ome.zarr, every image block-wise)

    def __post_init__(self) -> None:
        if self.format not in LABEL_FORMATS:
            raise ValueError(f"format must be one of {', '.join(LABEL_FORMATS)}, got {self.format!r}")
        if self.block_size < 64:
            raise ValueError(f"block_size must be >= 64, got {self.block_size}")
        if self.margin < 0 or self.margin * 2 >= self.block_size:
            raise ValueError(f"margin must be in [0, block_size / 2), got {self.margin} for block size {self.block_size}")
        if not self.threshold_mp >= 0:
            raise ValueError(f"threshold_mp must be >= 0, got {self.threshold_mp}")
        if self.level < 0:
            raise ValueError(f"level must be >= 0, got {self.level}")

    def to_config(self) -> dict:
        """The settings as recorded in segment_config.json (JSON-ready: no threshold is ``None``)."""
        return {"level": self.level, "block_size": self.block_size, "block_margin": self.margin,
                "blocks_above_mp": self.threshold_mp if math.isfinite(self.threshold_mp) else None,
                "geojson": self.geojson, "format": self.format}

    @property
    def suffix(self) -> str:
        """The label files' suffix: ``.tif`` or ``.ome.zarr``."""
        return LABEL_FORMATS[self.format]


def use_blocks(path: str | os.PathLike, options: BlockOptions) -> bool:
    """Whether ``path`` goes the block path: a pyramid level was asked for, a slide format, or a large image."""
    from triageseg.datasets.io import IMAGE_SUFFIXES
    from triageseg.datasets.lazy import image_size, is_tiff
    from triageseg.datasets.omezarr import is_zarr

    path = Path(path)
    # OME-Zarr in or out: the block path reads and writes it chunk by chunk (same labels as in memory)
    if options.format == "ome-zarr" or is_zarr(path):
        return True
    if options.level > 0 or (is_tiff(path) and path.suffix.lower() not in IMAGE_SUFFIXES):
        return True
    size = image_size(path)
    return size is not None and size[0] * size[1] > options.threshold_mp * 1e6


# --------------------------------------------------------------------------- stitched labels on disk


def _save_array(path: Path, array: np.ndarray) -> None:
    import io

    import imagecodecs

    buf = io.BytesIO()
    np.save(buf, array)
    path.write_bytes(imagecodecs.zstd_encode(buf.getvalue(), level=1))


def _load_array(path: Path) -> np.ndarray:
    import io

    import imagecodecs

    return np.load(io.BytesIO(imagecodecs.zstd_decode(path.read_bytes())))


def _save_cores(grid: BlockGrid, numbering, load, folder: Path, tile: int, store: ProbabilityStore) -> np.ndarray:
    """Each block's final core labels, in pieces of ``tile`` image rows (the writer reads one strip of rows at a time).

    Returns:
        The image's quality pixel sums (:func:`triageseg.postprocess.quality.pixel_sums`, added
        over the cores, which tile the image once), from the stored probabilities and final labels.
    """
    from triageseg.postprocess.quality import pixel_sums

    sums = np.zeros(6)
    for block in grid.blocks:
        core = render_core(grid, numbering, load, block.index).astype(numbering.dtype(), copy=False)
        sums = sums + pixel_sums(store.read(block.core), core)
        y0, y1 = block.core[0], block.core[1]
        for k in range(y0 // tile, math.ceil(y1 / tile)):
            part = core[max(y0, k * tile) - y0 : min(y1, (k + 1) * tile) - y0]
            _save_array(folder / f"core_{block.index:05d}_{k:05d}.npy.zst", part)
    return sums


def _row_reader(grid: BlockGrid, folder: Path, tile: int, dtype: np.dtype) -> Callable[[int, int], np.ndarray]:
    """``(y0, y1) -> rows`` of the stitched labels, for strips of ``tile`` rows starting at multiples of ``tile``."""
    w = grid.shape[1]

    def read_rows(y0: int, y1: int) -> np.ndarray:
        if y0 % tile or y1 - y0 > tile:
            raise ValueError(f"rows {y0}:{y1} are not one strip of {tile}")
        k = y0 // tile
        out = np.zeros((y1 - y0, w), dtype)
        for block in grid.blocks:
            by0, by1, bx0, bx1 = block.core
            if by1 <= y0 or by0 >= y1:
                continue
            part = _load_array(folder / f"core_{block.index:05d}_{k:05d}.npy.zst")
            top = max(by0, y0) - y0
            out[top : top + part.shape[0], bx0:bx1] = part
        return out

    return read_rows


def _probabilities(source, stream: Stream, store: ProbabilityStore, norm: NormStats, *, name: str,
                   progress: bool) -> int:
    """Fill ``store`` with the probabilities of the normalised ``source`` (rows it has are kept); rows computed."""
    from tqdm import tqdm

    if store.complete:
        return 0
    width = store.shape[1]

    def read_rows(y0: int, y1: int) -> np.ndarray:
        return norm.apply(source[y0:y1, 0:width], name=name)

    with tqdm(total=store.shape[0], initial=store.finished, unit="row", desc=f"{str(name)[-24:]} probs", leave=False,
              disable=not progress) as bar:
        return compute_probabilities(stream, read_rows, store, progress=bar.update)


def _block_loader(journal: Journal, store: ProbabilityStore, grid: BlockGrid,
                  params: WatershedParams) -> Callable[[int], BlockResult]:
    """``index -> BlockResult`` from the journal, decoding again a block whose file went missing or was damaged.

    Decoding is deterministic: the block decoded again from the stored probabilities is the one lost.
    """

    def load(index: int) -> BlockResult:
        try:
            return journal.load(index)
        except DataError as err:
            logger.warning("%s; decoding that block again", err)
            result = decode_block(store.read, grid.blocks[index], params=params, margin=grid.margin)
            journal.save(result)
            return result

    return load


def segment_blocks(
    source,
    out_path: str | os.PathLike,
    *,
    stream: Stream,
    params: WatershedParams,
    grid: BlockGrid,
    norm: NormStats,
    journal: Journal,
    geojson: str | os.PathLike | None = None,
    modality: str = "",
    pixel_size: tuple[float, float] | None = None,
    progress: bool = False,
    name: str = "<array>",
    before_write: Callable[[], None] | None = None,
    record: Callable[[dict], dict | None] | None = None,
    store_dtype: str = "float32",
) -> dict:
    """The block path for an array-like image: probabilities, every block, numbered, streamed to ``out_path``.

    Args:
        source: array-like image (HxW or HxWxC, ``source[y0:y1, x0:x1]``), e.g. a
            :class:`~triageseg.datasets.lazy.LazyImage`.
        out_path: the label TIFF to write (tiled pyramidal OME-TIFF, uint16 or uint32).
        stream: ``stream(read_rows, shape, start=row)`` -> ``(y0, y1, probs)`` rows of the
            class probabilities of the normalised image (``Pipeline.probability_stream``,
            or any function of the rows for tests).
        params: watershed parameters.
        grid: the blocks (:func:`~triageseg.pipeline.blockwise.blocks.plan_blocks`).
        norm: global normalisation (:func:`~triageseg.pipeline.blockwise.blocks.scan_image`).
        journal: where the probabilities and finished blocks are kept; what is in it is
            not computed again. It is removed once the outputs are in place.
        geojson: also write the outlines here (GeoJSON FeatureCollection).
        modality: the modality named in the GeoJSON.
        pixel_size: microns per pixel (y, x), stored in the TIFF and used for areas.
        progress: show progress bars over the probability rows and the blocks.
        name: the image's name in messages and metadata.
        before_write: called just before the label file is written (e.g. to log its
            routing row, so a crash right after the write loses nothing).
        record: called with the summary (``objects``, ``quality_sums``, ``median_area``) just
            before the label file is written; what it returns is stored in the file
            (:func:`triageseg.datasets.tiffrecord.read_record`).
        store_dtype: the probability store's dtype (float16 only for a ``stream`` whose rows
            are float16 values already, e.g. a ``Pipeline(prob_dtype="float16")``'s: then exact).

    Returns:
        A summary: ``objects``, ``blocks``, ``computed`` (blocks decoded now), ``rows``
        (probability rows computed now), ``grown`` (components larger than the margin,
        decoded in a grown window), ``oversized`` (of those, larger than
        :data:`~triageseg.pipeline.blockwise.blocks.GROW_LIMIT`: decoded in limited windows, warned),
        ``quality_sums`` / ``median_area`` (:func:`triageseg.postprocess.quality.signals_from_sums`).
    """
    from tqdm import tqdm

    done = journal.done()
    todo = [b for b in grid.blocks if b.index not in done]
    store = ProbabilityStore(child(journal.folder, "probs.zarr"), grid.shape, dtype=store_dtype)
    # always: the stored rows are read again below (quality sums), and a damaged chunk is computed again here
    rows = _probabilities(source, stream, store, norm, name=name, progress=progress)
    if todo:
        with tqdm(total=len(grid), initial=len(grid) - len(todo), unit="block", desc=str(name)[-30:], leave=False,
                  disable=not progress) as bar:
            for block in todo:
                journal.save(decode_block(store.read, block, params=params, margin=grid.margin))
                bar.update(1)
    load = BlockCache(_block_loader(journal, store, grid, params), size=min(len(grid.cols) + 4, 16))
    numbering = number_blocks(grid, load)
    with _cores_folder(journal, out_path) as cores:
        return _render(grid, numbering, load, cores, store, out_path, geojson=geojson, modality=modality,
                       pixel_size=pixel_size, before_write=before_write, record=record, journal=journal, name=name,
                       summary={"blocks": len(grid), "computed": len(todo), "rows": rows})


@contextlib.contextmanager
def _cores_folder(journal: Journal, out_path: str | os.PathLike) -> Iterator[Path]:
    """Where the rendered cores wait for the label writer: the journal, or beside the labels when it is remote.

    A journal on object storage would cost a PUT and a GET per piece of core; the cores are
    made again from the blocks on every finish, so a local temporary folder (removed by a
    later run when a killed one left it: :func:`~triageseg.pipeline.blockwise.journal.temporaries`) loses nothing.
    """
    import tempfile

    if not journal.remote:
        yield journal.folder
        return
    out_path = Path(out_path)
    stem = out_path.name.removesuffix(".tif").removesuffix(".zarr").removesuffix(".ome")
    with tempfile.TemporaryDirectory(prefix=f".{stem}.cores.", dir=out_path.parent) as tmp:
        yield Path(tmp)


def _render(grid, numbering, load, cores: Path, store: ProbabilityStore, out_path, *, geojson, modality, pixel_size,
            before_write, record, journal: Journal, name: str, summary: dict) -> dict:
    """The numbered blocks rendered into ``cores``, then the label file (and GeoJSON) written; the summary."""
    from triageseg.pipeline.blockwise.geojson import GeoJSONWriter

    sums = _save_cores(grid, numbering, load, cores, _OUTPUT_TILE, store)
    areas = [load(block.index).area for block in grid.blocks]
    areas = np.concatenate(areas) if areas else np.zeros(0)
    if geojson is not None:
        with GeoJSONWriter(geojson, modality=modality, pixel_size=pixel_size, image=Path(out_path).stem) as out:
            for label, mask, top_left, area in kept_objects(grid, numbering, load):
                out.add(label, mask, top_left, area)
    median_area = float(np.median(areas)) if len(areas) else None
    stored = None if record is None else record({"objects": numbering.n_objects, "quality_sums": sums,
                                                 "median_area": median_area})
    # the label file last: its presence marks the input as done for a resumed batch
    if before_write is not None:
        before_write()
    write_labels_file(out_path, grid.shape, numbering.dtype(),
                      _row_reader(grid, cores, _OUTPUT_TILE, numbering.dtype()), tile=_OUTPUT_TILE,
                      pixel_size=pixel_size, record=stored)
    journal.remove()
    if numbering.oversized:
        logger.warning("%s: %d foreground component(s) larger than %d px were decoded in limited windows; they may "
                       "be cut where blocks meet", name, numbering.oversized, GROW_LIMIT)
    return {"objects": numbering.n_objects, **summary, "grown": numbering.grown, "oversized": numbering.oversized,
            "quality_sums": sums, "median_area": median_area}


def write_labels_file(out_path, shape, dtype, read_rows, *, tile: int, pixel_size, record) -> None:
    """The label file from strips of rows: an OME-Zarr labels pyramid for ``*.zarr``, else a pyramidal OME-TIFF."""
    from triageseg.datasets.omezarr import is_zarr, write_labels_zarr
    from triageseg.datasets.pyramid import write_pyramid

    if is_zarr(out_path):
        name = Path(str(out_path).rstrip("/")).name.removesuffix(".zarr").removesuffix(".ome")
        write_labels_zarr(out_path, shape, dtype, read_rows, tile=tile, pixel_size=pixel_size, name=name,
                          record=record)
    else:
        write_pyramid(out_path, shape, dtype, read_rows, tile=tile, pixel_size=pixel_size, name=Path(out_path).stem,
                      record=record)


# --------------------------------------------------------------------------- files


@contextlib.contextmanager
def open_source(path: str | os.PathLike, *, level: int = 0) -> Iterator[tuple[object, tuple[float, float] | None]]:
    """``(array-like image, pixel size)`` of a file: lazy for TIFFs and OME-Zarr, in memory (raw pixels) otherwise."""
    from triageseg.datasets.lazy import LazyImage, is_tiff
    from triageseg.datasets.omezarr import OmeZarrImage, is_zarr

    if is_zarr(path):
        with OmeZarrImage(path, level=level) as image:
            yield image, image.pixel_size
        return
    path = Path(path)
    if is_tiff(path):
        with LazyImage(path, level=level) as image:
            yield image, image.pixel_size
        return
    if level:
        raise DataError(path, f"pyramid level {level} requested, but only TIFF files have pyramid levels")
    from triageseg.datasets.io import read_image_raw

    yield read_image_raw(path), None


def _fingerprint(pipe, path: Path, options: BlockOptions, modality: str | None, channel) -> dict:
    """What a journal's blocks depend on: the input (path, size, time, content), the bundle, the settings.

    The bundle is known by its manifest's time stamp too: retrained in place, it gives a new key.
    """
    from triageseg.datasets.omezarr import zarr_fingerprint

    stat = path.stat()
    manifest = (Path(pipe.path) / "bundle.json").stat()
    return {
        "input": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
        "content": zarr_fingerprint(path) if path.is_dir() else content_fingerprint(path), "level": options.level,
        "channel": channel, "modality": modality, "bundle": str(Path(pipe.path).resolve()),
        "bundle_mtime_ns": manifest.st_mtime_ns,
        "block_size": options.block_size, "margin": options.margin, "tile_size": pipe.tile_size,
        "overlap": pipe.overlap, "tta": pipe.tta, "batch_size": pipe.batch_size, "device": pipe.device_name,
        "diameter": pipe.diameter, "use_pixel_size": pipe.use_pixel_size,
        # only when not the default: journals begun before the setting existed keep their key
        **({"prob_dtype": pipe.prob_dtype} if getattr(pipe, "prob_dtype", "float32") != "float32" else {}),
    }


def segment_large_file(
    pipe,
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    name: str,
    *,
    modality: str | None = None,
    channel: int | None = None,
    options: BlockOptions = BlockOptions(),
    before_write: Callable[[dict], None] | None = None,
    journal_at: str | os.PathLike | None = None,
) -> dict:
    """Segment one huge image file block-wise into ``out_dir/<name>.tif`` (and ``<name>.geojson``).

    Routing uses an overview of the whole image and full-resolution crops; the router,
    segmenter and fallback policy are ``pipe``'s, as for small images. The journal
    ``out_dir/.<name>.blocks/`` keeps finished blocks until the outputs are complete. The
    image's outputs are claimed first (:func:`~triageseg.pipeline.blockwise.journal.claim_outputs`: a
    lock, and the temporaries an interrupted run left removed).

    ``before_write`` is called with the ``routing.csv`` row (without ``objects``) just
    before the label file is written. ``journal_at`` puts the journal elsewhere (a shared
    folder or an object-store URI, :func:`journal_location`).

    Returns:
        The ``routing.csv`` row (without ``seconds``), with ``objects``, ``quality`` (predicted from
        the blocks' summed signals; None without a quality model) and ``mode = blocks``.

    Raises:
        DataError: unreadable, truncated or non-tiled input (naming the file), bad channels,
            another run segmenting the same image into ``out_dir`` (naming the lock).
    """
    path, out_dir = Path(path), Path(out_dir)
    # the lock of this image's outputs (one writer; a killed run's temporaries removed), then the input
    with claim_outputs(out_dir, name), open_source(path, level=options.level) as (source, pixel_size):
        shape = (int(source.shape[0]), int(source.shape[1]))
        journal = Journal(journal_at if journal_at is not None else journal_location(out_dir, name),
                          _fingerprint(pipe, path, options, modality, channel))
        if journal.state is None:
            norm, overview = scan_image(source, channel=channel, name=str(path))

            def read_crop(top: int, left: int, height: int, width: int) -> np.ndarray:
                return norm.apply(source[top : top + height, left : left + width], name=str(path))

            d = pipe.decide_overview(overview, shape, read_crop, modality, pixel_size=_mean_pixel(pixel_size))
            if d.skipped:  # an unknown modality under --unknown skip: no label file, nothing to resume
                journal.remove()
                return {**routing_row(path, name, *d[:4], mode="blocks", ood_score=d.ood_score), "objects": 0}
            # The size is decided once per image and kept: a resumed run uses the same scale.
            journal.set_state({"norm": norm.to_dict(), "modality": d.modality, "confidence": d.confidence,
                               "used_model": d.used_model, "decision": d.decision, "ood_score": d.ood_score,
                               "diameter": d.diameter, "scale": d.scale, "size_source": d.size_source})
        state = journal.state
        used = state["used_model"]
        size = SimpleNamespace(diameter=state.get("diameter"), scale=state.get("scale"),
                               size_source=state.get("size_source", ""))
        row = routing_row(path, name, state["modality"], state["confidence"], used, state["decision"],
                          mode="blocks", ood_score=state.get("ood_score"), size=size)
        grid = plan_blocks(shape, block_size=options.block_size, margin=options.margin)
        made: dict = {}

        def record(summary: dict) -> dict:
            # the finished row, stored in the label file: routing.csv can be rebuilt from it
            made.update(row, output=f"{name}{options.suffix}", objects=summary["objects"],
                        quality=_predict_quality(pipe, used, state, summary))
            return label_record(made)

        segment_blocks(
            source, out_dir / f"{name}{options.suffix}",
            stream=pipe.probability_stream(used, scale=size.scale, name=str(path)),
            params=pipe.params(used, size.scale), grid=grid, norm=NormStats.from_dict(state["norm"]), journal=journal,
            geojson=out_dir / f"{name}.geojson" if options.geojson else None, modality=state["modality"],
            pixel_size=pixel_size, progress=options.progress, name=str(path),
            before_write=None if before_write is None else lambda: before_write(dict(row)), record=record,
            store_dtype=getattr(pipe, "prob_dtype", "float32"),
        )
    return made


def _predict_quality(pipe, used: str, state: dict, summary: dict) -> float | None:
    """The predicted quality of a block-wise image from its summed signals; None without a quality model."""
    from triageseg.postprocess.quality import signals_from_sums

    quality = pipe.quality_model(used)
    return None if quality is None else quality.predict(signals_from_sums(
        summary["quality_sums"], n_objects=summary["objects"], median_area=summary["median_area"],
        stats=quality.stats, router_confidence=state["confidence"], ood_score=state.get("ood_score")))


def _mean_pixel(pixel_size):
    """Microns per pixel as one number (the mean of a (y, x) pair); None when unknown."""
    if pixel_size is None:
        return None
    return float(np.mean([float(v) for v in np.atleast_1d(pixel_size)]))
