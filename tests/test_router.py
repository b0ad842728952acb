"""Router: factory, thumbnails and crops, classify, save/load, temperature, fallback, training, CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from triageseg.bundle import GENERALIST, read_manifest  # noqa: E402
from triageseg.datasets.errors import BundleError, DataError  # noqa: E402
from triageseg.router.model import (  # noqa: E402
    Prediction,
    RouterConfig,
    classify,
    create_router,
    crop_boxes,
    image_views,
    load_router,
    make_thumbnail,
    save_router,
    to_tensor,
)
from triageseg.router.policy import decide  # noqa: E402
from triageseg.router.train import fit_temperature, score_predictions, train_router  # noqa: E402

CLASSES = ("brightfield", "fluorescence", "he")


@pytest.fixture()
def small_config() -> RouterConfig:
    return RouterConfig(class_names=CLASSES, image_size=32)


@pytest.fixture()
def small_model(small_config):
    torch.manual_seed(0)
    return create_router(small_config).eval()


# --------------------------------------------------------------------------- factory


def test_create_router_outputs_one_logit_per_class(small_model):
    with torch.inference_mode():
        out = small_model(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 3)
    assert small_model.pos_embed.shape == (1, 1 + 2 * 2, 192)  # 32 px / patch 16 -> 2 x 2 tokens + cls


def test_unknown_model_name_lists_valid_vits():
    with pytest.raises(ValueError, match=r"unknown router model 'vit_nonexistent'.*vit_tiny_patch16_224"):
        create_router(RouterConfig(class_names=CLASSES, model_name="vit_nonexistent"))
    with pytest.raises(ValueError, match="unknown router model 'resnet18'"):
        create_router(RouterConfig(class_names=CLASSES, model_name="resnet18"))


def test_config_validation_and_empty_classes():
    with pytest.raises(ValueError, match="empty"):
        create_router(RouterConfig())
    with pytest.raises(ValueError, match="image_size 100 is not a multiple of the vit_tiny_patch16_224 patch size 16"):
        create_router(RouterConfig(class_names=CLASSES, image_size=100))
    with pytest.raises(ValueError, match="duplicates"):
        RouterConfig(class_names=("a", "a"))
    with pytest.raises(ValueError, match="temperature"):
        RouterConfig(class_names=CLASSES, temperature=0.0)
    with pytest.raises(ValueError, match="unknown RouterConfig fields"):
        RouterConfig.from_dict({"class_names": ["a"], "colour": 1})


def test_config_json_roundtrip(tmp_path):
    cfg = RouterConfig(class_names=CLASSES, image_size=48, temperature=1.7, mean=(0.1, 0.2, 0.3))
    cfg.to_json(tmp_path / "config.json")
    assert RouterConfig.from_json(tmp_path / "config.json") == cfg
    assert json.loads((tmp_path / "config.json").read_text())["class_names"] == list(CLASSES)


# --------------------------------------------------------------------------- thumbnails


@pytest.mark.parametrize(
    ("shape", "box"),
    [
        ((200, 50), (0, 24, 64, 16)),  # tall: 64 rows, 16 columns centred
        ((50, 200), (24, 0, 16, 64)),  # wide
        ((5, 7), (9, 0, 46, 64)),  # tiny: enlarged, 5 * 64 / 7 = 45.7 -> 46 rows
        ((3000, 1000), (0, 21, 64, 21)),  # large: block mean then resize, 1000 * 64 / 3000 -> 21
        ((64, 64), (0, 0, 64, 64)),  # already the size: unchanged
    ],
)
def test_thumbnail_keeps_aspect_and_pads(shape, box):
    image = np.ones((*shape, 3), np.float32)
    thumb = make_thumbnail(image, 64, fill=(0.0, 0.0, 0.0))
    assert thumb.shape == (64, 64, 3) and thumb.dtype == np.float32
    top, left, h, w = box
    expected = np.zeros((64, 64), np.float32)
    expected[top : top + h, left : left + w] = 1.0
    np.testing.assert_allclose(thumb[..., 0], expected, atol=1e-6)
    np.testing.assert_array_equal(thumb[..., 0], thumb[..., 2])


def test_thumbnail_pads_with_the_background_colour():
    image = np.empty((120, 40, 3), np.float32)
    image[:] = (0.1, 0.2, 0.3)  # background: 70 % of the pixels
    image[:36] = (0.9, 0.8, 0.7)
    thumb = make_thumbnail(image, 30)
    np.testing.assert_allclose(thumb[:, :5], np.broadcast_to([0.1, 0.2, 0.3], (30, 5, 3)), atol=1e-6)
    np.testing.assert_allclose(thumb[:, -5:], np.broadcast_to([0.1, 0.2, 0.3], (30, 5, 3)), atol=1e-6)


def test_thumbnail_preserves_the_mean_of_a_large_image():
    rng = np.random.default_rng(0)
    image = rng.random((1500, 1500, 3), dtype=np.float32)
    thumb = make_thumbnail(image, 50)
    np.testing.assert_allclose(thumb.mean(axis=(0, 1)), image.mean(axis=(0, 1)), atol=2e-3)
    assert thumb.std() < 0.05  # anti-aliased: noise averaged out, not sampled


@pytest.mark.parametrize("shape", [(512, 512, 3), (300, 700, 3), (2000, 1500, 3), (1, 900, 3), (50, 80, 3)])
def test_thumbnail_equals_skimage_block_mean_and_resize(shape):
    """The strided block mean is skimage's downscale_local_mean bit for bit, on every path."""
    from skimage.transform import downscale_local_mean, resize

    from triageseg.router.model import background_colour

    image = np.random.default_rng(1).random(shape, dtype=np.float32)
    size = 112
    h, w = shape[:2]
    scale = size / max(h, w)
    factor = int(1 / scale) if scale < 1 else 1
    img = image
    if factor >= 2:
        hh, ww = max((h // factor) * factor, factor), max((w // factor) * factor, factor)
        img = np.pad(img, ((0, max(0, hh - h)), (0, max(0, ww - w)), (0, 0)), mode="edge")
        img = downscale_local_mean(img[:hh, :ww], (factor, factor, 1)).astype(np.float32)
    th, tw = max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale)))
    if img.shape[:2] != (th, tw):
        img = resize(img, (th, tw, 3), order=1, anti_aliasing=img.shape[0] > th or img.shape[1] > tw,
                     preserve_range=True).astype(np.float32)
    expected = np.empty((size, size, 3), np.float32)
    expected[:] = background_colour(image)
    top, left = (size - th) // 2, (size - tw) // 2
    expected[top : top + th, left : left + tw] = img
    np.testing.assert_array_equal(make_thumbnail(image, size), np.clip(expected, 0, 1))


