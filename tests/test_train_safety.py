"""Training never loses progress silently, never half-replaces a model, never registers a useless one."""

from __future__ import annotations

import shlex
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from triageseg import bundle
from triageseg.datasets.errors import DataError
from triageseg.segmenters.train import CHECKPOINT_DIR, CHECKPOINT_FILE, TrainConfig, train_segmenter

TINY = TrainConfig(
    modality="fluorescence", epochs=2, steps_per_epoch=1, batch_size=2, crop_size=64,
    decoder_channels=(32, 16, 16, 8, 8), tile_size=128, overlap=32, max_val_images=2, warmup_epochs=0.5,
    tune_postprocess=False,
)
OLD_FILES = ("config.json", "model.safetensors", "postprocess.json", "history.csv", "history.json",
             "train_config.json")


class Stop(Exception):
    pass


def _stop_after_first(epoch, metrics, run_dir):
    if epoch == 1:
        raise Stop


def _old_model(run):
    """Stand-ins for the files of a model already in the bundle."""
    run.mkdir(parents=True)
    for name in OLD_FILES:
        (run / name).write_text(f"old {name}\n")
    return {name: (run / name).read_bytes() for name in OLD_FILES}


def test_interrupted_run_keeps_the_old_model_and_a_rerun_without_resume_is_refused(synth_data, tmp_path):
    run = tmp_path / "bundle" / "segmenters" / "fluorescence"
    old = _old_model(run)
    with pytest.raises(Stop):
        train_segmenter(TINY, synth_data, run, device="cpu", progress=False, report=_stop_after_first)
    ckpt = run / CHECKPOINT_DIR / CHECKPOINT_FILE
    assert ckpt.is_file()
    assert {name: (run / name).read_bytes() for name in OLD_FILES} == old  # nothing replaced before the end

    with pytest.raises(DataError) as info:
        train_segmenter(TINY, synth_data, run, device="cpu", progress=False)
    message = str(info.value)
    assert str(ckpt) in message and "epoch 1 of 2" in message and "--resume" in message and "--overwrite" in message
    assert ckpt.is_file()  # the refusal deletes nothing

    result = train_segmenter(TINY, synth_data, run, device="cpu", progress=False, resume=True)
    assert result.epochs_completed == 2 and [r["epoch"] for r in result.history] == [1, 2]
    assert (run / "history.csv").read_text().count("\n") == 3  # header + both epochs
    assert bundle.load_weights(run / "model.safetensors")
    assert not (run / CHECKPOINT_DIR).exists()


def test_cli_refuses_a_rerun_and_the_interrupt_message_gives_the_resume_command(synth_data, tmp_path,
                                                                                  monkeypatch):
    from triageseg.cli import train_segmenter_cmd  # noqa: F401  (registers the commands)
    from triageseg.cli.groups import cli
    from triageseg.segmenters import train as train_module

    out = tmp_path / "bundle"
    config = tmp_path / "tiny.json"
    TINY.to_json(config)
    args = ["train", "segmenter", "--data", str(synth_data), "--modality", "fluorescence", "--out", str(out),
            "--config", str(config), "--device", "cpu", "--quiet"]
    run = bundle.segmenter_dir(out, "fluorescence")
    old = _old_model(run)
    real = train_module.train_segmenter

    def interrupted(*a, **kw):
        return real(*a, **kw, report=_interrupt_after_first)

    monkeypatch.setattr(train_module, "train_segmenter", interrupted)
    runner = CliRunner()
    res = runner.invoke(cli, args)
    assert res.exit_code == 130, res.output
    assert "to resume, run: " + shlex.join(["triageseg", *args, "--resume"]) in res.output
    assert {name: (run / name).read_bytes() for name in OLD_FILES} == old  # train_config.json too
    monkeypatch.setattr(train_module, "train_segmenter", real)

    res = runner.invoke(cli, args)
    assert res.exit_code == 1 and "--resume" in res.output and "--overwrite" in res.output
    assert (run / CHECKPOINT_DIR / CHECKPOINT_FILE).is_file()
    assert runner.invoke(cli, [*args, "--resume", "--overwrite"]).exit_code == 2

    epochs = []

    def recorded(*a, **kw):
        return real(*a, **kw, report=lambda e, m, d: epochs.append(e))

    monkeypatch.setattr(train_module, "train_segmenter", recorded)
    res = runner.invoke(cli, [*args, "--overwrite"])
    assert res.exit_code == 0, res.output
    assert epochs == [1, 2]  # afresh from the first epoch, not resumed
    assert "fluorescence: 2 epochs" in res.output
    assert TrainConfig.from_json(run / "train_config.json") == TINY
    assert not (run / CHECKPOINT_DIR).exists()


def _interrupt_after_first(epoch, metrics, run_dir):
    if epoch == 1:
        raise KeyboardInterrupt


def test_segment_interrupt_message_gives_the_rerun_command(tiny_bundle, tmp_path, monkeypatch):
    from triageseg.cli.main import cli
    from triageseg.pipeline.local import batch

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(batch, "segment_files", interrupted)
    image = tmp_path / "a.png"
    import imagecodecs

    imagecodecs.imwrite(image, np.zeros((32, 32), np.uint8))
    args = ["segment", str(image), "--bundle", str(tiny_bundle), "--out", str(tmp_path / "o p"), "--quiet"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 130
    assert "to resume, rerun: " + shlex.join(["triageseg", *args]) in res.output


def test_a_training_split_without_objects_is_refused(synth_data, tmp_path):
    from triageseg.datasets.io import write_labels
    from triageseg.datasets.layout import Dataset

    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    ds = Dataset(data)
    train_ids = [s for s in ds.select(split="train", modality="fluorescence")]
    for sample in train_ids:
        write_labels(sample.label_path, np.zeros(ds.load(sample)[1].shape, np.uint16))
    out = tmp_path / "bundle"
    from triageseg.segmenters.train import train_segmenter_into_bundle

    with pytest.raises(DataError) as info:
        train_segmenter_into_bundle(TINY, data, out, device="cpu", progress=False)
    message = str(info.value)
    assert "no objects" in message and f"{len(train_ids)} training label images" in message
    assert "fluorescence" in message
    assert not (bundle.segmenter_dir(out, "fluorescence") / bundle.WEIGHTS).exists()
    assert not (out / bundle.MANIFEST).exists()
