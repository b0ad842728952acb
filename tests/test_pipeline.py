"""The routed pipeline, `segment` and `route`: mechanics on a small untrained bundle.

Accuracy of trained bundles is covered by the workflow tests and benchmarks; here the
models are untrained so the tests are fast, and the behaviour under test is routing,
fallback, file handling, errors, resume and outputs.
"""

from __future__ import annotations

import csv
import json
import shutil
import zipfile

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from triageseg import bundle as B
from triageseg.datasets.errors import BundleError, DataError
from triageseg.datasets.io import read_labels

MODS = ("fluorescence", "brightfield", "he")


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


@pytest.fixture
def inputs(tmp_path):
    """A folder with an RGB PNG, a 16-bit TIFF with a pixel size, a corrupt file, a gray JPEG."""
    import imagecodecs

    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    folder.mkdir()
    imagecodecs.imwrite(folder / "rgb.png", (rng.random((70, 90, 3)) * 255).astype(np.uint8))
    tifffile.imwrite(folder / "deep.tif", (rng.random((64, 80)) * 60000).astype(np.uint16),
                     resolution=(1 / 0.5, 1 / 0.5), resolutionunit="MICROMETER", imagej=False)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    imagecodecs.imwrite(folder / "gray.jpg", (rng.random((50, 40)) * 255).astype(np.uint8))
    return folder


def test_missing_and_bad_bundle_errors(tmp_path, bundle_copy):
    from triageseg.pipeline import Pipeline

    with pytest.raises(BundleError, match="does not exist"):
        Pipeline.from_bundle(tmp_path / "nope")
    manifest = json.loads((bundle_copy / "bundle.json").read_text())
    manifest["format_version"] = 99
    (bundle_copy / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="unknown bundle format version 99"):
        Pipeline.from_bundle(bundle_copy)


def test_truncated_weights_named_on_first_use(bundle_copy):
    from triageseg.pipeline import Pipeline

    weights = B.segmenter_dir(bundle_copy, "he") / B.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])
    pipe = Pipeline.from_bundle(bundle_copy, device="cpu")
    with pytest.raises(BundleError) as info:
        pipe.segment(np.zeros((40, 40, 3), np.float32), modality="he")
    assert str(weights) in str(info.value)


def test_segment_routes_and_falls_back(tiny_bundle):
    from triageseg.pipeline import Pipeline

    pipe = Pipeline.from_bundle(tiny_bundle, device="cpu")
    image = np.random.default_rng(1).random((70, 50, 3)).astype(np.float32)
    result = pipe.segment(image)
    assert result.labels.shape == (70, 50) and result.labels.dtype == np.uint32
    assert result.modality in MODS and 0 < result.confidence <= 1
    # an untrained 3-class router is unsure: the fallback policy picks the generalist
    if result.confidence < pipe.confidence_threshold:
        assert result.used_model == B.GENERALIST and "generalist" in result.decision
    forced = pipe.segment(image, modality="brightfield")
    assert (forced.used_model, forced.decision, forced.confidence) == ("brightfield", "forced", None)


def test_fallback_policy_without_generalist(bundle_copy):
    from triageseg.pipeline import Pipeline
    from triageseg.router.model import Prediction

    shutil.rmtree(B.segmenter_dir(bundle_copy, B.GENERALIST))
    B.update_manifest(bundle_copy)
    pipe = Pipeline.from_bundle(bundle_copy, device="cpu")
    assert not pipe.has_generalist
    low = Prediction("he", 0.4, {"he": 0.4, "fluorescence": 0.3, "brightfield": 0.3})
    high = Prediction("he", 0.9, {"he": 0.9, "fluorescence": 0.05, "brightfield": 0.05})
    assert pipe.choose(low)[0] == "he"  # no generalist: top-1 specialist
    assert pipe.choose(high)[0] == "he"


def test_unknown_modality_lists_valid(tiny_bundle):
    from triageseg.pipeline import Pipeline

    pipe = Pipeline.from_bundle(tiny_bundle, device="cpu")
    with pytest.raises(DataError, match="unknown modality 'phase'.*brightfield"):
        pipe.segment(np.zeros((32, 32, 3), np.float32), modality="phase")


