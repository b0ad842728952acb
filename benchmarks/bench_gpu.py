"""The GPU figures in one run (under 8 minutes on one GPU), for the day a GPU is lent.

Three parts, each with its own time cap so the whole run stays inside ``--budget``:

1. the ``gpu``-marked tests (``pytest -m gpu``), pass/fail counts;
2. images/s of the segmenter's forward pass on 512 x 512 tiles at batch sizes 8-64 with
   AMP (bf16 where supported, else fp16) and channels_last, untrained efficientnet-b3 Unet
   (speed does not depend on the weights);
3. seconds per megapixel end to end (read -> route -> probabilities -> watershed -> label
   file) on a 4096 x 4096 image in memory and on a 16000 x 16000 image block-wise
   (``segment --blocks-above 0``), with ``--bundle`` or an untrained default bundle.

The figures are appended to ``benchmarks/RESULTS.md`` (``--results``) under a heading
with the device name and the date. Without CUDA the script stops with exit code 2 and
says so; ``--dry-run`` runs every part on the CPU at tiny sizes (no tests, nothing
timed for a claim) to check the script end to end, and writes to ``--results`` only when
it is given.

Usage:
    python benchmarks/bench_gpu.py                                   # on a GPU machine
    python benchmarks/bench_gpu.py --bundle demo/bundle --budget 420
    python benchmarks/bench_gpu.py --dry-run --results /tmp/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
MODS = ("fluorescence", "brightfield", "he")


@dataclass(frozen=True)
class Sizes:
    """What one run measures (the GPU run's, or the dry run's tiny ones)."""

    tile: int = 512  # side of the tiles of the forward benchmark
    batches: tuple[int, ...] = (8, 16, 32, 64)  # forward batch sizes
    whole: int = 4096  # side of the image segmented in memory
    large: int = 16000  # side of the image segmented block-wise
    block_size: int = 2048  # block side of the block-wise run
    repeats: int = 3  # forward timings per batch size (best kept)
    untrained: dict = field(default_factory=dict)  # SegmenterConfig fields of the untrained models


GPU_SIZES = Sizes()
DRY_SIZES = Sizes(tile=64, batches=(2, 4), whole=192, large=320, block_size=128, repeats=1,
                  untrained={"encoder": "tu-test_resnet", "decoder_channels": (16, 16, 16, 16, 16), "tile_size": 64,
                             "overlap": 16})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=None, help="trained bundle (default: untrained default models)")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run (default 450 = 7.5 min)")
    parser.add_argument("--results", type=Path, default=None,
                        help=f"append the figures here (default {RESULTS.relative_to(ROOT)}; a dry run writes only here)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one, ~1 GB)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the gpu-marked tests")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: check the script, measure nothing")
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error(f"--budget must be > 0, got {args.budget}")
    if args.bundle is not None and not (args.bundle / "bundle.json").is_file():
        parser.error(f"--bundle {args.bundle}: not a bundle folder (no bundle.json)")
    return args


def device_name(dry_run: bool) -> str:
    """The GPU's name (or the CPU's on a dry run)."""
    if dry_run:
        return f"CPU {platform.processor() or platform.machine()} (dry run)"
    import torch

    return torch.cuda.get_device_name(0)


def run_gpu_tests(timeout: float) -> dict:
    """``pytest -m gpu`` in a child process: passed / failed / skipped counts and the summary line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(ROOT / "tests")]
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(10.0, timeout))
    except subprocess.TimeoutExpired:
        return {"summary": f"stopped after {timeout:.0f} s (time cap)", "returncode": None}
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    summary = lines[-1].strip("= ") if lines else done.stderr.strip()[-200:]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|error)", summary)}
    return {"summary": summary, "returncode": done.returncode, **counts}


