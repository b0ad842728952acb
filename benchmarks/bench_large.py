"""Huge images block-wise: memory, accuracy against the tiles one by one, seams, speed.

Builds a fluorescence mosaic of synthetic tiles with its ground truth (written to tiled
TIFFs strip by strip, never whole in memory), then runs ``triageseg segment`` in child
processes and prints, in one run, every goal of the block path:

1. the mosaic (default 16000 x 16000) block-wise: peak RSS of the child (getrusage of
   its children), seconds per megapixel; mean F1 against the ground truth (per tile,
   the ``default`` protocol pooled over tiles) against the same tiles segmented one by
   one with the same model. Goals: RSS <= 3 GiB, |F1 difference| <= 0.005.
2. seam defects on the mosaic: ground-truth nuclei crossing a block-core boundary that
   come out split at that boundary (two predicted ids, one on each side, each mostly on
   its side) or cut there (the best-matching prediction stops at the line while the
   nucleus goes on); predicted ids that appear in two pieces across a boundary; ids not
   1..n. The same counts on the tiles one by one are printed for comparison. Goal: 0.
3. a crop of ``--whole`` x ``--whole`` pixels (default 4000) segmented whole (in memory)
   and block-wise, side by side, ``--repeats`` times alternating: F1 at IoU 0.5 between
   the two label images (goal >= 0.995) and seconds per megapixel of each (goal: block-wise
   within 15% of whole, best run of each).

A trained bundle is needed: ``--bundle DIR``, or the demo bundle in ``.bench/demo`` (made
with ``triageseg demo --out .bench/demo`` when missing, ~8 minutes on 2 cores).

Usage:
    python benchmarks/bench_large.py                          # 16000 x 16000, ~30-60 min on 2 cores
    python benchmarks/bench_large.py --size 8000 --whole 2000 # smaller trial
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

ROOT = Path(__file__).resolve().parents[1]
_TIFF_TILE = 512
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


def run_child(args: list[str], log: Path) -> tuple[float, float]:
    """Run a command in a child process; (wall seconds, peak RSS in GiB of that child)."""
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run([sys.executable, "-c", _WRAPPER, *args], stdout=subprocess.PIPE, stderr=fh, text=True,
                              env=_env(), check=False)
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


# --------------------------------------------------------------------------- data


def ensure_bundle(bundle: str | None) -> Path:
    if bundle:
        return Path(bundle)
    demo = ROOT / ".bench" / "demo"
    if not (demo / "bundle" / "bundle.json").is_file():
        print(f"training the demo bundle into {demo} ...", flush=True)
        subprocess.run([sys.executable, "-m", "triageseg.cli.main", "demo", "--out", str(demo), "--quiet"], check=True,
                       env=_env())
    return demo / "bundle"


def _zsave(path: Path, array: np.ndarray) -> None:
    import io

    import imagecodecs

    buf = io.BytesIO()
    np.save(buf, array)
    path.write_bytes(imagecodecs.zstd_encode(buf.getvalue(), level=1))


def _zload(path: Path) -> np.ndarray:
    import io

    import imagecodecs

    return np.load(io.BytesIO(imagecodecs.zstd_decode(path.read_bytes())))


def _tiff_tiles(rows, size: int, tile: int, channels: int | None):
    """512 x 512 TIFF tiles in row-major order from synthetic rows of ``tile`` px (two rows in memory at most)."""
    cache: dict[int, np.ndarray] = {}
    for ty in range(0, size, _TIFF_TILE):
        r0, r1 = ty // tile, (min(size, ty + _TIFF_TILE) - 1) // tile
        for r in list(cache):
            if r < r0:
                del cache[r]
        for r in range(r0, r1 + 1):
            if r not in cache:
                cache[r] = rows(r)
        strip = np.concatenate([cache[r] for r in range(r0, r1 + 1)])[ty - r0 * tile :][:_TIFF_TILE]
        for tx in range(0, size, _TIFF_TILE):
            piece = strip[:, tx : tx + _TIFF_TILE]
            pad = [(0, _TIFF_TILE - piece.shape[0]), (0, _TIFF_TILE - piece.shape[1])] + ([(0, 0)] if channels else [])
            yield np.ascontiguousarray(np.pad(piece, pad))


def build_mosaic(work: Path, size: int, tile: int, seed: int) -> dict:
    """mosaic.tif + mosaic_gt.tif (tiled TIFFs) and tiles/t_RRR_CCC.tif; reused when already built."""
    import tifffile
    from triageseg.datasets.synth import synth_sample

    meta = {"size": size, "tile": tile, "seed": seed, "modality": "fluorescence", "format": 2}
    stamp = work / "mosaic.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == meta:
        return meta
    if size % tile:
        raise SystemExit(f"--size {size} must be a multiple of --tile {tile}")
    n = size // tile
    (work / "tiles").mkdir(parents=True, exist_ok=True)
    (work / "gt_rows").mkdir(exist_ok=True)
    offsets = np.zeros(n * n + 1, np.int64)
    t0 = time.perf_counter()

    def image_row(r: int) -> np.ndarray:
        images, labels = [], []
        for c in range(n):
            img, lab = synth_sample("fluorescence", size=tile, rng=np.random.default_rng([seed, r, c]))
            tifffile.imwrite(work / "tiles" / f"t_{r:03d}_{c:03d}.tif", img, compression="zlib", photometric="rgb")
            base = offsets[r * n + c]
            offsets[r * n + c + 1] = base + int(lab.max())
            images.append(img)
            labels.append(np.where(lab > 0, lab.astype(np.int64) + base, 0).astype(np.uint32))
        _zsave(work / "gt_rows" / f"{r:03d}.npy.zst", np.concatenate(labels, axis=1))
        if r % 8 == 7:
            print(f"  mosaic rows {r + 1}/{n} ({time.perf_counter() - t0:.0f} s)", flush=True)
        return np.concatenate(images, axis=1)

    opts = {"tile": (_TIFF_TILE, _TIFF_TILE), "compression": "zlib", "bigtiff": size * size * 4 > 2**31}
    tifffile.imwrite(work / "mosaic.tif", _tiff_tiles(image_row, size, tile, 3), shape=(size, size, 3), dtype=np.uint8,
                     photometric="rgb", **opts)
    tifffile.imwrite(work / "mosaic_gt.tif", _tiff_tiles(lambda r: _zload(work / "gt_rows" / f"{r:03d}.npy.zst"), size,
                                                         tile, None), shape=(size, size), dtype=np.uint32, **opts)
    for p in (work / "gt_rows").iterdir():
        p.unlink()
    (work / "gt_rows").rmdir()
    stamp.write_text(json.dumps(meta))
    return meta


def write_crop(src: Path, dst: Path, side: int) -> None:
    import tifffile
    from triageseg.datasets.lazy import LazyImage

    with LazyImage(src) as image:
        crop = image[0:side, 0:side]
    tifffile.imwrite(dst, crop, tile=(_TIFF_TILE, _TIFF_TILE), compression="zlib",
                     photometric="rgb" if crop.ndim == 3 else "minisblack")


# --------------------------------------------------------------------------- scoring


def _read(path: Path, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    from triageseg.datasets.lazy import LazyImage

    with LazyImage(path) as image:
        return image[y0:y1, x0:x1]


def tile_scores(pred_region, gt_path: Path, n: int, tile: int):
    """Pooled default-protocol result over tiles; ``pred_region(r, c)`` gives the prediction of tile (r, c)."""
    from triageseg.datasets.lazy import LazyImage
    from triageseg.postprocess.metrics import aggregate, match_image

    results = []
    with LazyImage(gt_path) as gt:
        for r in range(n):
            for c in range(n):
                truth = gt[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile]
                results.append(match_image(truth, pred_region(r, c), id=f"{r}_{c}"))
    return aggregate(results)


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Ids made consecutive (0 stays 0), so per-object tables stay small."""
    ids, inverse = np.unique(labels, return_inverse=True)
    out = inverse.reshape(labels.shape).astype(np.int64)
    return out if ids[0] == 0 else out + 1


