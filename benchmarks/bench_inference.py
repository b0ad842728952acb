"""CPU/GPU inference speed: each backend (and StarDist when installed), network only and end to end.

For each image size (default 512² x 8 images and 2048² x 1) and each tool, prints the
median over ``--repeats`` rounds, the tools interleaved within each round (so a load
change on the machine hits every tool alike), of:

* ``net``: seconds in the segmenter network alone (its forward calls inside ``predict``);
* ``e2e``: end to end per image: read the file + normalise + route + tiles, network and
  blending + watershed;
* both per image and per megapixel (``s/MP``), the stage split of ``e2e`` (read, route,
  network, tiling + blending + softmax, watershed), the ``s/MP`` growth from the smallest
  to the largest size, and each tool's ratio to torch fp32 and to StarDist.

It also prints the tiling overhead by counting (pixels the network computes / image pixels)
and, with ``--accuracy DATA``, the cost of each backend on the test split: mean F1 per
modality against torch fp32 (goal for bf16: within 0.002 on every modality) and the
largest probability difference (goal for fp32 backends: <= 1e-4; labels identical).

Tools (``--tools``): ``auto`` (what ``segment`` runs by default here), ``torch`` (eager,
channels_last, inference_mode), ``torch-bf16`` (CPU autocast; only on CPUs with
AMX/AVX512-BF16), ``onnx`` (ONNX Runtime), ``openvino``,
``openvino-bf16``, ``stardist`` (2D, grid 2, random weights: the same compute as a trained
model; its end to end adds its NMS run on outputs made from the ground truth, as a trained
model would give, because NMS on random outputs is 5-8x slower). Missing libraries skip
their tool with a line saying so.

This script installs nothing. StarDist (TensorFlow, its own NumPy) runs in a separate
virtual environment, started as a subprocess (``peer_stardist.py``; it times its own
stages, so the pipe is not counted)::

    python -m venv /work/peers
    /work/peers/bin/pip install stardist "tensorflow-cpu<2.16" tifffile
    .venv/bin/python benchmarks/bench_inference.py --bundle B --peers-python /work/peers/bin/python

(``$TRIAGESEG_PEERS_PYTHON`` works as ``--peers-python``.) Without it, ``stardist`` runs in
this process when importable here.

Usage:
    python benchmarks/bench_inference.py --bundle /work/demo_base/bundle            # timings
    python benchmarks/bench_inference.py --bundle B --accuracy /work/demo_base/data  # + F1 cost
    python benchmarks/bench_inference.py --threads 2 --busy 2    # two other busy processes
    python benchmarks/bench_inference.py --bundle B --peers-python /work/peers/bin/python   # + StarDist
    python benchmarks/bench_inference.py --bundle B --batch   # + segment_files, decode thread off / on

Without ``--bundle`` the models are untrained (random weights, same compute); then the
watershed sees noisy probabilities and its share is not representative. Measure on a
quiet machine (nothing else running), and say which machine gave each number.
``OMP_WAIT_POLICY=PASSIVE`` in the environment makes idle OpenMP threads sleep (better
when the cores are shared, see README "Speed"); it must be set before Python starts.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

TOOLS = ("auto", "torch", "torch-bf16", "onnx", "openvino", "openvino-bf16", "stardist")


# ------------------------------------------------------------------ inputs
def synthetic_image(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A size x size synthetic fluorescence image (uint8 HxWx3) and its labels, tiled from 256 px samples."""
    from triageseg.datasets.synth import synth_sample

    rng = np.random.default_rng(seed)
    n = -(-size // 256)
    img_rows, lab_rows, offset = [], [], 0
    for _ in range(n):
        imgs, labs = [], []
        for _ in range(n):
            img, lab = synth_sample("fluorescence", size=256, rng=rng)
            labs.append(np.where(lab > 0, lab + offset, 0))  # unique ids across the samples
            offset += int(lab.max())
            imgs.append(img)
        img_rows.append(np.concatenate(imgs, axis=1))
        lab_rows.append(np.concatenate(labs, axis=1))
    return np.concatenate(img_rows)[:size, :size], np.concatenate(lab_rows)[:size, :size]


def write_inputs(folder: Path, sizes: list[int], per_size: dict[int, int]) -> dict[int, list[tuple[Path, np.ndarray]]]:
    """Synthetic images written as TIFF (end to end includes reading), with their labels (also .npy, for a peer)."""
    import tifffile

    out = {}
    for size in sizes:
        out[size] = []
        for i in range(per_size[size]):
            image, labels = synthetic_image(size, seed=1000 * size + i)
            path = folder / f"img_{size}_{i}.tif"
            tifffile.imwrite(path, image)
            np.save(labels_file(path), labels)
            out[size].append((path, labels))
    return out


def labels_file(image: Path) -> Path:
    """Where :func:`write_inputs` keeps an image's ground truth for a peer process (``<stem>.labels.npy``)."""
    return image.with_name(image.stem + ".labels.npy")


def random_bundle(folder: Path) -> Path:
    """A bundle of untrained full-size models (router + one fluorescence specialist): the same compute."""
    import torch

    from triageseg import bundle as B
    from triageseg.router.model import RouterConfig, create_router, save_router
    from triageseg.segmenters.model import SegmenterConfig, create_segmenter, save_segmenter

    torch.manual_seed(0)
    rcfg = RouterConfig(class_names=("fluorescence",))
    save_router(B.router_dir(folder), create_router(rcfg), rcfg)
    cfg = SegmenterConfig(modality="fluorescence")
    save_segmenter(B.segmenter_dir(folder, "fluorescence"), create_segmenter(cfg), cfg, params=None)
    B.update_manifest(folder, modalities=["fluorescence"])
    return folder


def tiling_overhead(size: int, tile: int, overlap: int) -> float:
    """Pixels the network computes / image pixels, by counting the tiles ``predict`` makes."""
    from triageseg.segmenters.predict import tile_grid

    t, starts = tile_grid(32 * -(-size // 32), tile, overlap)
    return (len(starts) * t) ** 2 / size**2


# ------------------------------------------------------------------ tools
class _Timed:
    """Wraps a segmenter module: counts the seconds spent in its forward (network only)."""

    def __init__(self):
        self.seconds = 0.0
        self.pixels = 0  # pixels the network computed (tiles x their sides)

    def wrap(self, net):
        from triageseg.segmenters.predict import _input_channels

        timer = self
        if getattr(net, "numpy_forward", None) is not None:  # an exported network: predict runs it on numpy

            class TimedExport:
                training = False

                def __init__(self):
                    self.inner = net
                    self.backend_name = getattr(net, "backend_name", "torch")
                    self.in_channels = _input_channels(net)

                def eval(self):
                    return self

                def numpy_forward(self, arr):
                    timer.pixels += int(arr.shape[0]) * int(arr.shape[2]) * int(arr.shape[3])
                    t0 = time.perf_counter()
                    y = net.numpy_forward(arr)
                    timer.seconds += time.perf_counter() - t0
                    return y

            return TimedExport()
        import torch


        class TimedNet(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = net
                self.backend_name = getattr(net, "backend_name", "torch")

            def forward(self, x):
                timer.pixels += int(x.shape[0]) * int(x.shape[2]) * int(x.shape[3])
                t0 = time.perf_counter()
                y = self.inner(x)
                if y.device.type == "cuda":
                    torch.cuda.synchronize(y.device)
                timer.seconds += time.perf_counter() - t0
                return y

        return TimedNet()


def _precision(backend: str, precision: str) -> str:
    """A tool name's precision: ``auto`` is the default of ``segment`` (backend and precision), the others fp32
    unless named (``openvino-bf16``)."""
    return precision or ("auto" if backend == "auto" else "fp32")


class TriagesegTool:
    """The routed pipeline with one backend and precision; times each stage of each image."""

    def __init__(self, name: str, bundle: Path, device: str, **tiling):
        from triageseg.pipeline import Pipeline
        from triageseg.segmenters.backends import BackendNote

        backend, _, precision = name.partition("-")
        self.name = name
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always", BackendNote)
            self.pipe = Pipeline(bundle, device=device, backend=backend, precision=_precision(backend, precision),
                                 **tiling)
        self.skip = next((str(w.message) for w in seen if issubclass(w.category, BackendNote)), None)
        if backend == "auto":
            print(f"  auto: {self.pipe.choice.backend} {self.pipe.choice.precision} (the default of `segment`)")
        self.timer = _Timed()
        self._wrapped: set[str] = set()

    def _prepare(self, used: str) -> None:
        if used not in self._wrapped:
            net, cfg, params = self.pipe.segmenter(used)
            self.pipe._segmenters[used] = (self.timer.wrap(net), cfg, params)
            self._wrapped.add(used)

    def run(self, path: Path) -> tuple[dict, np.ndarray]:
        """Stage seconds and labels of one image file."""
        from triageseg.datasets.io import read_image
        from triageseg.postprocess.watershed import watershed

        t0 = time.perf_counter()
        image = read_image(path)
        t1 = time.perf_counter()
        d = self.pipe.decide(image)
        t2 = time.perf_counter()
        self._prepare(d.used_model)
        self.timer.seconds, self.timer.pixels = 0.0, 0
        # at the size decision's scale, as `segment` runs it (the resize both ways is part of the time)
        probs = self.pipe.probabilities(image, d.used_model, d.scale)
        t3 = time.perf_counter()
        labels = watershed(probs, self.pipe.params(d.used_model, d.scale))
        t4 = time.perf_counter()
        net = self.timer.seconds
        return {"read": t1 - t0, "route": t2 - t1, "net": net, "tiling": t3 - t2 - net, "watershed": t4 - t3,
                "e2e": t4 - t0, "net_pixels": self.timer.pixels / float(image.shape[0] * image.shape[1]),
                "scale": float(d.scale)}, labels


class StarDistTool:
    """StarDist 2D (grid 2, 32 rays, random weights) in this Python; NMS on outputs made from the ground truth.

    The model and what is timed are ``peer_stardist.py``'s (:class:`PeerStarDistTool` runs the
    same in another environment). Not run in this project's CI (TensorFlow is not a
    dependency); a failure skips the tool.
    """

    name = "stardist"

    def __init__(self, threads: int):
        self.skip = None
        self.peer = _peer_stardist()
        self.model = self.peer.build(threads)

    def run(self, path: Path, labels: np.ndarray) -> tuple[dict, np.ndarray]:
        return self.peer.measure(self.model, str(path), labels)


def _peer_stardist():
    """``peer_stardist.py`` beside this file, as a module (whether this file runs as a script or is imported)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("peer_stardist", Path(__file__).with_name("peer_stardist.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class PeerStarDistTool:
    """:class:`StarDistTool` in another Python (``--peers-python``): ``peer_stardist.py`` as a subprocess.

    Started once (TensorFlow loads once), one JSON line per image each way; the peer times
    its own stages, so the pipe does not count.
    """

    name = "stardist"

    def __init__(self, python: str, threads: int, script: Path | None = None):
        script = script or Path(__file__).with_name("peer_stardist.py")
        env = {**PEER_ENV, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
        env.pop("PYTHONPATH", None)  # the peer's own packages only (its NumPy, not ours)
        self.proc = subprocess.Popen([python, str(script), "--threads", str(threads)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        ready = self._reply()
        self.skip = None if ready.get("ready") else f"peer did not start: {ready.get('error', ready)}"
        self.versions = ready.get("versions", {})
        if self.skip:
            self.close()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            return {"error": f"peer exited with code {self.proc.wait()}"}
        return json.loads(line)

    def run(self, path: Path, labels: np.ndarray) -> tuple[dict, None]:
        self.proc.stdin.write(json.dumps({"image": str(path), "labels": str(labels_file(path))}) + "\n")
        self.proc.stdin.flush()
        reply = self._reply()
        if "error" in reply:
            raise RuntimeError(f"stardist peer: {reply['error']}")
        reply.pop("objects", None)
        return reply, None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def make_tools(names: list[str], bundle: Path, device: str, peers_python: str | None = None, threads: int = 1,
               **tiling) -> list:
    tools = []
    for name in names:
        try:
            if name == "stardist" and peers_python:
                tool = PeerStarDistTool(peers_python, threads)
                if not tool.skip:
                    found = ", ".join(f"{k} {v}" for k, v in tool.versions.items())
                    print(f"  stardist: peer {peers_python} ({found})")
            else:
                tool = StarDistTool(threads) if name == "stardist" else TriagesegTool(name, bundle, device, **tiling)
        except Exception as err:  # noqa: BLE001 - a peer that does not load is skipped, said plainly
            print(f"  {name}: skipped ({type(err).__name__}: {err})")
            continue
        if tool.skip:
            print(f"  {name}: skipped ({tool.skip})")
            continue
        tools.append(tool)
    return tools


# ------------------------------------------------------------------ timing
def _busy(stop) -> None:
    x = 0
    while not stop.is_set():
        x = (x * 1103515245 + 12345) % 2147483648


def run_rounds(tools: list, inputs: dict, repeats: int) -> dict:
    """Median stage seconds per image, per tool and size; tools interleaved in every round."""
    for tool in tools:  # warm-up: exports, first-call allocations, lazy loads
        for size, items in inputs.items():
            _call(tool, items[0])
    per = {(t.name, s): {} for t in tools for s in inputs}
    for r in range(repeats):
        order = tools if r % 2 == 0 else tools[::-1]  # alternate so no tool always runs right after another
        for size, items in inputs.items():
            for tool in order:
                sums: dict[str, float] = {}
                for item in items:
                    stages, _ = _call(tool, item)
                    for k, v in stages.items():
                        sums[k] = sums.get(k, 0.0) + v / len(items)
                for k, v in sums.items():
                    per[(tool.name, size)].setdefault(k, []).append(v)
    return {key: {k: statistics.median(v) for k, v in stages.items()} for key, stages in per.items()}


def _call(tool, item):
    path, labels = item
    return tool.run(path, labels) if tool.name == "stardist" else tool.run(path)


def batch_rounds(tools: list, paths: list[Path], folder: Path, repeats: int) -> dict:
    """Seconds per image of ``segment_files`` (what ``triageseg segment`` runs), the decode thread off and on.

    Medians over ``repeats`` rounds, tools and modes interleaved (after one warm-up run each).
    The per-image stages above run one image at a time; this is where the watershed of one
    image overlapping the network of the next (``pipeline.local.batch.DECODE_THREAD``) shows.
    """
    from triageseg.pipeline.local import batch

    tools = [t for t in tools if hasattr(t, "pipe")]
    per: dict[tuple[str, str], list[float]] = {}
    default = batch.DECODE_THREAD
    try:
        for r in range(repeats + 1):
            order = tools if r % 2 == 0 else tools[::-1]
            for tool in order:
                for mode in ("in line", "thread") if r % 2 == 0 else ("thread", "in line"):
                    batch.DECODE_THREAD = mode == "thread"
                    t0 = time.perf_counter()
                    tool.pipe.segment_files(paths, folder / f"batch-{tool.name}-{mode.replace(' ', '-')}",
                                            overwrite=True)
                    if r:  # round 0 warms up
                        per.setdefault((tool.name, mode), []).append((time.perf_counter() - t0) / len(paths))
    finally:
        batch.DECODE_THREAD = default
    medians = {key: statistics.median(v) for key, v in per.items()}
    print(f"\nbatch: segment_files on {len(paths)} images, s/img (medians of {repeats}; goal: thread < in line)")
    for tool in tools:
        a, b = medians[(tool.name, "in line")], medians[(tool.name, "thread")]
        print(f"  {tool.name:<14} decode in line {a:.3f}   decode thread {b:.3f}   ratio {b / a:.2f}x")
    return {f"{name} {mode}": v for (name, mode), v in medians.items()}


def print_table(medians: dict, tools: list, sizes: list[int]) -> list[dict]:
    rows = []
    names = [t.name for t in tools]
    print(f"\n{'tool':<14} {'size':>5} {'net s/img':>10} {'e2e s/img':>10} {'net s/MP':>9} {'e2e s/MP':>9}  "
          f"{'read':>6} {'route':>6} {'net':>6} {'tiling':>6} {'wshed':>6}  {'vs torch':>8} {'vs StarDist':>11}")
    for size in sizes:
        mp = size * size / 1e6
        base = medians.get(("torch", size))
        star = medians.get(("stardist", size))
        for name in names:
            m = medians[(name, size)]
            row = {"tool": name, "size": size, **m, "net_s_per_mp": m["net"] / mp, "e2e_s_per_mp": m["e2e"] / mp}
            vs_torch = f"{m['e2e'] / base['e2e']:.2f}x" if base else "-"
            vs_star = f"{m['e2e'] / star['e2e']:.2f}x" if star else "-"
            print(f"{name:<14} {size:>5} {m['net']:>10.3f} {m['e2e']:>10.3f} {m['net'] / mp:>9.3f} "
                  f"{m['e2e'] / mp:>9.3f}  {m['read']:>6.3f} {m['route']:>6.3f} {m['net']:>6.3f} "
                  f"{m['tiling']:>6.3f} {m['watershed']:>6.3f}  {vs_torch:>8} {vs_star:>11}")
            rows.append(row)
    counted = [(n, s) for s in sizes for n in names if "net_pixels" in medians[(n, s)]]
    if counted:  # what size triage and the tiles make the network compute (counted in its forward calls)
        print("\nnetwork pixels per image pixel (the size decision's scale, then the tiles' overlap): " + "; ".join(
            f"{n} {s}²: {medians[(n, s)]['net_pixels']:.2f}x at scale {medians[(n, s)]['scale']:.2f}"
            for n, s in counted))
    if len(sizes) > 1:
        lo, hi = min(sizes), max(sizes)
        print(f"\ns/MP growth {lo}² -> {hi}² (goal <= 1.15x):")
        for name in names:
            a, b = medians[(name, lo)], medians[(name, hi)]
            lo_mp, hi_mp = lo * lo / 1e6, hi * hi / 1e6
            print(f"  {name:<14} e2e {b['e2e'] / hi_mp / (a['e2e'] / lo_mp):.2f}x   "
                  f"net {b['net'] / hi_mp / (a['net'] / lo_mp):.2f}x")
    return rows


# ------------------------------------------------------------------ accuracy
def accuracy(bundle: Path, data: Path, names: list[str], device: str, split: str = "test") -> dict:
    """Mean F1 per modality of each tool against torch fp32 on ``split``; probability and label differences."""
    from triageseg.datasets.layout import Dataset
    from triageseg.pipeline import Pipeline
    from triageseg.postprocess.folders import report_from_results
    from triageseg.postprocess.metrics import match_image
    from triageseg.postprocess.watershed import watershed

    ds = Dataset(data)
    samples = ds.select(split=split)
    names = ["torch"] + [n for n in names if n not in ("torch", "stardist")]
    pipes = {}
    for n in names:
        backend, _, precision = n.partition("-")
        pipes[n] = Pipeline(bundle, device=device, backend=backend, precision=_precision(backend, precision))
    results = {n: [] for n in names}
    max_prob = {n: 0.0 for n in names}
    same_labels = {n: 0 for n in names}
    modality_of = {}
    for sample in samples:
        image, gt = ds.load(sample)
        d = pipes["torch"].decide(image)  # the same segmenter for every tool: only the network differs
        modality_of[sample.id] = sample.modality or "unknown"
        ref = None
        for n, pipe in pipes.items():
            probs = pipe.probabilities(image, d.used_model, d.scale)  # at the size decision's scale, as `segment`
            labels = watershed(probs, pipe.params(d.used_model, d.scale))
            if ref is None:
                ref = (probs, labels)
            max_prob[n] = max(max_prob[n], float(np.abs(probs - ref[0]).max()))
            same_labels[n] += bool(np.array_equal(labels, ref[1]))
            results[n].append(match_image(gt, labels, id=sample.id))
    reports = {n: report_from_results(results[n], modality_of) for n in names}
    mods = sorted(reports["torch"].per_modality)
    print(f"\naccuracy on {data} split {split!r} ({len(samples)} images): mean F1 per modality, "
          f"difference to torch fp32 (goal: |bf16 - fp32| <= 0.002 on every modality)")
    print(f"{'tool':<14} " + " ".join(f"{m:>22}" for m in mods) + f" {'max |dp|':>9} {'labels same':>11}")
    out = {}
    for n in names:
        per = {m: reports[n].per_modality[m].mean_f1 for m in mods}
        diff = {m: per[m] - reports["torch"].per_modality[m].mean_f1 for m in mods}
        ok = all(abs(v) <= 0.002 for v in diff.values())
        cells = " ".join(f"{per[m]:>12.4f} ({diff[m]:+.4f})" for m in mods)
        print(f"{n:<14} {cells} {max_prob[n]:>9.2e} {same_labels[n]:>5}/{len(samples):<5}"
              + ("" if n == "torch" else ("  ok" if ok else "  OVER 0.002")))
        out[n] = {"mean_f1": per, "diff_to_fp32": diff, "max_prob_diff": max_prob[n],
                  "labels_identical": same_labels[n], "images": len(samples), "within_0.002": ok}
    return out


# The environment a peer starts with: the user's, as it was before this process took `segment`'s settings.
PEER_ENV = dict(os.environ)


# ------------------------------------------------------------------ main
def main() -> None:
    from triageseg.segmenters.model import DEFAULT_OVERLAP, DEFAULT_TILE_SIZE
    from triageseg.segmenters.threads import HUGEPAGE_ENV, set_memory_advice

    set_memory_advice()  # what `triageseg segment` does at its start (peers keep their defaults: PEER_ENV)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="a trained bundle (default: untrained models, same compute)")
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--images", type=int, nargs="+", default=[8, 1],
                        help="images per size (one number per --sizes entry)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved rounds; medians are printed (0: no timing, e.g. with --accuracy)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tile-size", type=int, default=None, help="tile side (default: the models')")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="tiles per forward pass (default: segment's, which depends on the tile size and device)")
    parser.add_argument("--threads", type=int, default=None, help="torch/ORT/OpenVINO threads (default: all cores)")
    parser.add_argument("--busy", type=int, default=0, help="run this many busy-looping processes meanwhile")
    parser.add_argument("--accuracy", type=Path, metavar="DATA", help="also score the tools on DATA's test split")
    parser.add_argument("--batch", action="store_true",
                        help="also time segment_files on the smallest size's images, decode thread off and on")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--peers-python", default=os.environ.get("TRIAGESEG_PEERS_PYTHON"),
                        help="the Python of a separate environment with stardist + tensorflow-cpu "
                             "(default $TRIAGESEG_PEERS_PYTHON; see peer_stardist.py)")
    args = parser.parse_args()
    import torch

    from triageseg.segmenters.backends import configure_threads, cpu_bf16_support

    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        configure_threads()
    if len(args.images) != len(args.sizes):
        parser.error("--images needs one count per --sizes entry")
    print(f"triageseg inference benchmark: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} logical CPUs, torch {torch.__version__} at {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, native bf16: {cpu_bf16_support()}, "
          f"busy processes: {args.busy}, {HUGEPAGE_ENV}: here {os.environ.get(HUGEPAGE_ENV)} (as `segment`), "
          f"peers {PEER_ENV.get(HUGEPAGE_ENV, '(unset)')}")
    for size in args.sizes:
        tile = args.tile_size or DEFAULT_TILE_SIZE
        over = tiling_overhead(size, tile, DEFAULT_OVERLAP)
        print(f"  tiling at {size}², scale 1: the network would compute {over:.2f}x the image's pixels (tile {tile}, "
              f"overlap {DEFAULT_OVERLAP}; the bundle's own overlap and the size decision's scale are counted "
              f"below), batches of {args.batch_size or 'segment default'} tiles")
    stop = multiprocessing.Event()
    busy = [multiprocessing.Process(target=_busy, args=(stop,), daemon=True) for _ in range(args.busy)]
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        tmp = Path(tmp)
        bundle = args.bundle or random_bundle(tmp / "bundle")
        inputs = write_inputs(tmp, args.sizes, dict(zip(args.sizes, args.images))) if args.repeats > 0 else {}
        tools = make_tools(args.tools, bundle, args.device, args.peers_python, torch.get_num_threads(),
                           tile_size=args.tile_size, batch_size=args.batch_size)
        for p in busy:
            p.start()
        try:
            medians = run_rounds(tools, inputs, args.repeats) if args.repeats > 0 else None
            batch = batch_rounds(tools, [p for p, _ in inputs[min(args.sizes)]], tmp, max(1, args.repeats)) \
                if args.batch and inputs else None
        finally:
            stop.set()
            for p in busy:
                p.join()
            for tool in tools:
                if hasattr(tool, "close"):
                    tool.close()
        rows = print_table(medians, tools, args.sizes) if medians else []
        acc = accuracy(bundle, args.accuracy, [t.name for t in tools], args.device) if args.accuracy else None
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "batch": batch, "accuracy": acc}, indent=2) + "\n")


if __name__ == "__main__":
    main()
