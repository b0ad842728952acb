"""F1 evaluator: exact expectations on drawn shapes, edge cases, protocols, scale."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from triageseg.postprocess.metrics import (
    AREA_BINS,
    PROTOCOLS,
    CaicedoErrors,
    aggregate,
    dilate_labels,
    evaluate,
    get_protocol,
    match_image,
)

T10 = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def square(shape=(32, 32), top=4, left=4, size=10, value=1, out=None):
    out = np.zeros(shape, np.uint16) if out is None else out
    out[top:top + size, left:left + size] = value
    return out


def draw_disk(shape, center, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


def test_protocol_thresholds():
    assert PROTOCOLS == ("default", "caicedo2019", "dsb2018")
    assert get_protocol("default").thresholds == T10
    assert get_protocol("dsb2018").thresholds == T10
    assert get_protocol("caicedo2019").thresholds == T10[:9]
    with pytest.raises(ValueError, match="valid: default, caicedo2019, dsb2018"):
        get_protocol("coco")


def test_shifted_square_exact_counts():
    gt = square()
    pred = square(left=6)  # overlap 10x8 = 80, union 120 -> IoU 2/3
    r = match_image(gt, pred)
    assert r.tp.tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert r.fp.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert r.fn.tolist() == r.fp.tolist()
    assert r.f1.tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert r.mean_f1 == pytest.approx(0.4)
    assert (r.n_true, r.n_pred) == (1, 1)


def test_shifted_disk_exact_counts():
    shape = (64, 64)
    a = draw_disk(shape, (30, 30), 12)
    b = draw_disk(shape, (30, 33), 12)
    iou = (a & b).sum() / (a | b).sum()
    expected = [int(iou >= t) for t in T10]
    assert 0 < sum(expected) < 10
    gt = a.astype(np.uint8) * 3
    pred = b.astype(np.int32) * 9
    pred[2, 2] = 4  # one extra tiny object
    r = match_image(gt, pred)
    assert r.tp.tolist() == expected
    assert r.fp.tolist() == [2 - e for e in expected]
    assert r.fn.tolist() == [1 - e for e in expected]


def test_iou_equal_to_threshold_matches_only_with_ge():
    gt = square(size=0)
    gt[0:4, 0:5] = 1  # 20 px
    pred = np.zeros_like(gt)
    pred[0:2, 0:5] = 2
    pred[2, 0] = 2  # 11 px inside the GT object: IoU = 11/20 = 0.55
    default = match_image(gt, pred)
    dsb = match_image(gt, pred, protocol="dsb2018")
    assert default.tp.tolist()[:3] == [1, 1, 0]
    assert dsb.tp.tolist()[:3] == [1, 0, 0]


def test_exact_halves_tie_counts_one_match():
    gt = np.ones((4, 8), np.uint8)
    pred = np.zeros((4, 8), np.uint8)
    pred[:, :4], pred[:, 4:] = 1, 2  # each half has IoU exactly 0.5
    r = match_image(gt, pred)
    assert r.tp.tolist()[:2] == [1, 0] and r.fp[0] == 1 and r.fn[0] == 0
    swapped = match_image(pred, gt)  # the same tie from the other side
    assert swapped.tp[0] == 1 and swapped.fn[0] == 1 and swapped.fp[0] == 0
    assert match_image(gt, pred, protocol="dsb2018").tp[0] == 0


def test_ap_and_per_image_scores():
    gt = square(size=10) + square(top=18, left=18, size=6, value=2)
    pred = square(size=10, value=5) + square(top=18, left=2, size=4, value=6)
    r = match_image(gt, pred, protocol="dsb2018")
    assert r.tp.tolist() == [1] * 10 and r.fp.tolist() == [1] * 10 and r.fn.tolist() == [1] * 10
    assert r.ap.tolist() == pytest.approx([1 / 3] * 10)
    assert r.mean_ap == pytest.approx(1 / 3)
    assert r.f1.tolist() == pytest.approx([0.5] * 10)
    assert r.precision.tolist() == pytest.approx([0.5] * 10)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_edge_cases(protocol):
    empty = np.zeros((16, 16), np.uint16)
    obj = square((16, 16), 2, 2, 6)
    # caicedo2019 dilates predictions by one pixel: its perfect prediction is one pixel smaller
    perfect = square((16, 16), 3, 3, 4) if protocol == "caicedo2019" else obj
    n = len(get_protocol(protocol).thresholds)
    both_empty = match_image(empty, empty, protocol=protocol)
    assert both_empty.f1.tolist() == [1.0] * n and both_empty.ap.tolist() == [1.0] * n
    assert both_empty.tp.sum() == both_empty.fp.sum() == both_empty.fn.sum() == 0
    no_pred = match_image(obj, empty, protocol=protocol)
    assert no_pred.f1.tolist() == [0.0] * n and no_pred.fn.tolist() == [1] * n
    assert no_pred.precision.tolist() == [0.0] * n and no_pred.recall.tolist() == [0.0] * n
    no_gt = match_image(empty, obj, protocol=protocol)
    assert no_gt.f1.tolist() == [0.0] * n and no_gt.fp.tolist() == [1] * n
    same = match_image(obj, perfect, protocol=protocol)
    assert same.f1.tolist() == [1.0] * n and same.mean_f1 == 1.0
    # an all-empty dataset scores 1; empty images add nothing to pooled counts
    assert evaluate([empty, empty], [empty, empty], protocol=protocol).mean_f1 == 1.0
    with_empty = evaluate([obj, empty], [perfect, empty], protocol=protocol)
    assert with_empty.tp.tolist() == [1] * n and with_empty.mean_f1 == 1.0


def test_pooled_versus_per_image_aggregation():
    a = square(size=10)
    b = square(size=10) + square(top=16, left=16, size=8, value=2) + square(top=0, left=20, size=4, value=3)
    b_pred = square(size=10)  # finds 1 of 3
    gts, preds = [a, b], [a, b_pred]
    default = evaluate(gts, preds)
    # pooled: tp 2, fn 2 -> F1 = 4/6; per image: 1 and 2/4
    assert default.f1.tolist() == pytest.approx([2 / 3] * 10)
    assert default.mean_f1 == pytest.approx(2 / 3)
    assert default.image_mean_f1 == pytest.approx((1 + 0.5) / 2)
    assert default.tp.tolist() == [2] * 10 and default.fn.tolist() == [2] * 10
    dsb = evaluate(gts, preds, protocol="dsb2018")
    assert dsb.mean_ap == pytest.approx((1 + 1 / 3) / 2) and dsb.score == dsb.mean_ap
    assert dsb.f1.tolist() == pytest.approx([0.75] * 10)
    assert default.ap is None and default.score == default.mean_f1


def test_label_permutation_and_gaps_do_not_matter():
    rng = np.random.default_rng(3)
    gt = np.zeros((40, 40), np.int64)
    for k in range(1, 7):
        y, x = rng.integers(0, 32, 2)
        gt[y:y + 7, x:x + 7] = k
    pred = np.roll(gt, 1, axis=0)
    base = match_image(gt, pred)
    perm = np.concatenate(([0], rng.permutation(np.arange(1, 7)) * 1000 + 17))
    perm_pred = np.concatenate(([0], rng.permutation(np.arange(1, 7)) + (2**40)))
    again = match_image(perm[gt], perm_pred[pred].astype(np.uint64))
    for field in ("tp", "fp", "fn", "f1"):
        assert getattr(again, field).tolist() == getattr(base, field).tolist()
    assert match_image(gt.astype(bool), pred.astype(bool)).n_true == 1


def _reference_tp(gt, pred, threshold, strict):
    """Brute force: dense IoU matrix + optimal assignment (only for tiny test images)."""
    g = [v for v in np.unique(gt) if v]
    p = [v for v in np.unique(pred) if v]
    if not g or not p:
        return 0
    iou = np.array([[((gt == a) & (pred == b)).sum() / ((gt == a) | (pred == b)).sum() for b in p] for a in g])
    ok = iou > threshold if strict else iou >= threshold
    rows, cols = linear_sum_assignment(-ok.astype(float) - iou / (2 * max(len(g), len(p))))
    return int(ok[rows, cols].sum())


def test_matches_brute_force_assignment_on_random_images():
    rng = np.random.default_rng(0)
    for _ in range(25):
        gt = np.zeros((24, 24), np.int32)
        for _ in range(6):
            y, x = rng.integers(0, 20, 2)
            h, w = rng.integers(2, 8, 2)
            gt[y:y + h, x:x + w] = rng.integers(1, 40)
        pred = np.roll(gt, int(rng.integers(-2, 3)), axis=int(rng.integers(0, 2)))
        pred[rng.random(pred.shape) < 0.05] = 0
        pred = np.where(pred > 0, pred * 3 + 1, 0)
        ge = match_image(gt, pred)
        gt_strict = match_image(gt, pred, protocol="dsb2018")
        for k, t in enumerate(T10):
            assert ge.tp[k] == _reference_tp(gt, pred, t, strict=False)
            assert gt_strict.tp[k] == _reference_tp(gt, pred, t, strict=True)


def test_dilate_labels_never_overwrites():
    lab = np.zeros((7, 9), np.uint16)
    lab[1:3, 1:3] = 1
    lab[1:3, 4:6] = 2  # one background column between them
    out = dilate_labels(lab)
    assert out[1, 3] == 2  # contested pixel: largest label wins
    assert (out[lab > 0] == lab[lab > 0]).all()
    assert out[0, 0] == 1 and out[3, 6] == 2 and out[5, 8] == 0
    assert (out > 0).sum() == 16 + 16 - 4


def test_caicedo_dilates_predictions():
    gt = square(size=8)  # 64 px
    pred = square(top=5, left=5, size=6)  # 36 px; dilated -> the GT square exactly
    assert match_image(gt, pred).tp[0] == 1 and match_image(gt, pred).tp[2] == 0
    r = match_image(gt, pred, protocol="caicedo2019")
    assert r.f1.tolist() == [1.0] * 9 and r.errors == CaicedoErrors((0, 0, 0, 0), (0, 0, 0, 0), 0, 0)


def test_caicedo_error_analysis():
    shape = (120, 120)
    gt = np.zeros(shape, np.uint16)
    gt[0:10, 0:25] = 1  # 250 px: bin 0-250, found
    gt[20:40, 0:30] = 2  # 600 px, split into two predictions
    gt[50:80, 0:30] = 3  # 900 px: bin 625-900, missed
    gt[90:110, 0:20] = 4  # 400 px and 5: merged by one prediction
    gt[90:110, 21:41] = 5
    gt[0:31, 60:91] = 6  # 961 px: bin >900, found
    pred = np.zeros(shape, np.uint16)
    pred[1:9, 1:24] = 1  # dilated: 10x25 == GT 1
    pred[21:39, 1:14] = 2  # halves of GT 2 (dilated 20x15 each, IoU 0.5 > 0.1)
    pred[21:39, 16:29] = 3
    pred[91:109, 1:40] = 4  # dilated 20x41 covers GT 4 and 5
    pred[1:30, 61:90] = 6  # dilated == GT 6
    pred[60:66, 100:106] = 7  # extra, dilated 64 px
    r = evaluate([gt], [pred], protocol="caicedo2019")
    err = r.caicedo
    assert err.area_bins == AREA_BINS == ("0-250", "250-625", "625-900", ">900")
    assert err.missed == (0, 3, 1, 0)  # GT 2, 4, 5 (250-625) and 3 (625-900)
    assert err.extra == (1, 2, 1, 0)  # pred 7 (64), preds 2 and 3 (300 each), pred 4 (20x41 = 820)
    assert (err.splits, err.merges) == (1, 1)
    doubled = evaluate([gt, gt], [pred, pred], protocol="caicedo2019").caicedo
    assert doubled.missed == (0, 6, 2, 0) and doubled.splits == 2


def test_results_are_typed_frozen_and_json_ready():
    r = evaluate([square()], [square(left=5)], protocol="caicedo2019", ids=["a"])
    with pytest.raises(AttributeError):
        r.mean_f1 = 0.0
    with pytest.raises(ValueError):
        r.tp[0] = 5
    d = json.loads(json.dumps(r.to_dict()))
    assert d["protocol"] == "caicedo2019" and len(d["thresholds"]) == 9
    assert d["per_image"][0]["id"] == "a" and "errors" in d
    assert r.f1_at(0.75) == r.f1[5]
    with pytest.raises(ValueError, match="not one of"):
        r.f1_at(0.33)


def test_bad_inputs_are_refused_with_names():
    gt = square()
    with pytest.raises(ValueError, match="shape"):
        match_image(gt, gt[:10])
    with pytest.raises(ValueError, match="integer"):
        match_image(gt.astype(np.float32), gt)
    with pytest.raises(ValueError, match="negative"):
        match_image(gt, -gt.astype(np.int32))
    with pytest.raises(ValueError, match="2 ground-truth images but 1"):
        evaluate([gt, gt], [gt])
    with pytest.raises(ValueError, match="image b: "):
        evaluate([gt, gt], [gt, gt[:5]], ids=["a", "b"])
    with pytest.raises(ValueError, match="no images"):
        evaluate([], [])
    with pytest.raises(ValueError, match="protocol"):
        aggregate([match_image(gt, gt)], protocol="dsb2018")


def test_large_image_many_nuclei_is_fast():
    n, size = 84, 48  # 4032 x 4032 px padded to 4096, 7056 nuclei of 44x44
    cell = np.zeros((size, size), bool)
    cell[2:-2, 2:-2] = True
    ids = np.arange(1, n * n + 1, dtype=np.uint32).reshape(n, n)
    grid = np.kron(ids, np.ones((size, size), np.uint32)) * np.tile(cell, (n, n))
    gt = np.zeros((4096, 4096), np.uint32)
    gt[: grid.shape[0], : grid.shape[1]] = grid
    pred = np.roll(gt, 1, axis=0)  # IoU 43/45 = 0.956 for every nucleus
    start = time.process_time()
    r = evaluate([gt], [pred])
    elapsed = time.process_time() - start
    assert r.n_true == r.n_pred == 7056
    assert r.tp.tolist() == [7056] * 10 and r.mean_f1 == 1.0
    assert elapsed < 5.0
