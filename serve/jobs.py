"""One uploaded image through the pipeline, the queue that runs such jobs, and the temp folder.

An upload is streamed into ``uploads/<token>/`` of the server's temp folder, analysed by
:func:`analyse_file` on the device thread of a :class:`DeviceQueue` (one job at a time, in
arrival order, so two uploads never compete for the device), and removed as soon as its
job ends. The outputs go to ``results/<token>/`` for download; :class:`Workspace` keeps the
newest ones and deletes the whole temp folder when the server stops.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from triageseg.datasets.atomic import atomic_path, write_text_atomic
from triageseg.datasets.errors import DataError
from triageseg.datasets.io import normalize_image, read_image_raw, read_pixel_size, write_labels
from triageseg.pipeline.local.interactive import route_image, segment_image
from triageseg.pipeline.local.outputs import label_rgba, write_overlay, write_rois
from triageseg.postprocess.measure import measure_nuclei

# what a result folder holds: file name -> (download suffix, served as an attachment)
RESULT_FILES = {
    "labels.tif": ("_labels.tif", True),
    "rois.zip": ("_rois.zip", True),
    "nuclei.csv": ("_nuclei.csv", True),
    "overlay.png": ("_overlay.png", True),
    "image.png": (".png", False),
    "outlines.png": ("_outlines.png", False),
    "filled.png": ("_filled.png", False),
}
_TOKEN = re.compile(r"^[0-9a-f]{16}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_filename(name: str) -> str:
    """A file name that cannot leave its folder: the last path part, odd characters replaced.

    Example:
        >>> safe_filename("../../etc/my cells (1).TIF")
        'my_cells_1_.TIF'
    """
    base = re.split(r"[\\/]", name or "")[-1]
    base = _UNSAFE.sub("_", base).lstrip(".")[-120:]
    return base or "upload"


def _intensity(raw: np.ndarray) -> np.ndarray:
    # RGBA: alpha is not intensity (normalize_image drops it too)
    return raw[..., :3] if raw.ndim == 3 and raw.shape[2] == 4 else raw


def _write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def analyse_file(pipe, path: str | os.PathLike, out_dir: str | os.PathLike, *, filename: str,
                 modality: str | None = None, diameter: float | None = None) -> dict:
    """Route and segment one image file, write its outputs into ``out_dir``, describe the result.

    Writes ``labels.tif`` (with the input's pixel size), ``rois.zip``, ``nuclei.csv``,
    ``overlay.png``, and the page's layers ``image.png``, ``outlines.png``, ``filled.png``.

    Args:
        pipe: the loaded :class:`~triageseg.pipeline.local.single.Pipeline`.
        path: the image file.
        out_dir: folder for the outputs (created).
        filename: the name the user knows the file by, used in error messages.
        modality: force this segmenter instead of the router's choice.
        diameter: the median nucleus diameter in pixels (None: estimated; see ``router.size``).

    Returns:
        A JSON-ready dict: filename, width, height, pixel_size_um, routing (see
        :class:`~triageseg.pipeline.local.interactive.Routing`), count, nuclei (one row per
        nucleus, :data:`~triageseg.postprocess.measure.TABLE_COLUMNS`), seconds.

    Raises:
        DataError: an unreadable or unsupported image, or an unknown forced modality,
            named by ``filename``.
    """
    start = time.perf_counter()
    path, out_dir = Path(path), Path(out_dir)
    try:
        raw = read_image_raw(path)
        image = normalize_image(raw, name=filename)
        pixel_size = read_pixel_size(path)
    except DataError as err:
        raise DataError(filename, err.problem) from None
    routing = route_image(pipe, image, modality=modality, diameter=diameter,
                          pixel_size=None if pixel_size is None else float(np.mean(pixel_size)))
    labels = segment_image(pipe, image, routing.used_model, routing.scale)
    table = measure_nuclei(labels, _intensity(raw), pixel_size=pixel_size)
    del raw  # the largest array; the rest go when the outputs are written

    out_dir.mkdir(parents=True, exist_ok=True)
    write_labels(out_dir / "labels.tif", labels, pixel_size=pixel_size)
    write_rois(out_dir / "rois.zip", labels)
    write_text_atomic(out_dir / "nuclei.csv", table.to_csv())
    write_overlay(out_dir / "overlay.png", image, labels)
    _write_png(out_dir / "image.png", (np.clip(image, 0, 1) * 255).round().astype(np.uint8))
    _write_png(out_dir / "outlines.png", label_rgba(labels, style="outlines"))
    _write_png(out_dir / "filled.png", label_rgba(labels, style="filled"))
    return {
        "filename": filename,
        "height": int(labels.shape[0]),
        "width": int(labels.shape[1]),
        "pixel_size_um": None if pixel_size is None else [float(v) for v in pixel_size],
        "routing": routing.to_dict(),
        "count": table.count,
        "nuclei": table.rows(),
        "seconds": round(time.perf_counter() - start, 3),
    }


class ShuttingDown(RuntimeError):
    """The server is stopping: the job was dropped before it started, or was never queued."""


class DeviceQueue:
    """Runs jobs one at a time, in the order they arrive, on one thread that owns the device."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="triageseg-device")
        self._lock = threading.Lock()
        self._futures: set[Future] = set()
        self._closing = False

    @property
    def pending(self) -> int:
        """Jobs waiting or running."""
        with self._lock:
            return len(self._futures)

    def submit(self, fn: Callable, *args, **kwargs) -> Future:
        """Queue ``fn(*args, **kwargs)``; the future's result is its return value.

        Raises:
            ShuttingDown: the queue is closing (:meth:`drop_pending` was called).
        """
        with self._lock:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            future = self._pool.submit(fn, *args, **kwargs)
            self._futures.add(future)
        future.add_done_callback(self._done)
        return future

    def _done(self, future: Future) -> None:
        with self._lock:
            self._futures.discard(future)

    def drop_pending(self) -> int:
        """Refuse new jobs and cancel the waiting ones (the running one goes on); how many were dropped."""
        with self._lock:
            self._closing = True
            waiting = list(self._futures)
        return sum(future.cancel() for future in waiting)

    def close(self) -> None:
        """Let the running job finish, drop the waiting ones, stop the thread."""
        self.drop_pending()
        self._pool.shutdown(wait=True, cancel_futures=True)


class Workspace:
    """The server's temp folder: ``uploads/<token>/`` while a job runs, ``results/<token>/`` after.

    Args:
        parent: folder to create the temp folder in (None: the system temp folder).
        keep: result folders kept; the oldest are deleted beyond that.
    """

    def __init__(self, parent: str | os.PathLike | None = None, *, keep: int = 100):
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="triageseg-serve-", dir=parent))
        self.keep = keep
        self._results: OrderedDict[str, str] = OrderedDict()  # token -> download stem
        self._lock = threading.Lock()

    def new_upload(self) -> tuple[str, Path]:
        """A fresh token and the empty folder its upload is streamed into."""
        token = secrets.token_hex(8)
        folder = self.root / "uploads" / token
        folder.mkdir(parents=True)
        return token, folder

    def discard_upload(self, token: str) -> None:
        """Delete the upload of ``token`` (its job has ended, however it ended)."""
        shutil.rmtree(self.root / "uploads" / token, ignore_errors=True)

    def result_dir(self, token: str) -> Path:
        """Where the outputs of ``token`` go."""
        return self.root / "results" / token

    def keep_result(self, token: str, stem: str) -> None:
        """Offer the outputs of ``token`` for download (named after ``stem``), evicting the oldest."""
        with self._lock:
            self._results[token] = stem
            while len(self._results) > self.keep:
                old, _ = self._results.popitem(last=False)
                shutil.rmtree(self.result_dir(old), ignore_errors=True)

    def lookup(self, token: str, name: str) -> tuple[Path, str] | None:
        """(file, download name) of output ``name`` of ``token``, or None when there is none."""
        if not _TOKEN.match(token) or name not in RESULT_FILES:
            return None
        with self._lock:
            stem = self._results.get(token)
        path = self.result_dir(token) / name
        if stem is None or not path.is_file():
            return None
        return path, stem + RESULT_FILES[name][0]

    def close(self) -> None:
        """Delete the temp folder with every upload and result in it."""
        shutil.rmtree(self.root, ignore_errors=True)
