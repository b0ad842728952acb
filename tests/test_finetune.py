"""The correct -> add -> fine-tune -> new bundle loop (finetune/), on the untrained ``tiny_bundle``."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from triageseg import bundle as B
from triageseg.datasets.errors import DataError
from triageseg.datasets.io import normalize_image
from triageseg.datasets.synth import synth_sample
from triageseg.datasets.synth_variants import variant_sample
from triageseg.finetune import add_to_training_set, finetune, partial_dir


def _tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _corrections(root: Path, modality: str = "fluorescence", n: int = 5, seed: int = 1, variant: str | None = None):
    rng = np.random.default_rng(seed)
    for i in range(n):
        image, labels = (variant_sample(variant, size=96, rng=rng) if variant
                         else synth_sample(modality, size=96, rng=rng))
        add_to_training_set(root, image, labels, modality, f"img{i}")
    return root


@pytest.fixture(scope="module")
def corrections(tmp_path_factory):
    return _corrections(tmp_path_factory.mktemp("corr") / "corrections")


# ----------------------------------------------------------------------------- add


def test_add_writes_the_layout_every_fifth_to_val_and_replaces_by_id(tmp_path):
    from triageseg.datasets.layout import Dataset

    root = _corrections(tmp_path / "c", n=6)
    ds = Dataset(root)
    assert [s.split for s in ds.samples] == ["train"] * 4 + ["val", "train"]
    assert ds.modalities == ["fluorescence"]
    image, labels = ds.load(ds.samples[4])
    assert labels.max() > 0 and image.shape[:2] == labels.shape
    # the same id again: labels replaced, split kept, no second file
    new = np.zeros_like(labels)
    new[10:20, 10:20] = 3
    added = add_to_training_set(root, (image * 255).astype(np.uint8), new, "fluorescence", "img4")
    assert added.replaced and added.split == "val" and added.n_objects == 1
    assert len(list((root / "images").iterdir())) == 6
    assert added.split == Dataset(root).samples[4].split
    assert add_to_training_set(root, (image * 255).astype(np.uint8), new, "he", "x", split="test").split == "test"


@pytest.mark.parametrize(("labels", "message"), [
    (np.zeros((32, 32), np.int32), "empty"),
    (np.ones((31, 32), np.int32), "shape"),
    (np.full((32, 32), 1.5, np.float32), "non-integer"),
    (np.ones((32, 32), bool), "boolean"),
    (-np.ones((32, 32), np.int32), "non-negative"),
])
def test_add_refuses_bad_labels_with_a_clear_message(tmp_path, labels, message):
    with pytest.raises(DataError, match=message):
        add_to_training_set(tmp_path / "c", np.zeros((32, 32), np.uint8), labels, "fluorescence", "a")
    assert not (tmp_path / "c" / "splits.csv").exists()


def test_add_accepts_integral_float_labels_and_16_bit_images(tmp_path):
    labels = np.zeros((32, 32), np.float32)
    labels[4:9, 4:9] = 2.0
    added = add_to_training_set(tmp_path / "c", np.full((32, 32), 1000, np.uint16), labels, "fluorescence", "a b")
    assert added.id == "a_b" and added.image_path.suffix == ".tif" and added.n_objects == 1


# ------------------------------------------------------------------------ finetune


def test_finetune_writes_a_complete_new_bundle_and_never_touches_the_parent(tiny_bundle, corrections, tmp_path):
    from triageseg.pipeline import Pipeline

    before = _tree_hashes(tiny_bundle)
    seen = []
    out = tmp_path / "b2"
    res = finetune(tiny_bundle, corrections, out, steps=2, minutes=5, progress=lambda *a: seen.append(a))
    assert _tree_hashes(tiny_bundle) == before  # byte-identical
    assert not partial_dir(out).exists()
    assert res.modality == "fluorescence" and not res.new_modality and res.n_train == 4 and res.n_val == 1
    assert res.epochs_completed == 2 and res.val_source == "val split"
    manifest = B.read_manifest(out)
    prov = manifest["provenance"]
    assert prov["parent"] == str(tiny_bundle.resolve())
    assert prov["finetune"]["data"] == str(corrections.resolve())
    assert len(prov["finetune"]["data_sha256"]) == 64
    assert prov["finetune"]["val_f1_before"] == res.val_f1_before
    assert sorted(manifest["segmenters"]) == sorted(B.read_manifest(tiny_bundle)["segmenters"])
    assert not list(out.rglob("checkpoint")) and not list(out.rglob("_finetune_work"))
    if res.kept == "finetuned":  # the other specialists are the parent's, bit for bit
        assert _tree_hashes(out / "segmenters" / "he") == _tree_hashes(tiny_bundle / "segmenters" / "he")
    image, _ = synth_sample("fluorescence", size=96, rng=np.random.default_rng(5))
    result = Pipeline.from_bundle(out, device="cpu").segment(normalize_image(image), modality="fluorescence")
    assert result.labels.shape == (96, 96)
    assert seen[-1][0] == seen[-1][1] and seen[-1][2] == "done"
    with pytest.raises(DataError, match="already exists"):
        finetune(tiny_bundle, corrections, out, steps=2)
    with pytest.raises(DataError, match="outside the parent"):
        finetune(tiny_bundle, corrections, tiny_bundle / "x", steps=2)


def test_stop_keeps_the_best_epoch_so_far_and_writes_a_usable_bundle(tiny_bundle, corrections, tmp_path):
    from triageseg.pipeline import Pipeline

    stop = threading.Event()

    def progress(done, total, text):
        if text == "fine-tuning" and done >= 2:
            stop.set()  # the Stop button, during the first epoch of 5

    res = finetune(tiny_bundle, corrections, tmp_path / "b2", steps=10, stop_event=stop, progress=progress,
                   keep_better=False)
    assert res.stopped and res.epochs_completed == 1
    history = json.loads((tmp_path / "b2" / "segmenters" / "fluorescence" / "history.json").read_text())
    assert history["final"]["best_epoch"] == 1 and history["final"]["stopped_by_budget"]
    Pipeline.from_bundle(tmp_path / "b2", device="cpu").segmenter("fluorescence")


def test_interrupted_finetune_is_refused_then_resumed_or_started_over(tiny_bundle, corrections, tmp_path):
    out = tmp_path / "b2"

    class Crash(Exception):
        pass

    def crash(done, total, text):
        if text == "fine-tuning" and done >= 4:  # step 3: epoch 1 of 2 (2 steps each) was checkpointed
            raise Crash

    with pytest.raises(Crash):
        finetune(tiny_bundle, corrections, out, steps=4, progress=crash)
    assert partial_dir(out).is_dir() and not out.exists()
    assert (partial_dir(out) / "segmenters" / "fluorescence" / "checkpoint" / "last.pt").is_file()
    with pytest.raises(DataError, match="resume"):
        finetune(tiny_bundle, corrections, out, steps=4)
    lines = []
    res = finetune(tiny_bundle, corrections, out, steps=4, resume=True, log=lines.append)
    assert res.epochs_completed == 2 and out.is_dir() and not partial_dir(out).exists()
    assert any("resuming" in line for line in lines)

    with pytest.raises(Crash):
        finetune(tiny_bundle, corrections, tmp_path / "b3", steps=4, progress=crash)
    res = finetune(tiny_bundle, corrections, tmp_path / "b3", steps=4, overwrite=True)
    assert res.epochs_completed == 2


def test_resume_refuses_changed_data(tiny_bundle, corrections, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(corrections, data)
    out = tmp_path / "b2"

    def crash(done, total, text):
        if text == "fine-tuning":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_bundle, data, out, steps=4, progress=crash)
    _corrections(data, n=1, seed=9)  # one more correction replaces img0
    with pytest.raises(DataError, match="another bundle, modality or data"):
        finetune(tiny_bundle, data, out, steps=4, resume=True)


# --------------------------------------------------------------------- new modality


@pytest.fixture
def bundle_with_ood(tiny_bundle, tmp_path):
    """A copy of tiny_bundle whose router has thumbstats OOD statistics fitted on synthetic images."""
    from triageseg.router.calibrate import fit_router_ood
    from triageseg.router.model import image_views, load_router
    from triageseg.router.ood import save_ood

    root = tmp_path / "parent"
    shutil.copytree(tiny_bundle, root)
    model, config = load_router(B.router_dir(root))
    rng = np.random.default_rng(3)
    thumbs, labels = [], []
    for k, name in enumerate(config.class_names):
        for _ in range(8):
            image, _ = synth_sample(name, size=96, rng=rng)
            thumbs.append(image_views(normalize_image(image), config)[0])
            labels.append(k)
    thumbs = np.stack(thumbs)
    ood = fit_router_ood(model, config, thumbs, np.array(labels), thumbs[1::2])
    save_ood(B.router_dir(root), ood)
    B.update_manifest(root, ood=ood.summary())
    return root


def test_a_new_modality_gets_a_specialist_and_the_router_returns_it(bundle_with_ood, tmp_path):
    from triageseg.pipeline import Pipeline

    # The generator's own IHC (issue 19): a modality this 3-modality bundle has never seen.
    data = _corrections(tmp_path / "ihc", modality="ihc", n=6, seed=4)
    pipe = Pipeline.from_bundle(bundle_with_ood, device="cpu")
    rng = np.random.default_rng(100)
    held_out = [normalize_image(synth_sample("ihc", size=96, rng=rng)[0]) for _ in range(4)]
    assert all(pipe.decide(img).modality != "ihc" for img in held_out)

    res = finetune(bundle_with_ood, data, tmp_path / "b2", steps=2)
    assert res.new_modality and res.init_from == "_generalist"
    assert res.router["known_features"].startswith("synthetic")
    manifest = B.read_manifest(tmp_path / "b2")
    assert "ihc" in manifest["modalities"] and "ihc" in manifest["segmenters"]
    new = Pipeline.from_bundle(tmp_path / "b2", device="cpu")
    decisions = [new.decide(img) for img in held_out]
    assert [d.modality for d in decisions] == ["ihc"] * 4
    assert all(d.used_model == "ihc" for d in decisions), decisions
    # the known modalities still route to themselves
    for name in ("fluorescence", "he"):
        image, _ = synth_sample(name, size=96, rng=rng)
        assert new.decide(normalize_image(image)).modality == name
    # a stored reference now holds the new class too: a second new modality refits without synthetic images
    assert (B.router_dir(tmp_path / "b2") / "reference.safetensors").is_file()


# ----------------------------------------------------------------------------- CLI


def test_cli_finetune_writes_the_bundle_and_refuses_an_interrupted_run(tiny_bundle, corrections, tmp_path):
    from click.testing import CliRunner

    from triageseg.cli.main import cli

    runner = CliRunner()
    args = ["finetune", "--bundle", str(tiny_bundle), "--data", str(corrections), "--steps", "2", "--quiet"]
    res = runner.invoke(cli, [*args, "--out", str(tmp_path / "b2")])
    assert res.exit_code == 0, res.output
    assert "val mean F1" in res.output and "unchanged" in res.output
    assert B.read_manifest(tmp_path / "b2")["provenance"]["parent"] == str(tiny_bundle.resolve())
    partial_dir(tmp_path / "b3").mkdir()
    res = runner.invoke(cli, [*args, "--out", str(tmp_path / "b3")])
    assert res.exit_code != 0 and "--resume" in res.output
    res = runner.invoke(cli, [*args, "--out", str(tmp_path / "b4"), "--modality", "he"])
    assert res.exit_code != 0 and "no corrected image of modality 'he'" in res.output


def test_a_second_new_modality_refits_from_the_stored_reference(bundle_with_ood, tmp_path):
    from triageseg.finetune.router_add import add_modality
    from triageseg.router.model import load_router

    data = _corrections(tmp_path / "ihc", modality="ihc", n=3, seed=4, variant="ihc")
    first = add_modality(bundle_with_ood, "ihc", data, device="cpu")
    assert first["known_features"].startswith("synthetic")  # tiny_bundle's router stored none
    zoom = _corrections(tmp_path / "zoom", modality="zoomed", n=3, seed=5, variant="zoom")
    second = add_modality(bundle_with_ood, "zoomed", zoom, device="cpu")
    assert second["known_features"] == "stored router reference"
    _, config = load_router(B.router_dir(bundle_with_ood))
    assert config.class_names == ("fluorescence", "brightfield", "he", "ihc", "zoomed")
    assert B.read_manifest(bundle_with_ood)["modalities"] == sorted(config.class_names)
    assert add_modality(bundle_with_ood, "zoomed", zoom) == {"router": "already knows zoomed"}


def test_a_specialist_that_got_worse_on_val_is_put_back(tiny_bundle, corrections, tmp_path, monkeypatch):
    import triageseg.finetune.run as run

    def fake_score(bundle, model_name, data, **_kw):
        return 0.5 if str(bundle) == str(tiny_bundle) else 0.1  # the parent scores better than the fine-tune

    monkeypatch.setattr(run, "score_model", fake_score)
    res = finetune(tiny_bundle, corrections, tmp_path / "b2", steps=2)
    assert (res.kept, res.val_f1_before, res.val_f1_after) == ("parent", 0.5, 0.5)
    seg = "segmenters/fluorescence"
    assert _tree_hashes(tmp_path / "b2" / seg) == _tree_hashes(tiny_bundle / seg)
    assert B.read_manifest(tmp_path / "b2")["provenance"]["finetune"]["kept"] == "parent"
