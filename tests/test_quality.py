"""Predicted per-image quality: the signals, the regressor and its file, and `segment`'s review list."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from triageseg import bundle as B
from triageseg.datasets.errors import BundleError
from triageseg.postprocess.quality import (
    QUALITY_JSON,
    QualityModel,
    TrainingStats,
    fit_quality,
    image_signals,
    load_quality,
    predict_quality,
    spearman,
    training_stats,
)


def _disks(shape=(64, 64), centres=((16, 16), (16, 46), (46, 30)), radius=7) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.uint32)
    for k, (cy, cx) in enumerate(centres, start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = k
    return labels


def _probs(labels: np.ndarray, sharpness: float) -> np.ndarray:
    """Probabilities that agree with ``labels``: ``sharpness`` 1 = certain, 0 = uniform."""
    from scipy import ndimage as ndi

    onehot = np.zeros((3, *labels.shape), np.float32)
    edge = (labels > 0) & (ndi.grey_erosion(labels, size=3) != labels)
    onehot[0] = labels == 0
    onehot[1] = (labels > 0) & ~edge
    onehot[2] = edge
    return sharpness * onehot + (1 - sharpness) / 3


# ------------------------------------------------------------------------------ signals


def test_signals_move_the_right_way_from_confident_to_uncertain():
    labels = _disks()
    sure = image_signals(_probs(labels, 0.95), labels)
    unsure = image_signals(_probs(labels, 0.3), labels)
    assert sure["object_confidence"] == pytest.approx(0.95 + 0.05 / 3, abs=1e-6)
    assert unsure["object_confidence"] < sure["object_confidence"]
    assert sure["uncertain_share"] == 0.0 and unsure["uncertain_share"] == 1.0
    assert 0 <= sure["boundary_entropy"] < unsure["boundary_entropy"] <= 1
    assert sure["no_objects"] == 0.0 and "router_confidence" not in sure
    empty = image_signals(_probs(labels, 0.95), np.zeros_like(labels), router_confidence=0.8, ood_score=3.0)
    assert empty["no_objects"] == 1.0 and empty["object_confidence"] == 0.0
    assert empty["router_confidence"] == 0.8 and empty["ood_score"] == 3.0
    with pytest.raises(ValueError, match="3xHxW"):
        image_signals(np.zeros((2, 8, 8)), np.zeros((8, 8)))
    with pytest.raises(ValueError, match="does not match"):
        image_signals(np.zeros((3, 8, 8)), np.zeros((8, 9)))


def test_count_and_size_deviate_from_the_training_labels():
    train = [_disks(), _disks(centres=((20, 20), (44, 44), (20, 44)))]
    stats = training_stats(train)
    assert stats.n_images == 2 and stats.log_area_std == 0.1  # same sizes: the floor
    same = image_signals(_probs(train[0], 0.9), train[0], stats=stats)
    assert same["count_deviation"] == pytest.approx(0, abs=1e-9) and same["size_deviation"] == pytest.approx(0)
    big = _disks(centres=((32, 32),), radius=20)
    odd = image_signals(_probs(big, 0.9), big, stats=stats)
    assert odd["size_deviation"] > 10 and odd["count_deviation"] > 1
    with pytest.raises(ValueError, match="at least one"):
        training_stats([])


# ---------------------------------------------------------------------------- regressor


def _points(n=40, seed=0):
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.4, 1.0, n)
    unc = 1 - conf + rng.normal(0, 0.05, n)
    points = [{"object_confidence": c, "uncertain_share": u, "no_objects": 0.0} for c, u in zip(conf, unc)]
    return points, list(np.clip(1.6 * conf - 0.6 + rng.normal(0, 0.03, n), 0, 1))


def test_fit_save_load_round_trip_is_plain_json(tmp_path):
    points, f1 = _points()
    stats = TrainingStats(1.0, 0.5, 4.0, 0.3, 7)
    model = fit_quality(points, f1, stats=stats, info={"n_images": 8})
    # constant signals (no_objects) cannot be learnt; router signals were never seen
    assert model.signals == ("object_confidence", "uncertain_share")
    assert model.fit["n_points"] == 40 and model.fit["n_images"] == 8 and model.fit["spearman_in_fit"] > 0.9
    path = model.save(tmp_path / QUALITY_JSON)
    assert json.loads(path.read_text())["kind"] == "triageseg-quality"  # JSON numbers, no pickle
    loaded = load_quality(tmp_path)
    assert loaded == model and loaded.stats == stats
    for p in points:
        assert loaded.predict(p) == model.predict(p)
        assert loaded.predict({**p, "router_confidence": 0.1, "ood_score": 9.0}) == model.predict(p)
    preds = [loaded.predict(p) for p in points]
    assert spearman(preds, f1) > 0.9 and all(0 <= v <= 1 for v in preds)
    assert loaded.predict({"object_confidence": 50.0, "uncertain_share": -50}) == 1.0  # clipped
    assert loaded.predict({}) == pytest.approx(loaded.intercept)  # every signal at its mean
    assert load_quality(tmp_path / "nothing") is None
    assert predict_quality(None, np.zeros((3, 4, 4)), np.zeros((4, 4))) is None
    with pytest.raises(ValueError, match="at least 2"):
        fit_quality(points[:1], f1[:1])
    with pytest.raises(ValueError, match="unknown method"):
        fit_quality(points, f1, method="forest")


def test_signed_fit_keeps_every_coefficient_on_its_side():
    from triageseg.postprocess.quality import SIGNS

    rng = np.random.default_rng(3)
    conf = rng.uniform(0.5, 1.0, 12)
    # few points where more uncertain pixels happen to go with a higher F1: a free ridge learns that sign
    points = [{"object_confidence": c, "uncertain_share": u} for c, u in zip(conf, conf + rng.normal(0, 0.02, 12))]
    f1 = list(conf)
    free = fit_quality(points, f1, method="free")
    signed = fit_quality(points, f1)
    assert signed.fit["method"] == "signed" and len(signed.fit["points"]) == 12
    assert all(c * SIGNS[s] >= 0 for s, c in zip(signed.signals, signed.coef))
    assert dict(zip(free.signals, free.coef))["uncertain_share"] > 0  # the wrong side, unconstrained


@pytest.mark.parametrize("text, problem", [
    ("{not json", "unreadable quality model"),
    ("[1, 2]", "not a JSON object"),
    ('{"kind": "other", "format": 1}', "not a quality model"),
    (None, "2 signals but 1 means"),
    (None, "unknown signals"),
])
def test_corrupt_quality_json_is_named(tmp_path, text, problem):
    path = tmp_path / QUALITY_JSON
    if text is None:
        d = fit_quality(*_points()).to_dict()
        if "means" in problem:
            d["mean"] = d["mean"][:1]
        else:
            d["signals"][0] = "magic"
        text = json.dumps(d)
    path.write_text(text)
    with pytest.raises(BundleError, match=problem) as info:
        load_quality(path)
    assert QUALITY_JSON in str(info.value)


# ----------------------------------------------------------------------------- pipeline


@pytest.fixture
def scored_bundle(tiny_bundle, tmp_path):
    """The tiny bundle with a quality model beside every segmenter but ``brightfield``."""
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    model = QualityModel(("object_confidence", "uncertain_share"), (0.5, 0.5), (0.1, 0.1), (0.2, -0.1), 0.5,
                         stats=TrainingStats(1.0, 0.5, 4.0, 0.3, 3))
    for name in ("fluorescence", "he", B.GENERALIST):
        model.save(B.segmenter_dir(dst, name) / QUALITY_JSON)
    return dst


def test_pipeline_result_carries_the_quality(scored_bundle):
    from triageseg.pipeline import Pipeline

    pipe = Pipeline.from_bundle(scored_bundle, device="cpu")
    image = np.random.default_rng(0).random((64, 64, 3), dtype=np.float32)
    result = pipe.segment(image, modality="he")
    probs = pipe.probabilities(image, "he")
    expected = pipe.quality_model("he").predict(image_signals(probs, result.labels, stats=pipe.quality_model("he")
                                                              .stats))
    assert result.quality == pytest.approx(expected) and 0 <= result.quality <= 1
    assert pipe.segment(image, modality="brightfield").quality is None  # no quality.json: off
    assert pipe.without_quality == ["brightfield"]


def test_segment_writes_quality_the_review_list_and_review_csv(scored_bundle, tmp_path):
    import imagecodecs

    from triageseg.cli.main import cli
    from triageseg.pipeline import Pipeline

    rng = np.random.default_rng(1)
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(4):
        imagecodecs.imwrite(folder / f"img{k}.png", (rng.random((48 + 8 * k, 64, 3)) * 255).astype(np.uint8))
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["segment", str(folder), "--bundle", str(scored_bundle), "--out", str(out),
                                   "--modality", "he", "--review", "3", "--min-quality", "1.0", "--quiet"])
    assert res.exit_code == 0, res.output
    with (out / "routing.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[-4] == "quality" and all(0 <= float(r["quality"]) <= 1 for r in rows)
    ordered = sorted(rows, key=lambda r: (float(r["quality"]), r["output"]))
    listed = res.output.split("review first", 1)[1].splitlines()[1:4]
    assert [line.split()[1] for line in listed] == [r["output"] for r in ordered[:3]]
    with (out / "review.csv").open() as fh:
        review = list(csv.DictReader(fh))
    assert [r["output"] for r in review] == [r["output"] for r in ordered]  # all are below 1.0
    assert "4 image(s) below quality 1" in res.output

    # worker processes give the same qualities
    report = Pipeline.from_bundle(scored_bundle, device="cpu").segment_files(
        sorted(folder.iterdir()), tmp_path / "workers", modality="he", workers=1)
    assert sorted((r["output"], r["quality"]) for r in report.rows) == sorted((r["output"], r["quality"])
                                                                               for r in rows)

    # a segmenter without quality.json: empty quality, said once, no crash
    res = CliRunner().invoke(cli, ["segment", str(folder), "--bundle", str(scored_bundle), "--out",
                                   str(tmp_path / "bf"), "--modality", "brightfield", "--quiet"])
    assert res.exit_code == 0, res.output
    assert res.output.count("no quality estimate for images of brightfield") == 1
    assert "review first" not in res.output
    with (tmp_path / "bf" / "routing.csv").open() as fh:
        assert {r["quality"] for r in csv.DictReader(fh)} == {""}


def test_block_sums_add_up_to_the_whole_image_signals():
    from triageseg.postprocess.quality import pixel_sums, signals_from_sums

    labels = _disks()
    probs = _probs(labels, 0.7)
    stats = training_stats([labels])
    halves = pixel_sums(probs[:, :30], labels[:30]) + pixel_sums(probs[:, 30:], labels[30:])
    areas = np.bincount(labels.ravel())[1:]
    whole = signals_from_sums(halves, n_objects=3, median_area=float(np.median(areas)), stats=stats)
    assert whole == pytest.approx(image_signals(probs, labels, stats=stats))


def test_block_path_rows_carry_the_quality(scored_bundle, tmp_path):
    import tifffile

    from triageseg.pipeline import Pipeline
    from triageseg.pipeline.blockwise.large import BlockOptions

    path = tmp_path / "big.tif"
    image = (np.random.default_rng(2).random((160, 200)) * 255).astype(np.uint8)
    tifffile.imwrite(path, image, tile=(64, 64))
    pipe = Pipeline.from_bundle(scored_bundle, device="cpu")
    blocks = pipe.segment_files([path], tmp_path / "blocks", modality="he",
                                blocks=BlockOptions(threshold_mp=0, block_size=96, margin=16))
    memory = pipe.segment_files([path], tmp_path / "memory", modality="he")
    (row,), (ref,) = blocks.rows, memory.rows
    assert row["mode"] == "blocks" and ref["mode"] == "memory"
    # blocks decode a little differently at their seams: close, not equal
    assert 0 <= float(row["quality"]) <= 1 and abs(float(row["quality"]) - float(ref["quality"])) < 0.1


def test_ray_stages_carry_the_quality_without_ray(scored_bundle, tmp_path):
    """The cluster path's segment actor and write task, called directly: the same quality as the local path."""
    import imagecodecs

    from triageseg.pipeline import Pipeline
    from triageseg.pipeline.cluster.ray_stages import BundleSource, SegmentActor, StageOptions, read_stage, write_stage

    path = tmp_path / "one.png"
    imagecodecs.imwrite(path, (np.random.default_rng(4).random((56, 72, 3)) * 255).astype(np.uint8))
    options = StageOptions(out=str(tmp_path / "ray_out"), pipeline={"device": "cpu"}, modality="he")
    (tmp_path / "ray_out").mkdir()
    row = read_stage({"index": 0, "file": str(path), "name": "one", "modality": "", "confidence": np.nan,
                      "used_model": "he", "decision": "", "error": "", "error_path": ""}, options=options)
    batch = SegmentActor(BundleSource(path=str(scored_bundle)), options)({k: [v] for k, v in row.items()})
    out = write_stage({k: v[0] for k, v in batch.items()}, options=options)
    local = Pipeline.from_bundle(scored_bundle, device="cpu").segment_files([path], tmp_path / "local", modality="he")
    assert out["error"] == "" and f"{out['quality']:.3f}" == local.rows[0]["quality"]