def test_segment_files_skip_resume_and_metadata(tiny_bundle, inputs, tmp_path):
    from triageseg.pipeline import Pipeline

    pipe = Pipeline.from_bundle(tiny_bundle, device="cpu")
    files = sorted(inputs.iterdir())
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in files}
    report = pipe.segment_files(files, out, on_error="skip", overlays=True, rois=True)
    assert [p.name for p, _ in report.failures] == ["broken.png"]
    assert sorted(p.name for p in report.written) == ["deep.tif", "gray.tif", "rgb.tif"]
    assert {p.name: p.read_bytes() for p in files} == before  # inputs untouched
    assert read_labels(out / "rgb.tif").shape == (70, 90)
    assert read_labels(out / "deep.tif").shape == (64, 80)
    from triageseg.datasets.io import read_pixel_size

    assert read_pixel_size(out / "deep.tif") == pytest.approx((0.5, 0.5), rel=1e-3)
    assert (out / "overlays" / "rgb.png").is_file()
    assert sorted(p.name for p in out.glob("*.png")) == []  # label folder holds label images only
    with zipfile.ZipFile(out / "rgb.rois.zip") as zf:
        assert all(n.endswith(".roi") for n in zf.namelist())
    rows = list(csv.DictReader((out / "routing.csv").open()))
    assert sorted(r["output"] for r in rows) == ["deep.tif", "gray.tif", "rgb.tif"]
    assert all(r["modality"] in MODS and r["used_model"] for r in rows)
    assert not list(out.glob(".*part*"))  # no temp files left behind

    # resume: everything done is skipped; the broken file fails again
    again = pipe.segment_files(files, out, on_error="skip")
    assert len(again.skipped) == 3 and not again.written and len(again.failures) == 1
    assert len(list(csv.DictReader((out / "routing.csv").open()))) == 3
    # fail policy stops on the bad file and names it
    with pytest.raises(DataError) as info:
        pipe.segment_files(files, tmp_path / "out2", on_error="fail")
    assert "broken.png" in str(info.value)


def test_segment_files_in_worker_processes(tiny_bundle, inputs, tmp_path):
    from triageseg.pipeline import Pipeline

    pipe = Pipeline.from_bundle(tiny_bundle, device="cpu")
    files = [inputs / "rgb.png", inputs / "deep.tif"]
    serial = pipe.segment_files(files, tmp_path / "serial", modality="he")
    parallel = pipe.segment_files(files, tmp_path / "parallel", modality="he", workers=1)
    assert len(serial.written) == len(parallel.written) == 2
    for name in ("rgb.tif", "deep.tif"):
        np.testing.assert_array_equal(read_labels(tmp_path / "serial" / name), read_labels(tmp_path / "parallel" / name))


def test_segment_cli_exit_codes_and_summary(tiny_bundle, inputs, tmp_path):
    from triageseg.cli.main import cli

    runner = CliRunner()
    out = tmp_path / "cli_out"
    res = runner.invoke(cli, ["segment", str(inputs), "--bundle", str(tiny_bundle), "--out", str(out), "--quiet"])
    assert res.exit_code == 1
    assert "broken.png" in res.output and "Traceback" not in res.output
    res = runner.invoke(cli, ["segment", str(inputs), "--bundle", str(tiny_bundle), "--out", str(out),
                              "--on-error", "skip", "--quiet"])
    assert res.exit_code == 1, res.output
    assert "1 failed" in res.output and "failed:" in res.output and "broken.png" in res.output
    assert sorted(p.name for p in out.glob("*.tif")) == ["deep.tif", "gray.tif", "rgb.tif"]
    assert json.loads((out / "segment_config.json").read_text())["n_inputs"] == 4
    res = runner.invoke(cli, ["segment", str(inputs / "rgb.png"), "--bundle", str(tiny_bundle), "--out", str(out),
                              "--quiet"])
    assert res.exit_code == 0 and "skipped 1" in res.output
    res = runner.invoke(cli, ["segment", str(inputs / "rgb.png"), "--bundle", str(tiny_bundle), "--out", str(out),
                              "--modality", "phase", "--quiet"])
    assert res.exit_code == 1 and "unknown modality 'phase'" in res.output
    res = runner.invoke(cli, ["segment", str(tmp_path / "missing.png"), "--bundle", str(tiny_bundle), "--out",
                              str(out)])
    assert res.exit_code == 1 and "missing.png: no such file" in res.output


def test_route_cli_table(tiny_bundle, inputs, tmp_path):
    from triageseg.cli.main import cli

    res = CliRunner().invoke(cli, ["route", str(inputs / "rgb.png"), str(inputs / "gray.jpg"), "--bundle",
                                   str(tiny_bundle), "--csv", str(tmp_path / "r.csv")])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert [r["file"].rsplit("/", 1)[-1] for r in rows] == ["rgb.png", "gray.jpg"]
    assert all(r["modality"] in MODS for r in rows)


@pytest.mark.slow
def test_segment_4000_square_image(tiny_bundle, tmp_path):
    """A 4000x4000 image goes through routing, tiled prediction and watershed on CPU."""
    from triageseg.pipeline import Pipeline

    rng = np.random.default_rng(0)
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, (rng.random((4000, 4000)) * 4000).astype(np.uint16))
    pipe = Pipeline.from_bundle(tiny_bundle, device="cpu", tile_size=512, overlap=64, batch_size=2)
    report = pipe.segment_files([path], tmp_path / "out", workers=0)
    assert len(report.written) == 1
    assert read_labels(tmp_path / "out" / "big.tif").shape == (4000, 4000)
