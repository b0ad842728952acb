"""Shared pytest fixtures: one small synthetic dataset per test session."""

from __future__ import annotations

import os

import pytest

# Before torch is imported: idle OpenMP threads spin briefly, then sleep, as the CLI sets it
# (segmenters/threads.py), so torch does not slow down several times while Ray workers or
# data-loading threads share the cores.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Qt widgets (the napari plugin's tests) render without a display.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# `--backend auto` means torch in the test suite (segmenters.backends.AUTO_ENV): with ONNX
# Runtime installed (the `test` extra), `auto` would otherwise export the networks of every
# bundle a test makes or trains, seconds each, for images of 96 px. tests/test_backends.py
# and tests/test_router_backend.py unset it to test auto -> ONNX Runtime on a real bundle.
# `TRIAGESEG_AUTO_BACKEND=onnx pytest` runs the whole suite the way users' `auto` does.
os.environ.setdefault("TRIAGESEG_AUTO_BACKEND", "torch")


def load_benchmark(name: str):
    """A script of benchmarks/ (scripts, not a package) loaded by path as a module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session", autouse=True)
def _export_cache(tmp_path_factory):
    """Exported networks (segmenters.backends) go to a folder of this session, never to the user's cache."""
    before = os.environ.get("TRIAGESEG_CACHE")
    os.environ["TRIAGESEG_CACHE"] = str(tmp_path_factory.mktemp("export-cache"))
    yield
    if before is None:
        os.environ.pop("TRIAGESEG_CACHE", None)
    else:
        os.environ["TRIAGESEG_CACHE"] = before


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """A synthetic dataset in the DESIGN layout: 24 images of 96x96, seed 0, three modalities.

    Read-only for tests: copy it (``shutil.copytree``) before modifying anything.
    With the default weights it holds 14 fluorescence, 5 brightfield and 5 he images,
    each modality with at least one train, val and test image. IHC (the fourth modality)
    is left out so the suite's small models stay three-class; tests/test_synth_realism.py
    covers a four-modality dataset.
    """
    from triageseg.datasets.synth import make_dataset

    return make_dataset(
        tmp_path_factory.mktemp("synth") / "data",
        n=24,
        size=96,
        seed=0,
        modalities=("fluorescence", "brightfield", "he"),
        weights=(0.6, 0.2, 0.2),
    )


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """A bundle of untrained models: router, three specialists (fluorescence, brightfield, he) and a generalist."""
    import torch

    from triageseg import bundle as B
    from triageseg.router.model import RouterConfig, create_router, save_router
    from triageseg.segmenters.model import SegmenterConfig, create_segmenter, save_segmenter

    mods = ("fluorescence", "brightfield", "he")
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("bundle") / "bundle"
    rcfg = RouterConfig(class_names=mods, image_size=32)
    save_router(B.router_dir(root), create_router(rcfg), rcfg)
    for name in (*mods, B.GENERALIST):
        cfg = SegmenterConfig(decoder_channels=(16, 16, 16, 16, 16), tile_size=128, overlap=32,
                              modality=None if name == B.GENERALIST else name)
        save_segmenter(B.segmenter_dir(root, name), create_segmenter(cfg), cfg, params=None)
    B.update_manifest(root, modalities=list(mods))
    return root


@pytest.fixture(scope="session")
def sized_bundle(tiny_bundle, tmp_path_factory):
    """``tiny_bundle`` with every segmenter trained (as its config says) at a nucleus diameter of 16 px.

    Read-only for tests: copy it before modifying anything.
    """
    import json
    import shutil

    from triageseg import bundle as B

    root = tmp_path_factory.mktemp("sized") / "bundle"
    shutil.copytree(tiny_bundle, root)
    for name in ("fluorescence", "brightfield", "he", B.GENERALIST):
        path = B.segmenter_dir(root, name) / B.CONFIG
        cfg = json.loads(path.read_text())
        cfg["diameter"] = 16.0
        path.write_text(json.dumps(cfg))
    return root


@pytest.fixture(scope="session")
def constant_bundle(tmp_path_factory):
    """A bundle whose results are known exactly: an untrained router, segmenters with constant output.

    The confidence threshold is 1.0, so routing always falls back to the generalist.
    ``_generalist``, ``fluorescence`` and ``brightfield`` call every pixel nucleus interior
    (one nucleus covering the whole image); ``he`` calls every pixel background (no nucleus).
    Read-only for tests.
    """
    import torch

    from triageseg import bundle as B
    from triageseg.router.model import RouterConfig, create_router, save_router
    from triageseg.segmenters.model import SegmenterConfig, create_segmenter, save_segmenter

    torch.manual_seed(0)
    modalities = ("fluorescence", "brightfield", "he")
    root = tmp_path_factory.mktemp("constant_bundle") / "bundle"
    rcfg = RouterConfig(class_names=modalities, image_size=32)
    save_router(B.router_dir(root), create_router(rcfg), rcfg)
    for name in (*modalities, B.GENERALIST):
        cfg = SegmenterConfig(decoder_channels=(16, 16, 16, 16, 16), tile_size=128, overlap=32,
                              modality=None if name == B.GENERALIST else name)
        model = create_segmenter(cfg)
        head = model.segmentation_head[0]  # logits = bias everywhere
        with torch.no_grad():
            head.weight.zero_()
            head.bias.copy_(torch.tensor([8.0, 0.0, 0.0] if name == "he" else [0.0, 8.0, 0.0]))
        save_segmenter(B.segmenter_dir(root, name), model, cfg, params=None)
    B.update_manifest(root, modalities=list(modalities), fallback={"confidence_threshold": 1.0})
    return root


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (a free port), for journals on object storage; stopped by its PID at the end.

    The endpoint and dummy keys go into the environment (``AWS_ENDPOINT_URL``...), where
    s3fs and botocore read them, and back out at the end: nothing reaches a real network.
    Yields ``{"endpoint": URL, "env": the variables set, "fs": an s3fs filesystem on it}``.
    """
    import signal
    import socket
    import subprocess
    import sys
    import time

    pytest.importorskip("moto.server", reason="moto[server] (the test extra) runs a local S3")
    s3fs = pytest.importorskip("s3fs")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto's S3 server did not start on 127.0.0.1:{port}") from None
                time.sleep(0.1)
        s3fs.S3FileSystem.clear_instance_cache()  # a cached filesystem could hold another endpoint
        yield {"endpoint": env["AWS_ENDPOINT_URL"], "env": env, "fs": s3fs.S3FileSystem()}
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on the local S3 server for one test: ``s3://<bucket>``."""
    import re

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + f"-{os.getpid()}"
    s3_server["fs"].mkdir(name)
    yield f"s3://{name}"
    s3_server["fs"].rm(name, recursive=True)
