"""The stages of a cluster run, as Ray Data executes them on the nodes.

```
read + normalise (task)  ->  route + segment (SegmentActor pool, every model)  ->  watershed + write (task)
```

Each stage calls the functions the local path calls (:func:`~triageseg.pipeline.local.batch.read_input`,
:meth:`Pipeline.decide`, :meth:`Pipeline.probabilities`, the batch writer), so a cluster run
and ``triageseg segment`` on one machine give the same labels. A bad input never raises
out of a stage: its row carries ``error`` (and ``error_path``) and passes the later
stages untouched, so the driver applies ``--on-error`` and Ray's retries are left for
lost workers and nodes.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from triageseg.datasets.errors import DataError
from triageseg.pipeline.cluster import storage
from triageseg.ray_cluster import is_uri
from triageseg.router.policy import SKIPPED

EMPTY_IMAGE = np.zeros((0, 0, 3), np.float32)
# Columns a row keeps from stage to stage (the input and its routing decision).
CARRIED = ("index", "file", "source", "name", "modality", "confidence", "ood_score", "used_model", "decision", "error",
           "error_path", "diameter", "scale", "size_source")


@dataclass(frozen=True)
class BundleSource:
    """Where actors find the bundle: a path every node reads, or a copy in the object store."""

    path: str | None = None  # bundle folder readable on every node (shared filesystem or one machine)
    ref: Any = None  # ObjectRef of storage.bundle_payload's files, when shipped
    digest: str = ""  # content digest of the shipped files (name of the node-local copy)

    def open(self) -> str:
        """A local folder holding the bundle (the shipped copy is written once per node)."""
        if self.path is not None:
            return self.path
        import ray

        return str(storage.materialize_bundle(self.digest, ray.get(self.ref)))


@dataclass(frozen=True)
class StageOptions:
    """What every stage needs to know about the run (sent once with each stage's function)."""

    out: str  # output folder or URI
    pipeline: dict = field(default_factory=dict)  # Pipeline keyword options (device, tile_size, batch_size, tta)
    threads: int = 1  # torch CPU threads per actor (its CPU share)
    channel: int | None = None  # channel of 2- or >3-channel images (or of the pages of a 2-4 page TIFF)
    page: int | None = None  # plane of multi-page TIFFs
    modality: str | None = None  # forced specialist (no routing pass)
    overlays: bool = False  # also write overlays/<name>.png
    rois: bool = False  # also write <name>.rois.zip
    decode_in_actor: bool = False  # SegmentActor runs write_stage on its own rows (no write tasks)


def error_fields(err: BaseException, file: str, local: str | None = None) -> dict[str, str]:
    """``{"error", "error_path"}`` for a failure on ``file`` (``local``: its downloaded copy)."""
    if isinstance(err, DataError):
        path = err.path
        if path is not None and local is not None and os.fspath(path) == os.fspath(local):
            path = file  # name the URI the user gave, not the node's temporary copy
        return {"error": err.problem, "error_path": "" if path is None else str(path)}
    return {"error": f"{type(err).__name__}: {err}", "error_path": ""}


def row_error(row) -> DataError | None:
    """The failure a row carries, as the DataError the local path would raise; None when it has none."""
    problem = str(row.get("error") or "")
    if not problem:
        return None
    return DataError(row.get("error_path") or row["file"], problem)


def _carry(row) -> dict:
    return {k: row[k] for k in CARRIED if k in row}


def _pixel(row) -> float | None:
    """Microns per pixel of a read row (the mean of y and x); None when the file has none."""
    px = float(row.get("px_y", np.nan))
    return None if np.isnan(px) else 0.5 * (px + float(row["px_x"]))


def _size(d) -> dict:
    """The size decision's carried columns (NaN / "" when none)."""
    return {"diameter": _nan(d.diameter), "scale": _nan(d.scale), "size_source": d.size_source}


def _writable(array: np.ndarray) -> np.ndarray:
    # Arrays from the object store are read-only views; the pipeline functions may write.
    return array if array.flags.writeable else array.copy()


def _set_threads(threads: int) -> None:
    from triageseg.segmenters.threads import set_network_threads

    # The same thread count as the local run gives bit-identical probabilities (torch's, or the exported
    # runtime's when the networks are served from their exports without torch).
    set_network_threads(threads)


def read_stage(row: dict, *, options: StageOptions) -> dict:
    """Read + normalise one input (a Ray task): adds ``image``, ``px_y``, ``px_x``, ``t_read``."""
    from triageseg.pipeline.local.batch import read_input

    t0 = time.perf_counter()
    out = {**_carry(row), "error": row.get("error", ""), "error_path": row.get("error_path", "")}
    out.update(image=EMPTY_IMAGE, px_y=np.nan, px_x=np.nan)
    file = row.get("source") or row["file"]
    local = None
    try:
        if is_uri(file):
            with tempfile.TemporaryDirectory(prefix="triageseg-in-") as tmp:
                local = storage.fetch(file, tmp)
                image, pixel = read_input(local, channel=options.channel, page=options.page)
        else:
            image, pixel = read_input(file, channel=options.channel, page=options.page)
    except Exception as err:  # noqa: BLE001 - recorded per file, the driver applies --on-error
        out.update(error_fields(err, file, None if local is None else str(local)))
        image, pixel = EMPTY_IMAGE, None
    out["image"] = image
    if pixel is not None:
        out["px_y"], out["px_x"] = float(pixel[0]), float(pixel[1])
    out["t_read"] = time.perf_counter() - t0
    return out


def _rows(batch: dict) -> list[dict]:
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [{k: batch[k][i] for k in keys} for i in range(n)]


def _nan(value: float | None) -> float:
    """A float column value: NaN for None (Ray Data columns keep one type)."""
    return np.nan if value is None else float(value)


def _columns(rows: list[dict]) -> dict:
    return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}


