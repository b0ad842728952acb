"""Throughput of `segment` on one machine: the local path vs the Ray Data path, same CPUs, same images.

One run segments the same synthetic images twice, first with
:func:`triageseg.pipeline.batch.segment_files` (what ``triageseg segment`` runs), then on
a local Ray with the same number of CPUs (what ``triageseg segment --ray`` runs), and
prints images/s of both, the Ray overhead (goal: <= 20 %), the wall time of each Ray
pass and the task seconds of each stage (read, route, segment, write), for two ways
of giving Ray the same cores (see ``setups`` in :func:`main`). README.md
("Segmenting a large collection on a cluster") derives the expected scaling over GPU
nodes from these per-stage figures.

Usage:
    python benchmarks/bench_distributed.py                        # 48 images of 512x512, untrained models
    python benchmarks/bench_distributed.py --bundle demo_out/bundle --size 1024 --json out.json

Without ``--bundle`` the models are untrained, of the default architectures (ViT-tiny
router at 112 px, efficientnet-b3 Unets), and the bundle's confidence threshold is 0, so
the router's top-1 choice spreads the images over the three specialists as a trained,
confident router would: speed only, the labels mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

MODS = ("fluorescence", "brightfield", "he")


def untrained_bundle(root: Path) -> Path:
    """Default-architecture router and specialists with random weights, fallback threshold 0."""
    import torch

    from triageseg import bundle as B
    from triageseg.router.model import RouterConfig, create_router, save_router
    from triageseg.segmenters.model import SegmenterConfig, create_segmenter, save_segmenter

    torch.manual_seed(0)
    rcfg = RouterConfig(class_names=MODS)
    save_router(B.router_dir(root), create_router(rcfg), rcfg)
    for name in (*MODS, B.GENERALIST):
        cfg = SegmenterConfig(modality=None if name == B.GENERALIST else name)
        save_segmenter(B.segmenter_dir(root, name), create_segmenter(cfg), cfg, params=None)
    B.update_manifest(root, modalities=list(MODS), fallback={"confidence_threshold": 0.0})
    return root


def run_local(bundle: Path, files: list[Path], out: Path, threads: int):
    import torch

    from triageseg.pipeline import Pipeline

    torch.set_num_threads(threads)
    pipe = Pipeline.from_bundle(bundle, device="cpu")
    return pipe.segment_files(files, out)


def run_ray(bundle: Path, files: list[Path], out: Path, ray_cpus: int, actors: str, cpus_per_actor: float):
    """A local Ray of ``ray_cpus`` logical CPUs for the run; returns (report, seconds to start Ray)."""
    import ray

    from triageseg.pipeline import Pipeline
    from triageseg.pipeline.distributed import ClusterOptions, segment_files_ray

    pipe = Pipeline.from_bundle(bundle, device="cpu")
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=ray_cpus, include_dashboard=False, logging_level="WARNING",
             log_to_driver=False)
    start_s = time.perf_counter() - t0
    try:
        options = ClusterOptions(actors=actors, cpus_per_actor=cpus_per_actor, progress=False)
        report = segment_files_ray(pipe, files, out, log=lambda _m: None, cluster_options=options)
    finally:
        ray.shutdown()
    return report, start_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=None, help="Model bundle (default: untrained, default architectures).")
    parser.add_argument("--n", type=int, default=48, help="Images.")
    parser.add_argument("--size", type=int, default=512, help="Image side in pixels.")
    parser.add_argument("--cpus", type=int, default=len(os.sched_getaffinity(0)),
                        help="CPUs for both runs: torch threads locally, Ray's num_cpus.")
    parser.add_argument("--json", default=None, help="Also write the figures here.")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a Ray of its own: no token file in ~/.ray

    from triageseg.datasets.synth import make_dataset

    with tempfile.TemporaryDirectory(prefix="bench_distributed_") as tmp:
        tmp = Path(tmp)
        bundle = Path(args.bundle) if args.bundle else untrained_bundle(tmp / "bundle")
        data = make_dataset(tmp / "data", n=args.n, size=args.size, seed=0)
        files = sorted((data / "images").iterdir())

        local = run_local(bundle, files, tmp / "local", args.cpus)
        # Two ways to give Ray the same cores: the default (auto: actors of one CPU, one
        # CPU kept for the read/write tasks), and one actor with as many torch threads as
        # the local run, plus one logical CPU so the watershed tasks interleave with it
        # as they do in the local process.
        setups = [(f"ray auto ({args.cpus} CPUs)", args.cpus, "auto", 1.0),
                  (f"ray 1 actor x {args.cpus} threads", args.cpus + 1, "1", float(args.cpus))]
        runs = []
        for label, ray_cpus, actors, per_actor in setups:
            out = tmp / f"ray{len(runs)}"
            report, start_s = run_ray(bundle, files, out, ray_cpus, actors, per_actor)
            runs.append((label, report, start_s, _same_labels(tmp / "local", out, files)))

    n = len(files)
    print(f"bench_distributed: {n} images of {args.size}x{args.size}, {args.cpus} CPUs, "
          f"{'bundle ' + args.bundle if args.bundle else 'untrained default models'}; "
          f"{platform.processor() or platform.machine()}, local torch threads {args.cpus}")
    print(f"models used: {', '.join(f'{k}: {v}' for k, v in local.per_model().items())}")
    print(f"{'path':<26} {'seconds':>8} {'images/s':>9} {'overhead':>9}  labels = local")
    print(f"{'local':<26} {local.seconds:8.1f} {n / local.seconds:9.2f} {'':>9}")
    figures = {"n": n, "size": args.size, "cpus": args.cpus, "bundle": args.bundle, "local_s": local.seconds,
               "per_model": local.per_model(), "ray": []}
    for label, report, start_s, same in runs:
        overhead = report.seconds / local.seconds - 1
        print(f"{label:<26} {report.seconds:8.1f} {n / report.seconds:9.2f} {100 * overhead:+8.0f}%  {same}"
              f"   (+ {start_s:.1f} s to start the local Ray)")
        figures["ray"].append({"setup": label, "seconds": report.seconds, "ray_start_s": start_s,
                               "overhead": overhead, "labels_identical": same, "passes": report.passes,
                               "stage_seconds": report.stage_seconds})
    best = min(r[1].seconds for r in runs) / local.seconds - 1
    print(f"best Ray overhead {100 * best:+.0f} % (goal <= +20 %: {'met' if best <= 0.20 else 'missed'})")
    for label, report, _, _ in runs:
        print(f"{label}: passes (wall seconds)")
        for name, count, seconds in report.passes:
            print(f"  {name:<28} {count:4d} images {seconds:7.1f} s")
        print(f"{label}: stages (task seconds summed over workers; per image)")
        for stage, seconds in report.stage_seconds.items():
            print(f"  {stage:<8} {seconds:8.2f} s  {seconds / n:7.3f} s/image")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


def _same_labels(a: Path, b: Path, files: list[Path]) -> bool:
    import numpy as np

    from triageseg.datasets.io import read_labels

    return all(np.array_equal(read_labels(a / f"{f.stem}.tif"), read_labels(b / f"{f.stem}.tif")) for f in files)


if __name__ == "__main__":
    main()
