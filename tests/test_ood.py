"""Out-of-distribution routing: statistics, calibration, storage, and the unknown-modality decision everywhere."""

from __future__ import annotations

import csv
import json
import pickle
import shutil
import warnings

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("timm")

from click.testing import CliRunner  # noqa: E402

from triageseg import bundle as B  # noqa: E402
from triageseg.datasets.errors import BundleError  # noqa: E402
from triageseg.router import ood as O  # noqa: E402
from triageseg.router.model import Prediction  # noqa: E402
from triageseg.router.policy import UnknownModality, decide  # noqa: E402


def _noise(rng, n=4, size=96):
    from triageseg.datasets.io import normalize_image

    return [normalize_image(rng.uniform(0, 255, (size, size, 3)).astype(np.uint8)) for _ in range(n)]


def _blank(n=4, size=96):
    from triageseg.datasets.io import normalize_image

    return [normalize_image(np.full((size, size, 3), v, np.uint8)) for v in np.linspace(0, 255, n).astype(int)]


def _views(rng, n, d=6, c=2, shift=0.0):
    feats = rng.normal(size=(n, d)) + shift
    return O.ViewSet(rng.normal(size=(n, c)), feats, rng.random((n, 16, 16, 3)).astype(np.float32))


# ------------------------------------------------------------------ statistics and calibration


def test_mahalanobis_scores_grow_away_from_every_class_mean():
    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(0, 1, (50, 4)), rng.normal(5, 1, (50, 4))]
    y = np.r_[np.zeros(50, int), np.ones(50, int)]
    means, precision = O.mahalanobis_fit(x, y, 2)
    np.testing.assert_allclose(means, [x[:50].mean(0), x[50:].mean(0)])
    near = O.mahalanobis_score(means + 0.1, means, precision)
    far = O.mahalanobis_score(np.full((1, 4), 20.0), means, precision)
    assert near.max() < 0.5 and far[0] > 50 * near.max()
    with pytest.raises(ValueError, match=r"classes \[2\]"):
        O.mahalanobis_fit(x, y, 3)


def test_thumbnail_stats_tell_noise_and_blank_from_a_smooth_image():
    rng = np.random.default_rng(0)
    smooth = np.zeros((1, 32, 32, 3), np.float32)
    smooth[0, 8:24, 8:24] = 0.8
    noise = rng.random((1, 32, 32, 3)).astype(np.float32)
    s = O.thumbnail_stats(np.concatenate([smooth, noise, np.zeros_like(smooth)]))
    assert s.shape == (3, 19) and np.isfinite(s).all()
    grad = s[:, 12:15].sum(1)
    assert grad[1] > 5 * grad[0] and grad[2] == 0


def test_thumbnail_stats_match_their_definition():
    """Each column against a plain per-thumbnail computation (the fast layout must not change a value)."""
    rng = np.random.default_rng(2)
    thumbs = rng.random((3, 24, 24, 3), dtype=np.float32)
    thumbs[1, :10] = 0.3  # a flat region: the background share column
    got = O.thumbnail_stats(thumbs)
    for i, t in enumerate(thumbs.astype(np.float64)):
        flat = t.reshape(-1, 3)
        grey = t.mean(axis=2)
        spread = flat.max(1) - flat.min(1)
        lap = np.abs(4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:])
        want = np.concatenate([
            np.percentile(flat, 5, axis=0), np.percentile(flat, 50, axis=0), np.percentile(flat, 95, axis=0),
            flat.std(axis=0),
            np.abs(np.diff(t, axis=0)).mean(axis=(0, 1)) + np.abs(np.diff(t, axis=1)).mean(axis=(0, 1)),
            [spread.mean(), np.percentile(spread, 95), (np.abs(grey - np.median(grey)) < 0.05).mean(), lap.mean()],
        ])
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)


def test_energy_is_low_for_confident_logits():
    e = O.energy_score(np.array([[10.0, 0.0], [0.1, 0.0]]))
    assert e[0] < e[1]


