"""Whole slides on Ray: the ``mix`` and ``kill`` modes of ``bench_distributed.py`` (see its docstring).

mix:  N slides + M small images in one ``segment_files_ray`` run on a local Ray; the share
      of time the actors sat idle; the labels against the local run at one torch thread.
kill: one slide on a two-node cluster on this machine, clean, then with the second node
      SIGKILLed when half its probability rows are recorded; the time lost.
slide: one slide, ``triageseg segment`` locally (block-wise) against ``segment --address`` on a
      two-node cluster on this machine (1 CPU per node); wall times, peak RSS of the driver and
      of every Ray process, the labels compared.
"""

from __future__ import annotations

import json
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from local_cluster import RAY_ENV, LocalCluster


def _sizes(args) -> dict:
    small = args.small
    return {"slides": args.slides or (2 if small else 4), "slide_size": args.slide_size or (1536 if small else 8000),
            "n": args.n or (8 if small else 40), "size": args.size or (256 if small else 512)}


def _slides(work: Path, count: int, size: int) -> list[Path]:
    """``count`` synthetic tile scans of ``size`` x ``size`` (bench_large's mosaics, one seed each), reused if built."""
    from large_data import build_mosaic

    tile = 2000 if size % 2000 == 0 else size // 4
    paths = []
    for k in range(count):
        folder = work / f"slide{k}"
        folder.mkdir(parents=True, exist_ok=True)
        build_mosaic(folder, size, tile, seed=100 + k)
        paths.append(folder / "mosaic.tif")
    return paths


def _bundle(args, tmp: Path) -> Path:
    from bench_distributed import untrained_bundle

    return Path(args.bundle) if args.bundle else untrained_bundle(tmp / "bundle")


def _same(a: Path, b: Path, names: list[str]) -> int:
    """How many of ``names`` have identical label files in ``a`` and ``b``."""
    from triageseg.datasets.io import read_labels

    return sum(np.array_equal(read_labels(a / f"{n}.tif"), read_labels(b / f"{n}.tif")) for n in names)


def run_mix(args) -> dict:
    """Slides and small images in one Ray run; idle share of the actors; labels against the local run."""
    import os

    import ray
    import torch

    from triageseg.datasets.synth import make_dataset
    from triageseg.pipeline import Pipeline
    from triageseg.pipeline.blockwise.large import BlockOptions
    from triageseg.pipeline.cluster.distributed import ClusterOptions, pool_size, segment_files_ray
    from triageseg.ray_cluster import cluster_info

    s = _sizes(args)
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    blocks = BlockOptions(threshold_mp=1.0)  # the slides block-wise, the small images in memory
    with tempfile.TemporaryDirectory(prefix="bench_mix_") as tmp:
        tmp = Path(tmp)
        bundle = _bundle(args, tmp)
        print(f"building {s['slides']} slide(s) of {s['slide_size']}^2 and {s['n']} image(s) of {s['size']}^2 ...",
              flush=True)
        slides = _slides(tmp / "slides", s["slides"], s["slide_size"])
        data = make_dataset(tmp / "data", n=s["n"], size=s["size"], seed=0)
        images = sorted((data / "images").iterdir())
        files = [*slides, *images]
        names = [f"slide{k}" for k in range(len(slides))] + [p.stem for p in images]
        pipe = Pipeline.from_bundle(bundle, device="cpu")
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING",
                 log_to_driver=False)
        try:
            options = ClusterOptions(actors=args.actors, progress=False)
            sizes = pool_size(options, cluster_info())
            report = segment_files_ray(pipe, files, tmp / "ray", names=names, blocks=blocks, cluster_options=options,
                                       log=lambda m: print(f"  {m}", flush=True))
        finally:
            ray.shutdown()
        local_s = same = None
        if not args.no_check:
            torch.set_num_threads(1)  # the actors' thread count: the same probabilities bit for bit
            t0 = time.perf_counter()
            Pipeline.from_bundle(bundle, device="cpu").segment_files(files, tmp / "local", names=names, blocks=blocks)
            local_s = time.perf_counter() - t0
            same = _same(tmp / "ray", tmp / "local", names)
    stats = report.slides
    pass_s = sum(seconds for _, _, seconds in report.passes)
    pool_alive = sizes[1] * pass_s  # the small images' pool at its largest size, for the pass's wall time
    pool_busy = report.stage_seconds["route"] + report.stage_seconds["segment"]
    idle_all = 1 - (stats.band_seconds + pool_busy) / max(1e-9, stats.actor_seconds + pool_alive)
    print(f"bench_distributed --mode mix: {s['slides']} slide(s) of {s['slide_size']}x{s['slide_size']} + {s['n']} "
          f"image(s) of {s['size']}x{s['size']}, {args.cpus} CPUs (local Ray), --actors {args.actors}; "
          f"{platform.processor() or platform.machine()}")
    print(f"one Ray run: {report.seconds:.1f} s, {len(report.written)} label files, {len(report.failures)} failed"
          + ("" if local_s is None else f"; local (1 torch thread): {local_s:.1f} s"))
    print(f"band actors: {stats.actors_started} started, alive {stats.actor_seconds:.1f} s, computing bands "
          f"{stats.band_seconds:.1f} s ({stats.bands} bands, {stats.blocks} blocks): "
          f"idle {100 * stats.idle_share:.0f} %")
    if pass_s:
        print(f"small images' pool: up to {sizes[1]} actor(s) x {pass_s:.1f} s, routing + segmenting "
              f"{pool_busy:.1f} s: idle {100 * (1 - pool_busy / pool_alive):.0f} %")
    print(f"all actors: idle {100 * idle_all:.0f} % of their time (actor start and model loads count as idle)")
    if same is not None:
        print(f"labels identical to the local run: {same} of {len(names)}")
    return {"sizes": s, "cpus": args.cpus, "actors": args.actors, "ray_s": report.seconds, "local_s": local_s,
            "band_actor_s": stats.actor_seconds, "band_s": stats.band_seconds, "band_idle": stats.idle_share,
            "pool_alive_s": pool_alive, "pool_busy_s": pool_busy, "idle_all": idle_all, "labels_identical": same,
            "n_labels": len(names)}


