"""The statistics the accuracy benchmark prints (benchmarks/ is scripts, loaded by path)."""

import math

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_accuracy")


def test_paired_difference_mean_and_standard_error(bench):
    mean, se = bench.paired_difference([0.60, 0.50, 0.70], [0.55, 0.52, 0.64])
    diffs = [0.05, -0.02, 0.06]
    m = sum(diffs) / 3
    assert mean == pytest.approx(m)
    assert se == pytest.approx(math.sqrt(sum((d - m) ** 2 for d in diffs) / 2 / 3))


def test_paired_difference_uses_pairs_not_scores(bench):
    # Scores spread widely across seeds but the difference is the same every time: no uncertainty.
    mean, se = bench.paired_difference([0.2, 0.5, 0.9], [0.1, 0.4, 0.8])
    assert mean == pytest.approx(0.1)
    assert se == pytest.approx(0.0, abs=1e-12)


def test_paired_difference_one_seed_and_bad_input(bench):
    assert bench.paired_difference([0.4], [0.3]) == (pytest.approx(0.1), 0.0)
    with pytest.raises(ValueError, match="equally long"):
        bench.paired_difference([0.4, 0.5], [0.3])
    with pytest.raises(ValueError, match="non-empty"):
        bench.paired_difference([], [])