def test_calibrated_threshold_keeps_99_percent_of_new_in_distribution_images():
    rng = np.random.default_rng(0)
    coverage = []
    for _ in range(300):
        thr, info = O.calibrate_threshold(rng.lognormal(1.0, 0.5, 15))
        coverage.append(float(np.mean(rng.lognormal(1.0, 0.5, 2000) <= thr)))
    assert info["fit"] == "log-normal" and info["n_val"] == 15 and thr >= info["max_val"]
    # the upper prediction bound keeps 99 % on average, not 100 % (a threshold at infinity would)
    assert 0.985 <= np.mean(coverage) <= 0.998
    thr, info = O.calibrate_threshold([-3.0, -2.5, -2.0, -2.2])  # energy scores: a normal fit
    assert info["fit"] == "normal" and thr > -2.0
    with pytest.raises(ValueError, match="at least 2"):
        O.calibrate_threshold([1.0])


def test_view_scores_combine_by_the_median():
    assert O.combine_view_scores(np.array([100.0, 1.0, 2.0, 3.0, 2.5, 1.5])) == 2.25
    assert O.combine_view_scores(np.array([7.0])) == 7.0


# ------------------------------------------------------------------ storage


@pytest.mark.parametrize("method", O.METHODS)
def test_save_load_roundtrip_is_exact_and_never_unpickles(tmp_path, monkeypatch, method):
    rng = np.random.default_rng(0)
    ood = O.fit_ood(_views(rng, 40), rng.integers(0, 2, 40), _views(rng, 10), ("a", "b"), method=method,
                    temperature=1.3)
    O.save_ood(tmp_path, ood)
    assert sorted(p.name for p in tmp_path.iterdir()) == [O.OOD_JSON, O.OOD_WEIGHTS]

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    back = O.load_ood(tmp_path)
    assert (back.method, back.class_names, back.threshold, back.temperature) == (method, ("a", "b"), ood.threshold, 1.3)
    assert sorted(back.tensors) == sorted(ood.tensors)
    for k in ood.tensors:
        np.testing.assert_array_equal(back.tensors[k], ood.tensors[k])
    probe = _views(rng, 5, shift=3.0)
    np.testing.assert_array_equal(back.view_scores(probe), ood.view_scores(probe))


def test_missing_or_corrupt_ood_files_are_named(tmp_path):
    rng = np.random.default_rng(0)
    assert O.load_ood(tmp_path) is None  # a router from before OOD statistics
    O.save_ood(tmp_path, O.fit_ood(_views(rng, 40), rng.integers(0, 2, 40), _views(rng, 10), ("a", "b")))
    data = (tmp_path / O.OOD_WEIGHTS).read_bytes()
    (tmp_path / O.OOD_WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match=O.OOD_WEIGHTS + ".*corrupt or truncated"):
        O.load_ood(tmp_path)
    (tmp_path / O.OOD_WEIGHTS).unlink()
    with pytest.raises(BundleError, match=O.OOD_WEIGHTS + ": missing file"):
        O.load_ood(tmp_path)
    (tmp_path / O.OOD_WEIGHTS).write_bytes(data)
    meta = json.loads((tmp_path / O.OOD_JSON).read_text())
    (tmp_path / O.OOD_JSON).write_text(json.dumps({**meta, "method": "magic"}))
    with pytest.raises(BundleError, match=O.OOD_JSON + ".*unknown OOD method 'magic'"):
        O.load_ood(tmp_path)
    (tmp_path / O.OOD_JSON).write_text("{not json")
    with pytest.raises(BundleError, match=O.OOD_JSON + ".*not valid JSON"):
        O.load_ood(tmp_path)


# ------------------------------------------------------------------ a router trained in the test