def forward_rate(sizes: Sizes, device, *, deadline: float) -> list[dict]:
    """Images/s of the Unet forward pass per batch size, AMP and channels_last on CUDA (best of ``repeats``)."""
    import torch

    from triageseg.segmenters.model import SegmenterConfig, create_segmenter
    from triageseg.segmenters.predict import autocast_context

    torch.manual_seed(0)
    model = create_segmenter(SegmenterConfig(**sizes.untrained)).eval().to(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    rows = []
    for batch in sizes.batches:
        if time.monotonic() > deadline:
            rows.append({"batch": batch, "images_per_s": None, "note": "skipped (time cap)"})
            continue
        x = torch.rand(batch, 3, sizes.tile, sizes.tile, device=device)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        best = float("inf")
        try:
            for k in range(sizes.repeats + 1):  # the first call warms up (cuDNN autotuning, allocator)
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.inference_mode(), autocast_context(device, True):
                    model(x)
                if cuda:
                    torch.cuda.synchronize()
                if k:
                    best = min(best, time.perf_counter() - t0)
        except torch.OutOfMemoryError:
            rows.append({"batch": batch, "images_per_s": None, "note": "out of GPU memory"})
            torch.cuda.empty_cache()
            continue
        rows.append({"batch": batch, "images_per_s": batch / best})
    return rows


def untrained_bundle(root: Path, config: dict) -> Path:
    """A router and four segmenters with random weights (speed only; the labels mean nothing)."""
    import torch

    from triageseg import bundle as B
    from triageseg.router.model import RouterConfig, create_router, save_router
    from triageseg.segmenters.model import SegmenterConfig, create_segmenter, save_segmenter

    torch.manual_seed(0)
    rcfg = RouterConfig(class_names=MODS, **({"image_size": 32} if config else {}))
    save_router(B.router_dir(root), create_router(rcfg), rcfg)
    for name in (*MODS, B.GENERALIST):
        cfg = SegmenterConfig(modality=None if name == B.GENERALIST else name, **config)
        save_segmenter(B.segmenter_dir(root, name), create_segmenter(cfg), cfg, params=None)
    B.update_manifest(root, modalities=list(MODS), fallback={"confidence_threshold": 0.0})
    return root


def synthetic_tiff(path: Path, side: int) -> Path:
    """A side x side fluorescence image, tiled from one 512 px synthetic sample (cheap to make at 16000 px)."""
    import tifffile

    from triageseg.datasets.synth import synth_sample

    sample = synth_sample("fluorescence", size=min(512, side), rng=np.random.default_rng(0))[0]
    reps = (-(-side // sample.shape[0]), -(-side // sample.shape[1])) + (1,) * (sample.ndim - 2)
    image = np.tile(sample, reps)[:side, :side]
    tifffile.imwrite(path, image, tile=(512, 512) if side >= 512 else None, compression="zlib",
                     photometric="rgb" if image.ndim == 3 else "minisblack", bigtiff=image.nbytes > 2**31)
    return path


def seconds_per_mp(bundle: Path, image: Path, out: Path, device: str, *, blockwise: bool, block_size: int) -> dict:
    """One `segment` of ``image`` (in memory, or block-wise) through the library: wall seconds per megapixel."""
    import tifffile

    from triageseg.pipeline import Pipeline
    from triageseg.pipeline.blockwise.large import BlockOptions

    with tifffile.TiffFile(image) as tif:
        h, w = tif.pages[0].shape[:2]
    pipe = Pipeline.from_bundle(bundle, device=device)
    blocks = BlockOptions(threshold_mp=0.0 if blockwise else float("inf"), block_size=block_size,
                          margin=min(64, block_size // 4))
    t0 = time.perf_counter()
    report = pipe.segment_files([image], out, blocks=blocks)
    seconds = time.perf_counter() - t0
    if report.failures:
        raise RuntimeError(f"{image}: {report.failures[0][1]}")
    mp = h * w / 1e6
    return {"side": int(h), "megapixels": mp, "seconds": seconds, "s_per_mp": seconds / mp,
            "objects": int(report.rows[0]["objects"]) if report.rows else 0}


def markdown(figures: dict) -> str:
    """The RESULTS.md section of one run."""
    lines = [f"## GPU figures ({figures['date']}, {figures['device']})", "",
             f"`benchmarks/bench_gpu.py`{' --dry-run (CPU, tiny sizes: checks the script, not a measurement)' if figures['dry_run'] else ''}; "
             f"torch {figures['torch']}, bundle: {figures['bundle']}; {figures['wall_s']:.0f} s in all.", ""]
    tests = figures.get("tests")
    lines.append(f"- gpu tests: {tests['summary'] if tests else 'not run'}")
    for row in figures["forward"]:
        rate = row.get("images_per_s")
        lines.append(f"- forward {figures['tile']}x{figures['tile']}, batch {row['batch']}, AMP: "
                     + (f"{rate:.1f} img/s" if rate else row.get("note", "not measured")))
    for key, label in (("whole", "in memory"), ("large", "block-wise")):
        row = figures.get(key)
        if row and "s_per_mp" in row:
            lines.append(f"- {row['side']}x{row['side']} {label}: {row['seconds']:.1f} s = {row['s_per_mp']:.3f} s/MP "
                         f"({row['objects']} objects)")
        else:
            lines.append(f"- {label}: {row.get('note', 'not measured') if row else 'not measured'}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the parts within the budget, print and append the figures; 2 without CUDA (unless a dry run)."""
    args = parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine, "
              "or use --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    sizes = DRY_SIZES if args.dry_run else GPU_SIZES
    device = torch.device("cpu" if args.dry_run else "cuda")
    start = time.monotonic()
    end = start + args.budget
    figures: dict = {"date": dt.date.today().isoformat(), "device": device_name(args.dry_run),
                     "torch": torch.__version__, "dry_run": args.dry_run, "tile": sizes.tile,
                     "bundle": str(args.bundle) if args.bundle else "untrained default models"}
    if not (args.dry_run or args.skip_tests):
        figures["tests"] = run_gpu_tests(timeout=0.35 * args.budget)
        print(f"gpu tests: {figures['tests']['summary']}", flush=True)
    figures["forward"] = forward_rate(sizes, device, deadline=start + 0.55 * args.budget)
    for row in figures["forward"]:
        print(f"forward batch {row['batch']}: {row.get('images_per_s') or row.get('note')}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-", dir=args.work) as tmp:
        work = Path(tmp)
        bundle = args.bundle or untrained_bundle(work / "bundle", sizes.untrained)
        for key, side, blockwise in (("whole", sizes.whole, False), ("large", sizes.large, True)):
            if time.monotonic() > end - (30 if args.dry_run else 60):
                figures[key] = {"note": "skipped (time cap)"}
                continue
            image = synthetic_tiff(work / f"{key}.tif", side)
            figures[key] = seconds_per_mp(bundle, image, work / f"out_{key}", "cpu" if args.dry_run else "cuda",
                                          blockwise=blockwise, block_size=sizes.block_size)
            print(f"{key}: {figures[key]['s_per_mp']:.3f} s/MP", flush=True)
    figures["wall_s"] = time.monotonic() - start
    text = markdown(figures)
    print(text)
    target = args.results if args.results is not None else (None if args.dry_run else RESULTS)
    if target is not None:
        with open(target, "a", encoding="utf-8") as fh:
            fh.write("\n" + text)
        print(f"appended to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
