"""Model factory, config round trip and local encoder initialisation."""

from __future__ import annotations

import json

import pytest
import torch

from triageseg.datasets.errors import BundleError, DataError
from triageseg.segmenters.model import (
    SegmenterConfig,
    create_segmenter,
    load_encoder_weights,
    valid_encoders,
)

SMALL = (32, 16, 16, 8, 8)


def test_default_config_is_efficientnet_b3_three_classes():
    cfg = SegmenterConfig()
    assert (cfg.encoder, cfg.in_channels, cfg.classes, cfg.tile_size) == ("efficientnet-b3", 3, 3, 768)
    assert cfg.encoder_init is None


def test_create_segmenter_forward_64x64():
    torch.manual_seed(0)
    model = create_segmenter(SegmenterConfig(decoder_channels=SMALL)).eval()
    assert type(model).__name__ == "Unet"
    assert type(model.encoder).__name__ == "EfficientNetEncoder"
    with torch.inference_mode():
        out = model(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 3, 64, 64)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_unknown_encoder_lists_valid_names():
    with pytest.raises(ValueError) as err:
        create_segmenter(SegmenterConfig(encoder="efficientnet-b33"))
    msg = str(err.value)
    assert "efficientnet-b33" in msg
    assert "efficientnet-b3," in msg and "resnet34" in msg
    assert "efficientnet-b3" in valid_encoders()


@pytest.mark.parametrize(
    "changes",
    [
        {"tile_size": 500},
        {"overlap": 384},
        {"decoder_channels": (16, 8)},
        {"classes": 1},
        {"normalisation": "zscore"},
        {"percentiles": (99.0, 1.0)},
        {"encoder_init": "imagenet"},
    ],
)
def test_config_rejects_bad_values(changes):
    with pytest.raises(ValueError):
        SegmenterConfig(**changes)


def test_config_json_round_trip(tmp_path):
    cfg = SegmenterConfig(decoder_channels=SMALL, modality="he", tile_size=256, overlap=32)
    cfg.to_json(tmp_path / "config.json", results={"val_mean_f1_tuned": 0.5})
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["results"] == {"val_mean_f1_tuned": 0.5}
    assert "imagenet" not in json.dumps(data)
    assert SegmenterConfig.from_json(tmp_path / "config.json") == cfg


def test_config_json_unknown_key_names_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**SegmenterConfig().to_dict(), "encoder_weights": "imagenet"}))
    with pytest.raises(BundleError, match="config.json.*encoder_weights"):
        SegmenterConfig.from_json(path)


def _pair():
    cfg = SegmenterConfig(encoder="resnet18", decoder_channels=SMALL)
    torch.manual_seed(1)
    src = create_segmenter(cfg)
    torch.manual_seed(2)
    dst = create_segmenter(cfg)
    return src, dst


def _same_encoder(a, b) -> bool:
    sa, sb = a.encoder.state_dict(), b.encoder.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_encoder_weights_from_torch_state_dict(tmp_path):
    src, dst = _pair()
    assert not _same_encoder(src, dst)
    path = tmp_path / "enc.pth"
    # A classifier checkpoint: prefixed keys plus a head the Unet has no use for.
    state = {f"encoder.{k}": v for k, v in src.encoder.state_dict().items()}
    state["head.weight"] = torch.zeros(10, 4)
    torch.save({"state_dict": state}, path)
    counts = load_encoder_weights(dst, path)
    assert counts == {"loaded": len(src.encoder.state_dict()), "ignored": 1}
    assert _same_encoder(src, dst)


def test_encoder_weights_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    src, dst = _pair()
    path = tmp_path / "enc.safetensors"
    save_file({k: v.contiguous() for k, v in src.encoder.state_dict().items()}, str(path))
    load_encoder_weights(dst, path)
    assert _same_encoder(src, dst)


def test_encoder_weights_errors_name_the_file(tmp_path):
    _, dst = _pair()
    with pytest.raises(DataError, match="missing.pth.*not found"):
        load_encoder_weights(dst, tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(DataError, match="junk.pth"):
        load_encoder_weights(dst, junk)
    other = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(DataError, match="other.pth.*no tensor names match"):
        load_encoder_weights(dst, other)
    partial = tmp_path / "partial.pth"
    state = dict(dst.encoder.state_dict())
    state.pop("conv1.weight")
    torch.save(state, partial)
    with pytest.raises(DataError, match="partial.pth.*1 encoder tensors missing.*conv1.weight"):
        load_encoder_weights(dst, partial)
    wrong = tmp_path / "wrong.pth"
    state = dict(dst.encoder.state_dict())
    state["conv1.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(state, wrong)
    with pytest.raises(DataError, match="wrong.pth.*shape mismatch"):
        load_encoder_weights(dst, wrong)


def test_encoder_weights_never_unpickle_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    _, dst = _pair()
    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(DataError, match="evil.pth.*weights_only"):
        load_encoder_weights(dst, path)
