"""Throughput of `segment` on one machine: the local path vs the Ray Data path, same CPUs, same images.

One run segments the same synthetic images with
:func:`triageseg.pipeline.local.batch.segment_files` (what ``triageseg segment`` runs), then on
a local Ray with the same number of CPUs (what ``triageseg segment --ray`` runs), then locally
again (the Ray runs are compared with the mean of the two local runs: this VM drifts), and
prints images/s of both, the Ray overhead (goal: <= 20 %), the wall time of each Ray
pass and the task seconds of each stage (read, route, segment, write), for two ways
of giving Ray the same cores (see ``setups`` in :func:`main`). README.md
("Segmenting a large collection on a cluster") derives the expected scaling over GPU
nodes from these per-stage figures.

Two more modes, for whole slides on the cluster (issue 21):

- ``--mode mix``: 4 slides of 8000 x 8000 (synthetic tile scans) and 40 images of 512 x 512
  in ONE Ray run (slides block-wise, their bands and blocks interleaved; the small
  images' pass at the same time), then the same inputs locally at one torch thread (the
  actors' count) to check that every label file is identical. Prints the wall time and
  the share of time the actors sat idle (band actors: their lives less their band
  seconds; the small images' pool: its actors x the pass's wall time less their route and
  segment seconds; actor start and model loads count as idle).
- ``--mode kill``: one slide on a two-node cluster on this machine (``ray start --head`` and
  a second node, 1 CPU each), segmented once, then again with the second node's raylet
  and workers SIGKILLed when half the probability rows are recorded: prints both wall
  times and the time lost to the kill (the rest of that run has one CPU fewer), and
  whether the labels are identical.

- ``--mode slide``: one slide of 16000 x 16000 (``--slide-size``), ``triageseg segment`` on this
  machine's cores (block-wise) against ``triageseg segment --address`` on a two-node cluster on
  this machine (1 CPU each): both wall times and their ratio (goal <= 1.25x), the peak RSS of
  the local child, of the cluster's driver and of every Ray process (goal <= 3 GiB), and
  whether the label files are identical. The slide is kept in ``.bench/slide`` for reruns.

``--small`` makes any of these modes a quick check (2 slides of 1536 x 1536 and 8 images of
256 x 256; a 1536 x 1536 slide for ``kill``).

Usage:
    python benchmarks/bench_distributed.py                        # 48 images of 512x512, untrained models
    python benchmarks/bench_distributed.py --bundle demo_out/bundle --size 1024 --json out.json
    python benchmarks/bench_distributed.py --mode mix             # 4 x 8000^2 slides + 40 x 512^2 images
    python benchmarks/bench_distributed.py --mode kill --small    # time lost to a killed node, quick

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
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_slides, local_cluster, large_data

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


def run_ray(bundle: Path, files: list[Path], out: Path, ray_cpus: int, actors: str,
            cpus_per_actor: float | None):
    """A local Ray of ``ray_cpus`` logical CPUs for the run; returns (report, seconds to start Ray)."""
    import ray

    from triageseg.pipeline import Pipeline
    from triageseg.pipeline.cluster.distributed import ClusterOptions, segment_files_ray

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
    parser.add_argument("--mode", choices=("images", "mix", "kill", "slide"), default="images",
                        help="images: local vs Ray on small images; mix: slides and images in one run (idle share); "
                             "kill: time lost to a node killed mid-slide; slide: one slide, local vs two nodes.")
    parser.add_argument("--bundle", default=None, help="Model bundle (default: untrained, default architectures).")
    parser.add_argument("--n", type=int, default=None, help="Small images (images: 48, mix: 40; --small: 8).")
    parser.add_argument("--size", type=int, default=None, help="Small image side in pixels (512; --small: 256).")
    parser.add_argument("--slides", type=int, default=None, help="mix: slides (4; --small: 2).")
    parser.add_argument("--slide-size", type=int, default=None,
                        help="mix, kill: slide side (8000; slide: 16000; --small: 1536).")
    parser.add_argument("--small", action="store_true", help="mix, kill, slide: a quick check at small sizes.")
    parser.add_argument("--work", default=None, help="slide: where the slide is built and kept (.bench/slide).")
    parser.add_argument("--actors", default="auto", help="mix: --actors of the Ray run (kill: 2, one per node).")
    parser.add_argument("--no-check", action="store_true", help="mix: skip the local run and the label comparison.")
    parser.add_argument("--cpus", type=int, default=len(os.sched_getaffinity(0)),
                        help="CPUs for both runs: torch threads locally, Ray's num_cpus.")
    parser.add_argument("--json", default=None, help="Also write the figures here.")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a Ray of its own: no token file in ~/.ray
    if args.mode != "images":
        from bench_slides import run_kill, run_mix, run_slide

        figures = {"mix": run_mix, "kill": run_kill, "slide": run_slide}[args.mode](args)
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2))
        return
    args.n = args.n or 48
    args.size = args.size or 512

    from triageseg.datasets.synth import make_dataset

    with tempfile.TemporaryDirectory(prefix="bench_distributed_") as tmp:
        tmp = Path(tmp)
        bundle = Path(args.bundle) if args.bundle else untrained_bundle(tmp / "bundle")
        data = make_dataset(tmp / "data", n=args.n, size=args.size, seed=0)
        files = sorted((data / "images").iterdir())

        local = run_local(bundle, files, tmp / "local", args.cpus)
        # Two ways to give Ray the same cores: the default (auto: one actor per node with every CPU
        # of it, reading, decoding and writing its own images), and actors of one CPU (one thread) each.
        setups = [(f"ray auto ({args.cpus} CPUs)", args.cpus, "auto", None),
                  ("ray actors of 1 thread", args.cpus, "auto", 1.0)]
        runs = []
        for label, ray_cpus, actors, per_actor in setups:
            out = tmp / f"ray{len(runs)}"
            report, start_s = run_ray(bundle, files, out, ray_cpus, actors, per_actor)
            runs.append((label, report, start_s, _same_labels(tmp / "local", out, files)))
        # The local run again after the Ray runs: this VM's speed drifts 10-20 % within minutes, so the Ray
        # runs are compared with the mean of a local run before and one after them.
        again = run_local(bundle, files, tmp / "local_again", args.cpus)
    local_runs = (local.seconds, again.seconds)
    local.seconds = sum(local_runs) / 2

    n = len(files)
    print(f"bench_distributed: {n} images of {args.size}x{args.size}, {args.cpus} CPUs, "
          f"{'bundle ' + args.bundle if args.bundle else 'untrained default models'}; "
          f"{platform.processor() or platform.machine()}, local torch threads {args.cpus}")
    print(f"models used: {', '.join(f'{k}: {v}' for k, v in local.per_model().items())}")
    print(f"{'path':<26} {'seconds':>8} {'images/s':>9} {'overhead':>9}  labels = local")
    print(f"{'local':<26} {local.seconds:8.1f} {n / local.seconds:9.2f} {'':>9}"
          f"   (mean of {local_runs[0]:.1f} s before and {local_runs[1]:.1f} s after the Ray runs)")
    figures = {"n": n, "size": args.size, "cpus": args.cpus, "bundle": args.bundle, "local_s": local.seconds, "local_runs_s": local_runs,
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