def test_thumbnail_asks_for_the_fill_colour_only_when_it_pads():
    calls = []

    def fill():
        calls.append(1)
        return (0.5, 0.5, 0.5)

    make_thumbnail(np.zeros((448, 448, 3), np.float32), 112, fill=fill)
    assert calls == []
    thumb = make_thumbnail(np.zeros((448, 224, 3), np.float32), 112, fill=fill)
    assert calls == [1] and thumb[0, 0, 0] == 0.5 and thumb[0, 56, 0] == 0.0


def test_thumbnail_rejects_bad_input():
    with pytest.raises(ValueError, match="dtype uint8"):
        make_thumbnail(np.zeros((10, 10, 3), np.uint8), 16)
    with pytest.raises(ValueError, match=r"shape \(10, 10\)"):
        make_thumbnail(np.zeros((10, 10), np.float32), 16)


def test_crop_boxes_only_for_large_images(small_config):
    assert crop_boxes((100, 127), small_config) == []  # 127 <= 4 * 32
    boxes = crop_boxes((400, 1000), small_config)
    assert len(boxes) == 5 and boxes[0] == (168, 468, 64, 64)  # centre first
    for top, left, h, w in boxes:
        assert (h, w) == (64, 64) and 0 <= top <= 400 - 64 and 0 <= left <= 1000 - 64
    assert crop_boxes((400, 1000), small_config.replace(n_crops=1)) == [(168, 468, 64, 64)]
    assert crop_boxes((400, 1000), small_config.replace(n_crops=0)) == []
    assert image_views(np.zeros((400, 1000, 3), np.float32), small_config).shape == (6, 32, 32, 3)


