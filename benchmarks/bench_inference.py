"""Inference speed of a specialist: bare Unet forward vs predict (tiled) + watershed.

Prints images/s (best of ``--repeats`` runs) for each image size and device, and
the share of the end-to-end time spent in post-processing (watershed). On CUDA the
forward runs batched with AMP (bf16 where supported) and channels_last.

Usage:
    python benchmarks/bench_inference.py                       # CPU (+ CUDA when present)
    python benchmarks/bench_inference.py --sizes 512 --repeats 3 --run-dir bundle/segmenters/he
    python benchmarks/bench_inference.py --device cuda --json results.json

Without ``--run-dir`` the network is untrained (random weights); its probability maps
are then noisier than a trained model's, which changes the watershed's share a little.
Images are synthetic fluorescence tiles (datasets.synth) so the watershed sees nuclei.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _image(size: int, seed: int = 0) -> np.ndarray:
    """A size x size synthetic fluorescence image (float32 HxWx3 in [0, 1]), tiled from 256 px samples."""
    from triageseg.datasets.io import normalize_image
    from triageseg.datasets.synth import synth_sample

    rng = np.random.default_rng(seed)
    n = -(-size // 256)
    rows = [np.concatenate([synth_sample("fluorescence", size=256, rng=rng)[0] for _ in range(n)], axis=1)
            for _ in range(n)]
    return normalize_image(np.concatenate(rows, axis=0)[:size, :size])


def _time(fn, repeats: int, device) -> float:
    """Best (minimum) seconds of ``fn()`` over ``repeats`` runs, after one warm-up run.

    The minimum, as ``timeit`` advises: on a shared machine slower runs measure the
    other processes, not this code.
    """
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return float(min(times))


def bench(device_spec: str, sizes: list[int], repeats: int, run_dir: str | None, batch: int, tile: int) -> list[dict]:
    import torch

    from triageseg.postprocess.watershed import watershed
    from triageseg.segmenters.model import SegmenterConfig, create_segmenter, load_segmenter
    from triageseg.segmenters.predict import autocast_context, predict, resolve_device

    device = resolve_device(device_spec)
    if run_dir:
        model, _, params = load_segmenter(run_dir, device=device)
    else:
        torch.manual_seed(0)
        model, params = create_segmenter(SegmenterConfig()).eval().to(device), None
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    rows = []
    for size in sizes:
        image = _image(size)
        fwd_batch = batch if cuda and size <= 1024 else 1
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].repeat(fwd_batch, 1, 1, 1)
        x = x.to(device)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)

        def forward():
            with torch.inference_mode(), autocast_context(device, True):
                model(x)

        t_fwd = _time(forward, repeats, device) / fwd_batch
        state = {}

        def run_predict():
            state["probs"] = predict(model, image, tile_size=tile, overlap=64, batch_size=batch, amp=True)

        t_pred = _time(run_predict, repeats, device)
        t_ws = _time(lambda: watershed(state["probs"], params), repeats, device)
        total = t_pred + t_ws
        row = {
            "device": str(device),
            "size": size,
            "forward_images_per_s": 1 / t_fwd,
            "forward_batch": fwd_batch,
            "predict_images_per_s": 1 / t_pred,
            "predict_watershed_images_per_s": 1 / total,
            "watershed_s": t_ws,
            "postprocess_share": t_ws / total,
        }
        rows.append(row)
        print(
            f"{row['device']:>6} {size:>5}px  forward {row['forward_images_per_s']:8.3f} img/s (batch {fwd_batch})"
            f"  predict {row['predict_images_per_s']:8.3f} img/s  predict+watershed "
            f"{row['predict_watershed_images_per_s']:8.3f} img/s  watershed {t_ws:6.3f}s "
            f"= {100 * row['postprocess_share']:4.1f}% of end-to-end",
            flush=True,
        )
    return rows


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--device", action="append", help="cpu, cuda, ... (repeatable; default cpu + cuda if any)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="tiles per forward pass (and forward batch on CUDA)")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--run-dir", help="a trained segmenter run folder (default: untrained efficientnet-b3)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    print(f"triageseg inference benchmark: {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    rows = []
    for dev in devices:
        rows += bench(dev, args.sizes, args.repeats, args.run_dir, args.batch, args.tile)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
