"""`segment --address/--ray`: the routed pipeline on a real Ray cluster of two nodes on 127.0.0.1.

A head with 2 CPUs and a second node with 1 CPU, each with its own temp dir and a small
object store, run the Ray Data passes on 24 synthetic images of three modalities with
a small untrained bundle (tiny encoders; a confidence threshold that sends images to
all three specialists and the generalist). The label files must equal, pixel for pixel,
those of the local `segment` on the same bundle with the same torch thread count as the
actors (one), and routing.csv must equal the local one but for the seconds column.
Every Ray process the module starts is stopped by its process group; the module fails
if a raylet it started is left running.

What "on 127.0.0.1" can mean with Ray 2.60: the nodes are started with ``--node-ip-address
127.0.0.1`` and the driver connects to ``127.0.0.1:PORT``, but Ray replaces a loopback node
address by the machine's own (``ray._private.services.resolve_ip_for_localhost``; only with
multi-node clusters switched off does it keep 127.0.0.1), and its GCS and raylet gRPC servers
listen on all interfaces. Ray has no setting that binds them to loopback, so for the life of
this module (free ports, chosen per run) the two nodes can be reached from the network.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from triageseg import bundle as B
from triageseg.datasets.errors import DataError
from triageseg.datasets.io import read_labels
from triageseg.pipeline.local.batch import OutputConflict

MODS = ("fluorescence", "brightfield", "he")
N_IMAGES = 24
# Environment of every Ray process here: no token file in ~/.ray, no usage stats, and
# fast failure detection so a killed node is declared dead in seconds.
RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "HF_HUB_OFFLINE": "1",
    "OMP_WAIT_POLICY": "PASSIVE",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


# --------------------------------------------------------------------------- processes


def _load_local_cluster():
    """benchmarks/local_cluster.py: the process helpers the benchmarks' clusters use too (stdlib only)."""
    from conftest import load_benchmark

    return load_benchmark("local_cluster")


_LOCAL_CLUSTER = _load_local_cluster()
_free_port, _cmdline = _LOCAL_CLUSTER.free_port, _LOCAL_CLUSTER.cmdline
_procs = _LOCAL_CLUSTER.processes  # (pid, parent pid, process group) of every process


# Temp dirs of the nodes this module starts: every process of ours names one on its command line.
_OUR_TEMP_DIRS: list[str] = []


def _ours() -> list[int]:
    """Processes of the Ray nodes this module started (other Rays on the machine are not ours).

    Daemons name the node's temp dir on their command line; workers rename themselves
    (``ray::IDLE``) but inherit ``TMPDIR`` set to it.
    """
    marks = [t.encode() for t in _OUR_TEMP_DIRS]
    found = []
    for pid, _, _ in _procs():
        try:
            text = Path(f"/proc/{pid}/cmdline").read_bytes() + Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if pid != os.getpid() and any(m in text for m in marks):
            found.append(pid)
    return found


def _kill_group(pgid: int) -> None:
    """SIGTERM then SIGKILL every process of a process group this module started."""
    for sig, wait in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 10.0)):  # a test's own nodes: no long goodbye
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def _start_node(temp_dir: str, *args: str) -> int:
    """`ray start` in its own session; returns that session's process group (all the node's daemons)."""
    ports = []
    for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
                 "--metrics-export-port"):
        ports += [flag, str(_free_port())]  # two nodes on one machine: no fixed default ports
    proc = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", *args, "--temp-dir", temp_dir,
         "--disable-usage-stats", *ports],
        env={**os.environ, **RAY_ENV, "TMPDIR": temp_dir}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    output = proc.communicate(timeout=180)[0].decode()
    assert proc.returncode == 0, output
    return proc.pid