@pytest.fixture(scope="module")
def trained_bundle(synth_data, tmp_path_factory):
    """A bundle whose router was trained briefly on the synthetic data (OOD statistics fitted), untrained segmenters."""
    from triageseg.router.train import train_router
    from triageseg.segmenters.model import SegmenterConfig, create_segmenter, save_segmenter

    root = tmp_path_factory.mktemp("ood") / "bundle"
    for name in ("fluorescence", "brightfield", "he", B.GENERALIST):
        cfg = SegmenterConfig(decoder_channels=(16, 16, 16, 16, 16), tile_size=64, overlap=16,
                              modality=None if name == B.GENERALIST else name)
        save_segmenter(B.segmenter_dir(root, name), create_segmenter(cfg), cfg, params=None)
    result = train_router(synth_data, B.router_dir(root), epochs=3, batch_size=16, image_size=32, seed=0,
                          progress=False, device="cpu", bundle=root)
    return root, result


def test_router_training_fits_ood_and_writes_curves(trained_bundle):
    root, result = trained_bundle
    run = B.router_dir(root)
    assert (run / O.OOD_JSON).is_file() and (run / O.OOD_WEIGHTS).is_file()
    ood = O.load_ood(run)
    assert ood.method == O.DEFAULT_METHOD and ood.class_names == result.config.class_names
    manifest = B.read_manifest(root)
    assert manifest["ood"]["method"] == ood.method and manifest["ood"]["threshold"] == ood.threshold
    assert result.ood == ood.summary()
    curves = run / "curves.png"
    assert curves.is_file() and curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "history.csv").is_file()


def test_noise_and_blank_images_score_above_in_distribution_ones(trained_bundle, synth_data):
    from triageseg.datasets.layout import Dataset
    from triageseg.pipeline import Pipeline

    root, _ = trained_bundle
    pipe = Pipeline(root)
    ds = Dataset(synth_data)
    inside = [p.ood_score for p in pipe.route([ds.load(s)[0] for s in ds.select(split="test")])]
    rng = np.random.default_rng(0)
    noise = [p.ood_score for p in pipe.route(_noise(rng))]
    blank = [p.ood_score for p in pipe.route(_blank())]
    assert min(noise) > max(inside)
    # A blank slide is close to a sparse brightfield field (grey cells on glass, issue 19's renderer):
    # with 16 training images, one brightfield test image outscores a blank one, so blank is held
    # to scoring above the typical in-distribution image, not above every one.
    assert min(blank) > float(np.median(inside))
    assert all(s <= pipe.ood_threshold for s in inside)  # no false reject
    # The threshold is a 99 % log-normal bound from this fixture's 4 validation images; with issue 19's
    # more varied renderers their scores spread over 10-57, which puts the bound above these noise
    # images (123-128). How far noise sits above the threshold of a full bundle is bench_ood.py's to say.
    assert pipe.ood_threshold >= max(inside)


def test_old_router_without_statistics_keeps_working_and_says_so_once(trained_bundle, tmp_path, one_image):
    from triageseg.pipeline import Pipeline

    root = tmp_path / "old"
    shutil.copytree(trained_bundle[0], root)
    for name in (O.OOD_JSON, O.OOD_WEIGHTS):
        (B.router_dir(root) / name).unlink()
    pipe = Pipeline(root)
    image = _noise(np.random.default_rng(0), n=1)[0]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        d1, d2 = pipe.decide(image), pipe.decide(image)
    assert [str(w.message).count("no OOD statistics") for w in seen] == [1]
    assert d1.ood_score is None and not d1.unknown and d2.used_model
    from triageseg.cli.main import cli

    res = CliRunner().invoke(cli, ["route", str(one_image), str(one_image), "--bundle", str(root)])
    assert res.exit_code == 0, res.output
    assert res.output.count("note: ") == 1 and "unknown-modality check is off" in res.output
    assert "OOD threshold" not in res.output


# ------------------------------------------------------------------ the decision