def _band_defects(gt: np.ndarray, pred: np.ndarray, line: int) -> dict:
    """Seam defects along the horizontal line between rows ``line - 1`` and ``line`` of a band.

    ``crossing``: GT nuclei with at least 20% of their area on each side (and not touching
    the band's ends). ``split``: such a nucleus overlapped (>= 10% of it each) by a predicted
    object lying >= 95% above the line and another >= 95% below. ``cut``: its best-matching
    prediction lies >= 95% on one side and covers none of its other side. ``pieces``:
    predicted objects touching the line whose pixels near it form two or more components.
    """
    from scipy import ndimage as ndi

    g, p = _relabel(gt), _relabel(pred)
    g_area, g_up = np.bincount(g.ravel()), np.bincount(g[:line].ravel(), minlength=g.max() + 1)
    p_area, p_up = np.bincount(p.ravel()), np.bincount(p[:line].ravel(), minlength=p.max() + 1)
    p_side = np.where(p_up >= 0.95 * p_area, 1, np.where(p_up <= 0.05 * p_area, -1, 0))
    out = {"crossing": 0, "split": 0, "cut": 0, "pieces": 0}
    crossing = np.intersect1d(np.unique(g[line - 1]), np.unique(g[line]))
    crossing = crossing[(crossing > 0) & ~np.isin(crossing, np.concatenate([g[0], g[-1]]))]
    boxes = ndi.find_objects(g)
    for k in crossing.tolist():
        up, down = int(g_up[k]), int(g_area[k] - g_up[k])
        if min(up, down) < 0.2 * g_area[k]:
            continue
        out["crossing"] += 1
        box = boxes[k - 1]
        mask = g[box] == k
        rows_up = (np.arange(box[0].start, box[0].stop) < line)[:, None]
        ids, counts = np.unique(p[box][mask], return_counts=True)
        counts, ids = counts[ids > 0], ids[ids > 0]
        if ids.size == 0:
            continue
        sides = {int(p_side[i]) for i, c in zip(ids, counts) if c >= 0.1 * g_area[k]}
        if {1, -1} <= sides:
            out["split"] += 1
        best = int(ids[np.argmax(counts)])
        if p_side[best] != 0:
            other = mask & (~rows_up if p_side[best] == 1 else rows_up)
            if not (p[box][other] == best).any():
                out["cut"] += 1
    near = p[max(0, line - 40) : line + 40]
    touching = np.intersect1d(np.unique(p[line - 1]), np.unique(p[line]))
    pboxes = ndi.find_objects(near)
    for k in touching[touching > 0].tolist():
        if ndi.label(near[pboxes[k - 1]] == k)[1] > 1:
            out["pieces"] += 1
    return out


