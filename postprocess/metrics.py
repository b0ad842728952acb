"""Instance-level F1 evaluator: three protocols, sparse IoU, typed results.

Every protocol matches ground-truth (GT) and predicted objects by intersection over
union (IoU) at a set of thresholds, all >= 0.5:

=============  =========================  ==========  ===========================================
protocol       thresholds                 match       aggregation
=============  =========================  ==========  ===========================================
``default``    0.50:0.95 step 0.05 (10)   IoU >= t    F1 per threshold from tp/fp/fn pooled over
                                                      images, mean over thresholds; the mean over
                                                      images of per-image F1 is also reported
                                                      (stardist ``matching_dataset(by_image=False)``)
``caicedo2019`` 0.50:0.90 step 0.05 (9)   IoU > t     predictions dilated by a 3x3 square first;
                                                      F1 per image, mean over images, mean over
                                                      thresholds; error analysis (Caicedo et al.
                                                      2019, BBBC039)
``dsb2018``    0.50:0.95 step 0.05 (10)   IoU > t     AP = TP / (TP + FP + FN) per image, mean over
                                                      thresholds, mean over images (Kaggle DSB 2018)
=============  =========================  ==========  ===========================================

How IoU is computed: the pixels that are foreground in either image are coded as
``gt * (max_pred + 1) + pred``, sorted and run-length counted. Runs whose two labels
are non-zero are the overlaps of (GT, prediction) pairs; summing the runs of a label
gives its area. Memory grows with the number of pixels and of overlapping pairs, never
with ``n_gt x n_pred``; a 4096x4096 image with 7000 nuclei takes well under a second.
Labels need not be consecutive (huge ids are ranked first).

Why no assignment problem is solved: for thresholds above 0.5 an object can overlap at
most one object of the other image with IoU > 0.5 (two such overlaps would each need
more than half of it), so matches are unique and TP is a count. At exactly IoU = 0.5
with ``>=`` two ties are possible (an object cut into two exact halves); the matched
pairs then form disjoint stars of at most two edges, and a maximum matching has
``n_gt_matched + n_pred_matched - n_pairs`` edges, which is what ``default`` counts at
0.5 (the same as stardist's and cellpose's optimal assignment).

Conventions (edge cases):

* An image with no objects in either GT or prediction has tp = fp = fn = 0 and scores
  precision = recall = F1 = AP = 1 at every threshold (nothing to find, nothing
  found). It adds nothing to pooled counts; a pool whose tp + fp + fn is 0 also scores 1.
* Otherwise a ratio with a zero denominator is 0: objects on one side only give
  F1 = AP = 0 (precision 0 when nothing is predicted, recall 0 when nothing exists).
* Identical label images score 1 (under ``caicedo2019`` the prediction is dilated
  first, so there the perfect prediction is the GT shrunk by one pixel); renumbering
  labels (any permutation, gaps, huge ids) changes nothing.

The typed results (:class:`CaicedoErrors`, :class:`ImageResult`, :class:`EvalResult`) are
defined in :mod:`triageseg.postprocess.results` and imported here. Folder evaluation
(pairing files by id, per-modality reports) lives in :mod:`triageseg.postprocess.folders`,
the text table and the HTML report in :mod:`triageseg.postprocess.report`; this module
only matches and aggregates.

Caicedo error analysis (``caicedo2019`` only, on the dilated predictions):

* *missed*: GT objects with no prediction at IoU > 0.7, counted by GT area bin.
* *extra*: predictions with no GT object at IoU > 0.7, counted by (dilated) predicted
  area bin. Bins are 0-250, 250-625, 625-900 and >900 pixels (upper edge inclusive:
  an object of exactly 250 pixels is in 0-250).
* *merge*: a predicted object that overlaps two or more GT objects with IoU > 0.1 each;
  ``merges`` counts such predicted objects.
* *split*: a GT object overlapped by two or more predicted objects with IoU > 0.1 each;
  ``splits`` counts such GT objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from triageseg.postprocess.results import (  # noqa: F401  (AREA_BINS, ERROR_IOU, SPLIT_MERGE_IOU: part of this API)
    AREA_BINS,
    ERROR_IOU,
    SPLIT_MERGE_IOU,
    CaicedoErrors,
    EvalResult,
    ImageResult,
    _frozen,
)

PROTOCOLS = ("default", "caicedo2019", "dsb2018")

_T10 = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.5, 0.55, ..., 0.95
_T9 = _T10[:9]  # 0.5, ..., 0.9

_AREA_EDGES = np.array([250, 625, 900])  # upper edges (inclusive) of AREA_BINS


@dataclass(frozen=True)
class Protocol:
    """How one evaluation protocol matches and aggregates."""

    name: str  # one of PROTOCOLS
    thresholds: tuple[float, ...]  # IoU thresholds, all >= 0.5
    strict: bool  # True: a match needs IoU > t; False: IoU >= t
    dilate_pred: bool  # dilate predicted labels by a 3x3 square before matching
    pooled: bool  # True: precision/recall/F1 from counts pooled over images; False: mean of per-image
    description: str  # one line for tables and help


_PROTOCOLS = {
    "default": Protocol(
        "default", _T10, False, False, True,
        "IoU >= 0.50:0.95 (10 thresholds); F1 from tp/fp/fn pooled over images",
    ),
    "caicedo2019": Protocol(
        "caicedo2019", _T9, True, True, False,
        "IoU > 0.50:0.90 (9 thresholds) after 3x3 dilation of predictions; F1 per image, mean over images",
    ),
    "dsb2018": Protocol(
        "dsb2018", _T10, True, False, False,
        "IoU > 0.50:0.95 (10 thresholds); AP = TP/(TP+FP+FN) per image, mean over images",
    ),
}


def get_protocol(name: str) -> Protocol:
    """Return the :class:`Protocol` called ``name``.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    try:
        return _PROTOCOLS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown protocol {name!r}; valid: {', '.join(PROTOCOLS)}") from None


