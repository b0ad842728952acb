"""Huge images block-wise: memory, accuracy against the tiles one by one, seams, speed.

Builds a fluorescence mosaic with its ground truth (``large_data.py``: by default one
synthetic tile scan, ``datasets.synth_scan``: one acquisition, content continuous across
tile edges; ``--layout independent``: independent synthetic images side by side), then
runs ``triageseg segment`` in child processes and prints, in one run, every goal of the
block path (scoring in ``large_scoring.py``):

1. the mosaic (default 16000 x 16000) block-wise: peak RSS of the child (getrusage of
   its children), seconds per megapixel; mean F1 against the ground truth (per tile,
   the ``default`` protocol pooled over tiles) against the same tiles segmented one by
   one with the same model. Goals: RSS <= 3 GiB, |F1 difference| <= 0.005.
2. seam defects on the mosaic: ground-truth nuclei crossing a block-core boundary that
   come out split at that boundary (two predicted ids, one on each side, each mostly on
   its side) or cut there (the best-matching prediction, covering >= 20% of it, stops at
   the line while the nucleus goes on); predicted ids that appear in two pieces across a
   boundary; ids not 1..n. The same counts on the tiles one by one are printed for
   comparison. Goal: 0.
3. a crop of ``--whole`` x ``--whole`` pixels (default 4000) segmented whole (in memory)
   and block-wise, side by side, ``--repeats`` times alternating: F1 at IoU 0.5 between
   the two label images (goal >= 0.995) and seconds per megapixel of each (goal: block-wise
   within 15% of whole, best run of each).

A trained bundle is needed: ``--bundle DIR``, or the demo bundle in ``.bench/demo`` (made
with ``triageseg demo --out .bench/demo`` when missing, ~8 minutes on 2 cores).

The tiles are 2000 px by default. A mosaic of independent synthetic images has seams no
real scan has (each tile its own exposure; a nucleus cut by one tile's edge next to
unrelated content): they cost the whole-image path as much F1 as the block path, which is
why the default mosaic is a tile scan.

Usage:
    python benchmarks/bench_large.py                                  # 16000 x 16000
    python benchmarks/bench_large.py --size 8000                      # smaller
    python benchmarks/bench_large.py --steps mosaic                   # memory, seams, speed only
    python benchmarks/bench_large.py --steps tiles                    # then the tiles, scored against it
    python benchmarks/bench_large.py --size 8000 --rescore            # score an earlier run again
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from large_data import build_mosaic, write_crop  # noqa: E402
from large_scoring import _read, ids_consecutive, seam_defects, tile_scores  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Run the command given after it and print the peak RSS (KiB) of that child alone.
_WRAPPER = (
    "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
    "print('MAXRSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True); sys.exit(rc)"
)


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def run_child(args: list[str], log: Path, env: dict | None = None) -> tuple[float, float]:
    """Run a command in a child process (``env`` added to the environment); (wall seconds, peak RSS in GiB of it)."""
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run([sys.executable, "-c", _WRAPPER, *args], stdout=subprocess.PIPE, stderr=fh, text=True,
                              env={**_env(), **(env or {})}, check=False)
    wall = time.perf_counter() - t0
    fh_text = proc.stdout
    log.write_text(log.read_text() + fh_text)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(args)}; see {log}")
    kib = int(fh_text.strip().splitlines()[-1].split()[-1])
    return wall, kib / 2**20


def segment_cmd(inputs: list[Path], bundle: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "triageseg.cli.main", "segment", *map(str, inputs), "--bundle", str(bundle),
            "--out", str(out), "--overwrite", "--quiet", *extra]


def ensure_bundle(bundle: str | None) -> Path:
    if bundle:
        return Path(bundle)
    demo = ROOT / ".bench" / "demo"
    if not (demo / "bundle" / "bundle.json").is_file():
        print(f"training the demo bundle into {demo} ...", flush=True)
        subprocess.run([sys.executable, "-m", "triageseg.cli.main", "demo", "--out", str(demo), "--quiet"], check=True,
                       env=_env())
    return demo / "bundle"


def routing_row(out: Path) -> dict:
    with (out / "routing.csv").open() as fh:
        return next(csv.DictReader(fh))


# --------------------------------------------------------------------------- main


def run_mosaic(args, work: Path, bundle: Path, run: bool = True) -> dict:
    """The mosaic block-wise in a child (RSS, time; or those of an earlier run), then its seams and ids."""
    from triageseg.pipeline.blockwise.blocks import DEFAULT_MARGIN, plan_blocks
    from triageseg.pipeline.blockwise.large import DEFAULT_THRESHOLD_MP

    out = work / "out_mosaic"
    measured = work / "mosaic_run.json"
    if run:
        # a mosaic above the default threshold goes block-wise by itself; a small trial is sent there
        force = ["--blocks-above", "0"] if args.size**2 <= DEFAULT_THRESHOLD_MP * 1e6 else []
        wall, rss = run_child(segment_cmd([work / "mosaic.tif"], bundle, out, "--block-size", str(args.block_size),
                                          *force), work / "mosaic.log")
        measured.write_text(json.dumps({"wall": wall, "rss": rss, "block_size": args.block_size}))
    else:  # scored from an earlier run in the same folder
        previous = json.loads(measured.read_text())
        wall, rss = previous["wall"], previous["rss"]
    row = routing_row(out)
    print(f"mosaic block-wise: {wall:.0f} s, peak RSS {rss:.2f} GiB, routed {row['modality']} -> {row['used_model']} "
          f"({row['decision']}), mode {row['mode']}", flush=True)
    grid = plan_blocks((args.size, args.size), block_size=args.block_size, margin=DEFAULT_MARGIN)  # as segment plans it
    pred = out / "mosaic.tif"
    seams = seam_defects(work / "mosaic_gt.tif", lambda *b: _read(pred, *b), grid)
    # the same count on lines through the middle of every core (no block boundary there): the model's own rate
    control = seam_defects(work / "mosaic_gt.tif", lambda *b: _read(pred, *b), midlines(grid))
    consecutive, n_ids = ids_consecutive(pred)
    return {"wall": wall, "rss": rss, "row": row, "grid": grid, "seams": seams, "control": control,
            "consecutive": consecutive, "n_ids": n_ids, "margin": DEFAULT_MARGIN}


def midlines(grid):
    """A stand-in grid for :func:`seam_defects` whose boundaries are the middle lines of ``grid``'s cores."""
    from types import SimpleNamespace

    def mids(spans):
        return [(0,)] + [((span[0] + span[1]) // 2,) for span in spans]

    return SimpleNamespace(shape=grid.shape, rows=mids(grid.rows), cols=mids(grid.cols))


def _measured(work: Path, name: str, run, rerun: bool):
    """``run()`` (its result saved as ``<name>_run.json``), or the saved result of an earlier run."""
    path = work / f"{name}_run.json"
    if rerun:
        result = run()
        path.write_text(json.dumps(result))
        return result
    return json.loads(path.read_text())


def run_tiles(args, work: Path, bundle: Path, used: str, grid, run: bool = True) -> dict:
    """The same tiles one by one with model ``used``; scores of tiles and mosaic per tile."""
    from triageseg.datasets.io import read_labels

    out = work / "out_tiles"
    wall, rss = _measured(work, "tiles", lambda: run_child(segment_cmd([work / "tiles"], bundle, out, "--modality",
                                                                       used), work / "tiles.log"), run)
    print(f"tiles one by one: {wall:.0f} s, peak RSS {rss:.2f} GiB", flush=True)
    tile, n = args.tile, args.size // args.tile
    pred = work / "out_mosaic" / "mosaic.tif"
    mosaic = tile_scores(lambda r, c: _read(pred, r * tile, (r + 1) * tile, c * tile, (c + 1) * tile),
                         work / "mosaic_gt.tif", n, tile)
    tiles = tile_scores(lambda r, c: read_labels(out / f"t_{r:03d}_{c:03d}.tif"), work / "mosaic_gt.tif", n, tile)

    def band(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        canvas = np.zeros((y1 - y0, x1 - x0), np.uint32)
        for r in range(y0 // tile, math.ceil(y1 / tile)):
            for c in range(x0 // tile, math.ceil(x1 / tile)):
                lab = read_labels(out / f"t_{r:03d}_{c:03d}.tif").astype(np.uint32)
                lab[lab > 0] += np.uint32((r * n + c) * 100000)  # ids unique across tiles
                ty, tx = r * tile, c * tile
                ys, xs = slice(max(y0, ty), min(y1, ty + tile)), slice(max(x0, tx), min(x1, tx + tile))
                canvas[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = \
                    lab[ys.start - ty : ys.stop - ty, xs.start - tx : xs.stop - tx]
        return canvas

    seams = seam_defects(work / "mosaic_gt.tif", band, grid) if grid is not None else None
    return {"wall": wall, "rss": rss, "mosaic": mosaic, "tiles": tiles, "seams": seams}


def run_crop(args, work: Path, bundle: Path, used: str, run: bool = True) -> dict:
    """A crop segmented whole and block-wise, alternating; agreement and speed."""
    from triageseg.datasets.io import read_labels
    from triageseg.postprocess.metrics import match_image

    crop = work / f"crop{args.whole}.tif"
    if not crop.is_file():
        write_crop(work / "mosaic.tif", crop, args.whole)

    def timed() -> dict:
        runs: dict[str, list[tuple[float, float, float]]] = {"whole": [], "blocks": []}
        order = (["whole", "blocks", "blocks", "whole"] * args.repeats)[: 2 * args.repeats]
        for k, mode in enumerate(order):
            out = work / f"out_{mode}"
            flag = ["--blocks-above", "inf"] if mode == "whole" else ["--blocks-above", "0", "--block-size",
                                                                       str(args.block_size)]
            wall, rss = run_child(segment_cmd([crop], bundle, out, "--modality", used, *flag), work / f"{mode}{k}.log")
            row = routing_row(out)
            runs[mode].append((wall, rss, float(row["seconds"])))
            print(f"crop {args.whole}x{args.whole} {mode}: {wall:.0f} s (routing.csv {row['seconds']} s), "
                  f"peak RSS {rss:.2f} GiB, mode {row['mode']}", flush=True)
        return runs

    runs = _measured(work, "crop", timed, run)
    whole = read_labels(work / "out_whole" / crop.name)
    blocks = read_labels(work / "out_blocks" / crop.name)
    gt = _read(work / "mosaic_gt.tif", 0, args.whole, 0, args.whole)
    # seam defects on the crop's core boundaries, block-wise and (the same nuclei) whole
    from triageseg.pipeline.blockwise.blocks import DEFAULT_MARGIN, plan_blocks

    grid = plan_blocks((args.whole, args.whole), block_size=args.block_size, margin=DEFAULT_MARGIN)
    crop_gt = work / "crop_gt.tif"
    if not crop_gt.is_file():
        write_crop(work / "mosaic_gt.tif", crop_gt, args.whole)
    seams = {mode: seam_defects(crop_gt, lambda y0, y1, x0, x1, lab=lab: lab[y0:y1, x0:x1], grid)
             for mode, lab in (("blocks", blocks), ("whole", whole))}
    pairs = np.unique(whole.astype(np.int64) * (int(blocks.max()) + 1) + blocks)
    a, b = pairs // (int(blocks.max()) + 1), pairs % (int(blocks.max()) + 1)
    identical = bool(((a > 0) == (b > 0)).all() and np.unique(a).size == np.unique(b).size == pairs.size)
    return {"runs": runs, "agree": match_image(whole, blocks).f1_at(0.5), "identical": identical, "seams": seams,
            "f1_whole": match_image(gt, whole).mean_f1, "f1_blocks": match_image(gt, blocks).mean_f1}


def _goal(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(args, m: dict | None, t: dict | None, c: dict | None, used: str) -> None:
    n, mp = args.size // args.tile, args.size**2 / 1e6
    print()
    print(f"# bench_large: {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, mosaic "
          f"{args.size}x{args.size} ({n}x{n} tiles of {args.tile}, layout {args.layout}), blocks {args.block_size}, "
          f"model {used}")
    if m is not None:
        s = m["seams"]
        print(f"mosaic grid {len(m['grid'].rows)}x{len(m['grid'].cols)} blocks, margin {m['margin']} px")
        print(f"mosaic peak RSS of the segment child     {m['rss']:.2f} GiB   goal <= 3 GiB: {_goal(m['rss'] <= 3.0)}")
        print(f"mosaic block-wise                        {m['wall'] / mp:.3f} s/MP ({m['wall']:.0f} s wall)")
        print(f"seams: GT nuclei across a core boundary  {s['crossing']}")
        defects = s["split"] | s["cut"]
        print(f"  split at the boundary / cut there      {len(s['split'])} / {len(s['cut'])}: seam defects {len(defects)}"
              f"  goal 0: {_goal(not defects)}")
        if t is not None and t["seams"] is not None:
            ts = t["seams"]
            own = defects - (ts["split"] | ts["cut"])
            print(f"  the same nuclei, tiles one by one      split {len(ts['split'])} / cut {len(ts['cut'])} (the model's "
                  f"own errors); defects of the block path only: {len(own)}")
        if m.get("control") is not None:
            cs = m["control"]
            print(f"  control: the same count on the cores' middle lines (no boundary there): {cs['crossing']} "
                  f"crossing, split {len(cs['split'])} / cut {len(cs['cut'])} = {len(cs['split'] | cs['cut'])}")
        print(f"  predicted ids in two pieces across it  {s['pieces']};  ids 1..{m['n_ids']} consecutive: "
              f"{m['consecutive']};  no duplicates: {_goal(s['pieces'] == 0 and m['consecutive'])}")
    if t is not None:
        fm, ft = t["mosaic"], t["tiles"]
        diff = fm.mean_f1 - ft.mean_f1
        print(f"mosaic mean F1 (per tile, pooled)        {fm.mean_f1:.4f}  (mean over tiles {fm.image_mean_f1:.4f}, "
              f"F1@0.5 {fm.f1_at(0.5):.4f}, {fm.n_pred} objects)")
        print(f"tiles one by one mean F1                 {ft.mean_f1:.4f}  (mean over tiles {ft.image_mean_f1:.4f}, "
              f"F1@0.5 {ft.f1_at(0.5):.4f}, {ft.n_pred} objects; GT {ft.n_true})")
        print(f"difference                               {diff:+.4f}  goal |d| <= 0.005: {_goal(abs(diff) <= 0.005)}")
        print(f"tiles one by one                         {t['wall'] / mp:.3f} s/MP, peak RSS {t['rss']:.2f} GiB")
    if c is not None:
        runs, mpc = c["runs"], args.whole**2 / 1e6
        best_w, best_b = min(r[0] for r in runs["whole"]), min(r[0] for r in runs["blocks"])
        print(f"crop {args.whole}x{args.whole} whole vs block-wise F1@0.5 {c['agree']:.4f}  goal >= 0.995: "
              f"{_goal(c['agree'] >= 0.995)}  (mean F1 vs GT: whole {c['f1_whole']:.4f}, blocks {c['f1_blocks']:.4f})")
        print(f"crop label images identical up to the numbering: {c.get('identical')}")
        if "seams" in c:
            sb, sw = c["seams"]["blocks"], c["seams"]["whole"]
            own = (sb["split"] | sb["cut"]) - (sw["split"] | sw["cut"])
            print(f"crop seams: GT nuclei across a core boundary {sb['crossing']}; split / cut block-wise "
                  f"{len(sb['split'])} / {len(sb['cut'])}, whole {len(sw['split'])} / {len(sw['cut'])}; "
                  f"defects of the block path only: {len(own)}  goal 0: {_goal(not own)}")
        for mode, best in (("whole", best_w), ("blocks", best_b)):
            print(f"crop {mode:<6} {best / mpc:.3f} s/MP (runs {', '.join(f'{r[0]:.0f}' for r in runs[mode])} s wall; "
                  f"routing.csv {', '.join(f'{r[2]:.0f}' for r in runs[mode])} s), peak RSS "
                  f"{max(r[1] for r in runs[mode]):.2f} GiB")
        print(f"block-wise / whole time                  {best_b / best_w:.3f}  goal <= 1.15: {_goal(best_b / best_w <= 1.15)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=None, help="trained bundle (default: the demo bundle in .bench/demo)")
    parser.add_argument("--size", type=int, default=16000, help="mosaic side (a multiple of --tile)")
    parser.add_argument("--tile", type=int, default=2000, help="side of the synthetic tiles")
    parser.add_argument("--whole", type=int, default=4000, help="side of the crop segmented whole and block-wise")
    parser.add_argument("--block-size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=1, help="whole + block-wise runs of the crop (alternating)")
    parser.add_argument("--steps", default="mosaic,tiles,crop", help="which parts to run (comma-separated)")
    parser.add_argument("--work", default=str(ROOT / ".bench" / "large"), help="scratch folder (several GB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=("scan", "independent"), default="scan",
                        help="mosaic of one synthetic tile scan (default) or of independent synthetic images")
    parser.add_argument("--rescore", action="store_true",
                        help="run nothing: score the outputs of an earlier run in --work (its times and RSS as saved)")
    args = parser.parse_args()
    steps = set(args.steps.split(","))
    if not steps <= {"mosaic", "tiles", "crop"}:
        raise SystemExit(f"--steps takes mosaic, tiles, crop; got {args.steps}")
    if "tiles" in steps and "mosaic" not in steps and not (Path(args.work) / "mosaic_run.json").is_file():
        raise SystemExit("--steps tiles needs the mosaic run (now or earlier in the same --work folder)")

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bundle = ensure_bundle(args.bundle)
    t0 = time.perf_counter()
    build_mosaic(work, args.size, args.tile, args.seed, args.layout)
    n = args.size // args.tile
    print(f"mosaic {args.size}x{args.size} from {n * n} tiles of {args.tile}: ready ({time.perf_counter() - t0:.0f} s)",
          flush=True)
    go = not args.rescore
    m = run_mosaic(args, work, bundle, run=go and "mosaic" in steps) if steps & {"mosaic", "tiles"} else None
    used = m["row"]["used_model"] if m else "fluorescence"
    t = run_tiles(args, work, bundle, used, m["grid"], run=go) if "tiles" in steps else None
    c = run_crop(args, work, bundle, used, run=go) if "crop" in steps else None
    report(args, m, t, c, used)


if __name__ == "__main__":
    main()
