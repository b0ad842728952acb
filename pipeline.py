"""The routed pipeline: image -> router -> specialist -> watershed -> labels.

Each step is callable on its own (files -> arrays -> probabilities -> labels), so a
user can swap one: :meth:`Pipeline.route` triages, :meth:`Pipeline.probabilities`
runs a segmenter, :func:`triageseg.postprocess.watershed.watershed` decodes.

Example:
    >>> from triageseg import load_pipeline                 # doctest: +SKIP
    >>> pipe = load_pipeline("bundle/")                       # doctest: +SKIP
    >>> result = pipe.segment(image)                          # doctest: +SKIP
    >>> result.labels.max(), result.modality, result.used_model   # doctest: +SKIP
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
from pathlib import Path

import numpy as np

from triageseg import bundle as _bundle
from triageseg.datasets.atomic import atomic_path, write_text_atomic
from triageseg.datasets.errors import BundleError, DataError
from triageseg.postprocess.watershed import WatershedParams, watershed

ROUTING_COLUMNS = ("file", "output", "modality", "confidence", "used_model", "decision", "objects", "seconds")


@dataclass(frozen=True)
class Result:
    """What segmenting one image gives.

    Attributes:
        labels: HxW uint32 instance labels, 0 = background.
        modality: the router's top-1 modality (or the forced one).
        confidence: the router's calibrated confidence in ``modality`` (None when forced).
        used_model: the segmenter that ran (a modality name or ``_generalist``).
        decision: why that segmenter ran ("routed", "forced", "low confidence -> generalist", ...).
    """

    labels: np.ndarray
    modality: str
    confidence: float | None
    used_model: str
    decision: str


@dataclass
class BatchReport:
    """Outcome of :meth:`Pipeline.segment_files`."""

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


class Pipeline:
    """A loaded bundle: the router, the specialists (loaded on first use) and their watershed parameters."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        device: str = "auto",
        tile_size: int | None = None,
        overlap: int | None = None,
        batch_size: int = 4,
        tta: bool = False,
    ):
        from triageseg.segmenters.predict import resolve_device

        self.path = Path(path)
        self.manifest = _bundle.read_manifest(self.path)
        self.device = resolve_device(device)
        self.tile_size = tile_size
        self.overlap = overlap
        self.batch_size = batch_size
        self.tta = tta
        self.available: list[str] = list(self.manifest.get("segmenters", []))
        if not self.available:
            raise BundleError(self.path / _bundle.MANIFEST, "the bundle holds no segmenter")
        for name in self.available:
            if not (_bundle.segmenter_dir(self.path, name) / _bundle.WEIGHTS).is_file():
                raise BundleError(_bundle.segmenter_dir(self.path, name) / _bundle.WEIGHTS, "missing weights file")
        fallback = self.manifest.get("fallback", {})
        self.confidence_threshold = float(fallback.get("confidence_threshold", 0.6))
        self.has_generalist = _bundle.GENERALIST in self.available
        self._router = None
        self._segmenters: dict[str, tuple] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, **kwargs) -> Pipeline:
        """Open the bundle at ``path`` (see :class:`Pipeline` for the keyword options)."""
        return cls(path, **kwargs)

    # ----------------------------------------------------------------- models
    @property
    def specialists(self) -> list[str]:
        """Modalities that have a specialist in this bundle."""
        return [m for m in self.available if m != _bundle.GENERALIST]

    def _load_router(self):
        if self._router is None:
            from triageseg.router.model import load_router

            if not self.manifest.get("has_router"):
                raise BundleError(_bundle.router_dir(self.path), "the bundle has no router; pass a modality to skip routing")
            self._router = load_router(_bundle.router_dir(self.path), device=self.device)
        return self._router

    def segmenter(self, name: str):
        """The (model, config, watershed params) of segmenter ``name``, loaded once."""
        if name not in self.available:
            raise DataError(
                self.path, f"no segmenter {name!r} in this bundle; it has: {', '.join(self.available)}"
            )
        with self._lock:
            if name not in self._segmenters:
                from triageseg.segmenters.model import load_segmenter

                self._segmenters[name] = load_segmenter(_bundle.segmenter_dir(self.path, name), device=self.device)
        return self._segmenters[name]

    # ------------------------------------------------------------------ steps
    def route(self, images: Sequence[np.ndarray]):
        """Triage images: one router prediction (modality, confidence, probs) each."""
        from triageseg.router.model import classify

        model, config = self._load_router()
        return classify(model, config, list(images), device=self.device)

    def choose(self, prediction) -> tuple[str, str]:
        """Which segmenter runs for a router prediction, and why (the bundle's fallback policy)."""
        from triageseg.router.model import decide

        return decide(
            prediction, threshold=self.confidence_threshold, available=self.available, has_generalist=self.has_generalist
        )

    def check_modality(self, modality: str) -> None:
        """Refuse a forced modality that has no segmenter in this bundle, listing those it has."""
        if modality not in self.available:
            raise DataError(
                self.path,
                f"unknown modality {modality!r}; this bundle has segmenters for: {', '.join(self.available)}",
            )

    def probabilities(self, image: np.ndarray, used_model: str) -> np.ndarray:
        """3xHxW class probabilities of segmenter ``used_model`` for a normalised HxWx3 image."""
        from triageseg.segmenters.predict import predict

        model, config, _ = self.segmenter(used_model)
        return predict(
            model,
            image,
            tile_size=self.tile_size or config.tile_size,
            overlap=config.overlap if self.overlap is None else self.overlap,
            batch_size=self.batch_size,
            tta=self.tta,
            device=self.device,
            scale=config.scale,
        )

    def params(self, used_model: str) -> WatershedParams:
        """Tuned watershed parameters of segmenter ``used_model``."""
        return self.segmenter(used_model)[2]

    def segment(self, image: np.ndarray, *, modality: str | None = None) -> Result:
        """Segment one normalised float32 HxWx3 image (see :func:`triageseg.datasets.io.read_image`).

        Args:
            image: HxWx3 float32 in [0, 1].
            modality: force this specialist and skip the router.
        """
        modality, confidence, used, decision = self._decide(image, modality)
        probs = self.probabilities(image, used)
        labels = watershed(probs, self.params(used))
        return Result(labels, modality, confidence, used, decision)

    def _decide(self, image: np.ndarray, modality: str | None):
        if modality is not None:
            self.check_modality(modality)
            return modality, None, modality, "forced"
        pred = self.route([image])[0]
        used, decision = self.choose(pred)
        return pred.modality, float(pred.confidence), used, decision

    # ----------------------------------------------------------------- files
    def segment_files(
        self,
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
        """Segment files into ``out_dir``: ``<name>.tif`` labels plus ``routing.csv``.

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
        names = list(names) if names is not None else [p.stem for p in paths]
        if len(names) != len(paths):
            raise ValueError(f"{len(names)} names for {len(paths)} inputs")
        seen: dict[str, Path] = {}
        for p, n in zip(paths, names):
            if n in seen:
                raise DataError(p, f"output name {n!r} is also that of {seen[n]}; rename one of them")
            seen[n] = p
        if modality is not None:
            self.check_modality(modality)  # fail fast, before any file is read

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
                self._fail(report, path, err, on_error)
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
            from triageseg.datasets.io import read_image, read_pixel_size

            image = read_image(path, channel=channel)
            return image, read_pixel_size(path), self._decide(image, modality)

        try:
            for path, name, loaded in _prefetch(todo, prepare):
                t0 = time.perf_counter()
                try:
                    if isinstance(loaded, BaseException):
                        raise loaded
                    image, pixel_size, (mod, conf, used, decision) = loaded
                    probs = self.probabilities(image, used)
                except Exception as err:  # noqa: BLE001
                    self._fail(report, path, err, on_error)
                    if progress:
                        progress(path)
                    continue
                row = {
                    "file": str(path),
                    "output": f"{name}.tif",
                    "modality": mod,
                    "confidence": "" if conf is None else f"{conf:.4f}",
                    "used_model": used,
                    "decision": decision,
                    "_t0": t0,
                }
                job = (probs, self.params(used), out_dir, name, pixel_size, image if (overlays or rois) else None, overlays, rois)
                if pool is not None:
                    pending.append((path, name, row, pool.submit(_decode_and_write, *job), None))
                    # keep memory bounded: at most 2 jobs per worker in flight
                    while len(pending) > 2 * workers:
                        finish(pending.pop(0))
                else:
                    try:
                        value = _decode_and_write(*job)
                    except Exception as err:  # noqa: BLE001
                        self._fail(report, path, err, on_error)
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

    @staticmethod
    def _fail(report: BatchReport, path: Path, err: BaseException, on_error: str) -> None:
        message = str(err)
        if isinstance(err, DataError) and err.path is not None:
            message = err.problem if Path(err.path) == path else str(err)
        if on_error == "fail":
            if isinstance(err, DataError):
                raise err
            raise DataError(path, f"{type(err).__name__}: {message}") from err
        report.failures.append((path, message))


def load_pipeline(path: str | os.PathLike, **kwargs) -> Pipeline:
    """Open a bundle as a :class:`Pipeline` (keyword options as for the class)."""
    return Pipeline.from_bundle(path, **kwargs)


# --------------------------------------------------------------------- helpers
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


def write_overlay(path: str | os.PathLike, image: np.ndarray, labels: np.ndarray) -> None:
    """Write a PNG of ``image`` with the outlines of ``labels`` drawn in yellow."""
    from PIL import Image
    from skimage.segmentation import find_boundaries

    rgb = (np.clip(image, 0, 1) * 255).astype(np.uint8).copy()
    edges = find_boundaries(labels, mode="inner")
    rgb[edges] = (255, 220, 0)
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")


def write_rois(path: str | os.PathLike, labels: np.ndarray) -> None:
    """Write an ImageJ/Fiji ROI set (zip of polygon ROIs, one per object)."""
    import zipfile

    from roifile import ImagejRoi
    from scipy import ndimage
    from skimage.measure import find_contours

    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for index, region in enumerate(ndimage.find_objects(labels.astype(np.int64)), start=1):
            if region is None:
                continue
            mask = np.pad(labels[region] == index, 1)
            contours = find_contours(mask.astype(np.uint8), 0.5)
            if not contours:
                continue
            contour = max(contours, key=len)
            # (row, col) in the padded crop -> (x, y) in the image
            xy = np.stack([contour[:, 1] - 1 + region[1].start, contour[:, 0] - 1 + region[0].start], axis=1)
            roi = ImagejRoi.frompoints(xy)
            roi.name = f"{index:05d}"
            zf.writestr(f"{index:05d}.roi", roi.tobytes())


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
