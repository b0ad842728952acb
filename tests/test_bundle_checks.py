"""Bundles with non-finite or mismatched statistics are refused at load, naming the file (issue 23, item 11).

Each test corrupts a copy of the ``tiny_bundle`` (conftest), given OOD statistics that fit its
router, and loads it the way ``segment`` and ``serve`` do (:class:`~triageseg.pipeline.Pipeline`).
"""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from triageseg import bundle as B
from triageseg.datasets.errors import BundleError
from triageseg.pipeline import Pipeline
from triageseg.router import ood as O

MODS = ("fluorescence", "brightfield", "he")


def _fitted_ood(width: int, method: str = "combined") -> O.OODModel:
    rng = np.random.default_rng(0)
    tensors = {}
    for comp, d in (("features", width), ("thumbstats", O.THUMBSTAT_DIM)):
        tensors[f"{comp}.means"] = rng.normal(size=(len(MODS), d))
        tensors[f"{comp}.precision"] = np.eye(d)
        tensors[f"{comp}.scale"] = np.array([float(d)])
    return O.OODModel(method=method, class_names=MODS, threshold=3.0, tensors=tensors)


@pytest.fixture(scope="module")
def feature_width(tiny_bundle) -> int:
    from triageseg.router.model import load_router

    model, config = load_router(B.router_dir(tiny_bundle))
    return O.router_feature_dim(model, config.class_names)


@pytest.fixture
def bundle(tiny_bundle, tmp_path, feature_width):
    """A copy of the tiny bundle with OOD statistics that fit its router."""
    root = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, root)
    O.save_ood(B.router_dir(root), _fitted_ood(feature_width))
    return root


def _load_router(root):
    pipe = Pipeline.from_bundle(root, device="cpu")
    pipe.load_router()
    return pipe


def _rewrite_weights(path, change) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    save_file({k: change(k, v) for k, v in state.items()}, str(path))


def test_the_fitting_copy_loads_and_scores(bundle, feature_width):
    pipe = _load_router(bundle)
    assert pipe.ood_threshold == 3.0
    (pred,) = pipe.route([np.random.default_rng(1).random((64, 64, 3), dtype=np.float32)])
    assert np.isfinite(pred.confidence) and np.isfinite(pred.ood_score)
    assert O.router_feature_dim(pipe._load_router()[0], MODS) == feature_width


def test_all_nan_ood_statistics_are_refused(bundle, feature_width):
    ood = _fitted_ood(feature_width)
    nan = {k: np.full_like(v, np.nan) for k, v in ood.tensors.items()}
    O.save_ood(B.router_dir(bundle), dataclasses.replace(ood, tensors=nan))
    with pytest.raises(BundleError) as err:
        _load_router(bundle)
    assert err.value.path == str(B.router_dir(bundle) / O.OOD_WEIGHTS)
    assert err.value.problem.startswith("non-finite values (NaN or inf) in features.means, features.precision")


def test_one_infinite_ood_value_is_refused(bundle, feature_width):
    ood = _fitted_ood(feature_width)
    ood.tensors["thumbstats.precision"][3, 3] = np.inf
    O.save_ood(B.router_dir(bundle), ood)
    with pytest.raises(BundleError, match=r"ood\.safetensors: non-finite values \(NaN or inf\) in thumbstats\.precision"):
        _load_router(bundle)


def test_ood_tensors_of_another_width_are_refused_naming_the_file(bundle, feature_width):
    O.save_ood(B.router_dir(bundle), _fitted_ood(feature_width + 5))
    with pytest.raises(BundleError) as err:
        _load_router(bundle)
    assert err.value.path == str(B.router_dir(bundle) / O.OOD_WEIGHTS)
    assert err.value.problem == (f"features.means has {feature_width + 5} columns, but the router gives "
                                 f"{feature_width} features values per image; retrain the router")


def test_ood_statistics_of_other_classes_are_refused(bundle, feature_width):
    ood = _fitted_ood(feature_width)
    O.save_ood(B.router_dir(bundle), dataclasses.replace(ood, class_names=("he", "brightfield", "fluorescence")))
    with pytest.raises(BundleError, match=r"ood\.json: OOD statistics for the classes \['he', "):
        _load_router(bundle)


def test_non_positive_scale_or_temperature_is_refused(bundle, feature_width):
    ood = _fitted_ood(feature_width)
    ood.tensors["features.scale"][:] = 0.0
    O.save_ood(B.router_dir(bundle), ood)
    with pytest.raises(BundleError, match=r"ood\.safetensors: features\.scale must be positive"):
        _load_router(bundle)
    O.save_ood(B.router_dir(bundle), dataclasses.replace(_fitted_ood(feature_width), temperature=float("nan")))
    with pytest.raises(BundleError, match=r"ood\.json: not valid OOD statistics .*temperature must be a positive"):
        _load_router(bundle)


def test_all_nan_router_weights_are_refused(bundle):
    path = B.router_dir(bundle) / B.WEIGHTS
    _rewrite_weights(path, lambda _k, v: torch.full_like(v, float("nan")) if v.is_floating_point() else v)
    with pytest.raises(BundleError) as err:
        _load_router(bundle)
    assert err.value.path == str(path)
    assert "tensors hold NaN or infinite values" in err.value.problem
    assert err.value.problem.endswith("the training diverged or the file is damaged; retrain this model")


def test_one_infinite_segmenter_weight_is_refused(bundle):
    path = B.segmenter_dir(bundle, "he") / B.WEIGHTS
    hit = []

    def poison(key, value):
        if value.is_floating_point() and not hit:
            hit.append(key)
            value = value.clone()
            value.view(-1)[0] = float("inf")
        return value

    _rewrite_weights(path, poison)
    pipe = Pipeline.from_bundle(bundle, device="cpu")
    pipe.segmenter("fluorescence")  # the others still load
    with pytest.raises(BundleError) as err:
        pipe.segmenter("he")
    assert err.value.path == str(path)
    assert err.value.problem.startswith("1 of ") and f"(e.g. {hit[0]})" in err.value.problem