class SegmentActor:
    """Routes and segments images: the router and every segmenter the images need, each loaded once per actor.

    One pool of these serves all the bundle's models side by side: an image is routed
    (``Pipeline.decide``; with a forced modality, the forced decision) and its class
    probabilities computed with the segmenter it was routed to
    (``Pipeline.probabilities``), in the same actor. A model loads on the first image
    that needs it and stays for the actor's life, so a run pays actor start and each
    model's load once per actor, not once per model pass.
    """

    def __init__(self, bundle: BundleSource, options: StageOptions):
        from triageseg.pipeline.local.single import Pipeline

        _set_threads(options.threads)
        self.options = options
        # A corrupt model file fails each image routed to it, with the message naming it, as it does locally.
        self.pipe = Pipeline(bundle.open(), **options.pipeline)
        self.router_loaded = False
        self.models: dict[str, tuple[str, str]] = {}  # model -> (watershed params, quality model) as JSON

    def ready(self) -> bool:
        """True once the actor is made (``pipeline.cluster.actor_pass`` hands work only to started actors)."""
        return True

    def _decide(self, image: np.ndarray, out: dict, pixel_size) -> tuple[str, float | None]:
        """Route and size ``image`` (timed as ``t_route``, the router's first load as ``t_load``).

        Returns:
            (the model it goes to, the scale its segmenter runs at; None = native).
        """
        t0 = time.perf_counter()
        if self.options.modality is None and not self.router_loaded:
            self.pipe._load_router()
            self.router_loaded = True
            out["t_load"] += time.perf_counter() - t0
            t0 = time.perf_counter()
        d = self.pipe.decide(image, self.options.modality, pixel_size=pixel_size)
        out.update(modality=d.modality, confidence=_nan(d.confidence), used_model=d.used_model, decision=d.decision,
                   ood_score=_nan(d.ood_score), **_size(d))
        if self.options.modality is None:
            out["t_route"] = time.perf_counter() - t0
        scale = float(out["scale"])
        return d.used_model, (scale if np.isfinite(scale) else None)

    def _load(self, model: str, out: dict) -> tuple[str, str]:
        if model not in self.models:
            t0 = time.perf_counter()
            params = json.dumps(self.pipe.params(model).to_dict())  # loads the model
            quality = self.pipe.quality_model(model)
            self.models[model] = (params, "" if quality is None else json.dumps(quality.to_dict()))
            out["t_load"] += time.perf_counter() - t0
        return self.models[model]

    def __call__(self, batch: dict) -> dict:
        keep_image = self.options.overlays or self.options.rois
        rows = []
        for row in _rows(batch):
            if self.options.decode_in_actor:  # the input item itself: read here (actor_pass)
                row = read_stage(row, options=self.options)
            out = {**_carry(row), "modality": "", "confidence": np.nan, "ood_score": np.nan, "used_model": "",
                   "decision": "", "diameter": np.nan, "scale": np.nan, "size_source": "",
                   "probs": np.zeros((0, 0, 0), np.float32), "params": "", "quality_model": "",
                   "px_y": row["px_y"], "px_x": row["px_x"], "image": EMPTY_IMAGE, "t_read": float(row["t_read"]),
                   "t_load": 0.0, "t_route": 0.0, "t_segment": 0.0}
            if not row["error"]:
                try:
                    image = _writable(row["image"])
                    model, scale = self._decide(image, out, _pixel(row))
                    if model != SKIPPED:  # an unknown modality under --unknown skip: a row, no label file
                        out["params"], out["quality_model"] = self._load(model, out)
                        if scale is not None:  # the watershed's area thresholds follow the image's own scale
                            out["params"] = json.dumps(self.pipe.params(model, scale).to_dict())
                        t0 = time.perf_counter()
                        out["probs"] = self.pipe.probabilities(image, model, scale)
                        out["t_segment"] = time.perf_counter() - t0
                        if keep_image:
                            out["image"] = image
                except Exception as err:  # noqa: BLE001
                    out.update(error_fields(err, row["file"]))
            # decoded here, the probabilities never leave the actor's process (no object store, no task to schedule)
            rows.append(write_stage(out, options=self.options) if self.options.decode_in_actor else out)
        return _columns(rows)


