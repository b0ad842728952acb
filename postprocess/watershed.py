"""Class probabilities (background / interior / boundary) -> instance labels.

The decoder shared by every specialist:

1. **Foreground**: ``p_interior + p_boundary > mask_threshold``. Boundary pixels are
   nucleus pixels (see ``postprocess.targets``), so the foreground is the union of all
   nuclei.
2. **Markers**: confident interior away from boundaries,
   ``p_interior - p_boundary > marker_threshold`` inside the foreground; its
   8-connected components, without those smaller than ``min_marker_size``, are the
   seeds. (8-connectivity is safe: the targets put every pixel that is 8-adjacent to
   another nucleus in the boundary class, so interiors of two nuclei never touch.)
3. **Flooding**: a foreground component with exactly one marker *is* that object, and
   one without any marker becomes one object as a whole (a nucleus with no confident
   interior is still a nucleus). No flooding is needed for them: this is most nuclei,
   and it is what makes the decoder fast. Only components holding two or more
   markers are flooded, with ``skimage.segmentation.watershed`` over the elevation
   ``1 - p_interior``, bounded by the component, so every foreground pixel, boundary
   included, goes back to the nucleus whose marker reaches it first. The elevation
   is quantised to 256 levels and, within a level, pixels nearer to a marker (chamfer
   distance) flood first: flat stretches (one-hot or saturated maps) are then split
   by proximity instead of by queue order; on real maps this changes nothing visible.
   **Locality**: the result for a foreground component depends only on that component's
   probabilities (markers, the plateau test and the distances are taken within it and its
   bounding box), so any window that holds a component whole decodes it exactly as the
   whole image does; the block path (``pipeline.blockwise.blocks``) relies on this.
4. **Unsure objects**: an object whose highest interior probability is below
   ``min_score`` is removed (a region the network never calls nucleus with confidence:
   a pale piece of cytoplasm, a chromatin speckle). This decides *whether* there is a
   nucleus, apart from the marker threshold, which decides where touching ones split.
   It depends on the object's own pixels only, so the locality above holds.
5. Objects smaller than ``min_size`` pixels are removed; labels are renumbered
   1..n (uint32).

Round trip: ``labels -> make_targets -> one-hot -> watershed`` gives back the labels
(mean F1 >= 0.99 on the synthetic data for every width and mode; see
``benchmarks/bench_postprocess.py``).

The parameters live in :class:`WatershedParams`, saved beside each model as
``postprocess.json``; :func:`tune_watershed` picks them on validation images.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

POSTPROCESS_JSON = "postprocess.json"
_EIGHT = np.ones((3, 3), bool)


@dataclass(frozen=True)
class WatershedParams:
    """Watershed settings (saved as ``postprocess.json`` next to a segmenter).

    Example:
        >>> WatershedParams(min_size=20).to_dict()["min_size"]
        20
    """

    marker_threshold: float = 0.4  # seed where p_interior - p_boundary > this; in [-1, 1)
    mask_threshold: float = 0.5  # foreground where p_interior + p_boundary > this; in [0, 1)
    min_marker_size: int = 3  # seed components smaller than this (pixels) are dropped
    min_size: int = 10  # final objects smaller than this (pixels) are removed
    min_score: float = 0.0  # objects whose highest interior probability is below this are removed; in [0, 1)

    def __post_init__(self) -> None:
        for name, low, high in (("marker_threshold", -1.0, 1.0), ("mask_threshold", 0.0, 1.0),
                                ("min_score", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            value = float(value)
            if not (low <= value < high):
                raise ValueError(f"{name} must be in [{low}, {high}), got {value}")
            object.__setattr__(self, name, value)
        for name in ("min_marker_size", "min_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
            object.__setattr__(self, name, int(value))

    def to_dict(self) -> dict:
        """Field name -> value (JSON-ready)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> WatershedParams:
        """Build from a dict; missing fields take their defaults.

        Raises:
            ValueError: unknown keys (listing the valid ones) or bad values.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"expected a JSON object of watershed parameters, got {type(data).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ValueError(f"unknown watershed parameter(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
        return cls(**data)

    def replace(self, **changes) -> WatershedParams:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write the parameters atomically to ``path`` (a file, or a folder to hold ``postprocess.json``)."""
        from triageseg.datasets.atomic import write_json_atomic

        path = Path(path)
        if path.is_dir():
            path = path / POSTPROCESS_JSON
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> WatershedParams:
        """Read parameters from ``path`` (a file, or a folder holding ``postprocess.json``).

        Raises:
            DataError: missing or unreadable file, invalid JSON, unknown keys, bad values
                (the message names the file).
        """
        from triageseg.datasets.errors import DataError

        path = Path(path)
        if path.is_dir():
            path = path / POSTPROCESS_JSON
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(path, "file not found") from None
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(path, f"cannot read: {err}") from None
        except json.JSONDecodeError as err:
            raise DataError(path, f"invalid JSON: {err}") from None
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise DataError(path, str(err)) from None


