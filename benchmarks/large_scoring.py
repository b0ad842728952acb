"""Scoring of ``bench_large.py``: per-tile F1 against the ground truth, seam defects, ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _read(path: Path, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    from triageseg.datasets.lazy import LazyImage

    with LazyImage(path) as image:
        return image[y0:y1, x0:x1]


def tile_scores(pred_region, gt_path: Path, n: int, tile: int):
    """Pooled default-protocol result over tiles; ``pred_region(r, c)`` gives the prediction of tile (r, c)."""
    from triageseg.datasets.lazy import LazyImage
    from triageseg.postprocess.metrics import aggregate, match_image

    results = []
    with LazyImage(gt_path) as gt:
        for r in range(n):
            for c in range(n):
                truth = gt[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile]
                results.append(match_image(truth, pred_region(r, c), id=f"{r}_{c}"))
    return aggregate(results)


def _relabel(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids made consecutive (0 stays 0), so per-object tables stay small; and the original id of each."""
    ids, inverse = np.unique(labels, return_inverse=True)
    if ids[0] != 0:
        ids = np.concatenate([[0], ids])
        inverse = inverse + 1
    return inverse.reshape(labels.shape).astype(np.int64), ids


_EIGHT = np.ones((3, 3), bool)


def _band_defects(gt: np.ndarray, pred: np.ndarray, line: int) -> dict:
    """Seam defects along the horizontal line between rows ``line - 1`` and ``line`` of a band.

    ``crossing``: GT nuclei with at least 20% of their area on each side (and not touching
    the band's ends). ``split``: such a nucleus overlapped (>= 10% of it each) by a predicted
    object lying >= 95% above the line and another >= 95% below. ``cut``: its best-matching
    prediction (>= 20% of it) lies >= 95% on one side and covers none of its other side.
    ``pieces``: predicted objects touching the line whose pixels near it are not one
    8-connected piece (the watershed's connectivity). Split and cut are sets of GT ids.
    """
    from scipy import ndimage as ndi

    (g, g_ids), (p, _) = _relabel(gt), _relabel(pred)
    g_area, g_up = np.bincount(g.ravel()), np.bincount(g[:line].ravel(), minlength=g.max() + 1)
    p_area, p_up = np.bincount(p.ravel()), np.bincount(p[:line].ravel(), minlength=p.max() + 1)
    p_side = np.where(p_up >= 0.95 * p_area, 1, np.where(p_up <= 0.05 * p_area, -1, 0))
    out = {"crossing": 0, "split": set(), "cut": set(), "pieces": 0}
    crossing = np.intersect1d(np.unique(g[line - 1]), np.unique(g[line]))
    crossing = crossing[(crossing > 0) & ~np.isin(crossing, np.concatenate([g[0], g[-1]]))]
    boxes = ndi.find_objects(g)
    for k in crossing.tolist():
        up, down = int(g_up[k]), int(g_area[k] - g_up[k])
        if min(up, down) < 0.2 * g_area[k]:
            continue
        out["crossing"] += 1
        box = boxes[k - 1]
        mask = g[box] == k
        rows_up = (np.arange(box[0].start, box[0].stop) < line)[:, None]
        ids, counts = np.unique(p[box][mask], return_counts=True)
        counts, ids = counts[ids > 0], ids[ids > 0]
        if ids.size == 0:
            continue
        sides = {int(p_side[i]) for i, c in zip(ids, counts) if c >= 0.1 * g_area[k]}
        if {1, -1} <= sides:
            out["split"].add(int(g_ids[k]))
        best = int(ids[np.argmax(counts)])
        if p_side[best] != 0 and counts.max() >= 0.2 * g_area[k]:  # a real match, not a stray pixel
            other = mask & (~rows_up if p_side[best] == 1 else rows_up)
            if not (p[box][other] == best).any():
                out["cut"].add(int(g_ids[k]))
    near = p[max(0, line - 40) : line + 40]
    touching = np.intersect1d(np.unique(p[line - 1]), np.unique(p[line]))
    pboxes = ndi.find_objects(near)
    for k in touching[touching > 0].tolist():
        if ndi.label(near[pboxes[k - 1]] == k, structure=_EIGHT)[1] > 1:
            out["pieces"] += 1
    return out


def seam_defects(gt_path: Path, pred_band, grid, reach: int = 64) -> dict:
    """Sum of :func:`_band_defects` over every core boundary of ``grid`` (horizontal and vertical)."""
    from triageseg.datasets.lazy import LazyImage

    total = {"crossing": 0, "split": set(), "cut": set(), "pieces": 0}
    h, w = grid.shape
    with LazyImage(gt_path) as gt:
        for axis, spans, length in ((0, grid.rows, h), (1, grid.cols, w)):
            for span in spans[1:]:
                b = span[0]
                lo, hi = max(0, b - reach), min(length, b + reach)
                if axis == 0:
                    g, p = gt[lo:hi, 0:w], pred_band(lo, hi, 0, w)
                else:
                    g, p = gt[0:h, lo:hi].T, pred_band(0, h, lo, hi).T
                for key, value in _band_defects(np.ascontiguousarray(g), np.ascontiguousarray(p), b - lo).items():
                    total[key] = total[key] | value if isinstance(value, set) else total[key] + value
    return total


def ids_consecutive(path: Path) -> tuple[bool, int]:
    from triageseg.datasets.lazy import LazyImage

    with LazyImage(path) as image:
        seen = np.zeros(1, bool)
        for y in range(0, image.shape[0], 1024):
            ids = np.unique(image[y : y + 1024, 0 : image.shape[1]])
            if ids.max(initial=0) >= seen.size:
                seen = np.concatenate([seen, np.zeros(int(ids.max()) + 1 - seen.size, bool)])
            seen[ids] = True
    n = int(seen.size - 1)
    return bool(seen[1:].all()), n
