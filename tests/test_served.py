"""A cached export served without building the eager network (segmenters.served): same results, safe fallbacks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from triageseg import bundle as B  # noqa: E402
from triageseg.datasets.errors import BundleError  # noqa: E402
from triageseg.pipeline import Pipeline  # noqa: E402
from triageseg.segmenters import backends as BK  # noqa: E402
from triageseg.segmenters import served  # noqa: E402

pytestmark = pytest.mark.skipif(not BK.available("onnx"), reason="onnxruntime is not installed")


@pytest.fixture()
def bundle(tiny_bundle, tmp_path, monkeypatch):
    """A copy of the tiny bundle with OOD statistics, and an export cache of this test's own."""
    from triageseg.router.calibrate import fit_router_ood
    from triageseg.router.model import load_router
    from triageseg.router.ood import save_ood

    root = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, root)
    model, config = load_router(B.router_dir(root))
    rng = np.random.default_rng(0)
    thumbs = rng.random((12, config.image_size, config.image_size, 3), dtype=np.float32)
    save_ood(B.router_dir(root), fit_router_ood(model, config, thumbs[:9], np.arange(9) % 3, thumbs[9:],
                                                method="combined"))
    monkeypatch.setenv("TRIAGESEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(BK, "_noted", set())
    return root


def _image(seed=3):
    return np.random.default_rng(seed).random((96, 96, 3), dtype=np.float32)


def _run(root, image, **kw):
    pipe = Pipeline(root, backend="onnx", **kw)
    d = pipe.decide(image)
    probs = pipe.probabilities(image, "fluorescence", None)
    return pipe, d, probs


def test_second_pipeline_serves_the_export_without_the_eager_networks(bundle):
    image = _image()
    first, d1, p1 = _run(bundle, image)
    assert not isinstance(first._router[0].eager, torch.nn.Sequential)  # the first one built the ViT
    second, d2, p2 = _run(bundle, image)
    router, _ = second._router
    assert isinstance(router, served.ServedRouter) and not isinstance(router, torch.nn.Module)
    net = second.segmenter("fluorescence")[0]
    assert isinstance(net, served.ServedNet) and not isinstance(net, torch.nn.Module)
    assert BK.backend_of(net) == "onnx" and router.backend_name == "onnx"
    assert (d1.modality, d1.used_model, d1.decision) == (d2.modality, d2.used_model, d2.decision)
    assert d1.confidence == d2.confidence and d1.ood_score == d2.ood_score
    assert second.ood_threshold == first.ood_threshold
    np.testing.assert_array_equal(p1, p2)


def test_a_damaged_export_is_rebuilt_the_eager_way(bundle):
    image = _image()
    _, _, p1 = _run(bundle, image)
    onnx = BK.cache_dir(None, B.segmenter_dir(bundle, "fluorescence"), "segmenter") / BK.ONNX_FILE
    onnx.write_bytes(onnx.read_bytes()[:1000])  # truncated
    with pytest.warns(BK.BackendNote, match="does not match its checksum"):
        pipe, _, p2 = _run(bundle, image)
    assert isinstance(pipe.segmenter("fluorescence")[0], torch.nn.Module)  # the eager network's wrapper
    np.testing.assert_array_equal(p1, p2)
    third, _, p3 = _run(bundle, image)  # repaired: served again
    assert isinstance(third.segmenter("fluorescence")[0], served.ServedNet)
    np.testing.assert_array_equal(p1, p3)


def test_an_export_without_meta_is_served_after_the_eager_path_writes_it(bundle):
    image = _image()
    _run(bundle, image)
    router_folder = BK.cache_dir(None, B.router_dir(bundle), "router")
    (router_folder / served.META_FILE).unlink()
    pipe, _, _ = _run(bundle, image)
    assert not isinstance(pipe._router[0], served.ServedRouter)
    meta = json.loads((router_folder / served.META_FILE).read_text())
    assert meta["feature_dim"] == pipe._router[0].eager.head.in_features
    again, _, _ = _run(bundle, image)
    assert isinstance(again._router[0], served.ServedRouter) and again._router[0].feature_dim == meta["feature_dim"]


def test_weights_changed_after_the_export_are_loaded_and_checked(bundle):
    _run(bundle, _image())
    weights = B.segmenter_dir(bundle, "fluorescence") / B.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])  # another key: the eager load reads the file
    pipe = Pipeline(bundle, backend="onnx")
    with pytest.raises(BundleError) as err:
        pipe.segmenter("fluorescence")
    assert str(weights) in str(err.value)


def test_nothing_is_served_for_torch_or_without_a_cache(bundle):
    run_dir = B.segmenter_dir(bundle, "fluorescence")
    assert served.cached_runner(run_dir, BK.resolve("onnx"), "cpu", kind="segmenter") is None  # no cache yet
    _run(bundle, _image())
    assert served.cached_runner(run_dir, BK.resolve("onnx"), "cpu", kind="segmenter") is not None
    assert served.cached_runner(run_dir, BK.resolve("torch"), "cpu", kind="segmenter") is None
    pipe = Pipeline(bundle, backend="torch")
    assert not hasattr(pipe.segmenter("fluorescence")[0], "_runner")


def test_a_fresh_process_serves_a_cached_bundle_without_torch(bundle):
    image = _image()
    _run(bundle, image)  # fills the cache
    code = (
        "import sys, numpy as np\n"
        "from triageseg.pipeline import Pipeline\n"
        f"pipe = Pipeline({str(bundle)!r}, backend='onnx')\n"
        "img = np.random.default_rng(3).random((96, 96, 3), dtype=np.float32)\n"
        "d = pipe.decide(img)\n"
        "pipe.probabilities(img, 'fluorescence', None)\n"
        "heavy = ('timm', 'segmentation_models_pytorch', 'torchvision', 'torch')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    env = {**os.environ, "TRIAGESEG_AUTO_BACKEND": "onnx"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=Path(bundle).parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_cache_that_cannot_take_meta_still_runs_the_export(bundle, monkeypatch):
    """meta.json is an optimisation: a write that fails leaves the exported backend running, not torch."""
    from triageseg.datasets import atomic

    def refuse(*_args, **_kwargs):
        raise PermissionError("read-only cache")

    monkeypatch.setattr(atomic, "write_text_atomic", refuse)
    pipe = Pipeline(bundle, backend="onnx")
    pipe.decide(_image())
    net = pipe.segmenter("fluorescence")[0]
    assert BK.backend_of(net) == "onnx" and pipe._router[0].backend_name == "onnx"