# --------------------------------------------------------------------------- decoding


def _as_probs(probs: np.ndarray, logits: bool) -> np.ndarray:
    arr = np.asarray(probs)
    if arr.ndim != 3 or arr.shape[0] != 3:
        raise ValueError(f"expected class {'logits' if logits else 'probabilities'} of shape 3xHxW, got {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"expected a real-valued array, got dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError("probabilities contain NaN or infinite values")
    if logits:
        arr = np.exp(arr - arr.max(axis=0, keepdims=True))
        arr /= arr.sum(axis=0, keepdims=True)
    return arr


def _drop_small(labels: np.ndarray, min_count: int, where: np.ndarray) -> np.ndarray:
    """Zero the labels covering fewer than ``min_count`` pixels (in place, returns labels).

    ``where`` is ``labels > 0``, passed in because the caller has it already.
    """
    if min_count <= 1:
        return labels
    values = labels[where]
    counts = np.bincount(values, minlength=1)
    small = counts < min_count
    small[0] = False
    if small.any():
        labels[where] = np.where(small[values], 0, values)
    return labels


def _drop_unsure(labels: np.ndarray, interior: np.ndarray, min_score: float) -> np.ndarray:
    """Zero the objects whose highest ``interior`` probability is below ``min_score`` (in place, returns labels)."""
    if min_score <= 0.0:
        return labels
    where = labels > 0
    values = labels[where]
    if values.size == 0:
        return labels
    peak = np.zeros(int(values.max()) + 1, np.float32)
    np.maximum.at(peak, values, interior[where])
    unsure = peak < min_score
    unsure[0] = False
    if unsure.any():
        labels[where] = np.where(unsure[values], 0, values)
    return labels


def _decode(p: np.ndarray, params: WatershedParams) -> np.ndarray:
    """Watershed without the final size filter; returns int32 labels (not consecutive)."""
    return decode_components(p, params)[0]


def decode_components(p: np.ndarray, params: WatershedParams) -> tuple[np.ndarray, np.ndarray]:
    """Watershed without the final size filter, and the foreground components it decoded one by one.

    Objects below ``params.min_score`` are already removed (their pixels are 0 in the labels,
    still foreground in the components).

    Args:
        p: float32 3xHxW probabilities (already checked).
        params: watershed parameters.

    Returns:
        ``(labels, components)``: int32 object labels (unique, not consecutive) and the
        int32 8-connected foreground components (1..n). Each object lies in one component,
        and a component's objects depend on that component's probabilities alone.
    """
    interior, boundary = p[1], p[2]
    fg = (interior + boundary) > params.mask_threshold
    seeds = (interior - boundary) > params.marker_threshold
    seeds &= fg
    markers, n_markers = ndi.label(seeds, structure=_EIGHT)
    _drop_small(markers, params.min_marker_size, seeds)
    comps, n_comps = ndi.label(fg, structure=_EIGHT)
    if n_comps == 0:
        return comps, comps
    # Which component each marker lies in, and how many markers each component holds.
    comp_of_marker = np.zeros(n_markers + 1, np.int64)
    comp_of_marker[markers[seeds]] = comps[seeds]
    comp_of_marker[0] = 0
    present = np.flatnonzero(comp_of_marker)
    per_comp = np.bincount(comp_of_marker[present], minlength=n_comps + 1)
    # Components with one marker take its id; without any, a fresh id.
    lut = np.zeros(n_comps + 1, np.int32)
    lut[comp_of_marker[present]] = present
    empty = np.flatnonzero(per_comp[1:] == 0) + 1
    lut[empty] = n_markers + 1 + np.arange(empty.size)
    multi = per_comp >= 2
    multi[0] = False
    out = lut[comps]
    if multi.any():
        region = multi[comps]
        rows = np.flatnonzero(region.any(axis=1))
        cols = np.flatnonzero(region.any(axis=0))
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        sub = region[box]
        out[box][sub] = _flood(interior[box], markers[box], comps[box], multi)[sub]
    return _drop_unsure(out, interior, params.min_score), comps


# Order among a component's queued marker pixels of one elevation (raster order), far below any elevation step.
_TIE = 2.0**-36


def _flood(interior: np.ndarray, markers: np.ndarray, comps: np.ndarray, multi: np.ndarray) -> np.ndarray:
    """Flood the components marked in ``multi`` from their ``markers`` over ``1 - interior`` (skimage watershed).

    The elevation is quantised to 256 levels. In a component where many pixels to flood
    share one level (a plateau: one-hot or saturated maps), the chamfer distance to the
    component's nearest marker, over its bounding box, is added as a fraction of a level:
    it orders pixels only *within* a level, so plateaus are split by proximity to the
    markers instead of by queue order. Only marker pixels next to a pixel to flood enter
    the queue (the rest cannot reach anything), which keeps the queue short.

    One flood runs over all components at once, and each component's result depends on
    it alone: the components are separate regions of the mask, the plateau test and the
    distances are per component, and skimage's queue orders pixels by (elevation, arrival)
    except the markers, which all arrive at once and whose ties it breaks by heap position
    (that is, by the other regions' pixels too); so the markers of a component get
    distinct elevations, lowered by ``_TIE`` steps in their raster order within it.
    """
    from skimage.segmentation import watershed as skimage_watershed

    region = multi[comps]
    seeds = np.where(region, markers, 0)
    seeded = seeds > 0
    todo = region & ~seeded
    if not todo.any():
        return seeds
    rim = seeded & _dilate8(todo)
    elevation = np.rint((1.0 - interior) * 255.0).astype(np.float64)
    flooding = np.flatnonzero(multi)
    rank = np.zeros(multi.size, np.intp)
    rank[flooding] = np.arange(flooding.size)
    levels = np.bincount(rank[comps[todo]] * 256 + elevation[todo].astype(np.intp),
                         minlength=flooding.size * 256).reshape(flooding.size, 256)
    plateau = flooding[levels.max(axis=1) > 0.25 * levels.sum(axis=1)]
    if plateau.size:
        slices = ndi.find_objects(np.where(np.isin(comps, plateau), comps, 0))
        for k in plateau.tolist():
            box = slices[k - 1]
            own = comps[box] == k
            dist = ndi.distance_transform_cdt(~(seeded[box] & own), metric="taxicab")
            part = elevation[box]
            part[own] += (dist / (float(dist.max()) + 1.0))[own]
    # markers of one component: distinct elevations in raster order (below their level, so still first in it)
    where = np.flatnonzero(rim)
    owner = comps.ravel()[where]
    order = np.argsort(owner, kind="stable")
    counts = np.bincount(owner, minlength=multi.size)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.empty(where.size, np.float64)
    pos[order] = np.arange(where.size) - starts[owner[order]] - counts[owner[order]]
    elevation.ravel()[where] += pos * _TIE
    flooded = skimage_watershed(elevation, markers=np.where(rim, seeds, 0), mask=rim | todo, connectivity=2)
    flooded[seeded] = seeds[seeded]
    return flooded


def _dilate8(mask: np.ndarray) -> np.ndarray:
    """Binary dilation by the 3x3 square (cheap shifted ORs)."""
    rows = mask.copy()
    rows[1:] |= mask[:-1]
    rows[:-1] |= mask[1:]
    out = rows.copy()
    out[:, 1:] |= rows[:, :-1]
    out[:, :-1] |= rows[:, 1:]
    return out


def _finish(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Remove objects below ``min_size`` and renumber 1..n as uint32."""
    where = labels > 0
    values = labels[where]
    out = np.zeros(labels.shape, np.uint32)
    if values.size == 0:
        return out
    counts = np.bincount(values, minlength=1)
    keep = counts >= max(min_size, 1)
    keep[0] = False
    lut = (np.cumsum(keep) * keep).astype(np.uint32)
    out[where] = lut[values]
    return out


def watershed(probs: np.ndarray, params: WatershedParams | None = None, *, logits: bool = False) -> np.ndarray:
    """Turn 3-class probabilities into instance labels.

    Args:
        probs: 3xHxW class probabilities (background, interior, boundary), e.g. the
            softmax output of a segmenter; or logits with ``logits=True``.
        params: :class:`WatershedParams` (defaults if None).
        logits: apply a softmax over the class axis first.

    Returns:
        HxW uint32 labels, 0 = background, objects numbered 1..n.

    Raises:
        ValueError: wrong shape, non-numeric dtype, NaN or infinite values.

    Example:
        >>> p = np.zeros((3, 8, 8), np.float32); p[0] = 1
        >>> p[:, 2:6, 2:6] = [[[0]], [[1]], [[0]]]
        >>> int(watershed(p, WatershedParams(min_size=1)).max())
        1
    """
    params = WatershedParams() if params is None else params
    if not isinstance(params, WatershedParams):
        raise ValueError(f"params must be WatershedParams, got {type(params).__name__}")
    p = _as_probs(probs, logits)
    return _finish(_decode(p, params), params.min_size)


DEFAULT_GRID: dict[str, tuple] = {
    "marker_threshold": (0.2, 0.4, 0.6, 0.8),
    "mask_threshold": (0.4, 0.5, 0.6),
    "min_size": (0, 10, 20, 40),
    # The true nuclei's peaks crowd just under 1. On the demo bundle's validation split, 0.99 removes
    # 1-39 % of the objects that match a nucleus (IoU >= 0.5) and 70-96 % of the false ones, depending
    # on the segmenter; 0.995 removes 3-57 % of the true ones: the grid stops at 0.99.
    "min_score": (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99),
}


def tune_watershed(
    probs_list: Sequence[np.ndarray],
    gts: Sequence[np.ndarray],
    *,
    grid: Mapping[str, Sequence] | None = None,
    protocol: str = "default",
    base: WatershedParams | None = None,
    logits: bool = False,
) -> tuple[WatershedParams, float]:
    """Pick watershed parameters by grid search on validation images.

    Every combination of ``grid`` values is decoded and scored with the evaluator;
    the best mean score wins (``mean_f1``, or ``mean_ap`` for ``dsb2018``), ties going
    to the earliest combination in grid order. Cheap by construction: ``min_score``
    and ``min_size`` are applied after decoding, so the watershed runs once per
    combination of the *other* fields and image.

    Args:
        probs_list: 3xHxW probability maps (or logits with ``logits=True``).
        gts: matching ground-truth label images.
        grid: field name -> candidate values (fields of :class:`WatershedParams`);
            default :data:`DEFAULT_GRID` (4 x 3 x 4 x 8 = 384 combinations, 12 decodes).
        protocol: evaluation protocol (see ``postprocess.metrics``).
        base: values of the fields not in ``grid`` (defaults if None).
        logits: the maps are logits.

    Returns:
        (best parameters, their score).

    Raises:
        ValueError: unknown grid field (listing valid ones), empty grid values, bad
            values, mismatched inputs.
    """
    from triageseg.postprocess.metrics import aggregate, get_protocol, match_image

    get_protocol(protocol)
    base = WatershedParams() if base is None else base
    grid = dict(DEFAULT_GRID if grid is None else grid)
    valid = [f.name for f in dataclasses.fields(WatershedParams)]
    unknown = sorted(set(grid) - set(valid))
    if unknown:
        raise ValueError(f"unknown grid field(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    for name, values in grid.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
            raise ValueError(f"grid field {name} needs a non-empty list of values, got {values!r}")
    probs_list, gts = list(probs_list), list(gts)
    if len(probs_list) != len(gts) or not gts:
        raise ValueError(f"need as many probability maps as label images (>= 1), got {len(probs_list)} and {len(gts)}")
    maps = [_as_probs(p, logits) for p in probs_list]
    for k, (p, g) in enumerate(zip(maps, gts)):
        if p.shape[1:] != np.shape(g):
            raise ValueError(f"image {k}: probabilities {p.shape} do not match labels {np.shape(g)}")
    sizes = tuple(grid.pop("min_size", (base.min_size,)))
    scores = tuple(grid.pop("min_score", (base.min_score,)))
    names = list(grid)
    best: tuple[float, WatershedParams] | None = None
    for values in itertools.product(*(grid[n] for n in names)):
        params = base.replace(**dict(zip(names, values)), min_score=0.0)
        raw = [_decode(p, params) for p in maps]
        for min_score in scores:
            kept = [_drop_unsure(r.copy(), p[1], min_score) for r, p in zip(raw, maps)]
            for min_size in sizes:
                candidate = params.replace(min_size=min_size, min_score=min_score)
                results = [match_image(g, _finish(r, min_size), protocol=protocol) for g, r in zip(gts, kept)]
                score = aggregate(results, protocol=protocol).score
                if best is None or score > best[0]:
                    best = (score, candidate)
    return best[1], float(best[0])
