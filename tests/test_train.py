"""Training: config, schedule, loss, augmentation, an end-to-end run, resume exactness, CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from triageseg import bundle
from triageseg.datasets.errors import DataError
from triageseg.segmenters.train import (
    CHECKPOINT_DIR,
    CHECKPOINT_FILE,
    HISTORY_FIELDS,
    TrainConfig,
    lr_at,
    train_segmenter,
    train_segmenter_into_bundle,
)

SMALL = (32, 16, 16, 8, 8)
TINY = TrainConfig(
    modality="fluorescence",
    epochs=2,
    steps_per_epoch=2,
    batch_size=2,
    crop_size=64,
    decoder_channels=SMALL,
    tile_size=128,
    overlap=32,
    max_val_images=2,
    warmup_epochs=0.5,
)


class Stop(Exception):
    pass


# ------------------------------------------------------------------ config, schedule, loss


def test_config_json_round_trip_with_modality_override(tmp_path):
    path = tmp_path / "best_config.json"
    TINY.to_json(path)
    assert TrainConfig.from_json(path) == TINY
    assert TrainConfig.from_json(path, modality="he").modality == "he"
    assert TrainConfig.from_json(path, modality=None).run_name == bundle.GENERALIST


def test_config_refuses_unknown_keys_and_bad_values(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"epochs": 2, "learning_rate": 0.1}))
    with pytest.raises(DataError, match="c.json.*learning_rate"):
        TrainConfig.from_json(path)
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TINY.replace(learning_rate=0.1)
    for bad in ({"crop_size": 100}, {"epochs": 0}, {"encoder_weights": "imagenet"}, {"lr": 0.0},
                {"time_budget_s": -1.0}, {"tile_size": 100}, {"bn_momentum": 0.0}):
        with pytest.raises(ValueError):
            TINY.replace(**bad)


def test_saved_segmenter_config_follows_train_config():
    seg = TINY.segmenter_config()
    assert (seg.encoder, seg.decoder_channels, seg.tile_size, seg.modality) == ("efficientnet-b3", SMALL, 128,
                                                                                 "fluorescence")
    assert seg.encoder_init is None


def test_lr_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(epochs=4, steps_per_epoch=10, lr=1e-3, warmup_epochs=1, min_lr_ratio=0.01)
    assert lr_at(cfg, 0) == pytest.approx(1e-4)
    assert lr_at(cfg, 9) == pytest.approx(1e-3)
    assert lr_at(cfg, 10) == pytest.approx(1e-3)
    assert lr_at(cfg, 39) < lr_at(cfg, 25) < lr_at(cfg, 10)
    assert lr_at(cfg, 40) == pytest.approx(1e-5)


def test_loss_weights_the_boundary_class():
    from triageseg.segmenters.losses import confusion_matrix, iou_per_class, segmentation_loss

    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, 0, 0] = 2
    logits = torch.zeros(1, 3, 4, 4)
    logits[:, 0] = 5.0  # predicts background everywhere: the one boundary pixel is wrong
    light = segmentation_loss(logits, target, class_weights=(1, 1, 1), dice_weight=0)
    heavy = segmentation_loss(logits, target, class_weights=(1, 1, 10), dice_weight=0)
    assert heavy > light > 0
    assert segmentation_loss(logits, target, class_weights=(1, 1, 1), dice_weight=1) > light
    cm = confusion_matrix(logits, target, 3)
    assert cm.tolist() == [[15, 0, 0], [0, 0, 0], [1, 0, 0]]
    iou = iou_per_class(cm.numpy())
    assert iou[0] == pytest.approx(15 / 16) and iou[2] == 0.0 and math.isnan(iou[1])


def test_augmentation_is_a_function_of_the_seed_and_keeps_labels_exact():
    from triageseg.segmenters.augment import augment_sample, build_augmentation

    rng = np.random.default_rng(0)
    image = rng.random((50, 70, 3), dtype=np.float32)
    labels = np.zeros((50, 70), np.uint32)
    labels[5:20, 5:25] = 7
    labels[30:45, 40:60] = 70000
    for modality in ("fluorescence", "he", None):
        tf = build_augmentation(modality, crop_size=64, strength=1.0)
        a, la = augment_sample(tf, image, labels, seed=11)
        b, lb = augment_sample(tf, image, labels, seed=11)
        assert a.shape == (64, 64, 3) and la.shape == (64, 64) and la.dtype == np.uint32
        assert np.array_equal(a, b) and np.array_equal(la, lb)
        assert set(np.unique(la)) <= {0, 7, 70000}  # nearest interpolation: no new ids
        assert 0.0 <= a.min() and a.max() <= 1.0
    plain = build_augmentation("he", crop_size=64, strength=0.0)
    crop, lab = augment_sample(plain, image, labels, seed=3)
    # Crops only: the padded crop holds the original pixel values.
    assert set(np.unique(lab)) <= {0, 7, 70000}
    assert np.isin(crop[..., 0], image[..., 0]).all()


# ------------------------------------------------------------------------ training runs


def test_train_end_to_end_writes_a_bundle_that_loads(synth_data, tmp_path):
    from triageseg.datasets.layout import Dataset
    from triageseg.segmenters.model import load_segmenter

    calls = []
    out = tmp_path / "bundle"
    result = train_segmenter_into_bundle(
        TINY, synth_data, out, device="cpu", progress=False, report=lambda e, m, d: calls.append((e, m, d))
    )
    run = out / "segmenters" / "fluorescence"
    assert result.run_dir == run
    names = {p.name for p in run.iterdir()}
    assert names == {"config.json", "model.safetensors", "postprocess.json", "history.csv", "history.json",
                     "curves.png", "quality.json"}
    assert [c[0] for c in calls] == [1, 2] and all(c[2] == run for c in calls)
    for key in ("train_loss", "iou_background", "iou_interior", "iou_boundary", "val_mean_f1", "lr", "val_loss",
                "val_iou_background", "val_iou_interior", "val_iou_boundary"):
        assert key in calls[0][1]
    assert result.epochs_completed == 2 and len(result.history) == 2
    assert 0.0 <= result.best_val_mean_f1 <= result.val_mean_f1_tuned <= 1.0
    csv_lines = (run / "history.csv").read_text().splitlines()
    assert csv_lines[0] == ",".join(HISTORY_FIELDS) and len(csv_lines) == 3
    hist = json.loads((run / "history.json").read_text())
    assert hist["final"]["val_mean_f1_tuned"] == result.val_mean_f1_tuned
    for row in hist["epochs"]:
        assert row["val_loss"] > 0 and 0 <= row["val_iou_background"] <= 1
        assert all(row[f"val_iou_{c}"] is None or 0 <= row[f"val_iou_{c}"] <= 1 for c in ("interior", "boundary"))
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from triageseg.postprocess.quality import load_quality

    quality = load_quality(run)
    # 2 val images x (2 epochs + the final decode) points; router signals are never in a segmenter's fit
    assert quality.fit["n_points"] == 6 and quality.fit["n_images"] == 2 and quality.stats.n_images > 0
    assert not set(quality.signals) & {"router_confidence", "ood_score"}
    model, cfg, params = load_segmenter(run)
    # size triage: the training set's median nucleus diameter and the estimate's calibration are recorded
    assert cfg.diameter is not None and cfg.diameter > 0 and 0.1 <= cfg.size_calibration <= 10
    assert cfg.size_signal == "modality-pyramid"  # its calibration measured each image on its modality's signal
    assert dataclasses.replace(cfg, diameter=None, size_calibration=1.0, size_signal="auto") == TINY.segmenter_config()
    assert params == result.params
    config = json.loads((run / "config.json").read_text())
    assert config["train"] == TINY.to_dict()
    assert config["results"]["best_epoch"] == result.best_epoch
    manifest = bundle.read_manifest(out)
    assert manifest["segmenters"] == ["fluorescence"] and manifest["modalities"] == ["fluorescence"]
    prov = manifest["provenance"]["segmenters"]["fluorescence"]
    ds = Dataset(synth_data)
    assert prov["train_ids_sha256"] == ds.ids_hash(ds.select(split="train", modality="fluorescence"))
    assert prov["seed"] == 0 and prov["triageseg_version"] and prov["created"]
    assert prov == config["provenance"]


def test_resume_reaches_the_same_result_as_an_uninterrupted_run(synth_data, tmp_path):
    cfg = TINY.replace(epochs=3, modality="he")
    full = train_segmenter(cfg, synth_data, tmp_path / "full", device="cpu", progress=False)

    def stop_after_first(epoch, metrics, run_dir):
        if epoch == 1:
            raise Stop

    part = tmp_path / "part"
    with pytest.raises(Stop):
        train_segmenter(cfg, synth_data, part, device="cpu", progress=False, report=stop_after_first)
    assert (part / CHECKPOINT_DIR / CHECKPOINT_FILE).is_file()
    assert not (part / "model.safetensors").exists()
    resumed = train_segmenter(cfg, synth_data, part, device="cpu", progress=False, resume=True)
    assert not (part / CHECKPOINT_DIR).exists()

    a = bundle.load_weights(tmp_path / "full" / "model.safetensors")
    b = bundle.load_weights(part / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert strip(resumed.history) == strip(full.history)
    assert (resumed.best_epoch, resumed.best_val_mean_f1, resumed.val_mean_f1_tuned) == (
        full.best_epoch, full.best_val_mean_f1, full.val_mean_f1_tuned)
    assert (part / "postprocess.json").read_text() == (tmp_path / "full" / "postprocess.json").read_text()


def test_freeze_bn_fine_tunes_weights_but_keeps_the_base_normalisation(synth_data, tmp_path):
    base = tmp_path / "base"
    train_segmenter(TINY.replace(modality=None, tune_postprocess=False), synth_data, base, device="cpu",
                    progress=False)
    before = bundle.load_weights(base / "model.safetensors")
    runs = {}
    for frozen in (True, False):
        cfg = TINY.replace(modality="he", init_from=str(base), freeze_bn=frozen, tune_postprocess=False)
        train_segmenter(cfg, synth_data, tmp_path / f"he_{frozen}", device="cpu", progress=False)
        runs[frozen] = bundle.load_weights(tmp_path / f"he_{frozen}" / "model.safetensors")
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    affine = [k.replace("running_mean", "weight") for k in stats if k.endswith("running_mean")]
    convs = [k for k in before if k.endswith("weight") and before[k].ndim == 4]
    assert stats and affine and convs
    # Frozen: the statistics stay the base's, while the BN scales and the convolutions still learn.
    assert all(torch.equal(runs[True][k], before[k]) for k in stats)
    assert any(not torch.equal(runs[True][k], before[k]) for k in affine)
    assert any(not torch.equal(runs[True][k], before[k]) for k in convs)
    # Not frozen: the statistics move towards the new modality.
    assert any(not torch.equal(runs[False][k], before[k]) for k in stats)


def test_resume_with_another_config_is_refused(synth_data, tmp_path):
    def stop(epoch, metrics, run_dir):
        raise Stop

    with pytest.raises(Stop):
        train_segmenter(TINY, synth_data, tmp_path / "run", device="cpu", progress=False, report=stop)
    with pytest.raises(DataError, match="last.pt.*another config.*lr"):
        train_segmenter(TINY.replace(lr=0.5), synth_data, tmp_path / "run", device="cpu", progress=False,
                        resume=True)


def test_unknown_modality_lists_the_modalities_present(synth_data, tmp_path):
    with pytest.raises(DataError, match="'phase'.*the dataset has: brightfield, fluorescence, he"):
        train_segmenter(TINY.replace(modality="phase"), synth_data, tmp_path / "run", device="cpu", progress=False)


def test_time_budget_stops_cleanly_and_still_saves(synth_data, tmp_path):
    cfg = TINY.replace(epochs=5, time_budget_s=1e-3, tune_postprocess=False)
    result = train_segmenter(cfg, synth_data, tmp_path / "run", device="cpu", progress=False)
    assert result.stopped_by_budget
    assert result.epochs_completed == 1 and result.history[0]["steps"] == 1
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_cli_train_generalist_with_config_and_flags(synth_data, tmp_path):
    from click.testing import CliRunner

    from triageseg.cli import train_segmenter_cmd  # noqa: F401  (registers the commands)
    from triageseg.cli.groups import cli

    config = tmp_path / "best_config.json"
    TINY.replace(epochs=3).to_json(config)
    out = tmp_path / "bundle"
    runner = CliRunner()
    res = runner.invoke(cli, ["train", "generalist", "--data", str(synth_data), "--out", str(out), "--config",
                              str(config), "--epochs", "1", "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    run = out / "segmenters" / "_generalist"
    resolved = json.loads((run / "train_config.json").read_text())
    assert resolved["modality"] is None and resolved["epochs"] == 1 and resolved["crop_size"] == 64
    assert "_generalist: 1 epochs" in res.output
    manifest = bundle.read_manifest(out)
    assert manifest["has_generalist"] and manifest["modalities"] == []

    res = runner.invoke(cli, ["train", "segmenter", "--data", str(synth_data), "--modality", "phase", "--out",
                              str(out), "--config", str(config), "--device", "cpu", "--quiet"])
    assert res.exit_code == 1
    assert "error:" in res.output and "the dataset has: brightfield, fluorescence, he" in res.output


# ------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_short_training_beats_an_untrained_model_on_held_out_images(tmp_path):
    """A few minutes on 2 CPU cores: val/test mean F1 well above the untrained network."""
    from triageseg.datasets.layout import Dataset
    from triageseg.datasets.synth import make_dataset
    from triageseg.postprocess.metrics import evaluate
    from triageseg.postprocess.watershed import watershed
    from triageseg.segmenters.model import create_segmenter, load_segmenter
    from triageseg.segmenters.predict import predict

    data = make_dataset(tmp_path / "data", n=40, size=160, modalities=("fluorescence",), seed=5)
    cfg = TrainConfig(modality="fluorescence", epochs=8, steps_per_epoch=12, batch_size=8, crop_size=128,
                      lr=2e-3, warmup_epochs=0.5, max_val_images=6, tile_size=256, overlap=32, seed=0)
    result = train_segmenter(cfg, data, tmp_path / "run", device="cpu", progress=True)
    ds = Dataset(data)
    test = [ds.load(s) for s in ds.select(split="test")]
    trained, _, params = load_segmenter(tmp_path / "run")
    torch.manual_seed(0)
    untrained = create_segmenter(cfg.segmenter_config()).eval()

    def score(model, p):
        preds = [watershed(predict(model, img, tile_size=256), p) for img, _ in test]
        return evaluate([lab for _, lab in test], preds).mean_f1

    f1_trained, f1_untrained = score(trained, params), score(untrained, None)
    boundary = [r["iou_boundary"] for r in result.history]
    print(f"\nval F1 best {result.best_val_mean_f1:.3f} tuned {result.val_mean_f1_tuned:.3f}; test F1 trained "
          f"{f1_trained:.3f} vs untrained {f1_untrained:.3f}; boundary IoU per epoch {boundary}; "
          f"{result.seconds:.0f}s")
    assert f1_trained > f1_untrained + 0.3
    assert result.val_mean_f1_tuned > 0.4
    assert boundary[-1] > boundary[0]
