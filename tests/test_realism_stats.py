"""The realism check's shape and profile statistics (benchmarks/realism.py, loaded by path)."""

import numpy as np
import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def realism():
    return load_benchmark("realism")


def _ellipses(aspects, semi=9.0, size=220):
    """One ellipse per aspect (long / short), equal area, on a grid; with their normalised radius."""
    labels = np.zeros((size, size), np.int32)
    nrad = np.full((size, size), np.inf)
    yy, xx = np.mgrid[:size, :size].astype(float)
    for i, aspect in enumerate(aspects):
        cy, cx = 30 + 55 * (i // 4), 30 + 55 * (i % 4)
        a, b = semi * np.sqrt(aspect), semi / np.sqrt(aspect)
        r = np.hypot((xx - cx) / a, (yy - cy) / b)
        labels[r <= 1.0] = i + 1
        nrad = np.minimum(nrad, r)
    return labels, nrad


def test_elongation_is_the_long_over_short_axis(realism):
    aspects = [1.0, 1.2, 1.5, 1.8, 2.0, 2.4, 1.1, 1.3]
    labels, _ = _ellipses(aspects)
    ratios = np.sort(realism._elongations(labels))
    assert ratios == pytest.approx(np.sort(aspects), abs=0.06)
    tiny = np.zeros((20, 20), np.int32)
    tiny[5:9, 5:9] = 1  # 16 px: too small to measure
    assert realism._elongations(tiny).size == 0


def test_rim_core_tells_flat_nuclei_from_domes(realism):
    labels, nrad = _ellipses([1.0, 1.3, 1.6, 1.2])
    inside = labels > 0
    flat = np.where(inside, 0.8, 0.05)
    dome = np.where(inside, 0.05 + 0.75 * np.sqrt(np.clip(1.0 - nrad**2, 0.0, 1.0)), 0.05)
    assert realism._rim_core(flat, labels) == pytest.approx(1.0)
    assert 0.2 < realism._rim_core(dome, labels) < 0.6
    assert realism._rim_core(np.full(labels.shape, 0.05), labels) is None  # no nucleus above the background


def test_median_over_images_ignores_one_failed_segmentation(realism, monkeypatch):
    rows = iter([{"texture": 0.2}, {"texture": 0.3}, {"texture": 22.7}])
    monkeypatch.setattr(realism, "image_stats", lambda image, modality: next(rows))
    assert realism.median_stats([None] * 3, "fluorescence") == {"texture": 0.3}
