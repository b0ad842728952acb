"""Tiled inference: shapes, probabilities, whole-vs-tiled agreement, TTA, devices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from triageseg.segmenters.model import SegmenterConfig, create_segmenter
from triageseg.segmenters.predict import (
    SINGLE_TILE_SLACK,
    _ramp_1d,
    predict,
    resolve_device,
    tile_grid,
    tile_starts,
)

SMALL = (32, 16, 16, 8, 8)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return create_segmenter(SegmenterConfig(decoder_channels=SMALL)).eval()


def _pointwise_model() -> torch.nn.Module:
    """A 1x1 convolution: every pixel's output depends on that pixel only (and it is D4-equivariant)."""
    torch.manual_seed(3)
    return torch.nn.Conv2d(3, 3, kernel_size=1).eval()


def _image(h, w, seed=0):
    return np.random.default_rng(seed).random((h, w, 3), dtype=np.float32)


@pytest.mark.parametrize("shape", [(70, 45), (1, 1), (33, 97), (64, 64)])
def test_odd_sizes_give_probabilities_of_the_same_size(unet, shape):
    probs = predict(unet, _image(*shape))
    assert probs.shape == (3, *shape)
    assert probs.dtype == np.float32
    assert np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)


def test_one_tile_matches_a_whole_image_forward_pass(unet):
    image = _image(200, 190)
    probs = predict(unet, image, tile_size=256, overlap=32)
    padded = np.pad(image, ((0, 24), (0, 2), (0, 0)), mode="reflect")  # to 224 x 192
    with torch.inference_mode():
        logits = unet(torch.from_numpy(padded.transpose(2, 0, 1).copy())[None])
    whole = torch.softmax(logits, 1)[0, :, :200, :190].numpy()
    assert np.abs(probs - whole).max() < 1e-3
    # A larger tile budget does not change a prediction that already fits one tile.
    assert np.abs(predict(unet, image, tile_size=512) - probs).max() < 1e-6


def test_tiles_blend_to_the_whole_image_result_for_a_pointwise_model():
    model = _pointwise_model()
    image = _image(300, 230, seed=1)
    whole = predict(model, image, tile_size=512)
    tiled = predict(model, image, tile_size=64, overlap=16, batch_size=3)
    assert np.abs(tiled - whole).max() < 1e-5


def test_tiled_unet_close_to_whole_image_away_from_tile_borders(unet):
    image = _image(192, 192, seed=2)
    whole = predict(unet, image, tile_size=256)
    tiled = predict(unet, image, tile_size=128, overlap=48)
    assert tiled.shape == whole.shape
    np.testing.assert_allclose(tiled.sum(0), 1.0, atol=1e-5)
    # Convolutions see different context near tile borders, so only the mean is close.
    assert np.abs(tiled - whole).mean() < 0.05


def test_tta_of_an_equivariant_model_changes_nothing():
    model = _pointwise_model()
    image = _image(96, 64, seed=4)
    plain = predict(model, image, tile_size=64, overlap=16)
    tta = predict(model, image, tile_size=64, overlap=16, tta=True)
    assert np.abs(plain - tta).max() < 1e-5


def test_tta_on_unet_gives_probabilities(unet):
    probs = predict(unet, _image(50, 70), tta=True)
    assert probs.shape == (3, 50, 70)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)


def test_channels_last_model_gives_the_same_result(unet):
    image = _image(64, 96, seed=5)
    ref = predict(unet, image)
    model = create_segmenter(SegmenterConfig(decoder_channels=SMALL))
    model.load_state_dict(unet.state_dict())
    model = model.to(memory_format=torch.channels_last).eval()
    assert np.abs(predict(model, image) - ref).max() < 1e-4


def test_predict_restores_training_mode(unet):
    unet.train()
    predict(unet, _image(32, 32))
    assert unet.training
    unet.eval()


