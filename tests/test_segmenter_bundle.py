"""Segmenter run folders: save/load round trip and clear errors for every broken file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from triageseg import bundle
from triageseg.datasets.errors import BundleError
from triageseg.segmenters.model import POSTPROCESS, SegmenterConfig, create_segmenter, load_segmenter, save_segmenter
from triageseg.segmenters.predict import predict

SMALL = (32, 16, 16, 8, 8)
CFG = SegmenterConfig(decoder_channels=SMALL, modality="he", tile_size=256, overlap=32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from triageseg.postprocess.watershed import WatershedParams

    torch.manual_seed(0)
    model = create_segmenter(CFG).eval()
    run = tmp_path_factory.mktemp("bundle") / "segmenters" / "he"
    save_segmenter(run, model, CFG, params=WatershedParams(), provenance={"seed": 0})
    return run, model


@pytest.fixture()
def run_copy(saved, tmp_path):
    import shutil

    dst = tmp_path / "he"
    shutil.copytree(saved[0], dst)
    return dst


def test_round_trip_gives_the_same_model_config_and_params(saved):
    from triageseg.postprocess.watershed import WatershedParams

    run, model = saved
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "model.safetensors", "postprocess.json"]
    loaded, cfg, params = load_segmenter(run)
    assert cfg == CFG
    assert params == WatershedParams()
    assert not loaded.training
    image = np.random.default_rng(0).random((80, 60, 3), dtype=np.float32)
    assert np.array_equal(predict(loaded, image), predict(model, image))


def test_saved_files_never_mention_hub_weights(saved):
    run, _ = saved
    text = (run / "config.json").read_text()
    assert "imagenet" not in text
    assert json.loads(text)["provenance"] == {"seed": 0}
    assert b"imagenet" not in (run / "model.safetensors").read_bytes()[:4096]


def test_missing_folder(tmp_path):
    with pytest.raises(BundleError, match="nowhere.*does not exist"):
        load_segmenter(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "postprocess.json"])
def test_missing_file_is_named(run_copy, name):
    (run_copy / name).unlink()
    with pytest.raises(BundleError, match=f"{name}: missing"):
        load_segmenter(run_copy)


def test_corrupt_weights_are_named(run_copy):
    (run_copy / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(BundleError, match="model.safetensors: corrupt or truncated"):
        load_segmenter(run_copy)


def test_truncated_weights_are_named(run_copy):
    path = run_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="model.safetensors: corrupt or truncated"):
        load_segmenter(run_copy)


def test_config_that_does_not_match_the_weights(run_copy):
    path = run_copy / "config.json"
    data = json.loads(path.read_text())
    data["decoder_channels"] = [64, 32, 16, 8, 8]
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="model.safetensors: weights do not match the config.*shape mismatch"):
        load_segmenter(run_copy)


def test_config_with_another_encoder(run_copy):
    path = run_copy / "config.json"
    data = json.loads(path.read_text())
    data["encoder"] = "resnet18"
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="model.safetensors: weights do not match.*missing tensors"):
        load_segmenter(run_copy)


def test_config_with_unknown_encoder_names_the_config(run_copy):
    path = run_copy / "config.json"
    data = json.loads(path.read_text())
    data["encoder"] = "no-such-encoder"
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="config.json: unknown encoder 'no-such-encoder'"):
        load_segmenter(run_copy)


@pytest.mark.parametrize("name", ["config.json", POSTPROCESS])
def test_corrupt_json_is_named(run_copy, name):
    (run_copy / name).write_text("{ not json")
    with pytest.raises(BundleError, match=f"{name}: not valid JSON"):
        load_segmenter(run_copy)


def test_config_of_another_kind_is_refused(run_copy):
    path = run_copy / "config.json"
    data = json.loads(path.read_text())
    data["kind"] = "triageseg-router"
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="config.json: not a segmenter config"):
        load_segmenter(run_copy)


def test_weights_are_plain_safetensors(saved):
    run, model = saved
    state = bundle.load_weights(run / "model.safetensors")
    assert set(state) == set(model.state_dict())
