"""One quality model across a bundle's segmenters, with the router's signals (pipeline/local/bundle_quality.py)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from triageseg import bundle as B
from triageseg.postprocess.quality import TrainingStats, fit_quality, load_quality


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    root = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, root)
    # per-segmenter quality models with their own training statistics, as train segmenter writes them
    for i, name in enumerate(B.read_manifest(root)["segmenters"]):
        stats = TrainingStats(log_density_mean=5.0 + i, log_density_std=1.0, log_area_mean=4.0, log_area_std=0.5,
                              n_images=3)
        fit_quality([{"object_confidence": 0.5}, {"object_confidence": 0.9}, {"object_confidence": 0.7}],
                    [0.2, 0.8, 0.5], stats=stats).save(B.segmenter_dir(root, name) / "quality.json")
    return root


def test_one_fit_over_every_val_image_and_segmenter_with_router_signals(bundle_copy, synth_data):
    from triageseg.datasets.layout import Dataset
    from triageseg.pipeline import Pipeline
    from triageseg.pipeline.local.bundle_quality import bundle_points, fit_bundle_quality

    pipe = Pipeline.from_bundle(bundle_copy, device="cpu")
    n_val = len(Dataset(synth_data).select(split="val"))
    points = bundle_points(pipe, synth_data)
    assert len(points) == n_val * 4
    assert sum(p["routed"] for p in points) == n_val  # one routed model per image, as at inference
    for p in points:
        assert 0.0 <= p["signals"]["router_confidence"] <= 1.0 and 0.0 <= p["f1"] <= 1.0
    # the router's probability of the model's modality for a specialist, top-1 confidence for the generalist
    image_points = [p for p in points if p["id"] == points[0]["id"]]
    confs = {p["model"]: p["signals"]["router_confidence"] for p in image_points}
    assert confs["fluorescence"] + confs["brightfield"] + confs["he"] == pytest.approx(1.0, abs=1e-5)

    stats_before = {n: load_quality(B.segmenter_dir(bundle_copy, n)).stats for n in pipe.available}
    summary = fit_bundle_quality(bundle_copy, synth_data, device="cpu", log=lambda _m: None)
    assert summary["n_points"] == n_val * 4 and summary["n_images"] == n_val
    models = {n: load_quality(B.segmenter_dir(bundle_copy, n)) for n in pipe.available}
    coefs = {(m.signals, m.coef, m.intercept) for m in models.values()}
    assert len(coefs) == 1  # one model ...
    assert all(models[n].stats == stats_before[n] for n in models)  # ... with each segmenter's own statistics
    assert models["he"].fit["scope"].startswith("bundle")
    assert np.isfinite(models["he"].predict({"object_confidence": 0.8, "router_confidence": 0.9}))