@pytest.mark.parametrize(
    ("image", "kwargs", "match"),
    [
        (np.zeros((32, 32), np.float32), {}, r"HxWx3.*\(32, 32\)"),
        (np.zeros((32, 32, 4), np.float32), {}, "HxWx3"),
        (np.zeros((32, 32, 3), np.uint8), {}, "uint8"),
        (np.zeros((32, 32, 3), np.float32), {"tile_size": 100}, "multiple of 32"),
        (np.zeros((32, 32, 3), np.float32), {"overlap": 64, "tile_size": 128}, "overlap"),
        (np.zeros((32, 32, 3), np.float32), {"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_input_is_refused(unet, image, kwargs, match):
    with pytest.raises(ValueError, match=match):
        predict(unet, image, **kwargs)


def test_tile_starts_cover_the_image():
    assert tile_starts(100, 128, 96) == [0]
    assert tile_starts(128, 128, 96) == [0]
    assert tile_starts(320, 128, 96) == [0, 96, 192]
    assert tile_starts(300, 128, 96) == [0, 96, 172]


@pytest.mark.parametrize("length", [32, 288, 512, 544, 672, 1000 // 32 * 32, 2048, 16000])
@pytest.mark.parametrize("tile_size,overlap", [(512, 64), (256, 32), (128, 60), (96, 0)])
def test_tile_grid_covers_the_axis_with_the_fewest_smallest_tiles(length, tile_size, overlap):
    side, starts = tile_grid(length, tile_size, overlap)
    assert side % 32 == 0 and side <= max(tile_size, length) and 2 * overlap < side or len(starts) == 1
    assert starts[0] == 0 and starts[-1] + side == max(length, side)
    assert all(b - a <= side - overlap for a, b in zip(starts, starts[1:]))  # neighbours overlap by >= overlap
    single = max(tile_size, 32 * int(SINGLE_TILE_SLACK * tile_size / 32))
    expected = 1 if length <= single else len(tile_starts(length, tile_size, tile_size - overlap))
    assert len(starts) == expected  # no extra tile
    if len(starts) > 1:
        assert (side - 32) * len(starts) - (len(starts) - 1) * overlap < length or side - 32 <= 2 * overlap


def test_tile_grid_of_a_672_px_axis_is_two_384_px_tiles():
    assert tile_grid(672, 512, 64) == (384, [0, 288])
    assert tile_grid(512, 512, 64) == (512, [0])


def test_an_axis_a_little_over_the_tile_size_is_one_tile():
    # two tiles compute more pixels than one (overlap, rounding): up to 1.25x the tile size runs whole
    assert tile_grid(928, 768, 32) == (928, [0])
    assert tile_grid(960, 768, 32) == (960, [0])
    side, starts = tile_grid(992, 768, 32)
    assert len(starts) == 2 and side <= 768
    assert tile_grid(640, 512, 64) == (640, [0]) and len(tile_grid(672, 512, 64)[1]) == 2


def test_window_ramps_only_towards_neighbours():
    inner = _ramp_1d(64, 16, True, True)
    assert inner[0] < 0.01 and inner[-1] < 0.01 and inner[32] == 1.0
    edge = _ramp_1d(64, 16, False, True)
    assert edge[0] == 1.0 and edge[-1] < 0.01
    # Complementary ramps: two neighbours overlapping by the ramp length sum to 1.
    np.testing.assert_allclose(inner[:16] + edge[-16:], 1.0, atol=2e-3)
    assert (inner > 0).all()


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else None
    if expected:
        assert resolve_device("auto").type == "cuda"
    elif not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        assert resolve_device("auto") == torch.device("cpu")
        assert resolve_device(None) == torch.device("cpu")
    for bad in ("gpu", "cuda:x", "tpu"):
        with pytest.raises(ValueError, match="valid: auto, cpu, cuda, cuda:N, mps|not available"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")


@pytest.mark.slow
def test_4000x4000_image_on_cpu_without_running_out_of_memory():
    import resource
    import time

    torch.manual_seed(0)
    model = create_segmenter(SegmenterConfig()).eval()
    image = np.random.default_rng(0).random((4000, 4000, 3), dtype=np.float32)
    t0 = time.perf_counter()
    probs = predict(model, image, tile_size=512, overlap=64, batch_size=4, device="cpu")
    seconds = time.perf_counter() - t0
    assert probs.shape == (3, 4000, 4000)
    np.testing.assert_allclose(probs[:, ::97, ::89].sum(0), 1.0, atol=1e-4)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"4000x4000: {seconds:.1f}s, peak RSS {peak_gib:.2f} GiB")
    assert peak_gib < 12


@pytest.mark.parametrize("scale", [0.5, 1.37, 2.0])
def test_scaled_prediction_comes_back_at_the_image_size(scale):
    model = _pointwise_model()
    image = _image(70, 45, seed=2)
    probs = predict(model, image, scale=scale)
    assert probs.shape == (3, 70, 45) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    # A pointwise model on a smooth image: resizing before and after changes little.
    yy, xx = np.mgrid[0:70, 0:45] / 70.0
    smooth = np.stack([yy, xx, (yy + xx) / 2], -1).astype(np.float32)
    assert np.abs(predict(model, smooth, scale=scale) - predict(model, smooth)).max() < 0.02


def test_scale_out_of_range_is_refused(unet):
    with pytest.raises(ValueError, match="scale must be in"):
        predict(unet, _image(32, 32), scale=9.0)  # size triage widened the range to [1/32, 8]
    with pytest.raises(ValueError, match="scale must be in"):
        SegmenterConfig(scale=0.01)


@pytest.mark.parametrize("h,w", [(742, 742), (5, 37), (64, 64), (33, 100)])
def test_padded_rows_are_np_pad_reflect_copied_by_slices(h, w):
    from triageseg.segmenters.predict import _PaddedRows

    img = np.random.default_rng(h * w).random((h, w, 3), dtype=np.float32)
    hp, wp = 32 * -(-h // 32), 32 * -(-w // 32)
    expected = np.pad(img, ((0, hp - h), (0, wp - w), (0, 0)), mode="reflect")
    rows = _PaddedRows(lambda a, b: img[a:b], (h, w), (hp, wp))
    for y0, y1 in [(0, min(hp, 32)), (0, hp), (hp // 2, hp), (hp - 32, hp)]:
        got = rows.get(y0, y1)
        assert got.flags.c_contiguous and got.dtype == np.float32
        np.testing.assert_array_equal(got, expected[y0:y1])


@pytest.mark.parametrize("shape,scale,tta", [((300, 517), 1.0, False), ((120, 90), 1.0, True), ((70, 45), 1.45, True),
                                             ((70, 45), 1.45, False), ((64, 64), 1.0, False)])
def test_one_tile_images_skip_the_blending_with_the_same_values(unet, shape, scale, tta):
    """An image that runs as one tile is predicted directly: bit for bit what the streamed tiles give."""
    from triageseg.segmenters.predict import resize_probabilities, stream_probabilities
    from triageseg.segmenters.scale import resize_image, scaled_shape

    image = _image(*shape, seed=5)
    got = predict(unet, image, tile_size=544, overlap=32, batch_size=2, tta=tta, scale=scale)
    src = image if scale == 1.0 else resize_image(image, scaled_shape(image.shape, scale))
    rows = list(stream_probabilities(unet, lambda a, b: src[a:b], src.shape[:2], tile_size=544, overlap=32,
                                     batch_size=2, tta=tta))
    streamed = np.concatenate([r[2] for r in rows], axis=1)
    expected = streamed if scale == 1.0 else resize_probabilities(streamed, shape)
    assert got.shape == (3,) + shape and got.dtype == np.float32 and got.flags.c_contiguous
    assert np.array_equal(got, expected)