class _BrightnessModel(torch.nn.Module):
    """Stub router: logits (+s, -s) with s the mean normalised input (bright -> class 0)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(4.0))

    def forward(self, x):
        s = self.scale * x.mean(dim=(1, 2, 3))
        return torch.stack([s, -s], dim=1)


def test_large_image_votes_of_crops_are_combined():
    config = RouterConfig(class_names=("bright", "dark"), image_size=32)
    image = np.ones((1000, 1000, 3), np.float32)
    for top, left, h, w in crop_boxes(image.shape[:2], config):
        image[top : top + h, left : left + w] = 0.0  # only the crops are dark (2 % of the area)
    model = _BrightnessModel()
    whole_only = classify(model, config.replace(n_crops=0), [image])[0]
    combined = classify(model, config, [image])[0]
    assert whole_only.modality == "bright"
    assert combined.modality == "dark"
    # The combination is the normalised mean of the per-view log-probabilities.
    with torch.inference_mode():
        logits = model(to_tensor(image_views(image, config), config)).numpy()
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    p = np.exp(log_p.mean(0))
    p /= p.sum()
    assert combined.probs["dark"] == pytest.approx(p[1], rel=1e-5)


# --------------------------------------------------------------------------- classify


def test_classify_returns_one_prediction_per_image(small_model, small_config):
    rng = np.random.default_rng(1)
    images = [rng.random(s + (3,), dtype=np.float32) for s in [(40, 60), (300, 20), (8, 8), (500, 200)]]
    preds = classify(small_model, small_config, images, batch_size=3)
    assert len(preds) == 4
    for p in preds:
        assert isinstance(p, Prediction)
        assert set(p.probs) == set(CLASSES)
        assert sum(p.probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert p.confidence == max(p.probs.values()) and p.probs[p.modality] == p.confidence
    modality, confidence, probs, ood_score = preds[0]  # unpacks like a tuple
    assert modality in CLASSES and ood_score is None  # no OOD statistics given
    assert classify(small_model, small_config, []) == []
    with pytest.raises(ValueError, match=r"images\[0\].*uint8"):
        classify(small_model, small_config, [np.zeros((8, 8, 3), np.uint8)])


def test_temperature_scales_the_softmax(small_model, small_config):
    image = np.random.default_rng(2).random((48, 48, 3), dtype=np.float32)
    with torch.inference_mode():
        logits = small_model(to_tensor(image_views(image, small_config), small_config)).numpy()[0]
    confs = []
    for t in (0.5, 1.0, 4.0):
        pred = classify(small_model, small_config.replace(temperature=t), [image])[0]
        expected = np.exp(logits / t) / np.exp(logits / t).sum()
        np.testing.assert_allclose([pred.probs[c] for c in CLASSES], expected, rtol=1e-4)
        confs.append(pred.confidence)
    assert confs[0] > confs[1] > confs[2] > 1 / 3


# --------------------------------------------------------------------------- save / load


def test_save_load_roundtrip(tmp_path, small_model, small_config):
    config = small_config.replace(temperature=1.3)
    save_router(tmp_path / "router", small_model, config)
    model, loaded = load_router(tmp_path / "router")
    assert loaded == config and not model.training
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), small_model(x))


def test_corrupt_or_missing_router_files_name_the_file(tmp_path, small_model, small_config):
    run = tmp_path / "router"
    save_router(run, small_model, small_config)
    (run / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(BundleError, match=r"model\.safetensors.*corrupt"):
        load_router(run)
    (run / "model.safetensors").unlink()
    with pytest.raises(BundleError, match=r"model\.safetensors: missing"):
        load_router(run)
    save_router(run, create_router(small_config.replace(class_names=("a", "b"))), small_config.replace(class_names=("a", "b")))
    (run / "config.json").write_text(json.dumps(small_config.to_dict()))  # 3 classes vs 2 in the file
    with pytest.raises(BundleError, match=r"model\.safetensors: weights do not match"):
        load_router(run)
    (run / "config.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"config\.json: not valid JSON"):
        load_router(run)
    with pytest.raises(BundleError, match="does not exist"):
        load_router(tmp_path / "nowhere")


def test_local_weights_file_loads_offline(tmp_path, monkeypatch, small_config):
    from safetensors.torch import save_file
    from timm.models import _builder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(_builder, "load_state_dict_from_hf", no_network)
    monkeypatch.setattr(_builder, "load_state_dict_from_url", no_network)

    torch.manual_seed(1)
    source = create_router(small_config.replace(class_names=tuple("abcde")))  # 5-class head
    path = tmp_path / "init.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))

    # Different number of classes: backbone loaded, head re-initialised with 3 outputs.
    model = create_router(small_config, weights=path)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert model.head.weight.shape == (3, 192)
    # Same number of classes: the head is kept too.
    same = create_router(small_config.replace(class_names=tuple("vwxyz")), weights=path)
    torch.testing.assert_close(same.head.weight, source.head.weight)
    # Another image size: position embeddings resampled (48 px -> 3 x 3 patches + cls).
    bigger = create_router(small_config.replace(image_size=48), weights=path)
    assert bigger.pos_embed.shape == (1, 10, 192)
    torch.testing.assert_close(bigger.patch_embed.proj.weight, source.patch_embed.proj.weight)

    with pytest.raises(DataError, match="not found"):
        create_router(small_config, weights=tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    with pytest.raises(DataError, match=r"bad\.safetensors"):
        create_router(small_config, weights=tmp_path / "bad.safetensors")


# --------------------------------------------------------------------------- temperature, fallback


def _onehot_logits(pred: np.ndarray, n_classes: int, margin: float) -> np.ndarray:
    logits = np.zeros((len(pred), n_classes))
    logits[np.arange(len(pred)), pred] = margin
    return logits


def test_fit_temperature_softens_an_overconfident_model():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 2000)
    wrong = rng.random(2000) < 0.3  # 70 % accurate but ~100 % confident
    pred = np.where(wrong, (labels + 1) % 3, labels)
    t = fit_temperature(_onehot_logits(pred, 3, 10.0), labels)
    assert t > 1.0
    # The optimum has a closed form here: softmax(margin / T) of the top class = accuracy.
    acc = 1 - wrong.mean()
    assert 10.0 / t == pytest.approx(np.log(acc * 2 / (1 - acc)), rel=1e-3)


def test_fit_temperature_calibrated_and_bounds():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (4000, 3))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = (rng.random((4000, 1)) > p.cumsum(1)).sum(1)  # labels drawn from softmax(logits)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.1)
    # Perfectly separated: the NLL keeps falling as T -> 0; the lower bound stops it.
    assert fit_temperature(_onehot_logits(labels, 3, 3.0), labels) == pytest.approx(0.5, abs=1e-6)
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, int)) == 1.0
    with pytest.raises(ValueError, match="labels must be in"):
        fit_temperature(np.zeros((2, 3)), np.array([0, 3]))


@pytest.mark.parametrize(
    ("modality", "confidence", "available", "has_generalist", "used", "reason"),
    [
        ("he", 0.95, ["he", "fluorescence"], True, "he", "routed to he"),
        ("he", 0.40, ["he", "fluorescence"], True, GENERALIST, "low confidence 0.40 < 0.60"),
        ("he", 0.40, ["he", "fluorescence"], False, "he", "no generalist: top-1 specialist"),
        ("he", 0.95, ["fluorescence"], True, GENERALIST, "no specialist for he"),
        ("he", 0.40, ["fluorescence", GENERALIST], True, GENERALIST, "low confidence"),
    ],
)
def test_decide_policy(modality, confidence, available, has_generalist, used, reason):
    pred = Prediction(modality, confidence, {modality: confidence})
    got, why = decide(pred, threshold=0.6, available=available, has_generalist=has_generalist)
    assert got == used and reason in why


def test_decide_without_specialist_or_generalist_is_an_error():
    pred = Prediction("he", 0.9, {"he": 0.9})
    with pytest.raises(ValueError, match="no specialist for it"):
        decide(pred, threshold=0.6, available=["fluorescence"], has_generalist=False)
    with pytest.raises(ValueError, match="no generalist"):
        decide(pred._replace(confidence=0.3), threshold=0.6, available=["fluorescence"], has_generalist=False)


def test_score_predictions_confusion():
    ev = score_predictions(("a", "b"), ["1", "2", "3", "4"], ["a", "a", "b", "c"], ["a", "b", "b", "a"], [1, 1, 1, 1])
    assert ev.row_names == ("a", "b", "c")
    np.testing.assert_array_equal(ev.confusion, [[1, 1], [0, 1], [1, 0]])
    assert ev.accuracy == 0.5


# --------------------------------------------------------------------------- training


def test_train_router_on_synthetic_data(synth_data, tmp_path):
    bundle = tmp_path / "bundle"
    result = train_router(synth_data, bundle / "router", epochs=12, batch_size=16, image_size=32, seed=0,
                          device="cpu", progress=False)
    run = bundle / "router"
    assert {p.name for p in run.iterdir()} >= {"config.json", "model.safetensors", "history.json", "history.csv"}
    assert result.config.class_names == CLASSES and result.epochs_run == 12
    # the stored reference (features of training thumbnails per class) a fine-tune adds a modality with
    from triageseg.router.reference import load_reference

    feats, labels = load_reference(run, CLASSES)
    assert feats.shape == (len(labels), 192) and sorted(set(labels.tolist())) == [0, 1, 2]
    assert 0.5 <= result.config.temperature <= 20.0
    history = json.loads((run / "history.json").read_text())
    assert len(history["epochs"]) == 12 and history["summary"]["status"] == "done"
    n_val = history["summary"]["n_val"]
    for row in history["epochs"]:
        assert np.asarray(row["val_confusion"]).shape == (3, 3) and np.sum(row["val_confusion"]) == n_val
    assert len((run / "history.csv").read_text().strip().splitlines()) == 13
    # The manifest registers the router.
    manifest = read_manifest(bundle)
    assert manifest["has_router"] and manifest["modalities"] == list(CLASSES)
    assert manifest["provenance"]["router"]["test_accuracy"] == result.test_accuracy
    # Test accuracy reported, and the loaded router reproduces the training-time evaluation.
    assert result.test is not None and len(result.test.ids) == history["summary"]["n_test"] > 0
    assert result.test.accuracy >= 0.5, result.history[-1]  # 12 steps on 16 tiny images: fluorescence at least
    model, config = load_router(run)
    from triageseg.datasets.io import read_image
    from triageseg.datasets.layout import Dataset

    test = {s.id: s for s in Dataset(synth_data).select(split="test")}
    preds = classify(model, config, [read_image(test[i].image_path) for i in result.test.ids])
    assert tuple(p.modality for p in preds) == result.test.predicted


def test_router_schedule_follows_the_steps_and_the_budget_only_stops(synth_data, tmp_path):
    """The learning rate never reads the clock: a budget that stops training leaves the epochs it ran as they were.

    (It used to follow elapsed time as well, so the same seed gave another router on a slower or busier machine.)
    """
    from triageseg.router.train import lr_at

    kw = dict(epochs=3, batch_size=16, image_size=32, seed=0, device="cpu", progress=False)
    full = train_router(synth_data, tmp_path / "full", **kw)
    stopped = train_router(synth_data, tmp_path / "stopped", time_budget_s=1e-6, **kw)
    assert full.epochs_run == 3 and stopped.epochs_run == 1
    per_epoch = full.history[0]["steps"]
    total, warmup = 3 * per_epoch, max(1, round(0.05 * 3 * per_epoch))
    assert [row["lr"] for row in full.history] == [round(lr_at(e * per_epoch - 1, total, warmup, 1e-3), 8)
                                                   for e in (1, 2, 3)]
    first = {k: v for k, v in full.history[0].items() if k != "seconds"}
    assert {k: v for k, v in stopped.history[0].items() if k != "seconds"} == first
    assert first["lr"] > 0  # a clock-driven schedule had annealed to 0 as soon as the budget ran out
    assert lr_at(0, 10, 2, 1e-3) == pytest.approx(5e-4) and lr_at(10, 10, 2, 1e-3) == 0.0


def test_train_router_needs_two_modalities(synth_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    ids = [line.split(",")[0] for line in (data / "modalities.csv").read_text().splitlines()[1:]]
    (data / "modalities.csv").write_text("id,modality\n" + "".join(f"{i},he\n" for i in ids))
    with pytest.raises(DataError, match=r"modalities\.csv: the train split has only modality \['he'\]"):
        train_router(data, tmp_path / "router", epochs=1, progress=False)


def test_train_router_cli(synth_data, tmp_path):
    from click.testing import CliRunner

    import triageseg.cli.train_router_cmd  # noqa: F401  (registers the command)
    from triageseg.cli.groups import cli

    bundle = tmp_path / "b"
    result = CliRunner().invoke(
        cli, ["train", "router", "--data", str(synth_data), "--out", str(bundle), "--epochs", "2",
              "--batch-size", "8", "--image-size", "32", "--device", "cpu", "--quiet"],
    )
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output and "true \\ pred" in result.output
    assert "out-of-distribution check: thumbstats, threshold" in result.output and "curves.png" in result.output
    assert (bundle / "router" / "model.safetensors").is_file() and (bundle / "bundle.json").is_file()
    assert (bundle / "router" / "curves.png").is_file() and (bundle / "router" / "ood.json").is_file()
    bad = CliRunner().invoke(cli, ["train", "router", "--data", str(synth_data), "--out", str(bundle),
                                   "--model", "vit_bogus", "--quiet"])
    assert bad.exit_code == 1 and "unknown router model 'vit_bogus'" in bad.output


@pytest.mark.slow
def test_router_default_reaches_high_accuracy(tmp_path):
    """The documented default: >= 0.99 on the synthetic test split (about 40-60 s on 2 CPU cores)."""
    from triageseg.datasets.synth import make_dataset

    data = make_dataset(tmp_path / "data", n=120, size=256, seed=1)
    result = train_router(data, tmp_path / "router", progress=False, device="cpu")
    assert result.test_accuracy >= 0.99