def _recorded(journal: Path) -> int:
    try:
        return len(json.loads((journal / "probs.zarr.json").read_text())["chunks"])
    except (OSError, ValueError, KeyError):
        return 0


def run_kill(args) -> dict:
    """One slide on head + second node: clean, then the second node killed at half its rows; the time lost."""
    import math
    import os

    import ray

    from triageseg.pipeline import Pipeline
    from triageseg.pipeline.blockwise.large import BlockOptions
    from triageseg.pipeline.blockwise.probstore import CHUNK_ROWS
    from triageseg.pipeline.cluster.distributed import ClusterOptions, segment_files_ray

    s = _sizes(args)
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    side = s["slide_size"]
    band_rows = 1 if args.small else 8  # chunk rows of 256 per band: a few bands either way
    blocks = BlockOptions(threshold_mp=0)
    half = math.ceil(side / CHUNK_ROWS) // 2
    with tempfile.TemporaryDirectory(prefix="bench_kill_") as tmp:
        tmp = Path(tmp)
        bundle = _bundle(args, tmp)
        print(f"building a slide of {side}^2 ...", flush=True)
        slide = _slides(tmp / "slides", 1, side)[0]
        pipe = Pipeline.from_bundle(bundle, device="cpu")
        options = ClusterOptions(actors="2", band_chunk_rows=band_rows, progress=False)  # one band actor per node
        walls, killed = [], []
        with LocalCluster(head_cpus=1, nodes=(1,)) as cluster:
            ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
            try:
                for run in ("clean", "kill"):
                    out = tmp / run
                    done = threading.Event()

                    def watch(out=out, done=done) -> None:
                        while not done.is_set():
                            if _recorded(out / ".slide.blocks") >= half:
                                killed.extend(cluster.kill_node(1))
                                return
                            time.sleep(0.05)

                    watcher = threading.Thread(target=watch, daemon=True)
                    if run == "kill":
                        watcher.start()
                    t0 = time.perf_counter()
                    report = segment_files_ray(pipe, [slide], out, names=["slide"], blocks=blocks,
                                               cluster_options=options, log=lambda m: print(f"  {m}", flush=True))
                    walls.append(time.perf_counter() - t0)
                    done.set()
                    if report.failures:
                        raise SystemExit(f"{run} run failed: {report.failures}")
            finally:
                ray.shutdown()
        same = _same(tmp / "clean", tmp / "kill", ["slide"]) == 1
    lost = walls[1] - walls[0]
    print(f"bench_distributed --mode kill: one slide of {side}x{side}, head + second node of 1 CPU each "
          f"(127.0.0.1), 2 band actors, bands of {band_rows * CHUNK_ROWS} rows; "
          f"{platform.processor() or platform.machine()}")
    print(f"clean run: {walls[0]:.1f} s; second node SIGKILLed at {half} of {math.ceil(side / CHUNK_ROWS)} chunk rows "
          f"({'; '.join(killed) or 'nothing was running there'}): {walls[1]:.1f} s")
    print(f"time lost to the kill: {lost:+.1f} s ({100 * lost / walls[0]:+.0f} %; the rest of that run had 1 CPU, "
          f"not 2); labels identical: {same}")
    return {"side": side, "clean_s": walls[0], "kill_s": walls[1], "lost_s": lost, "killed": killed,
            "labels_identical": same}


def _peak_kib(pid: int) -> int:
    """The peak resident memory (VmHWM) of a live process, in KiB; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _short(command: str) -> str:
    """A process's command line without the interpreter's and the packages' paths."""
    words = [w.rsplit("site-packages/", 1)[-1] if "/" in w else w for w in command.split()]
    return " ".join(w for w in words if not w.endswith(("/python", "/python3")))[:90]