# --------------------------------------------------------------------------- matching


def _check_labels(arr, name: str) -> tuple[np.ndarray, int]:
    """Validate a label image; return it with its largest label (one pass over it)."""
    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an integer label image, got dtype {arr.dtype}")
    if arr.ndim == 0:
        raise ValueError(f"{name} must be a label image, got a scalar")
    if arr.size == 0:
        return arr, 0
    if arr.dtype.kind == "i":
        # Read as unsigned, a negative label is >= 2**(bits - 1): max() checks both at once.
        top = int(arr.view(np.dtype(arr.dtype.str.replace("i", "u"))).max())
        if top >= 2 ** (8 * arr.dtype.itemsize - 1):
            raise ValueError(f"{name} has negative labels (minimum {arr.min()})")
        return arr, top
    return arr, int(arr.max())


@dataclass(frozen=True, eq=False)
class _Overlap:
    true_area: np.ndarray  # area of each GT object (sorted by id)
    pred_area: np.ndarray  # area of each predicted object (sorted by id)
    pair_true: np.ndarray  # GT object index of each overlapping pair
    pair_pred: np.ndarray  # predicted object index of each overlapping pair
    iou: np.ndarray  # IoU of each overlapping pair


def _overlaps(gt: np.ndarray, pred: np.ndarray, top_g: int, top_p: int) -> _Overlap:
    """Sparse overlap table of two label images of the same shape.

    One pass: the pixels that are foreground in either image are coded as
    ``gt * (max_pred + 1) + pred``, sorted and run-length counted. Runs with both
    labels non-zero are intersections; summing runs per label gives the areas.
    """
    g = gt.ravel()
    p = pred.ravel()
    empty = np.zeros(0, np.int64)
    if g.size == 0 or (top_g == 0 and top_p == 0):
        return _Overlap(empty, empty, empty, empty, np.zeros(0))
    if (top_g + 1) * (top_p + 1) <= 2**32:  # common case: 32-bit codes over the whole image
        span = top_p + 1
        code = _as_uint32(g) * np.uint32(span)
        code += _as_uint32(p)
        code = code[code != 0]  # pixels that are foreground in either image
    else:
        union = g != 0
        union |= p != 0
        gv, pv = g[union].astype(np.int64), p[union].astype(np.int64)
        del union
        if (top_g + 1) * (top_p + 1) > 2**62:  # huge ids: pair their ranks instead
            gv, pv = _ranks(gv), _ranks(pv)
            top_g, top_p = int(gv.max()), int(pv.max())
        span = top_p + 1
        code = gv * span + pv
        del gv, pv
    code.sort()
    start = np.flatnonzero(np.concatenate(([True], code[1:] != code[:-1])))
    count = np.diff(np.append(start, code.size))
    pairs = code[start].astype(np.int64)
    gl, pl = pairs // span, pairs % span
    # GT areas: runs are sorted by GT label, so group them directly.
    has_g = gl != 0
    g_ids, g_first = np.unique(gl[has_g], return_index=True)
    true_area = np.add.reduceat(count[has_g], g_first) if g_ids.size else empty
    has_p = pl != 0
    p_ids, p_index = np.unique(pl[has_p], return_inverse=True)
    pred_area = np.bincount(p_index.ravel(), weights=count[has_p], minlength=p_ids.size).astype(np.int64)
    both = has_g & has_p
    ti = np.searchsorted(g_ids, gl[both])
    pi = np.searchsorted(p_ids, pl[both])
    inter = count[both]
    union_area = true_area[ti] + pred_area[pi] - inter
    return _Overlap(true_area.astype(np.int64), pred_area, ti, pi, inter / union_area)