def seam_defects(gt_path: Path, pred_band, grid, reach: int = 64) -> dict:
    """Sum of :func:`_band_defects` over every core boundary of ``grid`` (horizontal and vertical)."""
    from triageseg.datasets.lazy import LazyImage

    total = {"crossing": 0, "split": 0, "cut": 0, "pieces": 0}
    h, w = grid.shape
    with LazyImage(gt_path) as gt:
        for axis, spans, length in ((0, grid.rows, h), (1, grid.cols, w)):
            for span in spans[1:]:
                b = span[0]
                lo, hi = max(0, b - reach), min(length, b + reach)
                if axis == 0:
                    g, p = gt[lo:hi, 0:w], pred_band(lo, hi, 0, w)
                else:
                    g, p = gt[0:h, lo:hi].T, pred_band(0, h, lo, hi).T
                for key, value in _band_defects(np.ascontiguousarray(g), np.ascontiguousarray(p), b - lo).items():
                    total[key] += value
    return total


def ids_consecutive(path: Path) -> tuple[bool, int]:
    from triageseg.datasets.lazy import LazyImage

    with LazyImage(path) as image:
        seen = np.zeros(1, bool)
        for y in range(0, image.shape[0], 1024):
            ids = np.unique(image[y : y + 1024, 0 : image.shape[1]])
            if ids.max(initial=0) >= seen.size:
                seen = np.concatenate([seen, np.zeros(int(ids.max()) + 1 - seen.size, bool)])
            seen[ids] = True
    n = int(seen.size - 1)
    return bool(seen.all()), n