def test_decide_unknown_policies():
    pred = Prediction("he", 0.97, {"he": 0.97}, ood_score=9.0)
    kw = {"threshold": 0.6, "available": ["he", "_generalist"], "has_generalist": True}
    assert decide(pred, **kw, ood_threshold=10.0) == ("he", "routed to he (confidence 0.97)")
    used, why = decide(pred, **kw, ood_threshold=5.0)
    assert used == "_generalist" and why.startswith("unknown modality (OOD score 9 > 5; top-1 he")
    assert decide(pred, **kw, ood_threshold=5.0, unknown="skip")[0] == ""
    with pytest.raises(UnknownModality, match="OOD score 9 > 5"):
        decide(pred, **kw, ood_threshold=5.0, unknown="fail")
    used, why = decide(pred, threshold=0.6, available=["he"], has_generalist=False, ood_threshold=5.0)
    assert used == "he" and "no generalist: top-1 specialist" in why
    assert decide(pred, **kw)[0] == "he"  # no threshold: no OOD check


def _with_threshold(trained_bundle, tmp_path, threshold: float):
    root = tmp_path / f"bundle_{threshold}"
    shutil.copytree(trained_bundle[0], root)
    manifest = json.loads((root / B.MANIFEST).read_text())
    manifest["ood"]["threshold"] = threshold  # bundle.json's threshold wins over ood.json's
    (root / B.MANIFEST).write_text(json.dumps(manifest))
    return root


