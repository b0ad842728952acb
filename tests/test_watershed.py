"""Watershed decoder: round-trip fidelity with the targets, parameters, tuning."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage as ndi

from triageseg.datasets.errors import DataError
from triageseg.postprocess.metrics import evaluate, match_image
from triageseg.postprocess.targets import make_targets
from triageseg.postprocess.watershed import (
    POSTPROCESS_JSON,
    WatershedParams,
    tune_watershed,
    watershed,
)


def one_hot(targets: np.ndarray) -> np.ndarray:
    return np.eye(3, dtype=np.float32)[targets].transpose(2, 0, 1)


def draw_nuclei(seed: int, size: int = 160, n: int = 70) -> np.ndarray:
    """Disks and ellipses of varied size (a quarter ~30 px), touching and in clusters.

    Overlapping nuclei are split where their normalised radii are equal (each pixel
    goes to the ellipse it is deepest inside), so touching nuclei meet along a contact
    line, as in tissue; nuclei more than 20 % hidden are not drawn.
    """
    rng = np.random.default_rng(seed)
    lab = np.zeros((size, size), np.int32)
    depth = np.full((size, size), np.inf)
    yy, xx = np.mgrid[:size, :size]
    centres = rng.uniform(25, size - 25, (4, 2))
    for k in range(1, n + 1):
        if rng.random() < 0.7:  # clustered
            cy, cx = centres[rng.integers(4)] + rng.normal(0, 14, 2)
        else:
            cy, cx = rng.uniform(0, size, 2)
        r = 3.2 if rng.random() < 0.25 else rng.uniform(4, 14)  # radius 3.2: ~30 px nuclei
        aspect = rng.uniform(1, 2.2) if r > 4 else 1.0
        theta = rng.uniform(0, np.pi)
        u = ((xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)) / (r * np.sqrt(aspect))
        v = (-(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)) / (r / np.sqrt(aspect))
        nr = np.sqrt(u * u + v * v)
        inside = nr <= 1
        if not inside.any() or (depth[inside] <= 1).mean() > 0.2:
            continue
        win = inside & (nr < depth)
        lab[win] = k
        depth[win] = nr[win]
    # keep each nucleus' largest 4-connected piece, drop remnants under 20 px
    out = np.zeros_like(lab)
    for k, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is None:
            continue
        pieces, _ = ndi.label(lab[sl] == k)
        sizes = np.bincount(pieces.ravel())
        sizes[0] = 0
        if sizes.max() >= 20:
            out[sl][pieces == sizes.argmax()] = k
    return out


@pytest.fixture(scope="module")
def drawn():
    labels = [draw_nuclei(seed) for seed in range(3)]
    fg = np.concatenate([lab.ravel() for lab in labels]) > 0
    assert fg.mean() > 0.2
    return labels


def touching_pairs(lab: np.ndarray) -> int:
    right = (lab[:, 1:] != lab[:, :-1]) & (lab[:, 1:] > 0) & (lab[:, :-1] > 0)
    down = (lab[1:] != lab[:-1]) & (lab[1:] > 0) & (lab[:-1] > 0)
    return int(right.sum() + down.sum())


@pytest.mark.parametrize("mode", ["touching", "all"])
@pytest.mark.parametrize("width", [1, 2, 3, 4, 5])
def test_round_trip_drawn_nuclei(drawn, width, mode):
    assert all(touching_pairs(lab) > 50 for lab in drawn)  # the test really has contacts
    areas = np.concatenate([np.bincount(lab.ravel())[1:] for lab in drawn])
    assert (areas[areas > 0] < 40).sum() >= 5  # and small nuclei
    preds = [watershed(one_hot(make_targets(lab, width=width, mode=mode))) for lab in drawn]
    result = evaluate(drawn, preds)
    assert result.mean_f1 >= 0.99, (width, mode, result.f1)
    assert result.n_pred == result.n_true


@pytest.mark.parametrize("mode", ["touching", "all"])
def test_round_trip_synthetic_generator(mode):
    """The generator's layouts (each modality's nucleus style) survive targets -> watershed.

    Each layout has its own seed, so the labels do not depend on how many random draws the
    renderers make (they change as the renderers grow more realistic).
    """
    synth = pytest.importorskip("triageseg.datasets.synth")
    from triageseg.datasets.synth.layout import _place_nuclei

    labels = [_place_nuclei(np.random.default_rng([7, j, i]), 128, synth.STYLES[m])[0]
              for j, m in enumerate(synth.MODALITIES) for i in range(2)]
    for width in (1, 2, 3, 5):
        preds = [watershed(one_hot(make_targets(lab, width=width, mode=mode))) for lab in labels]
        assert evaluate(labels, preds).mean_f1 >= 0.99, (width, mode)


def test_two_touching_squares_exact():
    lab = np.zeros((20, 30), np.uint16)
    lab[3:15, 2:14] = 5
    lab[3:15, 14:26] = 9
    for mode in ("touching", "all"):
        for width in (1, 2, 3):
            out = watershed(one_hot(make_targets(lab, width=width, mode=mode)))
            assert out.dtype == np.uint32
            assert sorted(np.unique(out).tolist()) == [0, 1, 2]
            # identical partition up to renumbering
            assert match_image(lab, out).tp.tolist() == [2] * 10
            assert ((out > 0) == (lab > 0)).all()


def test_logits_and_probabilities_agree(drawn):
    probs = one_hot(make_targets(drawn[0]))
    probs = ndi.gaussian_filter(probs, (0, 1.0, 1.0))
    probs /= probs.sum(axis=0, keepdims=True)
    logits = np.log(probs + 1e-6) + 3.0  # softmax is shift-invariant
    np.testing.assert_array_equal(watershed(probs), watershed(logits, logits=True))


def test_blurred_maps_still_decode(drawn):
    lab = drawn[1]
    probs = ndi.gaussian_filter(one_hot(make_targets(lab, width=2)), (0, 0.8, 0.8))
    assert evaluate([lab], [watershed(probs)]).f1_at(0.5) > 0.9


def test_min_size_marker_fallback_and_numbering():
    probs = np.zeros((3, 20, 20), np.float32)
    probs[0] = 1
    probs[:, 2:8, 2:8] = np.array([0, 1, 0])[:, None, None]  # 36 px with interior
    probs[:, 12:18, 12:18] = np.array([0, 0, 1])[:, None, None]  # 36 px, boundary only
    probs[:, 0:2, 15:17] = np.array([0, 1, 0])[:, None, None]  # 4 px
    out = watershed(probs)  # default min_size 10 removes the 4 px object
    assert out.max() == 2 and (out[2:8, 2:8] > 0).all() and (out[12:18, 12:18] > 0).all()
    assert np.unique(out[12:18, 12:18]).size == 1  # no marker: the component is the object
    kept = watershed(probs, WatershedParams(min_size=1))
    assert kept.max() == 3 and np.array_equal(np.unique(kept), [0, 1, 2, 3])


def test_min_marker_size_drops_specks():
    probs = np.zeros((3, 12, 24), np.float32)
    probs[2, 2:10, 2:22] = 1  # one boundary-class blob...
    probs[0] = 1 - probs[2]
    probs[:, 5:7, 4:6] = np.array([0, 1, 0])[:, None, None]  # ...with a 4 px seed
    probs[:, 6, 18] = [0, 1, 0]  # ...and a 1 px speck
    assert watershed(probs, WatershedParams(min_marker_size=1, min_size=1)).max() == 2
    assert watershed(probs, WatershedParams(min_marker_size=2, min_size=1)).max() == 1


def test_params_validation_and_json(tmp_path):
    params = WatershedParams(marker_threshold=0.3, min_size=0)
    path = params.to_json(tmp_path)
    assert path == tmp_path / POSTPROCESS_JSON
    assert WatershedParams.from_json(tmp_path) == params
    assert WatershedParams.from_json(path) == params
    assert WatershedParams.from_dict({"min_size": 4}) == WatershedParams(min_size=4)
    assert params.replace(mask_threshold=0.6).mask_threshold == 0.6
    with pytest.raises(AttributeError):
        params.min_size = 3
    for bad in ({"marker_threshold": 1.5}, {"mask_threshold": -0.1}, {"min_size": -1},
                {"min_size": 2.5}, {"min_marker_size": True}, {"mask_threshold": "0.5"}):
        with pytest.raises(ValueError):
            WatershedParams(**bad)
    with pytest.raises(ValueError, match="valid: marker_threshold"):
        WatershedParams.from_dict({"threshold": 0.5})


@pytest.mark.parametrize(
    "content,match",
    [
        ('{"min_size": 10, "sigma": 1}', "unknown watershed parameter"),
        ('{"min_size": -3}', "min_size"),
        ("{not json", "invalid JSON"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_from_json_errors_name_the_file(tmp_path, content, match):
    path = tmp_path / POSTPROCESS_JSON
    path.write_text(content)
    with pytest.raises(DataError, match=match) as info:
        WatershedParams.from_json(path)
    assert str(path) in str(info.value)


def test_from_json_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        WatershedParams.from_json(tmp_path / "nope.json")


def test_bad_probabilities():
    with pytest.raises(ValueError, match="3xHxW"):
        watershed(np.zeros((2, 8, 8), np.float32))
    with pytest.raises(ValueError, match="3xHxW"):
        watershed(np.zeros((8, 8, 3), np.float32))
    nan = np.zeros((3, 8, 8), np.float32)
    nan[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        watershed(nan)
    with pytest.raises(ValueError, match="WatershedParams"):
        watershed(np.zeros((3, 8, 8), np.float32), {"min_size": 3})


def test_tune_watershed_picks_the_best_of_the_grid(drawn):
    rng = np.random.default_rng(0)
    probs, gts = [], []
    for lab in drawn[:2]:
        p = ndi.gaussian_filter(one_hot(make_targets(lab, width=2)), (0, 1.2, 1.2))
        p += rng.uniform(0, 0.15, p.shape).astype(np.float32)
        probs.append(p / p.sum(axis=0, keepdims=True))
        gts.append(lab)
    grid = {"marker_threshold": [0.0, 0.4, 0.8], "min_size": [10, 30]}
    best, score = tune_watershed(probs, gts, grid=grid)
    assert best.marker_threshold in grid["marker_threshold"] and best.min_size in grid["min_size"]
    scores = {
        (m, s): evaluate(gts, [watershed(p, WatershedParams(marker_threshold=m, min_size=s)) for p in probs]).mean_f1
        for m in grid["marker_threshold"]
        for s in grid["min_size"]
    }
    assert score == pytest.approx(max(scores.values()))
    assert score == pytest.approx(scores[(best.marker_threshold, best.min_size)])
    _, default_score = tune_watershed(probs, gts)  # the default grid runs too
    assert 0 < default_score <= 1


def test_tune_watershed_bad_inputs(drawn):
    p = one_hot(make_targets(drawn[0]))
    with pytest.raises(ValueError, match="valid: marker_threshold"):
        tune_watershed([p], [drawn[0]], grid={"sigma": [1]})
    with pytest.raises(ValueError, match="non-empty"):
        tune_watershed([p], [drawn[0]], grid={"min_size": []})
    with pytest.raises(ValueError, match="as many"):
        tune_watershed([p, p], [drawn[0]])
    with pytest.raises(ValueError, match="do not match"):
        tune_watershed([p], [drawn[0][:10]])
    with pytest.raises(ValueError, match="protocol"):
        tune_watershed([p], [drawn[0]], protocol="coco")


def test_params_file_is_plain_json(tmp_path):
    WatershedParams().to_json(tmp_path / "p.json")
    data = json.loads((tmp_path / "p.json").read_text())
    assert data == {"marker_threshold": 0.4, "mask_threshold": 0.5, "min_marker_size": 3, "min_size": 10,
                    "min_score": 0.0}


def test_a_params_file_without_min_score_loads_as_before(tmp_path):
    """Bundles saved before ``min_score`` existed keep every object, as they did."""
    path = tmp_path / POSTPROCESS_JSON
    path.write_text('{"marker_threshold": 0.2, "mask_threshold": 0.4, "min_marker_size": 3, "min_size": 40}')
    assert WatershedParams.from_json(path) == WatershedParams(marker_threshold=0.2, mask_threshold=0.4, min_size=40)
    assert WatershedParams.from_json(path).min_score == 0.0


def unsure_blobs() -> np.ndarray:
    """Two 36-px objects: one whose interior reaches 0.97, one that peaks at 0.6 (foreground, marker-less at 0.4)."""
    probs = np.zeros((3, 20, 30), np.float32)
    probs[0] = 1
    probs[:, 2:8, 2:8] = np.array([0.01, 0.97, 0.02])[:, None, None]
    probs[:, 12:18, 20:26] = np.array([0.3, 0.6, 0.1])[:, None, None]
    probs[1, 14, 22] = 0.62  # its peak, one pixel
    probs[0, 14, 22] = 0.28
    return probs


def test_min_score_drops_objects_the_network_is_unsure_of():
    probs = unsure_blobs()
    both = watershed(probs, WatershedParams(min_size=1))
    assert both.max() == 2
    for min_score, kept in ((0.62, 2), (0.63, 1), (0.97, 1), (0.98, 0)):
        out = watershed(probs, WatershedParams(min_size=1, min_score=min_score))
        assert out.max() == kept, min_score
        if kept == 1:  # the confident one stays whole, numbered 1; the unsure one's pixels are background
            assert (out[2:8, 2:8] == 1).all() and not out[12:18, 20:26].any()
    for bad in (1.0, -0.1, "0.9", True):
        with pytest.raises(ValueError, match="min_score"):
            WatershedParams(min_score=bad)


def test_tune_watershed_chooses_min_score_against_unsure_false_objects(drawn):
    """Maps with confident nuclei and faint false blobs: a score threshold is worth it, and found."""
    rng = np.random.default_rng(3)
    probs, gts = [], []
    for lab in drawn[:2]:
        p = ndi.gaussian_filter(one_hot(make_targets(lab, width=2)), (0, 1.0, 1.0))
        free = np.argwhere(ndi.binary_dilation(lab > 0, iterations=6) == 0)
        for cy, cx in free[rng.choice(len(free), 12, replace=False)]:  # faint blobs where no nucleus is
            blob = np.exp(-(((np.arange(lab.shape[0])[:, None] - cy) ** 2 + (np.arange(lab.shape[1]) - cx) ** 2)
                            / (2 * 3.0**2))).astype(np.float32)
            p[1] += 1.5 * blob  # peaks at 0.6 after normalising
        probs.append(p / p.sum(axis=0, keepdims=True))
        gts.append(lab)
    grid = {"marker_threshold": [0.4], "mask_threshold": [0.5], "min_size": [10], "min_score": [0.0, 0.5, 0.9]}
    best, score = tune_watershed(probs, gts, grid=grid)
    scores = {s: evaluate(gts, [watershed(p, WatershedParams(min_score=s)) for p in probs]).mean_f1
              for s in grid["min_score"]}
    assert best.min_score == max(scores, key=scores.get) == 0.9
    assert score == pytest.approx(scores[0.9]) and scores[0.9] > scores[0.0] + 0.05


# --------------------------------------------------------------------------- classical baseline


def disks_image():
    lab = np.zeros((64, 64), np.uint16)
    yy, xx = np.mgrid[:64, :64]
    for k, (cy, cx, r) in enumerate([(14, 14, 7), (14, 46, 6), (44, 24, 8), (44, 39, 8)], start=1):
        lab[((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (lab == 0)] = k  # 3 and 4 touch
    img = np.where(lab > 0, 0.8, 0.1).astype(np.float32)
    img = ndi.gaussian_filter(img, 0.7)
    return lab, np.repeat(img[..., None], 3, axis=2)


def test_classical_segment_separates_touching_nuclei_either_polarity():
    from triageseg.postprocess.classical import classical_segment

    lab, img = disks_image()
    for image in (img, 1.0 - img, img[..., 0]):  # bright on dark, dark on light, gray
        out = classical_segment(image)
        assert out.dtype == np.uint32 and out.max() == 4
        assert match_image(lab, out).f1_at(0.7) == 1.0


def test_classical_segment_edge_cases():
    from triageseg.postprocess.classical import classical_segment

    assert classical_segment(np.full((16, 16, 3), 0.5, np.float32)).max() == 0
    with pytest.raises(ValueError, match="HxWx3"):
        classical_segment(np.zeros((8, 8, 4), np.float32))
    with pytest.raises(ValueError, match="valid: gray, hematoxylin"):
        classical_segment(np.zeros((8, 8, 3), np.float32), channel="dapi")
    _, img = disks_image()
    assert classical_segment((img * 255).astype(np.uint8)).max() == 4  # integer images are scaled


def test_all_background_and_tiny_specks_give_empty_labels():
    """No foreground, or foreground below every size limit, is an empty label image, not an error."""
    probs = np.zeros((3, 40, 30), np.float32)
    probs[0] = 1.0
    out = watershed(probs)
    assert out.shape == (40, 30) and out.dtype == np.uint32 and not out.any()
    probs[:, 5, 5] = (0.0, 1.0, 0.0)  # a single-pixel nucleus, below min_size
    assert not watershed(probs).any()


def test_each_component_decodes_as_it_would_alone():
    """Locality (what the block path relies on): a component's objects depend on that component alone.

    Cropped to its box with every other component made background, each component of
    one-hot maps (plateaus, ties everywhere) and of smooth noisy maps decodes to the same
    objects as in the whole image.
    """
    from scipy import ndimage as ndi
    from skimage.draw import ellipse
    from triageseg.postprocess.targets import make_targets
    from triageseg.postprocess.watershed import decode_components

    rng = np.random.default_rng(1)
    labels = np.zeros((320, 320), np.uint32)
    centres = rng.uniform(30, 290, (10, 2))
    for k in range(1, 161):  # touching ellipses in ten clusters, each mostly visible
        cy, cx = centres[rng.integers(10)] + rng.normal(0, 16, 2)
        rr, cc = ellipse(cy, cx, rng.uniform(5, 9), rng.uniform(5, 9), shape=labels.shape,
                         rotation=rng.uniform(0, np.pi))
        free = labels[rr, cc] == 0
        if free.size and free.mean() > 0.7:
            labels[rr[free], cc[free]] = k
    one_hot = np.eye(3, dtype=np.float32)[make_targets(labels, width=2, mode="all")].transpose(2, 0, 1)
    logits = 6.0 * ndi.gaussian_filter(one_hot, (0, 1.2, 1.2))
    logits += 1.5 * ndi.gaussian_filter(rng.normal(0, 1, logits.shape).astype(np.float32), (0, 2.0, 2.0))
    smooth = np.exp(logits - logits.max(axis=0))
    smooth /= smooth.sum(axis=0)
    flooded = 0
    for probs, params in ((one_hot, WatershedParams()), (smooth.astype(np.float32), WatershedParams()),
                          (smooth.astype(np.float32), WatershedParams(min_score=0.996))):
        raw, comps = decode_components(probs, params)
        for k, sl in enumerate(ndi.find_objects(comps), start=1):
            y0, y1, x0, x1 = max(0, sl[0].start - 2), sl[0].stop + 2, max(0, sl[1].start - 2), sl[1].stop + 2
            alone = probs[:, y0:y1, x0:x1].copy()
            other = comps[y0:y1, x0:x1] != k
            alone[:, other] = np.array([1, 0, 0], np.float32)[:, None]
            a, b = raw[y0:y1, x0:x1][~other], decode_components(alone, params)[0][~other]
            pairs = np.unique(a.astype(np.int64) * (int(b.max()) + 1) + b)
            assert np.unique(a).size == np.unique(b).size == pairs.size, f"component {k} decodes differently alone"
            flooded += np.unique(a).size > 1
    assert flooded > 10  # many components hold several nuclei (the flooded case)


def test_the_torchscript_flood_drops_unsure_objects_too():
    import torch

    from triageseg.export.ts_watershed import scripted

    flood = scripted()
    probs = torch.from_numpy(unsure_blobs())
    counts = [torch.unique(flood(probs, 0.4, 0.5, 1, 1, 16, 512, s)).numel() - 1 for s in (0.0, 0.63, 0.98)]
    assert counts == [2, 1, 0]
