"""Outputs asked for on a rerun, made from the label files already there (no segmenting again).

A resumed ``segment`` skips inputs whose label file verifies. The other outputs of an
input (``--overlays`` PNG, ``--rois`` zip, ``--geojson``) may have been asked for only
now, or be missing or damaged: :func:`missing_outputs` finds them and :func:`remake_outputs`
writes them from the label file, as a first run with those options writes them. An overlay
also needs the input image, which is read again. A block-wise label file (too large to
hold) gets its GeoJSON read strip by strip (:func:`label_objects`); overlays and ROI zips
are for in-memory images only, as on a first run.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

OVERLAY, ROIS, GEOJSON = "overlay", "rois", "geojson"


@dataclass(frozen=True)
class Extras:
    """The outputs besides the label file that a run asks for (``segment --overlays --rois --geojson``)."""

    overlays: bool = False
    rois: bool = False
    geojson: bool = False

    def kinds(self, *, blockwise: bool) -> list[str]:
        """The kinds an input gets: overlays and ROI zips only for in-memory images."""
        wanted = [(OVERLAY, self.overlays and not blockwise), (ROIS, self.rois and not blockwise),
                  (GEOJSON, self.geojson)]
        return [kind for kind, on in wanted if on]


def output_path(out_dir: Path, name: str, kind: str) -> Path:
    """Where the output ``kind`` of ``name`` lives."""
    return {OVERLAY: out_dir / "overlays" / f"{name}.png", ROIS: out_dir / f"{name}.rois.zip",
            GEOJSON: out_dir / f"{name}.geojson"}[kind]


def check_extra(path: Path, kind: str) -> str | None:
    """Why the output at ``path`` cannot be kept (missing, cut off, unreadable); None when it can."""
    if not path.is_file():
        return "missing"
    try:
        if kind == GEOJSON:
            with path.open(encoding="utf-8") as fh:
                data = json.load(fh)
            if not isinstance(data, dict) or data.get("type") != "FeatureCollection":
                return "not a GeoJSON FeatureCollection"
        elif kind == ROIS:
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
            if bad is not None:
                return f"damaged zip member {bad}"
        else:
            from PIL import Image

            with Image.open(path) as im:
                im.load()  # decodes every row: a cut-off PNG fails here
    except Exception as err:  # noqa: BLE001 - any reader error means: make it again
        return f"unreadable ({type(err).__name__}: {err})"
    return None


def missing_outputs(out_dir: Path, name: str, kinds: list[str]) -> list[str]:
    """Of ``kinds``, those whose output of ``name`` is missing or damaged."""
    return [kind for kind in kinds if check_extra(output_path(out_dir, name, kind), kind) is not None]


def remake_outputs(path: Path, name: str, out_dir: Path, kinds: list[str], row: Mapping | None, *,
                   blockwise: bool, read_input: Callable[[Path], tuple[np.ndarray, object]],
                   level: int = 0) -> list[Path]:
    """Write the outputs ``kinds`` of input ``path`` from its verified label file ``out_dir/<name>.tif``.

    Args:
        row: the image's routing row (its ``modality`` names the GeoJSON classification).
        blockwise: the label file is a block-wise pyramid: read strip by strip, never whole.
        read_input: ``path -> (image, pixel size)``, as the run reads its inputs.
        level: the pyramid level of the input that was segmented (its pixel size is the GeoJSON's).

    Returns:
        The paths written.
    """
    from triageseg.datasets.io import read_labels, read_pixel_size
    from triageseg.pipeline.blockwise.geojson import GeoJSONWriter

    target = out_dir / f"{name}.tif"
    modality = str((row or {}).get("modality", ""))
    written = []
    if blockwise:
        if GEOJSON in kinds:
            from triageseg.datasets.lazy import LazyImage, is_tiff

            pixel_size = None
            if is_tiff(path):
                with LazyImage(path, level=level) as source:
                    pixel_size = source.pixel_size
            with LazyImage(target) as labels, GeoJSONWriter(output_path(out_dir, name, GEOJSON), modality=modality,
                                                             pixel_size=pixel_size, image=name) as out:
                for label, mask, top_left, area in label_objects(labels):
                    out.add(label, mask, top_left, area)
            written.append(output_path(out_dir, name, GEOJSON))
        return written
    labels = read_labels(target)
    image, pixel_size = read_input(path) if OVERLAY in kinds else (None, read_pixel_size(path))
    return written + write_extras(out_dir, name, kinds, labels, image=image, modality=modality,
                                  pixel_size=pixel_size)


def write_extras(out_dir: Path, name: str, kinds, labels: np.ndarray, *, image: np.ndarray | None,
                 modality: str, pixel_size) -> list[Path]:
    """The outputs besides the label file (overlay, ROI zip, GeoJSON) of in-memory ``labels``; their paths."""
    from triageseg.pipeline.blockwise.geojson import write_geojson
    from triageseg.pipeline.local.outputs import write_overlay, write_rois

    written = []
    for kind in kinds:
        where = output_path(out_dir, name, kind)
        if kind == OVERLAY:
            write_overlay(where, image, labels)
        elif kind == ROIS:
            write_rois(where, labels)
        else:
            write_geojson(where, labels, modality=modality, pixel_size=pixel_size, image=name)
        written.append(where)
    return written


def label_objects(labels, *, strip: int = 512) -> Iterator[tuple[int, np.ndarray, tuple[int, int], int]]:
    """Every object of an array-like label image read in strips of rows: ``(id, mask, (top, left), area)``.

    An object is yielded (in id order among those finishing together) once a whole strip
    passes without it; only the rows from the top of the highest unfinished object down
    are held, so memory follows the objects' height, not the image's.
    """
    h, w = int(labels.shape[0]), int(labels.shape[1])
    held = np.zeros((0, w), np.uint32)
    held_top = 0
    boxes: dict[int, list[int]] = {}  # id -> [top, bottom (exclusive), left, right (exclusive)]
    for y0 in range(0, h, strip):
        rows = np.asarray(labels[y0 : min(h, y0 + strip), 0:w]).astype(np.uint32, copy=False)
        held = np.concatenate([held, rows])
        seen = _strip_boxes(rows, y0)
        for label, box in seen.items():
            old = boxes.get(label)
            boxes[label] = box if old is None else [old[0], box[1], min(old[2], box[2]), max(old[3], box[3])]
        done = sorted(label for label in boxes if label not in seen)
        yield from _emit(done, boxes, held, held_top)
        if boxes:
            top = min(box[0] for box in boxes.values())
            held, held_top = held[top - held_top :], top
        else:
            held, held_top = held[len(held) :], y0 + len(rows)
    yield from _emit(sorted(boxes), boxes, held, held_top)


def _strip_boxes(rows: np.ndarray, y0: int) -> dict[int, list[int]]:
    """The bounding box of every id in ``rows`` (image coordinates)."""
    ys, xs = np.nonzero(rows)
    if ys.size == 0:
        return {}
    ids = rows[ys, xs]
    order = np.argsort(ids, kind="stable")
    ids, ys, xs = ids[order], ys[order], xs[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    tops, bottoms = np.minimum.reduceat(ys, starts), np.maximum.reduceat(ys, starts)
    lefts, rights = np.minimum.reduceat(xs, starts), np.maximum.reduceat(xs, starts)
    return {int(ids[s]): [int(t) + y0, int(b) + y0 + 1, int(l), int(r) + 1]
            for s, t, b, l, r in zip(starts, tops, bottoms, lefts, rights)}


def _emit(done: list[int], boxes: dict[int, list[int]], held: np.ndarray, held_top: int):
    for label in done:
        top, bottom, left, right = boxes.pop(label)
        mask = held[top - held_top : bottom - held_top, left:right] == label
        yield label, mask, (top, left), int(mask.sum())
