"""3-class targets: exact masks on drawn shapes, both modes, all widths, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage as ndi

from triageseg.postprocess.targets import BACKGROUND, BOUNDARY, INTERIOR, _band, make_targets, nucleus_widths


def disk_footprint(width):
    yy, xx = np.mgrid[-width:width + 1, -width:width + 1]
    return yy**2 + xx**2 <= (width + 0.5) ** 2


def brute_force_band(labels, width, mode):
    """The band rules of the module docstring, pixel by pixel (slow, obviously right)."""
    w_of = nucleus_widths(labels, width)
    h, w = labels.shape
    band = np.zeros(labels.shape, bool)

    def window(y, x, k):
        fp = disk_footprint(k)
        for dy, dx in zip(*np.nonzero(fp)):
            yy, xx = y + dy - k, x + dx - k
            if 0 <= yy < h and 0 <= xx < w:
                yield labels[yy, xx]

    for y, x in zip(*np.nonzero(labels)):
        own = labels[y, x]
        k_own = w_of[own]
        # a contact: another nucleus within the narrower of the two widths
        if any(v not in (0, own) and dist_ok for v, dist_ok in _near(labels, y, x, w_of, k_own)):
            band[y, x] = True
        elif mode == "all":
            k = min([k_own] + [w_of[v] for v in window(y, x, k_own) if v not in (0, own)])
            band[y, x] = any(v == 0 for v in window(y, x, k))
    return band


def _near(labels, y, x, w_of, k_own):
    h, w = labels.shape
    fp = disk_footprint(k_own)
    for dy, dx in zip(*np.nonzero(fp)):
        yy, xx = y + dy - k_own, x + dx - k_own
        if 0 <= yy < h and 0 <= xx < w and labels[yy, xx]:
            v = labels[yy, xx]
            k = min(k_own, w_of[v])
            yield v, (dy - k_own) ** 2 + (dx - k_own) ** 2 <= (k + 0.5) ** 2


def random_labels(rng, shape=(48, 52), n=12):
    lab = np.zeros(shape, np.int32)
    for k in range(1, n + 1):
        y, x = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
        h, w = rng.integers(3, 24, 2)
        lab[y:y + h, x:x + w] = k
    return lab


def test_class_constants():
    assert (BACKGROUND, INTERIOR, BOUNDARY) == (0, 1, 2)


def test_nucleus_widths():
    lab = np.zeros((60, 60), np.uint16)
    lab[0:3, 0:10] = 1  # 30 px, r 3.1 -> 1
    lab[10:22, 0:12] = 2  # 144 px, r 6.8 -> 2
    lab[25:60, 25:60] = 4  # 1225 px, r 19.7 -> 6 -> capped at width
    assert nucleus_widths(lab, 5).tolist() == [0, 1, 2, 0, 5]
    assert nucleus_widths(lab, 1).tolist() == [0, 1, 1, 0, 1]


@pytest.mark.parametrize("width", [1, 2, 3, 4, 5])
def test_all_mode_isolated_square(width):
    lab = np.zeros((48, 48), np.uint16)
    lab[4:44, 4:44] = 7  # r = 22.6: the full width applies
    t = make_targets(lab, width=width, mode="all")
    assert t.dtype == np.uint8 and t.shape == lab.shape
    inner = 40 - 2 * width
    assert (t == INTERIOR).sum() == inner * inner
    assert (t == BOUNDARY).sum() == 1600 - inner * inner
    assert (t[lab == 0] == BACKGROUND).all()


@pytest.mark.parametrize("width", [1, 2, 3, 4, 5])
def test_touching_mode_marks_contacts_only(width):
    lab = np.zeros((40, 70), np.uint16)
    lab[4:36, 4:34] = 1
    lab[4:36, 34:64] = 2  # touches 1 along a vertical line
    t = make_targets(lab, width=width, mode="touching")
    expected = np.where(lab > 0, INTERIOR, BACKGROUND)
    expected[4:36, 34 - width:34 + width] = BOUNDARY
    np.testing.assert_array_equal(t, expected)
    alone = make_targets(np.where(lab == 1, 1, 0), width=width)
    assert (alone[lab == 1] == INTERIOR).all()  # an isolated nucleus has no boundary


@pytest.mark.parametrize("width,gap,marked", [(1, 1, 0), (2, 1, 1), (3, 1, 2), (3, 2, 1), (3, 3, 0), (5, 1, 4)])
def test_touching_mode_nearly_meeting(width, gap, marked):
    lab = np.zeros((34, 80), np.uint16)
    lab[2:32, 2:32] = 1
    lab[2:32, 32 + gap:62 + gap] = 2
    t = make_targets(lab, width=width, mode="touching")
    assert (t[16, 2:32] == BOUNDARY).sum() == marked  # columns of nucleus 1 next to the gap
    assert (t[lab == 0] == BACKGROUND).all()


def test_small_nuclei_get_narrower_boundaries():
    lab = np.zeros((40, 60), np.uint16)
    lab[5:35, 5:35] = 1  # r 16.9 -> width 5
    lab[15:21, 35:41] = 2  # 36 px, r 3.4 -> width 1, touching nucleus 1
    t = make_targets(lab, width=5, mode="touching")
    assert (t[18, 5:35] == BOUNDARY).sum() == 1  # the contact takes the narrower width
    assert (t[18, 35:41] == BOUNDARY).sum() == 1
    t_all = make_targets(lab, width=5, mode="all")
    assert (t_all[lab == 2] == INTERIOR).sum() == 16  # 6x6 minus a 1 px outline
    assert (t_all[28, 5:35] == BOUNDARY).sum() == 10  # far from 2: 5 px outline each side
    assert (t_all[16, 5:35] == BOUNDARY).sum() == 6  # next to 2 the right outline narrows to 1


@pytest.mark.parametrize("mode", ["touching", "all"])
@pytest.mark.parametrize("width", [1, 2, 3, 4, 5])
def test_band_matches_brute_force(mode, width):
    rng = np.random.default_rng(width)
    lab = random_labels(rng, shape=(40, 44), n=10).astype(np.uint16)
    np.testing.assert_array_equal(_band(lab, width, mode), brute_force_band(lab, width, mode))


@pytest.mark.parametrize("mode", ["touching", "all"])
@pytest.mark.parametrize("width", [1, 2, 3, 4, 5])
def test_one_interior_component_per_nucleus(mode, width):
    rng = np.random.default_rng(10 + width)
    lab = random_labels(rng, shape=(64, 64), n=30)
    t = make_targets(lab, width=width, mode=mode)
    comp, n = ndi.label(t == INTERIOR, structure=np.ones((3, 3)))
    owners = [np.unique(lab[comp == k]) for k in range(1, n + 1)]
    assert all(o.size == 1 for o in owners)  # interiors of different nuclei never touch
    owners = [int(o[0]) for o in owners]
    assert len(owners) == len(set(owners))  # one piece per nucleus
    thick = [k for k in np.unique(lab)[1:] if ndi.binary_erosion(lab == k, np.ones((3, 3))).any()]
    assert set(thick) <= set(owners)  # every nucleus thicker than 2 px has an interior


def test_squeezed_nucleus_keeps_its_core():
    lab = np.zeros((40, 40), np.uint16)
    lab[2:18, 2:38] = 1
    lab[18:22, 2:38] = 2  # a 4 px bar between two big nuclei: all within reach of them
    lab[22:38, 2:38] = 3
    t = make_targets(lab, width=3, mode="touching")
    assert (t[18:22, 3:37] == np.array([[2], [1], [1], [2]])).all()


def test_split_interior_keeps_the_largest_piece():
    lab = np.zeros((30, 60), np.uint16)
    lab[2:28, 2:28] = 1  # big lobe
    lab[12:18, 28:40] = 1  # neck, too thin to keep interior at width 5
    lab[5:25, 40:58] = 1  # smaller lobe
    t = make_targets(lab, width=5, mode="all")
    comp, n = ndi.label(t == INTERIOR, structure=np.ones((3, 3)))
    assert n == 1 and (t[15, 10:20] == INTERIOR).all() and (t[15, 45:53] == BOUNDARY).all()


def test_image_edge_is_not_an_outline():
    lab = np.zeros((40, 40), np.uint8)
    lab[:, :20] = 3  # cut by the left, top and bottom edges
    t = make_targets(lab, width=2, mode="all")
    assert (t[:, :18] == INTERIOR).all() and (t[:, 18:20] == BOUNDARY).all()


def test_input_types_and_large_ids():
    lab = np.zeros((10, 10), np.uint64)
    lab[1:5, 1:9] = 2**40
    lab[5:9, 1:9] = 2**40 + 5
    big = make_targets(lab, width=1)
    small = make_targets((lab > 0).astype(np.int8) + (lab > 2**40).astype(np.int8), width=1)
    np.testing.assert_array_equal(big, small)
    assert make_targets(lab > 0, width=1, mode="all").max() == BOUNDARY
    assert make_targets(np.zeros((4, 4), np.int64)).max() == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"width": 0}, "width"),
        ({"width": 6}, "width"),
        ({"width": 2.0}, "width"),
        ({"width": True}, "width"),
        ({"mode": "outline"}, "valid: touching, all"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_targets(np.ones((4, 4), np.uint8), **kwargs)


def test_bad_labels():
    with pytest.raises(ValueError, match="2-D"):
        make_targets(np.ones((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="integer"):
        make_targets(np.ones((4, 4), np.float32))
    with pytest.raises(ValueError, match="non-negative"):
        make_targets(-np.ones((4, 4), np.int16))


def test_fast_on_a_megapixel():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:1024, :1024]
    lab = np.zeros((1024, 1024), np.uint32)
    for k, (cy, cx, r) in enumerate(zip(rng.integers(0, 1024, 800), rng.integers(0, 1024, 800),
                                        rng.integers(6, 16, 800)), start=1):
        sl = (slice(max(cy - r, 0), cy + r + 1), slice(max(cx - r, 0), cx + r + 1))
        lab[sl][(yy[sl] - cy) ** 2 + (xx[sl] - cx) ** 2 <= r * r] = k
    make_targets(lab, width=5)
    start = time.process_time()
    for mode in ("touching", "all"):
        make_targets(lab, width=5, mode=mode)
    assert (time.process_time() - start) / 2 < 0.5