def _as_uint32(labels: np.ndarray) -> np.ndarray:
    """Non-negative labels as uint32 (a free view for 32-bit input)."""
    if labels.dtype in (np.int32, np.uint32):
        return labels.view(np.uint32)
    return labels.astype(np.uint32)


def _ranks(values: np.ndarray) -> np.ndarray:
    """Replace label ids by their rank among the non-zero ids (1, 2, ...); 0 stays 0."""
    ids, inverse = np.unique(values, return_inverse=True)
    inverse = inverse.ravel().astype(np.int64)
    return inverse if ids[0] == 0 else inverse + 1


def _count_matches(ov: _Overlap, thresholds: Sequence[float], strict: bool) -> np.ndarray:
    """Matched pairs at each threshold (all thresholds >= 0.5)."""
    iou = ov.iou
    lowest = min(thresholds)
    cand = iou > lowest if strict else iou >= lowest
    iou_c = np.sort(iou[cand])
    thr = np.asarray(thresholds, dtype=float)
    side = "right" if strict else "left"
    tp = iou_c.size - np.searchsorted(iou_c, thr, side=side)
    if not strict and 0.5 in thresholds and iou_c.size and iou_c[0] == 0.5:
        # Exact halves can tie at IoU 0.5 (iou_c is sorted): count a maximum matching.
        sel = iou >= 0.5
        n = int(sel.sum())
        tp[list(thresholds).index(0.5)] = (
            np.unique(ov.pair_true[sel]).size + np.unique(ov.pair_pred[sel]).size - n
        )
    return tp.astype(np.int64)


def _ratio(num: np.ndarray, den: np.ndarray, nothing: np.ndarray) -> np.ndarray:
    """num / den; where den is 0 the value is 1 if there was nothing at all, else 0."""
    num = np.asarray(num, float)
    den = np.asarray(den, float)
    out = np.where(nothing, 1.0, 0.0)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _scores(tp, fp, fn):
    tp, fp, fn = (np.asarray(x) for x in (tp, fp, fn))
    nothing = (tp + fp + fn) == 0
    precision = _ratio(tp, tp + fp, nothing)
    recall = _ratio(tp, tp + fn, nothing)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn, nothing)
    ap = _ratio(tp, tp + fp + fn, nothing)
    return precision, recall, f1, ap


def _area_bins(areas: np.ndarray) -> tuple[int, ...]:
    idx = np.searchsorted(_AREA_EDGES, areas, side="left")  # upper edges inclusive
    return tuple(int(c) for c in np.bincount(idx, minlength=len(AREA_BINS)))