def write_stage(row: dict, *, options: StageOptions) -> dict:
    """Watershed + atomic writes of one image (a Ray task); returns its routing.csv row.

    A local (or NFS) output folder gets the batch writer's temp-then-rename files; a URI
    gets the same files written to a node-local folder, then uploaded, label file last.
    """
    from triageseg.pipeline.local.batch import _decode_and_write
    from triageseg.pipeline.local.remake import Extras
    from triageseg.postprocess.quality import QualityModel
    from triageseg.postprocess.watershed import WatershedParams

    t0 = time.perf_counter()
    out = {**_carry(row), "objects": -1, "quality": np.nan, "t_write": 0.0}
    for key in ("t_read", "t_load", "t_route", "t_segment"):
        out[key] = float(row.get(key, 0.0))
    if row["error"]:
        return out
    if row["used_model"] == SKIPPED:  # routed to no segmenter: the driver records its row, nothing is written
        out["objects"] = 0
        return out
    name = row["name"]
    pixel = None if np.isnan(row["px_y"]) else (float(row["px_y"]), float(row["px_x"]))
    image = row["image"] if (options.overlays or options.rois) else None
    kinds = Extras(options.overlays, options.rois).kinds(blockwise=False)
    job = (_writable(row["probs"]), WatershedParams.from_dict(json.loads(row["params"])))
    confidence = float(row["confidence"])
    scoring = (QualityModel.from_dict(json.loads(row["quality_model"])) if row.get("quality_model") else None,
               None if np.isnan(confidence) else confidence)
    entry = routing_entry(row)  # stored in the label file, as locally: routing.csv can be rebuilt from it
    try:
        if is_uri(options.out):
            with tempfile.TemporaryDirectory(prefix="triageseg-out-") as tmp:
                objects, quality = _decode_and_write(*job, tmp, name, pixel, image, kinds, *scoring, row=entry)
                for local in _produced(Path(tmp), name, options):
                    storage.upload(local, storage.join(options.out, local.relative_to(tmp).as_posix()))
        else:
            objects, quality = _decode_and_write(*job, options.out, name, pixel, image, kinds, *scoring, row=entry)
        out["objects"] = objects
        out["quality"] = np.nan if quality is None else float(quality)
    except Exception as err:  # noqa: BLE001
        out.update(error_fields(err, row["file"]))
    out["t_write"] = time.perf_counter() - t0
    return out


def routing_entry(row) -> dict:
    """The routing.csv columns of a Ray row known before the watershed (as ``records.routing_row`` makes them)."""
    from types import SimpleNamespace

    from triageseg.pipeline.local.records import routing_row

    def num(key: str) -> float | None:
        value = float(row.get(key, np.nan))
        return None if np.isnan(value) else value

    size = SimpleNamespace(diameter=num("diameter"), scale=num("scale"), size_source=str(row.get("size_source", "")))
    return routing_row(Path(row["file"]) if not is_uri(str(row["file"])) else str(row["file"]), str(row["name"]),
                       str(row["modality"]), num("confidence"), str(row["used_model"]), str(row["decision"]),
                       ood_score=num("ood_score"), size=size)


def _produced(folder: Path, name: str, options: StageOptions) -> list[Path]:
    """The files the writer made in ``folder``, the label file last (its presence marks the input done)."""
    extra = []
    if options.overlays:
        extra.append(folder / "overlays" / f"{name}.png")
    if options.rois:
        extra.append(folder / f"{name}.rois.zip")
    return [*extra, folder / f"{name}.tif"]
