"""The router on the specialists' backend (pipeline.local.router_backend): eager torch's routing, the cache, fallbacks."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from triageseg.pipeline.local import router_backend as RB  # noqa: E402
from triageseg.router.model import (  # noqa: E402
    RouterConfig,
    classify,
    create_router,
    load_router,
    router_outputs,
    save_router,
)
from triageseg.segmenters import backends as B  # noqa: E402

EXPORTED = [b for b in ("onnx", "openvino") if B.available(b)]
MODS = ("brightfield", "fluorescence", "he")


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("export-cache")


@pytest.fixture(autouse=True)
def _own_cache(shared_cache, monkeypatch):
    """Exports go to this module's cache (one export per backend's tests); notes are fresh in every test;
    `auto` is the users'."""
    monkeypatch.setenv("TRIAGESEG_CACHE", str(shared_cache))
    monkeypatch.setattr(B, "_noted", set())
    monkeypatch.delenv(B.AUTO_ENV, raising=False)


@pytest.fixture(scope="module")
def router_dir(tmp_path_factory):
    """A saved untrained ViT router on 64 px thumbnails (16 patches), with OOD statistics that read its features."""
    from triageseg.router.calibrate import fit_router_ood
    from triageseg.router.ood import save_ood

    torch.manual_seed(0)
    config = RouterConfig(class_names=MODS, image_size=64, temperature=0.5)
    model = create_router(config).eval()
    run = save_router(tmp_path_factory.mktemp("router") / "router", model, config)
    rng = np.random.default_rng(0)
    thumbs = rng.random((24, 64, 64, 3), dtype=np.float32)
    # "combined": features and thumbnail statistics, so the score depends on the exported network's features
    ood = fit_router_ood(model, config, thumbs[:18], np.arange(18) % 3, thumbs[18:], method="combined")
    save_ood(run, ood)
    return run


def _images(n=4, seed=1):
    rng = np.random.default_rng(seed)
    shapes = [(64, 64), (48, 80), (300, 517), (90, 60)]  # 300 x 517 > 4 x 64: the router adds its 5 crops
    return [rng.random((*shapes[i % len(shapes)], 3), dtype=np.float32) for i in range(n)]


def _choice(backend):
    return B.resolve(backend)


@pytest.mark.parametrize("backend", EXPORTED)
def test_exported_router_gives_eager_logits_features_and_decisions(router_dir, backend):
    from triageseg.router.ood import load_ood

    model, config = load_router(router_dir)
    net = RB.prepare_router(load_router(router_dir)[0], router_dir, choice=_choice(backend), threads=1)
    assert net.backend_name == backend
    thumbs = np.random.default_rng(2).random((7, 64, 64, 3), dtype=np.float32)  # 7: batches of 4 and 3 too
    for batch_size in (32, 4):
        want = router_outputs(model, config, thumbs, batch_size=batch_size)
        got = router_outputs(net, config, thumbs, batch_size=batch_size)
        for w, g in zip(want, got):
            assert g.shape == w.shape and g.dtype == np.float32
            assert np.abs(g - w).max() <= B.FP32_PROB_TOLERANCE
    ood = load_ood(router_dir)
    want = classify(model, config, _images(), ood=ood)
    got = classify(net, config, _images(), ood=ood)
    for w, g in zip(want, got):
        assert g.modality == w.modality  # the routing decision
        assert max(abs(g.probs[c] - w.probs[c]) for c in MODS) <= B.FP32_PROB_TOLERANCE
        assert abs(g.ood_score - w.ood_score) <= 1e-4 * max(1.0, abs(w.ood_score))
        assert ood.is_unknown(g.ood_score) == ood.is_unknown(w.ood_score)


def test_router_export_cache_is_kept_apart_from_a_segmenter_export(router_dir):
    model, _ = load_router(router_dir)
    assert B.cache_key(model, router_dir, RB.KIND) != B.cache_key(model, router_dir)
    assert B.cache_dir(model, router_dir, RB.KIND).parent == B.cache_root()


@pytest.mark.skipif(not B.available("onnx"), reason="onnxruntime not installed")
def test_corrupt_router_export_is_rebuilt(router_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TRIAGESEG_CACHE", str(tmp_path / "cache"))  # its own: this test damages it
    model, config = load_router(router_dir)
    RB.prepare_router(model, router_dir, choice=_choice("onnx"), threads=1)
    (path,) = B.cache_root().rglob(B.ONNX_FILE)
    stamp = path.stat().st_mtime_ns
    RB.prepare_router(model, router_dir, choice=_choice("onnx"), threads=1)
    assert path.stat().st_mtime_ns == stamp  # reused
    good = path.read_bytes()
    path.write_bytes(good[:500] + bytes([good[500] ^ 0xFF]) + good[501:])
    with pytest.warns(B.BackendNote, match="exporting it again"):
        net = RB.prepare_router(model, router_dir, choice=_choice("onnx"), threads=1)
    thumbs = np.random.default_rng(3).random((2, 64, 64, 3), dtype=np.float32)
    got, want = router_outputs(net, config, thumbs), router_outputs(model, config, thumbs)
    assert np.abs(got[0] - want[0]).max() <= B.FP32_PROB_TOLERANCE


def test_missing_library_keeps_the_router_on_torch(router_dir, monkeypatch, tmp_path):
    """onnx asked for, onnxruntime missing: one note (from resolving the backend), an eager router, no export."""
    monkeypatch.setenv("TRIAGESEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(B, "available", lambda backend: backend == "torch")
    model, _ = load_router(router_dir)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        choice = B.resolve("onnx")
        net = RB.prepare_router(model, router_dir, choice=choice)
    assert net is model and not hasattr(net, "numpy_logits_and_features")
    assert len([w for w in seen if issubclass(w.category, B.BackendNote)]) == 1
    assert not B.cache_root().exists() or not list(B.cache_root().rglob(B.ONNX_FILE))


def test_auto_router_falls_back_when_the_export_fails(router_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(B, "export_onnx", refuse)
    model, _ = load_router(router_dir)
    with pytest.warns(B.BackendNote, match="could not run the router.*no space"):
        assert RB.prepare_router(model, router_dir, choice=B.Choice("onnx", "fp32", auto=True)) is model
    with pytest.raises(OSError, match="no space"):
        RB.prepare_router(model, router_dir, choice=B.Choice("onnx", "fp32"))


def test_router_runs_fp32_under_bf16(router_dir, monkeypatch):
    """--precision bf16 speeds the specialists; the router's thresholded outputs stay fp32."""
    seen = {}

    def spy(choice, path, threads, outputs=1):
        seen["precision"] = choice.precision
        raise RuntimeError("stop here")

    monkeypatch.setattr(B, "runner", spy)
    monkeypatch.setattr(B, "export_onnx", lambda *a, **k: "unused.onnx")
    model, _ = load_router(router_dir)
    with pytest.raises(RuntimeError, match="stop here"):
        RB.prepare_router(model, router_dir, choice=B.Choice("openvino", "bf16"))
    assert seen["precision"] == "fp32"


def test_a_router_that_is_not_a_vit_stays_eager(router_dir):
    stand_in = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(3))
    assert RB.prepare_router(stand_in, None, choice=B.Choice("onnx", "fp32")) is stand_in
