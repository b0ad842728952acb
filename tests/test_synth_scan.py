"""Synthetic tile scans (datasets/synth_scan.py): one acquisition, content continuous across tile edges."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from scipy import ndimage as ndi
from triageseg.datasets.synth import synth_sample
from triageseg.datasets.synth_scan import Acquisition, SynthScan


@pytest.fixture(scope="module")
def scan():
    acquisition = Acquisition.draw(np.random.default_rng(3))
    return SynthScan(2, 3, 192, seed=5, acquisition=acquisition)


def _stitched(scan):
    tiles = {(r, c): scan.tile(r, c) for r in range(scan.rows) for c in range(scan.cols)}
    image = np.concatenate([np.concatenate([tiles[r, c][0] for c in range(scan.cols)], 1) for r in range(scan.rows)])
    labels = np.concatenate([np.concatenate([tiles[r, c][1] for c in range(scan.cols)], 1) for r in range(scan.rows)])
    return image, labels


def test_synth_sample_default_stream_is_unchanged():
    """The independent-image generator is bit for bit what it was before scans existed.

    The digests are those of issue 19's renderers (they replaced the first ones on purpose), with
    the H&E cellular fields, nuclei that add to their cell's stain and nuclei along a flow
    (deliberate changes of the H&E generator), and fluorescence nuclei elongated up to 2.2 (the
    same random stream, other shapes); one digest per modality so that a change of one cannot
    hide another's. synth_scan must never change them.
    """
    expected = {
        "fluorescence": "3ea7a83859cb35bf4d8dad51ab0edd3094192bdcf33b19bdd73dd252fea57f92",
        "brightfield": "5fc095fbafbf7a5cc6f22657b98a5c6de40acd30fbda12c1f15c4442a92e01d9",
        "he": "f8cbe281edfdbd475d3636a9a6f9318c29a71c6140f0ced882f6a0fbdad37159",
    }
    for modality, digest in expected.items():
        image, labels = synth_sample(modality, size=96, rng=np.random.default_rng(7))
        assert hashlib.sha256(image.tobytes() + labels.tobytes()).hexdigest() == digest, modality


def test_nuclei_across_tile_edges_are_whole_and_the_same_in_both_tiles(scan):
    image, labels = _stitched(scan)
    assert image.shape == (384, 576, 3) and labels.dtype == np.uint32
    t = scan.tile_size
    across = set()
    for cut in (t, 2 * t):  # vertical tile edges
        pair = np.stack([labels[:, cut - 1], labels[:, cut]])
        across |= set(np.intersect1d(pair[0], pair[1]).tolist()) - {0}
    pair = np.stack([labels[t - 1], labels[t]])
    across |= set(np.intersect1d(pair[0], pair[1]).tolist()) - {0}
    assert len(across) > 10  # nuclei do continue into the next tile, under the same id
    ids = np.unique(labels)[1:]
    rel = np.searchsorted(ids, labels) * (labels > 0)
    pieces = [ndi.label(rel[sl] == k)[1] for k, sl in enumerate(ndi.find_objects(rel), start=1) if sl is not None]
    assert pieces and all(p == 1 for p in pieces)  # every nucleus one 4-connected piece over the scan
    assert ids.size > 100
    # ids tell the tile whose stream placed the nucleus
    assert set((ids // 100_000).tolist()) <= set(range(scan.rows * scan.cols))


def test_one_acquisition_and_deterministic(scan):
    again = SynthScan(2, 3, 192, seed=5, acquisition=scan.acquisition)
    a, b = scan.tile(1, 2), again.tile(1, 2)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    other = SynthScan(2, 3, 192, seed=6, acquisition=scan.acquisition)
    assert not np.array_equal(other.tile(1, 2)[1], a[1])
    # one exposure: with a flat illumination, nuclei are as bright in every tile
    import dataclasses

    flat = SynthScan(2, 3, 192, seed=5, acquisition=dataclasses.replace(scan.acquisition, illumination=0.0))
    image, labels = _stitched(flat)
    gray = image[..., :].max(axis=2).astype(float)
    t = scan.tile_size
    means = [gray[r * t : (r + 1) * t, c * t : (c + 1) * t][labels[r * t : (r + 1) * t, c * t : (c + 1) * t] > 0].mean()
             for r in range(2) for c in range(3)]
    assert max(means) / min(means) < 1.15
    with pytest.raises(ValueError, match="outside"):
        scan.tile(2, 0)