def _caicedo_errors(ov: _Overlap) -> CaicedoErrors:
    good = ov.iou > ERROR_IOU
    true_hit = np.zeros(ov.true_area.size, bool)
    true_hit[ov.pair_true[good]] = True
    pred_hit = np.zeros(ov.pred_area.size, bool)
    pred_hit[ov.pair_pred[good]] = True
    touch = ov.iou > SPLIT_MERGE_IOU
    per_true = np.bincount(ov.pair_true[touch], minlength=ov.true_area.size)
    per_pred = np.bincount(ov.pair_pred[touch], minlength=ov.pred_area.size)
    return CaicedoErrors(
        missed=_area_bins(ov.true_area[~true_hit]),
        extra=_area_bins(ov.pred_area[~pred_hit]),
        splits=int((per_true >= 2).sum()),
        merges=int((per_pred >= 2).sum()),
    )


def dilate_labels(labels: np.ndarray) -> np.ndarray:
    """Grow every object by one pixel (3x3 square) without overwriting any object.

    Each background pixel with a labelled neighbour in its 3x3 (or 3x3x3) window takes
    the *largest* neighbouring label; labelled pixels keep theirs. This is the
    prediction dilation of the ``caicedo2019`` protocol; taking the largest label makes
    contested background pixels deterministic.
    """
    labels = np.asarray(labels)
    if not labels.size or not labels.any():
        return labels.copy()
    grown = ndi.maximum_filter(labels, size=3, mode="constant", cval=0)
    return np.where(labels == 0, grown, labels)


def match_image(
    gt: np.ndarray,
    pred: np.ndarray,
    *,
    protocol: str = "default",
    id: str | None = None,  # noqa: A002 - the image id, as everywhere else
) -> ImageResult:
    """Match the objects of one image and score them at every threshold of ``protocol``.

    Args:
        gt: ground-truth label image (any integer dtype, 0 = background; 2-D or N-D).
        pred: predicted label image of the same shape.
        protocol: one of :data:`PROTOCOLS`.
        id: optional image id carried into the result.

    Returns:
        :class:`ImageResult`.

    Raises:
        ValueError: unknown protocol, shapes differ, non-integer or negative labels.

    Example:
        >>> gt = np.zeros((8, 8), np.uint16); gt[1:5, 1:5] = 7
        >>> match_image(gt, gt).mean_f1
        1.0
    """
    proto = get_protocol(protocol)
    gt, top_g = _check_labels(gt, "ground truth")
    pred, top_p = _check_labels(pred, "prediction")
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth shape {gt.shape} differs from prediction shape {pred.shape}")
    if proto.dilate_pred:
        pred = dilate_labels(pred)
    ov = _overlaps(gt, pred, top_g, top_p)
    n_true, n_pred = int(ov.true_area.size), int(ov.pred_area.size)
    tp = _count_matches(ov, proto.thresholds, proto.strict)
    fp = n_pred - tp
    fn = n_true - tp
    precision, recall, f1, ap = _scores(tp, fp, fn)
    return ImageResult(
        id=id,
        protocol=proto.name,
        thresholds=proto.thresholds,
        n_true=n_true,
        n_pred=n_pred,
        tp=_frozen(tp, np.int64),
        fp=_frozen(fp, np.int64),
        fn=_frozen(fn, np.int64),
        precision=_frozen(precision, float),
        recall=_frozen(recall, float),
        f1=_frozen(f1, float),
        ap=_frozen(ap, float),
        mean_f1=float(np.mean(f1)),
        mean_ap=float(np.mean(ap)),
        errors=_caicedo_errors(ov) if proto.name == "caicedo2019" else None,
    )