def routing_row(out: Path) -> dict:
    with (out / "routing.csv").open() as fh:
        return next(csv.DictReader(fh))


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=None, help="trained bundle (default: the demo bundle in .bench/demo)")
    parser.add_argument("--size", type=int, default=16000, help="mosaic side (a multiple of --tile)")
    parser.add_argument("--tile", type=int, default=500, help="side of the synthetic tiles")
    parser.add_argument("--whole", type=int, default=4000, help="side of the crop segmented whole and block-wise")
    parser.add_argument("--block-size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2, help="whole/block runs of the crop, alternating")
    parser.add_argument("--work", default=str(ROOT / ".bench" / "large"), help="scratch folder (several GB)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from triageseg.pipeline import Pipeline
    from triageseg.pipeline.blocks import DEFAULT_MARGIN, plan_blocks
    from triageseg.postprocess.metrics import match_image

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bundle = ensure_bundle(args.bundle)
    n = args.size // args.tile
    t0 = time.perf_counter()
    build_mosaic(work, args.size, args.tile, args.seed)
    print(f"mosaic {args.size}x{args.size} from {n * n} tiles of {args.tile}: ready ({time.perf_counter() - t0:.0f} s)",
          flush=True)
    mp = args.size**2 / 1e6

    # 1. the mosaic block-wise, in a child whose peak RSS is measured
    out_m = work / "out_mosaic"
    wall_m, rss_m = run_child(segment_cmd([work / "mosaic.tif"], bundle, out_m, "--block-size", str(args.block_size)),
                              work / "mosaic.log")
    row = routing_row(out_m)
    used = row["used_model"]
    print(f"mosaic block-wise: {wall_m:.0f} s, peak RSS {rss_m:.2f} GiB, routed {row['modality']} -> {used} "
          f"({row['decision']}), mode {row['mode']}", flush=True)

    # 2. the same tiles one by one with the same model
    out_t = work / "out_tiles"
    wall_t, rss_t = run_child(segment_cmd([work / "tiles"], bundle, out_t, "--modality", used), work / "tiles.log")
    print(f"tiles one by one: {wall_t:.0f} s, peak RSS {rss_t:.2f} GiB", flush=True)

    # 3. the crop, whole and block-wise, alternating
    crop = work / f"crop{args.whole}.tif"
    if not crop.is_file():
        write_crop(work / "mosaic.tif", crop, args.whole)
    runs: dict[str, list[tuple[float, float, float]]] = {"whole": [], "blocks": []}
    order = ["whole", "blocks", "blocks", "whole"] * math.ceil(args.repeats / 2)
    for k, mode in enumerate(order[: 2 * args.repeats]):
        out = work / f"out_{mode}"
        flag = ["--blocks-above", "inf"] if mode == "whole" else ["--blocks-above", "0", "--block-size",
                                                                   str(args.block_size)]
        wall, rss = run_child(segment_cmd([crop], bundle, out, "--modality", used, *flag), work / f"{mode}{k}.log")
        runs[mode].append((wall, rss, float(routing_row(out)["seconds"])))
        print(f"crop {args.whole}x{args.whole} {mode}: {wall:.0f} s (routing.csv {runs[mode][-1][2]:.0f} s), "
              f"peak RSS {rss:.2f} GiB, mode {routing_row(out)['mode']}", flush=True)

    # scoring
    tile = args.tile
    mosaic_pred = work / "out_mosaic" / "mosaic.tif"
    f1_mosaic = tile_scores(lambda r, c: _read(mosaic_pred, r * tile, (r + 1) * tile, c * tile, (c + 1) * tile),
                            work / "mosaic_gt.tif", n, tile)
    from triageseg.datasets.io import read_labels

    f1_tiles = tile_scores(lambda r, c: read_labels(out_t / f"t_{r:03d}_{c:03d}.tif"), work / "mosaic_gt.tif", n, tile)

    pipe = Pipeline.from_bundle(bundle, device="cpu")
    tile_px, overlap, scale = pipe.tiling(used)
    grid = plan_blocks((args.size, args.size), block_size=args.block_size, margin=DEFAULT_MARGIN,
                       align=(tile_px / scale, (tile_px - overlap) / scale))

    def tiles_band(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        out = np.zeros((y1 - y0, x1 - x0), np.uint32)
        for r in range(y0 // tile, math.ceil(y1 / tile)):
            for c in range(x0 // tile, math.ceil(x1 / tile)):
                lab = read_labels(out_t / f"t_{r:03d}_{c:03d}.tif").astype(np.uint32)
                lab[lab > 0] += np.uint32((r * n + c) * 100000)  # ids unique across tiles
                ty0, tx0 = r * tile, c * tile
                ys, xs = slice(max(y0, ty0), min(y1, ty0 + tile)), slice(max(x0, tx0), min(x1, tx0 + tile))
                out[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = \
                    lab[ys.start - ty0 : ys.stop - ty0, xs.start - tx0 : xs.stop - tx0]
        return out

    seams = seam_defects(work / "mosaic_gt.tif", lambda *b: _read(mosaic_pred, *b), grid)
    seams_tiles = seam_defects(work / "mosaic_gt.tif", tiles_band, grid)
    consecutive, n_ids = ids_consecutive(mosaic_pred)

    whole = read_labels(work / "out_whole" / crop.name)
    blocks = read_labels(work / "out_blocks" / crop.name)
    agree = match_image(whole, blocks).f1_at(0.5)
    gt_crop = _read(work / "mosaic_gt.tif", 0, args.whole, 0, args.whole)
    f1_whole_gt, f1_blocks_gt = match_image(gt_crop, whole).mean_f1, match_image(gt_crop, blocks).mean_f1
    best_whole = min(r[0] for r in runs["whole"])
    best_blocks = min(r[0] for r in runs["blocks"])
    mp_crop = args.whole**2 / 1e6

    def goal(ok: bool) -> str:
        return "met" if ok else "MISSED"

    print()
    print(f"# bench_large: {platform.machine()} {os.cpu_count()} CPUs, {platform.python_version()}, "
          f"mosaic {args.size}x{args.size} ({n}x{n} tiles of {tile}), blocks {args.block_size} + margin {DEFAULT_MARGIN}, "
          f"grid {len(grid.rows)}x{len(grid.cols)}, model {used}")
    print(f"mosaic peak RSS of the segment child     {rss_m:.2f} GiB   goal <= 3 GiB: {goal(rss_m <= 3.0)}")
    print(f"mosaic mean F1 (per tile, pooled)        {f1_mosaic.mean_f1:.4f}  (per-tile mean {f1_mosaic.image_mean_f1:.4f})")
    print(f"tiles one by one mean F1                 {f1_tiles.mean_f1:.4f}  (per-tile mean {f1_tiles.image_mean_f1:.4f})")
    diff = f1_mosaic.mean_f1 - f1_tiles.mean_f1
    print(f"difference                               {diff:+.4f}  goal |d| <= 0.005: {goal(abs(diff) <= 0.005)}")
    print(f"mosaic F1@0.5 {f1_mosaic.f1_at(0.5):.4f} vs tiles {f1_tiles.f1_at(0.5):.4f}; objects {f1_mosaic.n_pred} vs "
          f"{f1_tiles.n_pred} (GT {f1_mosaic.n_true})")
    print(f"seams: GT nuclei across a core boundary  {seams['crossing']}")
    defects = seams["split"] + seams["cut"]
    print(f"  split at the boundary / cut there      {seams['split']} / {seams['cut']}  (tiles one by one: "
          f"{seams_tiles['split']} / {seams_tiles['cut']})  seam defects {defects}: {goal(defects == 0)}")
    print(f"  predicted ids in two pieces across it  {seams['pieces']}   ids 1..{n_ids} consecutive: {consecutive}  "
          f"no duplicates: {goal(seams['pieces'] == 0 and consecutive)}")
    print(f"mosaic block-wise                        {wall_m / mp:.3f} s/MP ({wall_m:.0f} s); tiles one by one "
          f"{wall_t / mp:.3f} s/MP (peak RSS {rss_t:.2f} GiB)")
    print(f"crop {args.whole}x{args.whole} whole vs block-wise F1@0.5 {agree:.4f}  goal >= 0.995: {goal(agree >= 0.995)}"
          f"   (mean F1 vs GT: whole {f1_whole_gt:.4f}, blocks {f1_blocks_gt:.4f})")
    ratio = best_blocks / best_whole
    print(f"crop whole {best_whole / mp_crop:.3f} s/MP (runs {', '.join(f'{r[0]:.0f}' for r in runs['whole'])} s, peak "
          f"{max(r[1] for r in runs['whole']):.2f} GiB) | block-wise {best_blocks / mp_crop:.3f} s/MP (runs "
          f"{', '.join(f'{r[0]:.0f}' for r in runs['blocks'])} s, peak {max(r[1] for r in runs['blocks']):.2f} GiB)")
    print(f"block-wise / whole time                  {ratio:.3f}  goal <= 1.15: {goal(ratio <= 1.15)}")


if __name__ == "__main__":
    main()
