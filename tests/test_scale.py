"""Per-modality input scale: resizing of images, labels and probabilities."""

from __future__ import annotations

import numpy as np
import pytest

from triageseg.segmenters.scale import (
    resize_image,
    resize_labels,
    resize_probabilities,
    scaled_shape,
)


def _disks(radius: int, n: int = 4, size: int = 96) -> np.ndarray:
    lab = np.zeros((size, size), np.int32)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        cy, cx = 20 + (i // 2) * 50, 20 + (i % 2) * 50
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = i + 1
    return lab


def test_resize_labels_keeps_ids_and_scales_areas():
    lab = _disks(8)
    up = resize_labels(lab, scaled_shape(lab.shape, 1.5))
    assert up.shape == (144, 144) and up.dtype == lab.dtype
    assert set(np.unique(up)) == set(np.unique(lab))
    ratio = (up == 1).sum() / (lab == 1).sum()
    assert 2.0 < ratio < 2.5  # area grows with the square of the scale
    back = resize_labels(up, lab.shape)
    assert (back == lab).mean() > 0.99


def test_resize_image_and_probabilities():
    img = np.random.default_rng(0).random((40, 30, 3), dtype=np.float32)
    assert resize_image(img, (80, 60)).shape == (80, 60, 3)
    assert resize_image(img, (20, 15)).shape == (20, 15, 3)
    assert resize_image(img[..., :1], (20, 15)).shape == (20, 15, 1)
    assert resize_image(img, (40, 30)) is img
    p = np.random.default_rng(1).random((3, 40, 30)).astype(np.float32)
    p /= p.sum(0)
    q = resize_probabilities(p, (57, 41))
    assert q.shape == (3, 57, 41) and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-5)


@pytest.mark.parametrize("shape", [(23, 61), (97, 130), (41, 30)])
def test_probabilities_resize_plane_by_plane_as_the_image_layout_does(shape):
    """Probabilities are resized channels first (no transpose): the same values, bit for bit, as resizing the
    H x W x C array, and the banded resampler gives the same rows again."""
    from triageseg.segmenters.scale import resample_probability_stream

    p = np.random.default_rng(2).random((3, 40, 30)).astype(np.float32)
    p /= p.sum(0)
    hwc = resize_image(np.ascontiguousarray(p.transpose(1, 2, 0)), shape).transpose(2, 0, 1)
    expected = np.clip(hwc, 0.0, None)
    expected /= np.maximum(expected.sum(axis=0, keepdims=True), 1e-12)
    q = resize_probabilities(p, shape)
    assert q.flags.c_contiguous and q.dtype == np.float32 and q.shape == (3, *shape)
    assert np.array_equal(q, expected)
    bands = ((y, min(y + 7, 40), p[:, y : y + 7]) for y in range(0, 40, 7))
    rows = list(resample_probability_stream(bands, (40, 30), shape))
    assert rows[0][0] == 0 and rows[-1][1] == shape[0]
    assert np.array_equal(np.concatenate([r for _, _, r in rows], axis=1), q)


@pytest.mark.parametrize("scale", [0.5, 1.5])
def test_training_with_a_scale_saves_it_and_the_pipeline_applies_it(synth_data, tmp_path, scale, monkeypatch):
    from triageseg.datasets.layout import Dataset
    from triageseg.pipeline import Pipeline
    from triageseg.segmenters import predict as predict_module
    from triageseg.segmenters.model import load_segmenter
    from triageseg.segmenters.train import TrainConfig, train_segmenter_into_bundle

    cfg = TrainConfig(modality="he", epochs=1, steps_per_epoch=2, batch_size=2, crop_size=64,
                      decoder_channels=(16, 16, 16, 16, 16), tile_size=128, overlap=32, max_val_images=2,
                      scale=scale, tune_postprocess=False)
    result = train_segmenter_into_bundle(cfg, synth_data, tmp_path / "b", device="cpu", progress=False)
    assert 0.0 <= result.best_val_mean_f1 <= 1.0
    _, config, _ = load_segmenter(result.run_dir)
    assert config.scale == scale

    seen = []
    original = predict_module.predict

    def spy(*args, **kwargs):
        seen.append(kwargs.get("scale"))
        return original(*args, **kwargs)

    monkeypatch.setattr(predict_module, "predict", spy)
    ds = Dataset(synth_data)
    image, _ = ds.load(ds.select(split="test", modality="he")[0])
    # the network sees the training set's diameter at the model's scale; an image whose nuclei are
    # that diameter (given here, not estimated) runs at the model's scale
    assert config.diameter is not None
    pipe = Pipeline.from_bundle(tmp_path / "b", device="cpu", diameter=config.diameter / scale)
    out = pipe.segment(image, modality="he")
    assert seen[0] == pytest.approx(scale, abs=1e-3)  # (predict then calls itself on the resized image)
    assert out.labels.shape == image.shape[:2]


def test_labels_shrunk_by_two_stay_on_their_image():
    """Nearest neighbour put labels shrunk by 2 a quarter pixel up-left of their image; shares keep them on it."""
    from scipy import ndimage

    lab = np.zeros((200, 200), np.int32)
    yy, xx = np.mgrid[0:200, 0:200]
    rng = np.random.default_rng(3)
    centres = [(30 + 35 * (i // 5) + rng.random(), 30 + 35 * (i % 5) + rng.random()) for i in range(25)]
    for i, (cy, cx) in enumerate(centres, start=1):
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= 7.5**2] = i
    small = resize_labels(lab, (100, 100))
    assert set(np.unique(small)) == set(np.unique(lab))
    ids = np.arange(1, 26)
    want = (np.array(ndimage.center_of_mass(lab > 0, lab, ids)) + 0.5) / 2 - 0.5
    got = np.array(ndimage.center_of_mass(small > 0, small, ids))
    assert np.abs((got - want).mean(axis=0)).max() < 0.03  # nearest neighbour: -0.25 in both
    ratio = np.bincount(small.ravel())[1:].sum() / np.bincount(lab.ravel())[1:].sum() * 4
    assert 0.95 < ratio < 1.05
    # the image's own operator decides: an object's pixels are those where its share under resize_image wins
    share = resize_image((lab == 1).astype(np.float32), (100, 100))
    assert np.array_equal(small == 1, (share > 0.5 + 1e-5) | ((np.abs(share - 0.5) <= 1e-5) & (small == 1)))


def test_label_ties_alternate_and_pieces_stay_whole():
    from triageseg.segmenters.label_resize import operator_matrix

    lab = np.zeros((40, 40), np.int32)
    lab[:, 21:] = 1  # the edge at 21 splits the 2 x 2 blocks of column pair 20-21: every output pixel of column 10 ties
    small = resize_labels(lab, (20, 20))
    assert (small[:, 11:] == 1).all() and (small[:, :10] == 0).all()
    assert (small[:, 10] == 1).sum() == 10  # half the ties to each side: the edge does not move
    thin = np.zeros((40, 40), np.int32)
    thin[5:35, 20] = 1  # one pixel wide: its shares are 0.5 at best, so it keeps one 4-connected piece or vanishes
    out = resize_labels(thin, (20, 20))
    from scipy import ndimage

    assert ndimage.label(out == 1)[1] <= 1
    mat = operator_matrix(lambda a, n: resize_image(a, (n, a.shape[1])), 777, 300)
    x = np.random.default_rng(0).random((777, 5)).astype(np.float32)
    assert np.allclose(mat @ x, resize_image(x, (300, 5)), atol=1e-5)
