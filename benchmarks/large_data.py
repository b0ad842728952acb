"""Data of ``bench_large.py``: the mosaic (a synthetic tile scan, or independent tiles) and its ground truth.

Written to tiled TIFFs strip by strip (never whole in memory), with each tile also as its
own file for "the same tiles one by one".
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from triageseg.pipeline.blockwise.large import (
    _load_array as _zload,  # zstd-compressed .npy, as the block journal keeps them
)
from triageseg.pipeline.blockwise.large import _save_array as _zsave

_TIFF_TILE = 512


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


def build_mosaic(work: Path, size: int, tile: int, seed: int, layout: str = "scan") -> dict:
    """mosaic.tif + mosaic_gt.tif (tiled TIFFs) and tiles/t_RRR_CCC.tif; reused when already built.

    ``layout``: ``scan`` (default), one synthetic tile scan (:class:`~triageseg.datasets.synth_scan.SynthScan`:
    one acquisition, content continuous across tile edges), the tiles cut from it; or
    ``independent``, independent synthetic images side by side (the layout of the first
    runs of this benchmark).
    """
    import tifffile

    from triageseg.datasets.synth import synth_sample
    from triageseg.datasets.synth_scan import SynthScan

    meta = {"size": size, "tile": tile, "seed": seed, "modality": "fluorescence", "format": 2, "layout": layout}
    if layout == "independent":
        meta.pop("layout")  # as the mosaics built before scans existed
    stamp = work / "mosaic.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == meta:
        return meta
    if size % tile:
        raise SystemExit(f"--size {size} must be a multiple of --tile {tile}")
    n = size // tile
    (work / "tiles").mkdir(parents=True, exist_ok=True)
    (work / "gt_rows").mkdir(exist_ok=True)
    offsets = np.zeros(n * n + 1, np.int64)
    scan = SynthScan(n, n, tile, seed=seed) if layout == "scan" else None
    t0 = time.perf_counter()

    def draw(r: int, c: int) -> tuple[np.ndarray, np.ndarray]:
        if scan is not None:
            return scan.tile(r, c)  # ids unique over the scan already
        img, lab = synth_sample("fluorescence", size=tile, rng=np.random.default_rng([seed, r, c]))
        base = offsets[r * n + c]
        offsets[r * n + c + 1] = base + int(lab.max())
        return img, np.where(lab > 0, lab.astype(np.int64) + base, 0).astype(np.uint32)

    def image_row(r: int) -> np.ndarray:
        images, labels = [], []
        for c in range(n):
            img, lab = draw(r, c)
            tifffile.imwrite(work / "tiles" / f"t_{r:03d}_{c:03d}.tif", img, compression="zlib", photometric="rgb")
            images.append(img)
            labels.append(lab)
        _zsave(work / "gt_rows" / f"{r:03d}.npy.zst", np.concatenate(labels, axis=1))
        if r % 4 == 3:
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
