"""Inference backends (segmenters.backends): same probabilities as eager PyTorch, fallbacks, the export cache."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from triageseg.segmenters import backends as B  # noqa: E402
from triageseg.segmenters.model import SegmenterConfig, create_segmenter, save_segmenter  # noqa: E402
from triageseg.segmenters.predict import _ramp_1d, _run_batch, predict, tile_grid  # noqa: E402

SHAPES = [(64, 64), (300, 517)]
TILING = {"tile_size": 128, "overlap": 32, "batch_size": 3}  # 300 x 517 runs in 3 x 5 tiles, 64 x 64 whole
FP32 = [b for b in ("torch", "onnx", "openvino") if B.available(b)]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("export-cache")


@pytest.fixture(autouse=True)
def _own_cache(shared_cache, monkeypatch):
    """Exports go to this module's cache, never to the user's (each network is exported once for the tests
    that only use it: an export costs seconds); notes are fresh in every test; `auto` is the users'
    (tests/conftest.py pins it to torch for the rest of the suite)."""
    monkeypatch.setenv("TRIAGESEG_CACHE", str(shared_cache))
    monkeypatch.setattr(B, "_noted", set())
    monkeypatch.delenv(B.AUTO_ENV, raising=False)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache of this test's own, for tests that damage the cache."""
    monkeypatch.setenv("TRIAGESEG_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A saved untrained specialist (efficientnet-b3, narrow decoder): config.json + model.safetensors."""
    torch.manual_seed(0)
    cfg = SegmenterConfig(decoder_channels=(16, 16, 16, 16, 16), tile_size=128, overlap=32)
    model = create_segmenter(cfg).eval()
    with torch.no_grad():  # BatchNorm statistics away from identity, as in a trained model
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return save_segmenter(tmp_path_factory.mktemp("seg") / "run", model, cfg, params=None)


def _eager(run_dir):
    from triageseg.segmenters.model import load_segmenter

    return load_segmenter(run_dir)[0]


def _image(shape, seed=0):
    return np.random.default_rng(seed).random((*shape, 3), dtype=np.float32)


@pytest.mark.parametrize("backend", FP32)
@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_backend_matches_eager(run_dir, backend, shape):
    eager = _eager(run_dir)
    image = _image(shape)
    want = predict(eager, image, **TILING)
    net = B.prepare_network(_eager(run_dir), run_dir, backend=backend, precision="fp32", threads=1)
    assert B.backend_of(net) == backend
    got = predict(net, image, **TILING)
    assert got.shape == want.shape == (3, *shape)
    assert np.abs(got - want).max() <= B.FP32_PROB_TOLERANCE


@pytest.mark.skipif(B.cpu_bf16_support() is None, reason="no native bf16 on this CPU")
@pytest.mark.parametrize("backend", [b for b in ("torch", "openvino") if B.available(b)])
def test_bf16_within_its_tolerance(run_dir, backend):
    eager = _eager(run_dir)
    image = _image((300, 517), seed=1)
    want = predict(eager, image, **TILING)
    net = B.prepare_network(_eager(run_dir), run_dir, backend=backend, precision="bf16", threads=1)
    got = predict(net, image, **TILING)
    err = np.abs(got - want)
    assert err.max() <= B.BF16_PROB_TOLERANCE
    assert err.max() > 0  # bf16 really ran (fp32 would give the eager answer within 1e-5)


def test_bf16_refused_without_native_support(monkeypatch):
    monkeypatch.setattr(B, "cpu_bf16_support", lambda: None)
    with pytest.warns(B.BackendNote, match="AMX or AVX512-BF16"):
        assert B.resolve("torch", "bf16") == B.Choice("torch", "fp32")


def test_missing_library_falls_back_to_torch_with_one_note(monkeypatch, run_dir):
    monkeypatch.setattr(B, "available", lambda backend: backend == "torch")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        first = B.prepare_network(_eager(run_dir), run_dir, backend="onnx")
        again = B.resolve("onnx")
    notes = [w for w in seen if issubclass(w.category, B.BackendNote)]
    assert len(notes) == 1 and "onnxruntime" in str(notes[0].message)
    assert B.backend_of(first) == "torch" and again.backend == "torch"


def test_auto_without_extra_libraries_is_pure_torch_with_one_note(monkeypatch):
    monkeypatch.setattr(B, "available", lambda backend: backend == "torch")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert B.resolve("auto") == B.Choice("torch", "fp32")
        assert B.resolve("auto") == B.Choice("torch", "fp32")
    notes = [str(w.message) for w in seen if issubclass(w.category, B.BackendNote)]
    assert len(notes) == 1 and "'onnxruntime'" in notes[0] and "triageseg[onnx]" in notes[0], notes


@pytest.mark.skipif(not B.available("onnx"), reason="onnxruntime not installed")
def test_auto_is_onnx_runtime_on_cpu_and_torch_on_gpus(monkeypatch):
    monkeypatch.setattr(B, "cpu_bf16_support", lambda: None)  # a CPU without native bf16: fp32 everywhere
    assert B.AUTO_ORDER[0] == "onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say: these are auto's picks, not fallbacks
        assert B.resolve("auto") == B.Choice("onnx", "fp32", auto=True)
        assert B.resolve("auto", device="cuda:0") == B.Choice("torch", "fp32")
        assert B.resolve("auto", device="mps") == B.Choice("torch", "fp32")
        assert B.resolve("onnx") == B.Choice("onnx", "fp32")  # asked for by name: not auto's to undo


@pytest.mark.parametrize("installed", [("torch", "onnx", "openvino"), ("torch", "onnx"), ("torch",)])
def test_auto_precision_is_bf16_only_where_measured_and_native(monkeypatch, installed):
    """On a CPU with native bf16, `auto` runs OpenVINO in bf16 (its F1 measured within 0.002 of fp32); torch and
    ONNX Runtime stay fp32, asked for or picked; without native bf16, or on a GPU, everything is fp32."""
    monkeypatch.setattr(B, "available", lambda backend: backend in installed)
    monkeypatch.setattr(B, "cpu_bf16_support", lambda: "avx512_bf16")
    assert B.AUTO_BF16 == ("openvino",)
    first = next(b for b in ("onnx", "torch") if b in installed)
    with warnings.catch_warnings():
        warnings.simplefilter("error", B.BackendNote)  # picks, not fallbacks: nothing to say ...
        if "onnx" not in installed:  # ... except the one note that ONNX Runtime would be faster than torch
            warnings.simplefilter("ignore", B.BackendNote)
        if "openvino" in installed:
            assert B.resolve("auto") == B.Choice("openvino", "bf16", auto=True)
            assert B.resolve("openvino") == B.Choice("openvino", "bf16")
            assert B.resolve("openvino", "fp32") == B.Choice("openvino", "fp32")
        else:
            assert B.resolve("auto") == B.Choice(first, "fp32", auto=first != "torch")
        assert B.resolve("auto", "fp32") == B.Choice(first, "fp32", auto=first != "torch")  # fp32 asked: no OpenVINO
        assert B.resolve("torch") == B.Choice("torch", "fp32")
        assert B.resolve("auto", device="cuda:0") == B.Choice("torch", "fp32")
    monkeypatch.setattr(B, "cpu_bf16_support", lambda: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", B.BackendNote)
        assert B.resolve("auto") == B.Choice(first, "fp32", auto=first != "torch")
        assert B.resolve("auto").precision_auto and not B.resolve("auto", "fp32").precision_auto


def test_auto_precision_falls_back_to_torch_in_fp32(run_dir, monkeypatch):
    """OpenVINO bf16 picked by `auto` that cannot run gives torch fp32 (torch's bf16 is not within the tolerance),
    while a bf16 asked for by name stays bf16 on torch."""
    def refuse(*args, **kwargs):
        raise RuntimeError("no export today")

    monkeypatch.setattr(B, "available", lambda backend: True)
    monkeypatch.setattr(B, "cpu_bf16_support", lambda: "avx512_bf16")
    monkeypatch.setattr(B, "export_onnx", refuse)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", B.BackendNote)
        assert B.backend_of(B.prepare_network(_eager(run_dir), run_dir)) == "torch"
        assert B.backend_of(B.prepare_network(_eager(run_dir), run_dir, precision="bf16")) == "torch-bf16"


def test_auto_env_pins_what_auto_means(monkeypatch):
    monkeypatch.setenv(B.AUTO_ENV, "torch")
    assert B.resolve("auto") == B.Choice("torch", "fp32")
    assert B.resolve("onnx").backend == ("onnx" if B.available("onnx") else "torch")  # a named backend wins
    monkeypatch.setenv(B.AUTO_ENV, "tensorrt")
    with pytest.raises(ValueError, match=f"{B.AUTO_ENV}.*tensorrt.*torch, onnx, openvino"):
        B.resolve("auto")
    monkeypatch.setenv(B.AUTO_ENV, "openvino")
    monkeypatch.setattr(B, "available", lambda backend: backend == "torch")
    with pytest.warns(B.BackendNote, match="'openvino'.*not installed"):
        assert B.resolve("auto") == B.Choice("torch", "fp32")


def test_auto_falls_back_to_torch_when_the_export_fails(run_dir, monkeypatch):
    """A cache that cannot be written (or an exporter error) costs `auto` speed, not the run; a named backend raises."""
    def refuse(*args, **kwargs):
        raise PermissionError("cache folder is read-only")

    monkeypatch.setattr(B, "available", lambda backend: True)
    monkeypatch.setattr(B, "export_onnx", refuse)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        net = B.prepare_network(_eager(run_dir), run_dir, backend="auto")
        B.prepare_network(_eager(run_dir), run_dir, backend="auto")
    notes = [str(w.message) for w in seen if issubclass(w.category, B.BackendNote)]
    assert B.backend_of(net) == "torch"
    assert len(notes) == 1 and "read-only" in notes[0] and "running on torch" in notes[0], notes
    with pytest.raises(PermissionError):
        B.prepare_network(_eager(run_dir), run_dir, backend="onnx")


def test_exported_backends_run_on_cpu_only():
    with pytest.warns(B.BackendNote, match="CPU only"):
        assert B.resolve("onnx", device="cuda:0").backend == "torch"
    with pytest.warns(B.BackendNote, match="AMP"):
        assert B.resolve("torch", "bf16", device="cuda") == B.Choice("torch", "fp32")


def test_unknown_backend_lists_the_valid_ones():
    with pytest.raises(ValueError, match="auto, torch, onnx, openvino"):
        B.resolve("tensorrt")
    with pytest.raises(ValueError, match="auto, fp32, bf16"):
        B.resolve("torch", "fp16")


@pytest.mark.skipif(not B.available("onnx"), reason="onnxruntime not installed")
def test_corrupt_cache_is_rebuilt(run_dir, fresh_cache):
    """Each kind of damage is noted and exported again (one test: an export costs seconds, the suite has a limit)."""
    model = _eager(run_dir)
    path = B.export_onnx(model, run_dir)
    assert path.parent.parent == B.cache_root() and run_dir not in path.parents  # never into the bundle
    for damage in ("truncate", "flip", "checksum"):
        good = path.read_bytes()
        if damage == "truncate":
            path.write_bytes(good[: len(good) // 2])
        elif damage == "flip":
            path.write_bytes(good[:1000] + bytes([good[1000] ^ 0xFF]) + good[1001:])
        else:
            (path.parent / B.CHECKSUM_FILE).write_text("0" * 64)
        B._noted.clear()
        with pytest.warns(B.BackendNote, match="exporting it again"):
            again = B.export_onnx(model, run_dir)
        assert again == path and B.file_sha256(path) == (path.parent / B.CHECKSUM_FILE).read_text().split()[0], damage
    net = B.prepare_network(model, run_dir, backend="onnx", threads=1)
    image = _image((64, 64))
    assert np.abs(predict(net, image, **TILING) - predict(_eager(run_dir), image, **TILING)).max() <= 1e-4


@pytest.mark.skipif(not B.available("openvino"), reason="openvino not installed")
def test_openvino_keeps_its_compiled_network_in_the_cache_and_recompiles_a_damaged_one(run_dir, fresh_cache):
    model, image = _eager(run_dir), _image((64, 64))
    want = predict(model, image, **TILING)
    net = B.prepare_network(model, run_dir, backend="openvino", precision="fp32", threads=1)
    blobs = list((B.cache_dir(model, run_dir) / B.OPENVINO_CACHE).glob("*.blob"))
    assert len(blobs) == 1 and fresh_cache in blobs[0].parents and run_dir not in blobs[0].parents
    assert np.abs(predict(net, image, **TILING) - want).max() <= B.FP32_PROB_TOLERANCE
    good = blobs[0].read_bytes()
    blobs[0].write_bytes(good[: len(good) // 2])
    again = B.prepare_network(model, run_dir, backend="openvino", precision="fp32", threads=1)
    assert np.abs(predict(again, image, **TILING) - want).max() <= B.FP32_PROB_TOLERANCE
    assert blobs[0].stat().st_size == len(good)  # compiled and written again


@pytest.mark.skipif(not B.available("onnx"), reason="onnxruntime not installed")
def test_cache_is_reused_and_keyed_by_weights(run_dir, tmp_path):
    model = _eager(run_dir)
    path = B.export_onnx(model, run_dir)
    stamp = path.stat().st_mtime_ns
    assert B.export_onnx(model, run_dir).stat().st_mtime_ns == stamp  # not exported again
    cfg = SegmenterConfig(decoder_channels=(16, 16, 16, 16, 16), tile_size=128, overlap=32)
    torch.manual_seed(1)
    other = save_segmenter(tmp_path / "other", create_segmenter(cfg), cfg, params=None)
    assert B.cache_key(model, other) != B.cache_key(model, run_dir)


def test_thread_plan(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert B.network_threads(0, cores=2) == 2
    assert B.network_threads(2, cores=2) == 1  # never below one
    assert B.network_threads(4, cores=64) == 60
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert B.network_threads(4, cores=64) == 3  # the user's choice wins


def _reference_probabilities(model, image, *, tile_size, overlap, batch_size):
    """The tiled blend written plainly (whole-image accumulators, copies everywhere): what predict must equal."""
    h, w = image.shape[:2]
    hp, wp = 32 * math.ceil(h / 32), 32 * math.ceil(w / 32)
    padded = np.pad(image, ((0, hp - h), (0, wp - w), (0, 0)), mode="reflect")
    (th, ys), (tw, xs) = tile_grid(hp, tile_size, overlap), tile_grid(wp, tile_size, overlap)
    tiles = [(y, x) for y in ys for x in xs]
    acc, wsum = np.zeros((3, hp, wp), np.float32), np.zeros((hp, wp), np.float32)
    for i in range(0, len(tiles), batch_size):
        batch = tiles[i : i + batch_size]
        arr = np.stack([padded[y : y + th, x : x + tw].transpose(2, 0, 1) for y, x in batch])
        probs = _run_batch(model, arr, torch.device("cpu"), False, [(0, False)], False)
        for (y, x), p in zip(batch, probs):
            win = np.outer(_ramp_1d(th, overlap, y > 0, y + th < hp), _ramp_1d(tw, overlap, x > 0, x + tw < wp))
            acc[:, y : y + th, x : x + tw] = acc[:, y : y + th, x : x + tw] + p * win
            wsum[y : y + th, x : x + tw] = wsum[y : y + th, x : x + tw] + win
    return (acc / wsum[None])[:, :h, :w]


@pytest.mark.parametrize("shape", [(64, 64), (300, 517), (97, 400)])
def test_in_place_blending_gives_the_plain_blend_bit_for_bit(run_dir, shape):
    model = _eager(run_dir)
    image = _image(shape, seed=2)
    want = _reference_probabilities(model, image, **TILING)
    assert np.array_equal(predict(model, image, **TILING), want)


def test_labels_identical_on_synthetic_images(tiny_bundle, synth_data):
    """Every backend in fp32 gives the plain eager path's labels on the test split (modality forced)."""
    from triageseg import bundle
    from triageseg.datasets.layout import Dataset
    from triageseg.pipeline import Pipeline
    from triageseg.postprocess.watershed import watershed
    from triageseg.segmenters.model import load_segmenter

    ds = Dataset(synth_data)
    samples = ds.select(split="test")
    assert samples
    pipes = {b: Pipeline(tiny_bundle, device="cpu", backend=b, precision="fp32") for b in FP32}
    for sample in samples:
        image, _ = ds.load(sample)
        model, cfg, params = load_segmenter(bundle.segmenter_dir(tiny_bundle, sample.modality))
        plain = watershed(predict(model, image, tile_size=cfg.tile_size, overlap=cfg.overlap), params)
        for name, pipe in pipes.items():
            assert np.array_equal(pipe.segment(image, modality=sample.modality).labels, plain), (name, sample.id)


def _bench():
    from conftest import load_benchmark

    return load_benchmark("bench_inference")


def test_benchmark_counts_the_tiling_overhead():
    """bench_inference.py loads, and counts the pixels the network computes as predict tiles them."""
    bench = _bench()
    assert bench.tiling_overhead(512, 512, 64) == 1.0  # one tile
    assert bench.tiling_overhead(2048, 512, 64) == (5 * 480) ** 2 / 2048**2  # five tiles of 480, not of 512
    image, labels = bench.synthetic_image(300, seed=0)
    assert image.shape == (300, 300, 3) and image.dtype == np.uint8 and labels.shape == (300, 300)
    left, right = set(np.unique(labels[:256, :256])), set(np.unique(labels[:256, 256:]))
    assert len(left) > 1 and left & right == {0}  # ids unique across the 256 px samples


def test_benchmark_batch_rounds_time_both_decode_modes(tiny_bundle, synth_data, tmp_path):
    from types import SimpleNamespace

    from triageseg.pipeline import Pipeline
    from triageseg.pipeline.local import batch

    bench = _bench()
    tool = SimpleNamespace(name="torch", pipe=Pipeline(tiny_bundle, device="cpu", backend="torch"))
    paths = sorted((synth_data / "images").iterdir())[:2]
    out = bench.batch_rounds([tool], paths, tmp_path, repeats=1)
    assert set(out) == {"torch in line", "torch thread"} and all(v > 0 for v in out.values())
    assert batch.DECODE_THREAD is True  # put back
    for mode in ("in-line", "thread"):
        assert len(list((tmp_path / f"batch-torch-{mode}").glob("*.tif"))) == 2


FAKE_PEER = """
import json, sys
print(json.dumps({"ready": True, "versions": {"stardist": "0.0"}}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    if req["image"].endswith("bad.tif"):
        print(json.dumps({"error": "OSError: unreadable"}), flush=True)
        continue
    assert req["labels"].endswith(".labels.npy"), req
    print(json.dumps({"read": 0.1, "route": 0.0, "net": 0.2, "tiling": 0.0, "watershed": 0.3, "e2e": 0.6,
                      "objects": 4}), flush=True)
"""


def test_benchmark_peer_in_another_python(tmp_path):
    """bench_inference.py's StarDist peer: a subprocess speaking JSON lines; a peer that cannot start is skipped."""
    import sys

    bench = _bench()
    fake = tmp_path / "fake_peer.py"
    fake.write_text(FAKE_PEER)
    tool = bench.PeerStarDistTool(sys.executable, 2, script=fake)
    assert tool.skip is None and tool.versions == {"stardist": "0.0"}
    stages, labels = tool.run(tmp_path / "img_512_0.tif", np.zeros((4, 4), np.int32))
    assert stages == {"read": 0.1, "route": 0.0, "net": 0.2, "tiling": 0.0, "watershed": 0.3, "e2e": 0.6}
    assert labels is None
    with pytest.raises(RuntimeError, match="stardist peer: OSError: unreadable"):
        tool.run(tmp_path / "bad.tif", None)
    tool.close()
    assert tool.proc.returncode == 0
    broken = tmp_path / "broken_peer.py"
    broken.write_text("import sys; sys.exit(3)\n")
    tool = bench.PeerStarDistTool(sys.executable, 2, script=broken)
    assert tool.skip == "peer did not start: peer exited with code 3"
    # the real peer script in a Python without StarDist: says so instead of hanging
    tool = bench.PeerStarDistTool(sys.executable, 1)
    assert tool.skip is not None and "peer did not start" in tool.skip


def test_segment_cli_backend_option(tiny_bundle, synth_data, tmp_path, monkeypatch):
    """`segment --backend`: an exported backend writes the torch labels; a missing library gives one note."""
    from click.testing import CliRunner

    from triageseg.cli.main import cli
    from triageseg.datasets.io import read_labels

    images = sorted((synth_data / "images").iterdir())[:3]
    runner = CliRunner()
    base = ["segment", *map(str, images), "--bundle", str(tiny_bundle), "--quiet"]
    res = runner.invoke(cli, [*base, "--out", str(tmp_path / "torch"), "--backend", "torch"])
    assert res.exit_code == 0, res.output
    if B.available("onnx"):
        res = runner.invoke(cli, [*base, "--out", str(tmp_path / "onnx"), "--backend", "onnx"])
        assert res.exit_code == 0, res.output
        for image in images:
            assert np.array_equal(read_labels(tmp_path / "onnx" / f"{image.stem}.tif"),
                                  read_labels(tmp_path / "torch" / f"{image.stem}.tif"))
    monkeypatch.setattr(B, "available", lambda backend: backend == "torch")
    res = runner.invoke(cli, [*base, "--out", str(tmp_path / "fallback"), "--backend", "openvino"])
    assert res.exit_code == 0, res.output
    assert res.output.count("note: backend 'openvino' needs the Python package 'openvino'") == 1
    res = runner.invoke(cli, [*base, "--out", str(tmp_path / "bad"), "--backend", "tensorrt"])
    assert res.exit_code == 2 and "tensorrt" in res.output


def test_worker_thread_limit_does_not_import_torch():
    """A watershed worker calls limit_worker_threads; it must not pay for importing torch."""
    import subprocess
    import sys

    code = ("import sys; from triageseg.segmenters.backends import limit_worker_threads; limit_worker_threads(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.skipif(not B.available("onnx"), reason="onnxruntime not installed")
def test_auto_runs_onnx_runtime_on_a_real_bundle(tiny_bundle, synth_data, monkeypatch):
    """The default backend on a CPU with onnxruntime and without native bf16: the specialists and the router
    run exported, into the cache (never the bundle), once; the answers are torch's (labels identical, routing
    within 1e-4); a damaged cache is exported again."""
    monkeypatch.setattr(B, "cpu_bf16_support", lambda: None)
    from triageseg import bundle
    from triageseg.datasets.layout import Dataset
    from triageseg.pipeline import Pipeline
    from triageseg.pipeline.local.router_backend import KIND

    before = sorted(p.relative_to(tiny_bundle) for p in tiny_bundle.rglob("*"))
    ds = Dataset(synth_data)
    samples = ds.select(split="test")[:3]
    auto, eager = Pipeline(tiny_bundle, device="cpu"), Pipeline(tiny_bundle, device="cpu", backend="torch")
    assert auto.choice == B.Choice("onnx", "fp32", auto=True)
    used, want = set(), {}
    for sample in samples:
        image, _ = ds.load(sample)
        got, want[sample.id] = auto.segment(image), eager.segment(image)
        w = want[sample.id]
        assert (got.modality, got.used_model, got.decision) == (w.modality, w.used_model, w.decision)
        assert abs(got.confidence - w.confidence) <= B.FP32_PROB_TOLERANCE
        assert np.array_equal(got.labels, w.labels), sample.id
        used.add(got.used_model)
    assert {B.backend_of(auto.segmenter(name)[0]) for name in used} == {"onnx"}
    router = auto._load_router()[0]
    assert getattr(router, "backend_name", "torch") == "onnx"
    # keyed by the run folders' files (the network itself is not needed: it may be served without one)
    exports = [B.cache_dir(None, bundle.segmenter_dir(tiny_bundle, name)) / B.ONNX_FILE for name in sorted(used)]
    exports.append(B.cache_dir(None, bundle.router_dir(tiny_bundle), KIND) / B.ONNX_FILE)
    assert all(p.is_file() and p.parent.parent == B.cache_root() for p in exports)
    assert sorted(p.relative_to(tiny_bundle) for p in tiny_bundle.rglob("*")) == before  # nothing into the bundle
    stamps = [p.stat().st_mtime_ns for p in exports]
    image, _ = ds.load(samples[0])
    Pipeline(tiny_bundle, device="cpu").segment(image)
    assert [p.stat().st_mtime_ns for p in exports] == stamps  # reused, not exported again

    for path in exports:
        path.write_bytes(path.read_bytes()[:100])  # truncated, as by a full disk or a killed copy
    with pytest.warns(B.BackendNote, match="exporting it again"):
        got = Pipeline(tiny_bundle, device="cpu").segment(image)
    assert np.array_equal(got.labels, want[samples[0].id].labels)
    for path in exports:
        assert B.file_sha256(path) == (path.parent / B.CHECKSUM_FILE).read_text().split()[0]



def test_a_model_in_eval_mode_is_not_walked_on_every_image(monkeypatch):
    """eval() / train() / to() visit every module (~10-15 ms each for an efficientnet-b3 behind an exported
    backend's wrapper): a model already in eval mode on its device is left as it is."""
    import torch

    net = create_segmenter(SegmenterConfig(encoder="resnet18", in_channels=3)).eval()
    walks = []
    train, to = type(net).train, torch.nn.Module.to
    monkeypatch.setattr(type(net), "train", lambda self, mode=True: (walks.append(mode), train(self, mode))[1])
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: (walks.append("to"), to(self, *a, **k))[1])
    image = np.random.default_rng(0).random((100, 70, 3)).astype(np.float32)
    assert predict(net, image, tile_size=64, overlap=8, device="cpu").shape == (3, 100, 70)
    assert walks == []
    net.train()
    walks.clear()
    predict(net, image, tile_size=64, overlap=8, device="cpu")
    assert walks == [False, True] and net.training  # put back as it was


def test_wrappers_take_the_eager_networks_mode():
    import torch

    eager = torch.nn.Conv2d(3, 3, 1).eval()
    assert not B._ExportedNet(eager, lambda a: a, "fake").training
    assert not B._Bf16Net(eager).training
    assert B._ExportedNet(eager.train(), lambda a: a, "fake").training


def test_benchmark_runs_at_the_size_decisions_scale(tmp_path):
    """bench_inference times what `segment` does: the image resized by the size decision and decoded at that
    scale (the first version ran every image at the segmenter's own scale, 1)."""
    import tifffile
    import torch

    from triageseg import bundle as B
    from triageseg.router.model import RouterConfig, create_router, save_router
    from triageseg.segmenters.model import create_segmenter, save_segmenter

    torch.manual_seed(0)
    root = tmp_path / "bundle"
    rcfg = RouterConfig(class_names=("fluorescence",), image_size=32)
    save_router(B.router_dir(root), create_router(rcfg), rcfg)
    cfg = SegmenterConfig(decoder_channels=(16, 16, 16, 16, 16), tile_size=128, overlap=32,
                          modality="fluorescence", diameter=20.0)
    save_segmenter(B.segmenter_dir(root, "fluorescence"), create_segmenter(cfg), cfg, params=None)
    B.update_manifest(root, modalities=["fluorescence"])
    bench = _bench()
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, bench.synthetic_image(160, seed=1)[0])
    tool = bench.TriagesegTool("torch", root, "cpu")
    tool.pipe.diameter = 10.0  # given: scale 20 / 10 = 2
    seen = {}
    probabilities, params = tool.pipe.probabilities, tool.pipe.params
    tool.pipe.probabilities = lambda image, model, scale=None: (seen.setdefault("probs", scale),
                                                                probabilities(image, model, scale))[1]
    tool.pipe.params = lambda model, scale=None: (seen.setdefault("params", scale), params(model, scale))[1]
    stages, labels = tool.run(path)
    assert seen == {"probs": 2.0, "params": 2.0} and labels.shape == (160, 160)


@pytest.mark.skipif(not (B.available("openvino") and B.cpu_bf16_support()), reason="needs OpenVINO and native bf16")
def test_auto_runs_openvino_bf16_on_a_native_bf16_cpu(tiny_bundle, synth_data):
    """The default on this CPU: the specialists in OpenVINO bf16 (probabilities within bf16's tolerance of
    torch fp32), the router in fp32 (its routing within the fp32 tolerance)."""
    from triageseg.datasets.layout import Dataset
    from triageseg.pipeline import Pipeline

    ds = Dataset(synth_data)
    image, _ = ds.load(ds.select(split="test")[0])
    auto, eager = Pipeline(tiny_bundle, device="cpu"), Pipeline(tiny_bundle, device="cpu", backend="torch")
    assert auto.choice == B.Choice("openvino", "bf16", auto=True)
    d, e = auto.decide(image), eager.decide(image)
    assert d.used_model == e.used_model and abs(d.confidence - e.confidence) <= B.FP32_PROB_TOLERANCE
    got, want = auto.probabilities(image, d.used_model, d.scale), eager.probabilities(image, e.used_model, e.scale)
    assert B.backend_of(auto.segmenter(d.used_model)[0]) == "openvino"
    err = np.abs(got - want).max()
    assert 0 < err <= B.BF16_PROB_TOLERANCE