def _routing(out):
    with (out / "routing.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture()
def one_image(tmp_path, synth_data):
    folder = tmp_path / "in"
    folder.mkdir()
    src = sorted((synth_data / "images").glob("fluorescence_*"))[0]
    shutil.copy2(src, folder / "cell.png")
    return folder / "cell.png"


def test_segment_unknown_generalist_skip_fail_and_forced(trained_bundle, tmp_path, one_image):
    from triageseg.cli.main import cli
    from triageseg.pipeline.local.records import ROUTING_COLUMNS

    assert ROUTING_COLUMNS.index("ood_score") == ROUTING_COLUMNS.index("confidence") + 1
    root = _with_threshold(trained_bundle, tmp_path, -1.0)  # every image is unknown
    runner = CliRunner()
    base = ["segment", str(one_image), "--bundle", str(root), "--quiet"]

    res = runner.invoke(cli, [*base, "--out", str(tmp_path / "gen")])
    assert res.exit_code == 0, res.output
    assert "1 unknown-modality image(s)" in res.output and "cell.png" in res.output
    (row,) = _routing(tmp_path / "gen")
    assert list(row) == list(ROUTING_COLUMNS)
    assert row["decision"].startswith("unknown modality") and row["used_model"] == "_generalist"
    assert float(row["ood_score"]) > -1.0 and (tmp_path / "gen" / "cell.tif").is_file()

    res = runner.invoke(cli, [*base, "--out", str(tmp_path / "skip"), "--unknown", "skip"])
    assert res.exit_code == 0, res.output
    assert "1 skipped" in res.output and "skipped: " in res.output
    (row,) = _routing(tmp_path / "skip")
    assert row["used_model"] == "" and row["output"] == "" and row["decision"].endswith("skipped")
    assert not list((tmp_path / "skip").glob("*.tif"))

    res = runner.invoke(cli, [*base, "--out", str(tmp_path / "fail"), "--unknown", "fail"])
    assert res.exit_code == 1 and "cell.png" in res.output and "OOD score" in res.output, res.output
    assert "Traceback" not in res.output
    res = runner.invoke(cli, [*base, "--out", str(tmp_path / "fail2"), "--unknown", "fail", "--on-error", "skip"])
    assert res.exit_code == 1 and "1 failed" in res.output

    res = runner.invoke(cli, [*base, "--out", str(tmp_path / "forced"), "--unknown", "fail", "--modality", "he"])
    assert res.exit_code == 0, res.output
    (row,) = _routing(tmp_path / "forced")
    assert row["decision"] == "forced" and row["used_model"] == "he" and float(row["ood_score"]) > -1.0

    res = runner.invoke(cli, [*base, "--out", str(tmp_path / "bad"), "--unknown", "maybe"])
    assert res.exit_code == 2


def test_in_distribution_image_is_routed_and_route_table_shows_score(trained_bundle, tmp_path, one_image):
    from triageseg.cli.main import cli

    high = _with_threshold(trained_bundle, tmp_path, 1e12)
    res = CliRunner().invoke(cli, ["segment", str(one_image), "--bundle", str(high), "--quiet", "--out",
                                   str(tmp_path / "out")])
    assert res.exit_code == 0 and "unknown-modality" not in res.output
    (row,) = _routing(tmp_path / "out")
    assert not row["decision"].startswith("unknown") and row["ood_score"]

    low = _with_threshold(trained_bundle, tmp_path, -1.0)
    res = CliRunner().invoke(cli, ["route", str(one_image), "--bundle", str(low), "--csv", str(tmp_path / "r.csv")])
    assert res.exit_code == 0, res.output
    assert "OOD threshold -1" in res.output and " unknown " in res.output
    (row,) = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert row["verdict"] == "unknown" and float(row["ood_score"]) > -1.0


def test_ray_route_stage_makes_the_same_decision(trained_bundle, tmp_path, one_image):
    """The Ray segment actor (called here as a plain object) decides as Pipeline.decide does."""
    from triageseg.datasets.io import read_image
    from triageseg.pipeline import Pipeline
    from triageseg.pipeline.cluster.ray_stages import SegmentActor

    root = _with_threshold(trained_bundle, tmp_path, -1.0)
    ray_stages = pytest.importorskip("triageseg.pipeline.cluster.ray_stages")
    image = read_image(one_image)
    expected = Pipeline(root, unknown="skip").decide(image)
    actor = SegmentActor(ray_stages.BundleSource(path=str(root)),
                       ray_stages.StageOptions(out=str(tmp_path / "o"), pipeline={"device": "cpu", "unknown": "skip"}))
    batch = {k: [v] for k, v in {"index": 0, "file": str(one_image), "source": str(one_image), "name": "cell",
                                 "modality": "", "confidence": np.nan, "ood_score": np.nan, "used_model": "",
                                 "decision": "", "error": "", "error_path": "", "image": image,
                                 "px_y": np.nan, "px_x": np.nan, "t_read": 0.0}.items()}
    out = actor(batch)
    assert out["used_model"] == [""] and out["decision"] == [expected.decision]
    assert out["ood_score"][0] == pytest.approx(expected.ood_score)


def test_block_path_skips_an_unknown_image(trained_bundle, tmp_path, one_image):
    from triageseg.cli.main import cli

    root = _with_threshold(trained_bundle, tmp_path, -1.0)
    res = CliRunner().invoke(cli, ["segment", str(one_image), "--bundle", str(root), "--quiet", "--out",
                                   str(tmp_path / "blk"), "--blocks-above", "0", "--unknown", "skip"])
    assert res.exit_code == 0, res.output
    (row,) = _routing(tmp_path / "blk")
    assert row["mode"] == "blocks" and row["used_model"] == "" and row["ood_score"]
    assert not list((tmp_path / "blk").glob("*.tif")) and not list((tmp_path / "blk").glob(".*.blocks"))


def test_ray_run_records_a_skipped_image_without_a_label_file(tmp_path):
    """The driver side of the Ray path: a routed-as-skipped input gets its row and no label file."""
    distributed = pytest.importorskip("triageseg.pipeline.cluster.distributed")
    from triageseg.pipeline.cluster.ray_stages import StageOptions

    run = object.__new__(distributed._Run)  # only the parts record() uses: no cluster needed
    run.report, run.stage = distributed.DistributedReport(), StageOptions(out=str(tmp_path))
    run.journal = distributed._Journal(str(tmp_path), every=0.0)
    item = {"file": str(tmp_path / "x.png"), "name": "x", "modality": "he", "confidence": 0.9, "ood_score": 7.5,
            "used_model": "", "decision": "unknown modality (OOD score 7.5 > 1; top-1 he, confidence 0.90): skipped"}
    run.record(item, item, objects=0, seconds=0.0)
    run.journal.flush()
    assert run.report.unknown_skipped == [tmp_path / "x.png"] and not run.report.written
    assert len(run.report.unknown) == 1
    (row,) = _routing(tmp_path)
    assert row["output"] == "" and row["ood_score"] == "7.5000" and row["decision"].endswith("skipped")