@pytest.fixture(scope="module", autouse=True)
def no_ray_left_behind():
    """Fails the module if any process of the Ray nodes it started is still running at the end."""
    yield
    deadline = time.monotonic() + 20
    while (left := _ours()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"Ray processes left behind: {[(pid, _cmdline(pid)[:80]) for pid in left]}"


@contextlib.contextmanager
def _two_nodes(prefixes: tuple[str, str] = ("kh", "kn")):
    """A head (2 CPUs, 200 MB object store) and a second node (1 CPU, 150 MB) on 127.0.0.1, stopped on exit."""
    port = _free_port()
    temps = [tempfile.mkdtemp(prefix=p, dir="/tmp") for p in prefixes]  # short: socket paths
    _OUR_TEMP_DIRS.extend(temps)
    groups = []
    try:
        groups.append(_start_node(temps[0], "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
                                  "--num-cpus", "2", "--object-store-memory", str(200 << 20),
                                  "--include-dashboard=false"))
        groups.append(_start_node(temps[1], "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1",
                                  "--num-cpus", "1", "--object-store-memory", str(150 << 20)))
        yield {"address": f"127.0.0.1:{port}", "head": groups[0], "node": groups[1]}
    finally:
        for pgid in reversed(groups):
            _kill_group(pgid)
        for temp in temps:
            shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    """The module's cluster: :func:`_two_nodes` (tests that kill a node start their own)."""
    with _two_nodes(("rh", "rn")) as nodes:
        yield nodes


# --------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def dist_bundle(tmp_path_factory):
    """Untrained tiny models (timm test_resnet encoders, a 32 px ViT router) in a bundle.

    With the confidence threshold at 0.4 the untrained router sends the 24 images to
    the generalist and to all three specialists (6/8/6/4), so every kind of pool runs.
    """
    import torch

    from triageseg.router.model import RouterConfig, create_router, save_router
    from triageseg.segmenters.model import SegmenterConfig, create_segmenter, save_segmenter

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("dist_bundle") / "bundle"
    rcfg = RouterConfig(class_names=MODS, image_size=32)
    save_router(B.router_dir(root), create_router(rcfg), rcfg)
    for name in (*MODS, B.GENERALIST):
        cfg = SegmenterConfig(encoder="tu-test_resnet", decoder_channels=(16, 16, 16, 16, 16), tile_size=64,
                              overlap=16, modality=None if name == B.GENERALIST else name)
        save_segmenter(B.segmenter_dir(root, name), create_segmenter(cfg), cfg, params=None)
    B.update_manifest(root, modalities=list(MODS), fallback={"confidence_threshold": 0.4})
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """24 synthetic 96x96 images (14 fluorescence, 5 brightfield, 5 he) plus a corrupt PNG, in one folder."""
    from triageseg.datasets.synth import make_dataset

    data = make_dataset(tmp_path_factory.mktemp("dist_data") / "data", n=N_IMAGES, size=96, seed=0,
                        modalities=MODS, weights=(0.6, 0.2, 0.2))
    folder = data / "images"
    (folder / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    return folder


def _tile_scan(path: Path, *, seed: int, columns: int = 3) -> Path:
    """A 320 x (160 x columns) tiled TIFF of synthetic fluorescence tiles (a small slide for the block path)."""
    import tifffile

    from triageseg.datasets.synth import synth_sample

    rng = np.random.default_rng(seed)
    tiles = [synth_sample("fluorescence", size=160, rng=rng)[0] for _ in range(2 * columns)]
    image = np.concatenate([np.concatenate(tiles[:columns], axis=1), np.concatenate(tiles[columns:], axis=1)], axis=0)
    tifffile.imwrite(path, image, tile=(128, 128), compression="zlib",
                     photometric="rgb" if image.ndim == 3 else "minisblack")
    return path


def _local_block_path(pipe, path: Path, out: Path, options):
    """The local block path at the actors' thread count (one), the reference the Ray runs must equal."""
    import torch

    from triageseg.pipeline.blockwise.large import segment_large_file

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return segment_large_file(pipe, path, out, "slide", options=options)
    finally:
        torch.set_num_threads(threads)


def _local_segment(bundle, inputs, out, *extra):
    """The local `segment` at one torch thread, the thread count of a 1-CPU actor."""
    import torch

    from triageseg.cli.main import cli

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return CliRunner().invoke(cli, ["segment", *map(str, inputs), "--bundle", str(bundle), "--out", str(out),
                                        "--on-error", "skip", "--quiet", *extra])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def local_out(dist_bundle, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_local") / "out"
    result = _local_segment(dist_bundle, [images], out)
    assert result.exit_code == 1 and "1 failed" in result.output, result.output
    return out


def _rows(out) -> list[dict]:
    with open(Path(out) / "routing.csv", newline="") as fh:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(fh)]


def _assert_same_outputs(out, reference, n=N_IMAGES) -> None:
    labels = sorted(p.name for p in Path(reference).glob("*.tif"))
    assert len(labels) == n
    assert sorted(p.name for p in Path(out).glob("*.tif")) == labels
    for name in labels:
        np.testing.assert_array_equal(read_labels(Path(out) / name), read_labels(Path(reference) / name), err_msg=name)
    assert _rows(out) == _rows(reference)
    assert not list(Path(out).rglob(".*part*")), "temporary files left behind"


def _cli(*args, timeout=420):
    """`python -m triageseg ...` in a child process, as a user runs it (exit code, stdout+stderr)."""
    env = {**os.environ, **RAY_ENV}
    return subprocess.run([sys.executable, "-m", "triageseg", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)


# --------------------------------------------------------------------------- tests


def test_cluster_run_equals_local_then_resumes(cluster, dist_bundle, images, local_out, tmp_path):
    out = tmp_path / "out"
    args = ["segment", images, "--bundle", dist_bundle, "--out", out, "--address", cluster["address"],
            "--actors", "1", "--on-error", "skip", "--quiet"]
    run = _cli(*args)
    assert run.returncode == 1, run.stderr[-3000:]  # the corrupt file failed, the others did not
    assert "ray: 2 node(s), 3 CPUs, 0 GPUs at 127.0.0.1:" in run.stderr
    assert "runs its 2 nodes on this machine" in run.stderr  # a local --out, tolerated on one machine
    assert "segmented 24 image(s), skipped 0 already done, 1 failed" in run.stdout
    assert "images/s" in run.stdout
    used = collections.Counter(r["used_model"] for r in _rows(local_out))  # the local run's routing
    assert "models used: " + ", ".join(f"{m}: {used[m]}" for m in sorted(used)) in run.stdout
    assert "failed: " in run.stderr and "zz_broken.png" in run.stderr and "Traceback" not in run.stderr
    # one pass, one actor pool holding every model: actor start paid once, not once per model
    assert "segment: 25 image(s), 1 actor(s)" in run.stderr and "route:" not in run.stderr
    assert "segment with" not in run.stderr
    _assert_same_outputs(out, local_out)
    config = json.loads((out / "segment_config.json").read_text())
    assert config["address"] == cluster["address"] and config["actors"] == "1"

    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tif")}
    again = _cli(*args)
    assert again.returncode == 1
    assert "segmented 0 image(s), skipped 24 already done, 1 failed" in again.stdout, again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tif")} == before  # nothing rewritten


def test_write_tasks_beside_the_actors_equal_the_local_run(cluster, dist_bundle, images, local_out, tmp_path,
                                                            monkeypatch):
    """``decode="tasks"`` (what GPU actors use): read tasks, the actor pool, write tasks; the same files as locally."""
    import ray

    from triageseg.pipeline import Pipeline
    from triageseg.pipeline.cluster import ray_stages
    from triageseg.pipeline.cluster.distributed import ClusterOptions, segment_files_ray

    for key, value in RAY_ENV.items():
        monkeypatch.setenv(key, value)
    files = sorted(p for p in Path(images).iterdir() if p.name != "zz_broken.png")
    ray.init(address=cluster["address"], logging_level="WARNING", log_to_driver=False)
    try:
        pipe = Pipeline.from_bundle(dist_bundle, device="cpu")
        report = segment_files_ray(pipe, files, tmp_path / "out", on_error="skip", log=lambda _m: None,
                                   cluster_options=ClusterOptions(actors="1", decode="tasks", progress=False))
    finally:
        ray.shutdown()
    assert not report.failures and report.stage_seconds["write"] > 0
    _assert_same_outputs(tmp_path / "out", local_out)
    assert ray_stages.StageOptions(out="x").decode_in_actor is False


def test_actor_cpus_follow_the_layout():
    from triageseg.pipeline.cluster.distributed import ClusterOptions, actor_cpus, check_cluster

    nodes = {"CPU": 10.0, "GPU": 0.0, "node_CPU": 4.0}
    assert ClusterOptions().decode_in_actor() and actor_cpus(ClusterOptions(), nodes) == 4.0  # a node's CPUs
    assert actor_cpus(ClusterOptions(cpus_per_actor=3), nodes) == 3.0  # asked for: wins
    assert actor_cpus(ClusterOptions(decode="tasks"), nodes) == 1.0  # beside write tasks
    gpu = ClusterOptions(gpus_per_actor=0.5)
    assert not gpu.decode_in_actor() and actor_cpus(gpu, {**nodes, "GPU": 2.0}) == 1.0
    assert ClusterOptions(decode="actor", gpus_per_actor=1).decode_in_actor()
    assert actor_cpus(ClusterOptions(), {"CPU": 2.0, "GPU": 0.0}) == 2.0  # no node figure: the cluster's
    with pytest.raises(ValueError, match="decode must be auto, actor or tasks"):
        check_cluster(ClusterOptions(decode="gpu"), nodes)


# Slow: the default suite must stay under 10 minutes on 2 cores (a shipped bundle, a forced modality
# and a URI output on the cluster: 17 s).
@pytest.mark.slow
def test_shipped_bundle_forced_modality_and_uri_output(cluster, dist_bundle, images, tmp_path, monkeypatch):
    """The API in this process: the bundle through the object store, a forced specialist, a URI --out."""
    import ray

    from triageseg.pipeline import Pipeline
    from triageseg.pipeline.cluster.distributed import ClusterOptions, segment_files_ray

    files = sorted(images.glob("*.png"))
    good = [f for f in files if f.name != "zz_broken.png"][:8]
    reference = tmp_path / "local"
    assert _local_segment(dist_bundle, good, reference, "--modality", "he").exit_code == 0
    for key, value in RAY_ENV.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "uri_out"
    messages: list[str] = []
    pipe = Pipeline.from_bundle(dist_bundle, device="cpu")
    ray.init(address=cluster["address"], logging_level="WARNING", log_to_driver=False)
    try:
        report = segment_files_ray(pipe, good, f"local://{out}", modality="he", log=messages.append,
                                   cluster_options=ClusterOptions(actors="1:2", ship_bundle=True, progress=False))
        with pytest.raises(OutputConflict, match="modality: 'he' then, 'fluorescence' now"):
            segment_files_ray(pipe, good, f"local://{out}", modality="fluorescence",
                              cluster_options=ClusterOptions(progress=False))  # refused before any pass
        with pytest.raises(DataError, match="zz_broken.png"):
            segment_files_ray(pipe, [*good[:2], images / "zz_broken.png"], tmp_path / "fail_out", modality="he",
                              log=messages.append, cluster_options=ClusterOptions(actors="1", progress=False))
    finally:
        ray.shutdown()
    assert any(m.startswith("bundle: shipping") for m in messages)
    started = [m for m in messages if m.startswith("segment") and "done in" not in m]
    assert started == ["segment: 8 image(s), 1-2 actor(s)", "segment: 3 image(s), 1 actor(s)"]
    assert report.per_model() == {"he": 8} and not report.failures and len(report.written) == 8
    assert all(str(w).startswith("local://") for w in report.written)
    assert report.stage_seconds["load"] > 0 and report.stage_seconds["route"] == 0
    assert all(report.stage_seconds[s] > 0 for s in ("read", "segment", "write"))
    _assert_same_outputs(out, reference, n=8)
    assert all(r["decision"] == "forced" and r["confidence"] == "" for r in _rows(out))


def test_block_path_as_ray_tasks_equals_the_local_block_path(cluster, dist_bundle, tmp_path, monkeypatch):
    """Scan + route (a task), probability bands (an actor pool), block decodes (CPU tasks) == the local block path."""
    import ray

    from triageseg.pipeline import Pipeline
    from triageseg.pipeline.blockwise import large
    from triageseg.pipeline.blockwise.large import BlockOptions, segment_large_file
    from triageseg.pipeline.cluster.distributed import ClusterOptions, segment_files_ray
    from triageseg.pipeline.cluster.ray_blocks import segment_large_file_ray

    messages: list[str] = []
    path = _tile_scan(tmp_path / "slide.tif", seed=3)
    options = BlockOptions(block_size=160, margin=32, threshold_mp=0)
    # on ONNX Runtime: the band actors serve the networks from the export cache, as users' `auto` does on CPUs
    pipe = Pipeline.from_bundle(dist_bundle, device="cpu", backend="onnx")
    local = _local_block_path(pipe, path, tmp_path / "local", options)

    def nothing_here(*_args, **_kwargs):
        raise AssertionError("the driver computed what the cluster should have")

    for key, value in RAY_ENV.items():
        monkeypatch.setenv(key, value)
    ray.init(address=cluster["address"], logging_level="WARNING", log_to_driver=False)
    try:
        monkeypatch.setattr(large, "decode_block", nothing_here)  # the driver only numbers, renders and writes
        monkeypatch.setattr(large, "compute_probabilities", nothing_here)
        row = segment_large_file_ray(pipe, path, tmp_path / "ray", "slide", options=options, actors=2,
                                     band_chunk_rows=1)  # 320 rows: two bands of 256 and 64 rows
        # the driver dies once the cluster has filled the journal: a rerun (here: local) computes nothing again
        from triageseg.pipeline.cluster.ray_slides import SlideRun

        def driver_dies(*_args, **_kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(SlideRun, "_finish", driver_dies)
        with pytest.raises(KeyboardInterrupt):
            segment_large_file_ray(pipe, path, tmp_path / "died", "slide", options=options, actors=1)
        monkeypatch.undo()
        assert (tmp_path / "died" / ".slide.blocks").is_dir() and not (tmp_path / "died" / "slide.tif").exists()
        monkeypatch.setattr(large, "decode_block", nothing_here)
        monkeypatch.setattr(large, "compute_probabilities", nothing_here)
        assert segment_large_file(pipe, path, tmp_path / "died", "slide", options=options) == {
            **local, "file": str(path.resolve())}
        np.testing.assert_array_equal(read_labels(tmp_path / "died" / "slide.tif"),
                                      read_labels(tmp_path / "local" / "slide.tif"))
        for key, value in RAY_ENV.items():
            monkeypatch.setenv(key, value)
        # what `segment --address` runs: the image above the threshold goes the block path as Ray tasks
        report = segment_files_ray(pipe, [path], tmp_path / "run", blocks=options, log=messages.append,
                                   cluster_options=ClusterOptions(actors="1", progress=False))
        # --format ome-zarr on Ray: every image block-wise, the labels as an NGFF pyramid; a rerun skips it
        zarr_options = BlockOptions(block_size=160, margin=32, format="ome-zarr")
        zarr_run = [segment_files_ray(pipe, [path], tmp_path / "zarr", blocks=zarr_options,
                                      cluster_options=ClusterOptions(actors="1", progress=False)) for _ in range(2)]
    finally:
        ray.shutdown()
    from triageseg.datasets.omezarr import OmeZarrImage

    with OmeZarrImage(tmp_path / "zarr" / "slide.ome.zarr", labels="slide") as labels:
        np.testing.assert_array_equal(labels[0:320, 0:480], read_labels(tmp_path / "local" / "slide.tif"))
    assert len(zarr_run[0].written) == 1 and len(zarr_run[1].skipped) == 1 and not zarr_run[1].written
    assert report.per_model() == {local["used_model"]: 1} and not report.failures
    assert any(m.startswith("blocks: ") for m in messages)
    np.testing.assert_array_equal(read_labels(tmp_path / "run" / "slide.tif"), read_labels(tmp_path / "local" / "slide.tif"))
    got = _rows(tmp_path / "run")[0]
    keys = ("file", "output", "modality", "used_model", "decision", "objects", "mode")
    assert {k: got[k] for k in keys} == {k: str(local[k]) for k in keys}
    np.testing.assert_array_equal(read_labels(tmp_path / "ray" / "slide.tif"),
                                  read_labels(tmp_path / "local" / "slide.tif"))
    assert row == local and row["mode"] == "blocks" and row["objects"] > 0
    assert not (tmp_path / "ray" / ".slide.blocks").exists()  # the journal removed once the labels are written


def _zarr_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_label_pyramid_bands_as_ray_tasks_equal_the_local_writer(cluster, tmp_path, monkeypatch):
    """RayLabelTasks: every band of a 1031 x 777 label pyramid (5 levels, odd sides) a Ray task in a worker;
    the zarr is the local writer's byte for byte, each level labels[::2**k, ::2**k]."""
    import ray

    from triageseg.datasets.omezarr import OmeZarrImage, verify_zarr, write_labels_zarr
    from triageseg.pipeline.cluster.ray_blocks import RayLabelTasks

    class RowsSeenBy:
        """Label rows; notes which process read each strip (defined here: pickled by value to the workers)."""

        def __init__(self, labels: np.ndarray, log: Path):
            self.labels, self.log = labels, log

        def __call__(self, y0: int, y1: int) -> np.ndarray:
            with open(self.log, "a") as f:
                f.write(f"{os.getpid()} {y0}\n")
            return self.labels[y0:y1]

    rng = np.random.default_rng(5)
    labels = np.repeat(np.repeat(rng.integers(0, 400, (130, 98), dtype=np.uint32), 8, 0), 8, 1)[:1031, :777]
    kwargs = {"tile": 64, "smallest": 100, "pixel_size": 0.5, "record": {"k": 1}}
    write_labels_zarr(tmp_path / "local" / "s.ome.zarr", labels.shape, labels.dtype, lambda a, b: labels[a:b],
                      **kwargs)
    for key, value in RAY_ENV.items():
        monkeypatch.setenv(key, value)
    ray.init(address=cluster["address"], logging_level="WARNING", log_to_driver=False)
    try:
        write_labels_zarr(tmp_path / "ray" / "s.ome.zarr", labels.shape, labels.dtype,
                          RowsSeenBy(labels, tmp_path / "reads.txt"), tasks=RayLabelTasks(), **kwargs)
    finally:
        ray.shutdown()
    reads = [line.split() for line in (tmp_path / "reads.txt").read_text().splitlines()]
    assert sorted(int(y) for _, y in reads) == list(range(0, 1031, 64))  # every strip of level 0 read once
    assert os.getpid() not in {int(pid) for pid, _ in reads}  # by the band tasks, not here
    local, there = _zarr_tree(tmp_path / "local" / "s.ome.zarr"), _zarr_tree(tmp_path / "ray" / "s.ome.zarr")
    assert len(local) > 100 and local == there
    with OmeZarrImage(tmp_path / "ray" / "s.ome.zarr", labels="s") as image:
        levels = image.levels
    assert levels == [(1031, 777), (516, 389), (258, 195), (129, 98), (65, 49)]
    for k, (h, w) in enumerate(levels):
        with OmeZarrImage(tmp_path / "ray" / "s.ome.zarr", labels="s", level=k) as level:
            np.testing.assert_array_equal(level[0:h, 0:w], labels[:: 2**k, :: 2**k])
            assert level.pixel_size == pytest.approx((0.5 * 2**k, 0.5 * 2**k))
    assert verify_zarr(tmp_path / "ray" / "s.ome.zarr", labels.shape) is None
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == ["s.ome.zarr"]  # the temporary renamed


@pytest.mark.slow  # about 25 s on the loaded 2-core machine
def test_segment_ome_zarr_on_ray_equals_the_local_block_path_at_every_level(cluster, dist_bundle, tmp_path,
                                                                              monkeypatch):
    """--format ome-zarr through segment_files_ray (finish task + band tasks) == the local block path's zarr,
    array for array at every level (a 320 x 1280 slide: two levels)."""
    import ray

    from triageseg.datasets.omezarr import OmeZarrImage
    from triageseg.pipeline import Pipeline
    from triageseg.pipeline.blockwise.large import BlockOptions
    from triageseg.pipeline.cluster.distributed import ClusterOptions, segment_files_ray

    path = _tile_scan(tmp_path / "slide.tif", seed=11, columns=8)
    options = BlockOptions(block_size=160, margin=32, format="ome-zarr")
    pipe = Pipeline.from_bundle(dist_bundle, device="cpu")
    _local_block_path(pipe, path, tmp_path / "local", options)
    for key, value in RAY_ENV.items():
        monkeypatch.setenv(key, value)
    ray.init(address=cluster["address"], logging_level="WARNING", log_to_driver=False)
    try:
        report = segment_files_ray(pipe, [path], tmp_path / "ray", blocks=options,
                                   cluster_options=ClusterOptions(actors="1", progress=False))
    finally:
        ray.shutdown()
    assert len(report.written) == 1 and not report.failures
    zarrs = [tmp_path / where / "slide.ome.zarr" for where in ("local", "ray")]
    trees = [{k: v for k, v in _zarr_tree(z).items() if k.startswith("labels/")} for z in zarrs]
    assert any(k.startswith("labels/slide/s1/") for k in trees[0]) and trees[0] == trees[1]
    for level in (0, 1):
        with OmeZarrImage(zarrs[0], labels="slide", level=level) as a, \
                OmeZarrImage(zarrs[1], labels="slide", level=level) as b:
            assert a.levels == b.levels == [(320, 1280), (160, 640)]
            h, w = a.shape[:2]
            np.testing.assert_array_equal(a[0:h, 0:w], b[0:h, 0:w])
            assert a[0:h, 0:w].max() > 0
    assert sorted(p.name for p in (tmp_path / "ray").iterdir() if p.name.startswith(".")) == []


@pytest.mark.slow  # about 35 s on the loaded 2-core machine
def test_block_journal_on_s3_scratch_resumes_and_equals_the_local_block_path(cluster, dist_bundle, s3_server, s3_bucket,
                                                                             tmp_path, monkeypatch):
    """``--scratch s3://...``: bands write zarr chunks to S3 (moto on 127.0.0.1), decodes read them, blocks go there.

    The driver dies before the finish (the journal is then all in the bucket, none beside the
    labels); the rerun computes no band and no block again, and the labels are the local block path's.
    Both with ``--prob-dtype float16``: the band actors round as the driver's pipeline does, the store is float16.
    """
    import ray

    from triageseg.pipeline import Pipeline
    from triageseg.pipeline.blockwise.large import BlockOptions
    from triageseg.pipeline.cluster.distributed import ClusterOptions, segment_files_ray
    from triageseg.pipeline.cluster.ray_blocks import segment_large_file_ray
    from triageseg.pipeline.cluster.ray_slides import SlideRun

    path = _tile_scan(tmp_path / "slide.tif", seed=7)
    options = BlockOptions(block_size=160, margin=32, threshold_mp=0)
    pipe = Pipeline.from_bundle(dist_bundle, device="cpu", prob_dtype="float16")
    _local_block_path(pipe, path, tmp_path / "local", options)
    scratch, fs = f"{s3_bucket}/scratch", s3_server["fs"]
    messages: list[str] = []
    for key, value in RAY_ENV.items():
        monkeypatch.setenv(key, value)
    # the workers reach the local S3 through the same variables (a cluster's nodes would have theirs)
    ray.init(address=cluster["address"], logging_level="WARNING", log_to_driver=False,
             runtime_env={"env_vars": s3_server["env"]})
    try:
        def driver_dies(*_args, **_kwargs):
            raise KeyboardInterrupt

        with monkeypatch.context() as patch:
            patch.setattr(SlideRun, "_finish", driver_dies)
            with pytest.raises(KeyboardInterrupt):
                segment_large_file_ray(pipe, path, tmp_path / "run", "slide", options=options, actors=1,
                                       band_chunk_rows=1, scratch=scratch)
        fs.invalidate_cache()
        stored = sorted(p.rsplit(".slide.blocks/", 1)[1] for p in fs.find(scratch.removeprefix("s3://")))
        assert stored == ["block_00000.npz", "block_00001.npz", "block_00002.npz", "block_00003.npz",
                          "block_00004.npz", "block_00005.npz", "journal.json", "probs.zarr.json",
                          "probs.zarr/c/0/0/0", "probs.zarr/c/0/1/0", "probs.zarr/zarr.json"], stored
        metadata = json.loads(fs.cat_file(next(p for p in fs.find(scratch.removeprefix("s3://"))
                                               if p.endswith("probs.zarr/zarr.json"))))
        assert metadata["data_type"] == "float16"
        assert not (tmp_path / "run" / ".slide.blocks").exists() and not (tmp_path / "run" / "slide.tif").exists()
        # the rerun (what `segment --address --scratch` runs) finds every band and block in the bucket
        report = segment_files_ray(pipe, [path], tmp_path / "run", blocks=options, log=messages.append,
                                   cluster_options=ClusterOptions(actors="1", progress=False, scratch=scratch))
    finally:
        ray.shutdown()
    assert f"blocks: {path}: 0 of 1 band(s), 0 of 6 block(s) to do" in messages, messages  # 8 chunk rows a band
    assert not report.failures and report.slides.bands == 0 and report.slides.blocks == 0
    np.testing.assert_array_equal(read_labels(tmp_path / "run" / "slide.tif"),
                                  read_labels(tmp_path / "local" / "slide.tif"))
    fs.invalidate_cache()
    assert fs.find(scratch.removeprefix("s3://")) == []  # the journal removed once the labels are written
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".slide")) == []


@pytest.mark.slow
def test_losing_a_node_mid_run_loses_nothing(cluster, dist_bundle, images, local_out, tmp_path):
    """SIGKILL the second node's raylet while it runs a stage: Ray retries, every output is whole and single."""
    out = tmp_path / "out"
    args = ["segment", images, "--bundle", dist_bundle, "--out", out, "--address", cluster["address"],
            "--actors", "2", "--on-error", "skip", "--quiet"]
    raylet = next(pid for pid, _, pgid in _procs() if pgid == cluster["node"] and "raylet/raylet" in _cmdline(pid))
    killed: list[str] = []

    def kill_when_busy() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            busy = [_cmdline(p) for p, ppid, _ in _procs()
                    if ppid == raylet and _cmdline(p).startswith(("ray::Map", "ray::SegmentActor"))]
            if busy and len(list(out.glob("*.tif"))) >= 4:
                os.kill(raylet, signal.SIGKILL)
                killed.append(busy[0][:80])
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_when_busy, daemon=True)
    watcher.start()
    run = _cli(*args, timeout=560)
    watcher.join(timeout=5)
    assert killed, "the second node never ran a stage while outputs were being written"
    assert run.returncode == 1, run.stderr[-3000:]
    assert "segmented 24 image(s), skipped 0 already done, 1 failed" in run.stdout, run.stdout
    _assert_same_outputs(out, local_out)
    rows = list(csv.DictReader((out / "routing.csv").open()))
    assert len(rows) == len({r["output"] for r in rows}) == N_IMAGES
    (out / "he_0001.tif").write_bytes((out / "he_0001.tif").read_bytes()[:100])  # as a cut-off copy would be
    again = _cli(*args)
    assert "segmented 1 image(s), skipped 23 already done" in again.stdout, again.stdout
    assert "he_0001.tif was incomplete" in again.stderr
    _assert_same_outputs(out, local_out)


# --------------------------------------------------------------------------- slides: many at once, faults


def _slide(path: Path, rows: int, cols: int, seed: int) -> Path:
    """A tiled TIFF of rows x cols synthetic 160 px fluorescence tiles (a small "slide")."""
    import tifffile

    from triageseg.datasets.synth import synth_sample

    rng = np.random.default_rng(seed)
    tiles = [[synth_sample("fluorescence", size=160, rng=rng)[0] for _ in range(cols)] for _ in range(rows)]
    image = np.concatenate([np.concatenate(row, axis=1) for row in tiles], axis=0)
    tifffile.imwrite(path, image, tile=(128, 128), compression="zlib",
                     photometric="rgb" if image.ndim == 3 else "minisblack")
    return path


BLOCK_ARGS = ("--blocks-above", "0.05", "--block-size", "160", "--block-margin", "32")


@pytest.mark.slow  # 30 s; the default suite ran 604 s on 2 cores (goal 600): in `make test-slow`
def test_slides_and_small_images_share_one_run(cluster, dist_bundle, images, tmp_path):
    """3 slides (block-wise), a cut-off one and 6 small images in one `segment --address` run == the local run."""
    from triageseg.datasets.tiffrecord import read_record

    folder = tmp_path / "in"
    folder.mkdir()
    for src in sorted(p for p in images.glob("*.png") if p.name != "zz_broken.png")[:6]:
        shutil.copy(src, folder / src.name)
    for k, (rows, cols) in enumerate(((2, 3), (3, 2), (2, 2))):
        _slide(folder / f"slide{k}.tif", rows, cols, seed=10 + k)
    whole = (folder / "slide0.tif").read_bytes()
    (folder / "slidebad.tif").write_bytes(whole[: len(whole) // 3])  # a cut-off copy: its header says block-wise
    reference = tmp_path / "local"
    assert _local_segment(dist_bundle, [folder], reference, *BLOCK_ARGS).exit_code == 1
    out = tmp_path / "out"
    args = ["segment", folder, "--bundle", dist_bundle, "--out", out, "--address", cluster["address"], "--actors", "1",
            "--quiet", "--on-error", "skip", *BLOCK_ARGS]
    run = _cli(*args)
    assert run.returncode == 1, run.stderr[-3000:]
    # one run: the slides' thread and the small images' pass, both announced, neither after the other's end
    assert "blocks: 4 image(s), up to 1 band actor(s)" in run.stderr and "segment: 6 image(s)" in run.stderr
    for k in range(3):
        assert f"slide{k}.tif: 1 of 1 band(s)" in run.stderr
    assert "segmented 9 image(s), skipped 0 already done, 1 failed" in run.stdout, run.stdout
    assert "slidebad.tif" in run.stderr and "Traceback" not in run.stderr  # the file named, no Ray wrapper
    _assert_same_outputs(out, reference, n=9)
    assert not list(out.glob(".slide[0-9].blocks")) and not list(out.glob(".*.lock"))
    # each label file carries its routing.csv row, as the local path's do (seconds left out)
    rows = {r["output"]: r for r in _rows(out)}
    for name in ("slide0.tif", next(n for n in sorted(rows) if not n.startswith("slide"))):
        record = read_record(out / name)["routing"]
        assert {k: str(v) for k, v in record.items() if k != "seconds"} == rows[name], name
    (out / "routing.csv").unlink()
    again = _cli(*args)
    assert again.returncode == 1, again.stderr[-3000:]
    assert "rebuilt 9 routing.csv row(s) from their label files" in again.stderr
    assert "segmented 0 image(s), skipped 9 already done, 1 failed" in again.stdout, again.stdout
    assert _rows(out) == _rows(reference)


def _journal_progress(journal: Path) -> tuple[int, int]:
    """(probability chunk rows recorded, blocks saved) in a block journal."""
    try:
        state = json.loads((journal / "probs.zarr.json").read_text())
        rows = len(state["chunks"])
    except (OSError, ValueError, KeyError):
        rows = 0
    return rows, len(list(journal.glob("block_*.npz")))


_DRIVER = """
import sys, ray
from triageseg.pipeline import Pipeline
from triageseg.pipeline.cluster.distributed import ClusterOptions, segment_files_ray
from triageseg.pipeline.blockwise.large import BlockOptions

address, bundle, slide, out = sys.argv[1:5]
pipe = Pipeline.from_bundle(bundle, device="cpu")
ray.init(address=address, logging_level="WARNING", log_to_driver=False)
report = segment_files_ray(pipe, [slide], out, blocks=BlockOptions(block_size=160, margin=32, threshold_mp=0),
                           log=lambda m: print(m, flush=True),
                           cluster_options=ClusterOptions(actors="1", band_chunk_rows=1, progress=False))
print("written", len(report.written), "failed", len(report.failures), flush=True)
"""


def _block_reference(bundle, slide: Path, out: Path) -> None:
    """The local block path at the actors' thread count (one)."""
    import torch

    from triageseg.pipeline import Pipeline
    from triageseg.pipeline.blockwise.large import BlockOptions, segment_large_file

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        segment_large_file(Pipeline.from_bundle(bundle, device="cpu"), slide, out, slide.stem,
                           options=BlockOptions(block_size=160, margin=32, threshold_mp=0))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_a_rerun_after_the_driver_died_resumes_from_the_journal(cluster, dist_bundle, tmp_path):
    """SIGKILL the driver mid-slide: the same command again computes only the bands and blocks not in the journal."""
    slide = _slide(tmp_path / "slide.tif", 8, 3, seed=5)  # 1280 rows: 5 bands of one chunk row
    _block_reference(dist_bundle, slide, tmp_path / "local")
    out = tmp_path / "out"
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER)
    cmd = [sys.executable, str(script), cluster["address"], str(dist_bundle), str(slide), str(out)]
    env = {**os.environ, **RAY_ENV}
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    journal = out / ".slide.blocks"
    deadline = time.monotonic() + 300
    while driver.poll() is None and time.monotonic() < deadline:
        if _journal_progress(journal)[0] >= 1:  # a band recorded: the driver dies mid-slide
            driver.kill()
            break
        time.sleep(0.05)
    driver.communicate(timeout=60)
    assert driver.returncode == -signal.SIGKILL, "the driver finished before a band was recorded"
    assert not (out / "slide.tif").exists()
    rows, blocks = _journal_progress(journal)
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    assert again.returncode == 0 and "written 1 failed 0" in again.stdout, again.stdout + again.stderr[-3000:]
    # 1280 rows = 5 chunk rows, one band each; 8 x 3 blocks of 160
    assert f"slide.tif: {5 - rows} of 5 band(s), {24 - blocks} of 24 block(s) to do" in again.stdout, again.stdout
    assert rows >= 1
    np.testing.assert_array_equal(read_labels(out / "slide.tif"), read_labels(tmp_path / "local" / "slide.tif"))
    assert not journal.exists()


@pytest.mark.slow
def test_a_node_killed_mid_slide_costs_only_its_work(dist_bundle, tmp_path, monkeypatch):
    """SIGKILL the second node's raylet and workers while it computes a band or decodes a block: same labels."""
    import ray

    from triageseg.pipeline import Pipeline
    from triageseg.pipeline.blockwise.large import BlockOptions
    from triageseg.pipeline.cluster.distributed import ClusterOptions, segment_files_ray

    slide = _slide(tmp_path / "slide.tif", 8, 3, seed=6)
    _block_reference(dist_bundle, slide, tmp_path / "local")
    for key, value in RAY_ENV.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "out"
    killed: list[str] = []
    with _two_nodes() as nodes:
        raylet = next(pid for pid, _, pgid in _procs() if pgid == nodes["node"] and "raylet/raylet" in _cmdline(pid))
        done = threading.Event()

        def kill_when_busy() -> None:
            while not done.is_set():
                workers = [p for p, ppid, _ in _procs() if ppid == raylet]
                busy = [_cmdline(p) for p in workers if _cmdline(p).startswith(("ray::BandActor", "ray::_decode"))]
                if busy and sum(_journal_progress(out / ".slide.blocks")) >= 1:
                    for pid in (raylet, *workers):  # the node's raylet and its workers, by PID
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    killed.append(busy[0][:60])
                    return
                time.sleep(0.05)

        watcher = threading.Thread(target=kill_when_busy, daemon=True)
        watcher.start()
        ray.init(address=nodes["address"], logging_level="WARNING", log_to_driver=False)
        try:
            # three band actors on three CPUs: one of them is on the second node
            report = segment_files_ray(Pipeline.from_bundle(dist_bundle, device="cpu"), [slide], out,
                                       blocks=BlockOptions(block_size=160, margin=32, threshold_mp=0),
                                       cluster_options=ClusterOptions(actors="3", band_chunk_rows=1, progress=False))
        finally:
            done.set()
            ray.shutdown()
        watcher.join(timeout=5)
    assert killed, "the second node never computed a band or decoded a block"
    assert len(report.written) == 1 and not report.failures
    np.testing.assert_array_equal(read_labels(out / "slide.tif"), read_labels(tmp_path / "local" / "slide.tif"))
    assert not (out / ".slide.blocks").exists()


# --------------------------------------------------------------------------- connecting


def test_segment_and_tune_give_up_on_an_unreachable_cluster(dist_bundle, images, tmp_path):
    """Nothing on 127.0.0.1:1: a one-line error naming the address after --connect-timeout, exit 1."""
    from triageseg.cli.main import cli

    for args in (["segment", images, "--bundle", dist_bundle, "--out", tmp_path / "o"],
                 ["tune", "--data", images.parent, "--modality", "he", "--out", tmp_path / "t"]):
        t0 = time.monotonic()
        run = CliRunner().invoke(cli, [*map(str, args), "--address", "127.0.0.1:1", "--connect-timeout", "2"])
        assert run.exit_code == 1, run.output
        lines = [line for line in run.output.splitlines() if line.strip()]
        assert lines[-1].startswith("error: cannot connect to a Ray cluster at 127.0.0.1:1: nothing answered "
                                    "within 2 s"), run.output
        assert time.monotonic() - t0 < 30
    assert not (tmp_path / "o" / "routing.csv").exists()


def test_a_port_that_never_answers_is_not_waited_on_forever():
    """A listener that accepts but never speaks HTTP/2 (not a Ray head) is refused within the timeout."""
    from triageseg.ray_cluster import wait_for_cluster

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        port = server.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(ValueError, match=rf"127.0.0.1:{port}.*did not answer as a Ray head within 1 s"):
            wait_for_cluster(f"127.0.0.1:{port}", timeout=1.0)
        assert time.monotonic() - t0 < 5


def test_a_grpc_greeting_counts_as_an_answer():
    """A server that greets with an HTTP/2 SETTINGS frame (as the Ray head's GCS does) passes the probe."""
    from triageseg.ray_cluster import wait_for_cluster

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        port = server.getsockname()[1]

        def greet() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(64)
                conn.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")

        thread = threading.Thread(target=greet, daemon=True)
        thread.start()
        wait_for_cluster(f"127.0.0.1:{port}", timeout=5.0)
        thread.join(timeout=5)


# --------------------------------------------------------------------------- pieces, without Ray


def test_actor_pool_sizes():
    from triageseg.pipeline.cluster.distributed import ClusterOptions, parse_actors, pool_size

    assert parse_actors("3") == (3, 3) and parse_actors("1:4") == (1, 4) and parse_actors("2-5") == (2, 5)
    assert parse_actors(" AUTO ") is None
    for bad in ("0", "3:1", "x", "1:2:3", "0:2"):
        with pytest.raises(ValueError, match="--actors"):
            parse_actors(bad)
    cpu_cluster = {"CPU": 3.0, "GPU": 0.0}
    assert pool_size(ClusterOptions(), cpu_cluster) == (1, 2)  # one CPU left for the read and write tasks
    assert pool_size(ClusterOptions(), cpu_cluster, spare_cpu=False) == (1, 3)  # band actors: every CPU
    assert pool_size(ClusterOptions(), {"CPU": 1.0, "GPU": 0.0}) == (1, 1)
    assert pool_size(ClusterOptions(cpus_per_actor=2), {"CPU": 9.0, "GPU": 0.0}) == (1, 4)
    assert pool_size(ClusterOptions(gpus_per_actor=0.25), {"CPU": 8.0, "GPU": 2.0}) == (1, 8)
    assert pool_size(ClusterOptions(actors="2:3", gpus_per_actor=0.25), {"CPU": 8.0, "GPU": 2.0}) == (2, 3)


def test_actors_that_cannot_be_placed():
    from triageseg.pipeline.cluster.distributed import ClusterOptions, check_cluster

    machine = {"CPU": 2.0, "GPU": 0.0}
    with pytest.raises(ValueError, match="1 GPUs per actor but the cluster has 0"):
        check_cluster(ClusterOptions(gpus_per_actor=1), machine)
    with pytest.raises(ValueError, match="above 1 must be a whole number"):
        check_cluster(ClusterOptions(gpus_per_actor=1.5), machine)
    messages: list[str] = []
    check_cluster(ClusterOptions(address="10.0.0.1:6379", cpus_per_actor=4), machine, log=messages.append)
    assert messages == ["warning: 4 CPUs per actor but the cluster has 2; the actors wait until the cluster grows"]


def test_local_output_on_several_machines_is_refused_naming_the_option(tmp_path):
    from triageseg.ray_cluster import check_storage, is_shared

    kwargs = {"address": "10.0.0.1:6379", "option": "--out", "what": "label files", "example": "s3://BUCKET/labels"}
    with pytest.raises(ValueError, match=r"^--out .* has 3 nodes; label files need .*NFS.*--out s3://BUCKET/labels$"):
        check_storage(str(tmp_path), n_nodes=3, n_hosts=2, **kwargs)
    messages: list[str] = []
    check_storage(str(tmp_path), n_nodes=2, n_hosts=1, log=messages.append, **kwargs)
    assert len(messages) == 1 and messages[0].startswith(f"warning: --out {tmp_path} is a local path")
    assert "runs its 2 nodes on this machine" in messages[0]
    check_storage("s3://bucket/labels", n_nodes=3, n_hosts=3, log=messages.append, **kwargs)
    assert len(messages) == 1
    assert is_shared(str(tmp_path), n_hosts=1) and is_shared("gs://b/x", n_hosts=4)
    assert not is_shared(str(tmp_path), n_hosts=2)


def test_uri_storage_through_fsspec_and_pyarrow(tmp_path):
    """memory:// is fsspec's (pyarrow does not know it); local:// is pyarrow's: both go through the URI paths."""
    from triageseg.datasets.io import IMAGE_SUFFIXES
    from triageseg.pipeline.cluster import storage

    root = "memory://triageseg-test/run"
    local = tmp_path / "a.png"
    local.write_bytes(b"png bytes")
    storage.upload(local, f"{root}/in/a.png")
    storage.upload(local, f"{root}/in/sub/b.tif")
    storage.upload(local, f"{root}/in/.hidden.png")
    storage.upload(local, f"{root}/in/notes.txt")
    assert storage.expand_uri(f"{root}/in", IMAGE_SUFFIXES, recursive=False) == ([f"{root}/in/a.png"], ["a"])
    assert storage.expand_uri(f"{root}/in/", IMAGE_SUFFIXES, recursive=True) == (
        [f"{root}/in/a.png", f"{root}/in/sub/b.tif"], ["a", "sub__b"])
    assert storage.expand_uri(f"{root}/in/*.png", IMAGE_SUFFIXES, recursive=False)[1] == ["a"]
    with pytest.raises(DataError, match="no such file or folder"):
        storage.expand_uri(f"{root}/nothing", IMAGE_SUFFIXES, recursive=False)
    assert storage.names_in(f"{root}/in") == {"a.png", ".hidden.png", "notes.txt"}
    assert storage.names_in(f"{root}/missing") == set()
    assert storage.fetch(f"{root}/in/sub/b.tif", tmp_path).read_bytes() == b"png bytes"
    assert (tmp_path / "b.tif").is_file()
    with pytest.raises(DataError, match="cannot read"):
        storage.fetch(f"{root}/in/gone.png", tmp_path)
    assert storage.read_text(f"{root}/routing.csv") is None
    storage.write_text(f"{root}/routing.csv", "file,output\n")
    assert storage.read_text(f"{root}/routing.csv") == "file,output\n"

    uri = f"local://{tmp_path / 'out'}"
    storage.write_text(storage.join(uri, "x.txt"), "hello")
    assert (tmp_path / "out" / "x.txt").read_text() == "hello"
    assert storage.names_in(uri) == {"x.txt"} and storage.basename(storage.join(uri, "x.txt")) == "x.txt"


def test_bundle_shipped_once_per_node(dist_bundle, tmp_path):
    from triageseg.pipeline import Pipeline
    from triageseg.pipeline.cluster import storage

    digest, files = storage.bundle_payload(dist_bundle)
    assert "bundle.json" in files and "segmenters/he/model.safetensors" in files
    assert storage.bundle_payload(dist_bundle)[0] == digest  # same content, same name
    copy = storage.materialize_bundle(digest, files, tmp_path)
    assert copy == tmp_path / "triageseg-bundles" / digest
    assert {p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()} == set(files)
    stamp = (copy / "bundle.json").stat().st_mtime_ns
    assert storage.materialize_bundle(digest, {}, tmp_path) == copy  # a second actor finds it written
    assert (copy / "bundle.json").stat().st_mtime_ns == stamp
    assert not [p for p in copy.parent.iterdir() if p.name.startswith(".")]  # no staging folder left
    assert Pipeline.from_bundle(copy, device="cpu").available == Pipeline.from_bundle(dist_bundle).available


def test_partial_files_of_killed_writers_are_removed(tmp_path):
    from triageseg.pipeline.cluster.storage import remove_partial_files

    (tmp_path / "overlays").mkdir()
    stale = [tmp_path / ".a.x1y2.part.tif", tmp_path / ".a.rois.k9.part.zip", tmp_path / "overlays" / ".a.q.part.png"]
    kept = [tmp_path / "a.tif", tmp_path / ".b.z.part.tif", tmp_path / "[c].tif"]
    for path in (*stale, *kept):
        path.write_bytes(b"x")
    assert remove_partial_files(tmp_path, ["a", "[c]"]) == 3
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_ray_options_are_checked_before_anything_runs(dist_bundle, images, tmp_path):
    from triageseg.cli.main import cli

    base = ["segment", str(images), "--bundle", str(dist_bundle), "--out", str(tmp_path / "o")]
    for extra, message in ((["--ray", "--workers", "2"], "--workers is for local runs"),
                           (["--ray", "--actors", "0"], "--actors must be"),
                           (["--ray", "--device", "cuda"], "the device follows --gpus-per-actor"),
                           (["--out", "s3://bucket/labels"], "URI inputs or --out need a Ray run"),
                           (["--ray", "--out", str(images)], "the output folder (--out) is the input folder")):
        run = CliRunner().invoke(cli, [*base, *extra])
        assert run.exit_code == 2 and message in run.output, run.output
    assert not (tmp_path / "o").exists()


def test_errors_name_the_input_not_the_nodes_copy(tmp_path):
    from triageseg.pipeline.cluster.ray_stages import error_fields, row_error

    copy = tmp_path / "a.png"
    fields = error_fields(DataError(copy, "truncated PNG"), "s3://bucket/a.png", str(copy))
    assert fields == {"error": "truncated PNG", "error_path": "s3://bucket/a.png"}
    assert error_fields(RuntimeError("CUDA out of memory"), "x.png") == {
        "error": "RuntimeError: CUDA out of memory", "error_path": ""}
    err = row_error({"file": "x.png", **error_fields(RuntimeError("boom"), "x.png")})
    assert isinstance(err, DataError) and str(err) == "x.png: RuntimeError: boom"
    assert row_error({"file": "x.png", "error": "", "error_path": ""}) is None


class _FakeRay:
    """Enough of ``ray`` for SlideRun: work completes one result at a time, oldest first; every step logged."""

    def __init__(self):
        self.events: list[tuple[str, str, str]] = []  # (submit | done | kill, kind, slide name)
        self.seq = 0

    def _ref(self, kind: str, slide: str, value):
        self.seq += 1
        self.events.append(("submit", kind, slide))
        return _FakeRef(self.seq, kind, slide, value)

    def remote(self, **_options):
        fake = self

        def wrap(target):
            if isinstance(target, type):  # the band actor class
                return types.SimpleNamespace(remote=lambda *_a: _FakeActor(fake))
            return types.SimpleNamespace(remote=lambda *a: fake._call(target.__name__, a))

        return wrap

    def _call(self, name: str, args):
        if name == "_scan_and_route":
            state = {"norm": {}, "modality": "he", "confidence": 0.9, "used_model": "he", "decision": "routed",
                     "ood_score": None, "diameter": None, "scale": None, "size_source": "", "skipped": False}
            return self._ref("scan", Path(args[2]).stem, state)
        if name == "_decode":
            return self._ref("decode", Path(args[0]).parent.name[1:-len(".blocks")], args[3])
        return self._ref("finish", args[4], {"output": f"{args[4]}.tif", "used_model": "he", "objects": 1})

    def wait(self, refs, num_returns=1, timeout=None):
        first = min(refs, key=lambda r: r.seq)
        return [first], [r for r in refs if r is not first]

    def get(self, ref):
        self.events.append(("done", ref.kind, ref.slide))
        return ref.value

    def kill(self, _actor):
        self.events.append(("kill", "actor", ""))

    def cluster_resources(self):
        return {"CPU": 2.0}


@dataclasses.dataclass(eq=False)
class _FakeRef:
    seq: int
    kind: str
    slide: str
    value: object


class _FakeActor:
    def __init__(self, fake: _FakeRay):
        self.fake = fake
        self.band = types.SimpleNamespace(remote=self._band)

    def _band(self, path, _level, _norm, _model, _scale, _folder, shape, y0, y1):
        import math

        sums = {r: [None] * math.ceil(shape[1] / 1024) for r in range(y0 // 256, math.ceil(y1 / 256))}
        return self.fake._ref("band", Path(path).stem, (sums, 1.0))


def test_slides_interleave_the_actors_never_wait_for_a_decode(tmp_path, monkeypatch):
    """Two slides, one band actor: slide b's bands go to the actor while slide a's blocks are decoded."""
    import tifffile

    from triageseg.pipeline.blockwise.large import BlockOptions
    from triageseg.pipeline.cluster.ray_slides import SlideRun

    fake = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "bundle.json").write_text("{}")
    pipe = types.SimpleNamespace(path=bundle, tile_size=64, overlap=16, batch_size=1, tta=False, unknown="generalist",
                                 backend="torch", precision="fp32", diameter=None, use_pixel_size=True, device="cpu",
                                 device_name="cpu",
                                 params=lambda _m, _s: types.SimpleNamespace(to_dict=dict))
    items = []
    for name in ("a", "b"):
        tifffile.imwrite(tmp_path / f"{name}.tif", np.zeros((512, 300), np.uint8), tile=(128, 128))
        items.append({"index": len(items), "file": str(tmp_path / f"{name}.tif"), "name": name,
                      "source": str(tmp_path / f"{name}.tif")})
    rows: dict[str, dict] = {}
    run = SlideRun(pipe, tmp_path / "out", BlockOptions(block_size=160, margin=32, threshold_mp=0), actors=1,
                   band_chunk_rows=1, max_tasks=2, on_done=lambda item, row: rows.setdefault(item["name"], row))
    run.run(items)
    events = fake.events
    assert set(rows) == {"a", "b"} and all(r["objects"] == 1 for r in rows.values())
    # 512 rows: two bands of one chunk row each; 4 x 2 blocks of 160 (cores ~128 x 150)
    assert [e for e in events if e[:2] == ("submit", "band")] == [("submit", "band", "a")] * 2 + [
        ("submit", "band", "b")] * 2
    assert events.count(("done", "decode", "a")) == events.count(("done", "decode", "b")) == 8
    # the actor got slide b's first band before slide a's decodes were done (it did not wait for them)
    assert events.index(("submit", "band", "b")) < len(events) - events[::-1].index(("done", "decode", "a"))
    assert events.index(("submit", "band", "b")) < events.index(("done", "finish", "a"))
    # one actor started, and stopped as soon as no band waited
    assert run.stats.actors_started == 1 and events.count(("kill", "actor", "")) == 1
    assert events.index(("kill", "actor", "")) < events.index(("done", "finish", "b"))
    assert run.stats.bands == 4 and run.stats.blocks == 16 and not run.open