def _watch_peaks(groups: list[int], stop: threading.Event, peaks: dict) -> None:
    """Until ``stop``: every process of these process groups and their descendants, its peak RSS and command."""
    from local_cluster import cmdline, processes

    while True:
        table = processes()
        ours = {pid for pid, _, pgid in table if pgid in groups}
        grew = True
        while grew:  # descendants that left the group
            more = {pid for pid, ppid, _ in table if ppid in ours} - ours
            ours |= more
            grew = bool(more)
        for pid in ours:
            kib = _peak_kib(pid)
            if kib:
                command = peaks[pid][1] if pid in peaks else _short(cmdline(pid))
                peaks[pid] = (max(kib, peaks.get(pid, (0, ""))[0]), command)
        if stop.wait(0.5):
            return


def _compare(a: Path, b: Path) -> dict:
    """Whether two label files are identical; if not, the pixels that differ and F1 between them."""
    from triageseg.datasets.io import read_labels
    from triageseg.postprocess.metrics import match_image

    x, y = read_labels(a), read_labels(b)
    if np.array_equal(x, y):
        return {"identical": True, "objects": int(x.max())}
    found = match_image(x, y)
    return {"identical": False, "objects": int(x.max()), "objects_b": int(y.max()),
            "pixels_differ": int(np.count_nonzero(x != y)), "f1_05": float(found.f1[0]), "mean_f1": found.mean_f1}


def run_slide(args) -> dict:
    """One slide: the local block path (``segment``, the machine's cores) against a two-node cluster on this
    machine (``segment --address``, 1 CPU per node): wall times, peak RSS of every process, the labels."""
    import os

    side = args.slide_size or (1536 if args.small else 16000)
    work = Path(args.work) if args.work else Path(__file__).resolve().parents[1] / ".bench" / "slide"
    from bench_large import run_child, segment_cmd

    with tempfile.TemporaryDirectory(prefix="bench_slide_", dir=work.parent if work.parent.is_dir() else None) as tmp:
        tmp = Path(tmp)
        bundle = _bundle(args, tmp)
        print(f"building (or reusing) a slide of {side}^2 in {work} ...", flush=True)
        slide = _slides(work, 1, side)[0]
        local_s, local_gib = run_child(segment_cmd([slide], bundle, tmp / "local", "--blocks-above", "0"),
                                       tmp / "local.log", RAY_ENV)
        print(f"local block path: {local_s:.1f} s, peak RSS {local_gib:.2f} GiB", flush=True)
        peaks: dict = {}
        with LocalCluster(head_cpus=1, nodes=(1,)) as cluster:
            stop = threading.Event()
            watcher = threading.Thread(target=_watch_peaks, args=(cluster.groups, stop, peaks), daemon=True)
            watcher.start()
            try:
                actors = ["--actors", args.actors] if args.actors != "auto" else []
                ray_s, driver_gib = run_child(segment_cmd([slide], bundle, tmp / "ray", "--blocks-above", "0",
                                                          "--address", cluster.address, *actors),
                                              tmp / "ray.log", RAY_ENV)
            finally:
                stop.set()
                watcher.join()
        print(f"two-node cluster: {ray_s:.1f} s, driver peak RSS {driver_gib:.2f} GiB", flush=True)
        same = _compare(tmp / "local" / f"{slide.stem}.tif", tmp / "ray" / f"{slide.stem}.tif")
    top = sorted(peaks.values(), reverse=True)
    workers = [(kib, cmd) for kib, cmd in top if "default_worker" in cmd or cmd.startswith("ray::")]
    worst = max((kib for kib, _ in workers), default=0) / 2**20
    print(f"bench_distributed --mode slide: one slide of {side}x{side}; local `segment` on "
          f"{len(os.sched_getaffinity(0))} cores against `segment --address` on a head + second node of 1 CPU each "
          f"(127.0.0.1); {platform.processor() or platform.machine()}")
    print(f"wall: local {local_s:.1f} s, cluster {ray_s:.1f} s = {ray_s / local_s:.2f}x (goal <= 1.25x)")
    print(f"peak RSS: local child {local_gib:.2f} GiB; cluster driver {driver_gib:.2f} GiB; worst Ray worker "
          f"{worst:.2f} GiB of {len(workers)} (goal <= 3 GiB)")
    for kib, cmd in top[:6]:
        print(f"  {kib / 2**20:.2f} GiB  {cmd}")
    print("labels identical to the local block path: " + (f"yes ({same['objects']} objects)" if same["identical"] else
          f"NO: {same['pixels_differ']} pixels differ, objects {same['objects']} / {same['objects_b']}, "
          f"F1@0.5 {same['f1_05']:.5f}, mean F1 {same['mean_f1']:.5f}"))
    return {"side": side, "local_s": local_s, "ray_s": ray_s, "ratio": ray_s / local_s, "local_rss_gib": local_gib,
            "driver_rss_gib": driver_gib, "worker_rss_gib": worst, "labels": same}