def aggregate(per_image: Sequence[ImageResult], *, protocol: str = "default") -> EvalResult:
    """Combine per-image results (all of ``protocol``) into an :class:`EvalResult`.

    Useful to score images one at a time (no need to hold them all in memory) and to
    re-aggregate subsets, e.g. per modality.

    Raises:
        ValueError: no images, or a result of another protocol.
    """
    proto = get_protocol(protocol)
    per_image = tuple(per_image)
    if not per_image:
        raise ValueError("no images to evaluate")
    for r in per_image:
        if r.protocol != proto.name:
            raise ValueError(f"image {r.id!r} was scored with protocol {r.protocol!r}, not {proto.name!r}")
    tp = np.sum([r.tp for r in per_image], axis=0)
    fp = np.sum([r.fp for r in per_image], axis=0)
    fn = np.sum([r.fn for r in per_image], axis=0)
    if proto.pooled:
        precision, recall, f1, _ = _scores(tp, fp, fn)
    else:
        precision = np.mean([r.precision for r in per_image], axis=0)
        recall = np.mean([r.recall for r in per_image], axis=0)
        f1 = np.mean([r.f1 for r in per_image], axis=0)
    ap = mean_ap = None
    if proto.name == "dsb2018":
        ap = _frozen(np.mean([r.ap for r in per_image], axis=0), float)
        mean_ap = float(np.mean(ap))
    caicedo = None
    if proto.name == "caicedo2019":
        caicedo = per_image[0].errors
        for r in per_image[1:]:
            caicedo = caicedo + r.errors
    return EvalResult(
        protocol=proto.name,
        thresholds=proto.thresholds,
        n_images=len(per_image),
        n_true=sum(r.n_true for r in per_image),
        n_pred=sum(r.n_pred for r in per_image),
        tp=_frozen(tp, np.int64),
        fp=_frozen(fp, np.int64),
        fn=_frozen(fn, np.int64),
        precision=_frozen(precision, float),
        recall=_frozen(recall, float),
        f1=_frozen(f1, float),
        mean_f1=float(np.mean(f1)),
        image_mean_f1=float(np.mean([r.mean_f1 for r in per_image])),
        ap=ap,
        mean_ap=mean_ap,
        per_image=per_image,
        caicedo=caicedo,
    )


def evaluate(
    gts: Sequence[np.ndarray],
    preds: Sequence[np.ndarray],
    *,
    protocol: str = "default",
    ids: Sequence[str] | None = None,
) -> EvalResult:
    """Score predicted label images against ground truth under one protocol.

    Args:
        gts: ground-truth label images (a list, or a stacked array whose first axis
            indexes images).
        preds: predicted label images, same number and shapes, same order.
        protocol: ``"default"``, ``"caicedo2019"`` or ``"dsb2018"`` (module docstring).
        ids: optional image ids, carried into ``per_image``.

    Returns:
        :class:`EvalResult`; ``mean_f1`` is the headline number.

    Raises:
        ValueError: unknown protocol, different counts, no images, shape mismatch,
            non-integer or negative labels (naming the image).

    Example:
        >>> gt = np.zeros((16, 16), np.uint16); gt[2:8, 2:8] = 1; gt[9:14, 9:14] = 2
        >>> r = evaluate([gt], [np.roll(gt, 1, axis=1)])  # IoU 30/42 and 20/30
        >>> r.tp.tolist()
        [2, 2, 2, 2, 1, 0, 0, 0, 0, 0]
        >>> round(r.mean_f1, 3)
        0.45
    """
    get_protocol(protocol)
    gts = list(gts)
    preds = list(preds)
    if len(gts) != len(preds):
        raise ValueError(f"{len(gts)} ground-truth images but {len(preds)} predictions")
    if ids is not None:
        ids = [str(i) for i in ids]
        if len(ids) != len(gts):
            raise ValueError(f"{len(ids)} ids for {len(gts)} images")
    results = []
    for k, (gt, pred) in enumerate(zip(gts, preds)):
        name = ids[k] if ids is not None else None
        try:
            results.append(match_image(gt, pred, protocol=protocol, id=name))
        except ValueError as err:
            raise ValueError(f"image {name if name is not None else k}: {err}") from None
    return aggregate(results, protocol=protocol)


# Names that lived here before folder evaluation and tables got their own modules; kept
# importable (lazily, to avoid an import cycle) for code written against the old layout.
_MOVED = {
    "FolderReport": "folders",
    "read_modalities": "folders",
    "evaluate_folders": "folders",
    "report_from_results": "folders",
    "format_table": "report",
}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f"triageseg.postprocess.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
