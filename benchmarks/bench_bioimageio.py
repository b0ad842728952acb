"""bioimage.io export/import of a bundle, checked by the zoo's own tools, and the in-TorchScript watershed question.

For every model of the bundle (router, specialists, generalist), in fp32 and fp16 storage:
export time, package size, bioimageio.spec validation, bioimageio.core's test per weight
format. Then the round trip: every specialist's package imported into a copy of the bundle,
and the test split segmented by both bundles (the whole pipeline: router, specialist,
watershed): how many label images are identical. Last, the torch-only seeded flood
(``export.ts_watershed``, TorchScript) against our skimage watershed on the bundle's real
probabilities of the test images: time and agreement.

Times on a shared 2-core machine are indicative only (say so when quoting them).

    python benchmarks/bench_bioimageio.py --bundle /work/demo_base/bundle --data /work/demo_base/data --out /tmp/bio
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np


def _exports(bundle: Path, out: Path, names: list[str], dtypes: list[bool]) -> dict:
    from triageseg.export.common import core_test, validate_package
    from triageseg.export.router import export_router
    from triageseg.export.specialist import export_segmenter

    packages = {}
    for float16 in dtypes:
        for name in names:
            path = out / f"{name}{'_fp16' if float16 else ''}.zip"
            if name == "router":
                r = export_router(bundle, path, overwrite=True, float16=float16)
            else:
                r = export_segmenter(bundle, name, path, overwrite=True, float16=float16)
            valid, _ = validate_package(r.path)
            verdicts = {wf: core_test(r.path, wf)[0] for wf in ("pytorch_state_dict", "torchscript")}
            print(f"{name:14s} {r.weights_dtype}: {r.size_bytes / 1e6:6.1f} MB, export {r.seconds:5.1f} s, "
                  f"spec {'valid' if valid else 'INVALID'}, core test: "
                  + ", ".join(f"{wf} {'passed' if ok else 'FAILED'}" for wf, ok in verdicts.items()), flush=True)
            packages[(name, float16)] = r.path
    return packages


def _round_trip(bundle: Path, data: Path, out: Path, packages: dict, names: list[str], float16: bool) -> None:
    from triageseg import load_pipeline
    from triageseg.datasets.layout import Dataset
    from triageseg.export.importer import import_package
    from triageseg.postprocess.metrics import aggregate, match_image

    copy = out / f"roundtrip{'_fp16' if float16 else ''}"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(bundle, copy, ignore=shutil.ignore_patterns("_work", "checkpoint"))
    for name in names:
        if name != "router":
            import_package(packages[(name, float16)], copy, name, overwrite=True, log=lambda m: None)
    ds = Dataset(data)
    samples = ds.select(split="test")
    a, b = load_pipeline(bundle), load_pipeline(copy)
    same, results = 0, []
    for s in samples:
        image, _ = ds.load(s)
        la, lb = a.segment(image).labels, b.segment(image).labels
        same += int(np.array_equal(la, lb))
        results.append(match_image(la, lb))
    agree = aggregate(results).score
    print(f"round trip ({'fp16' if float16 else 'fp32'} packages): {same}/{len(samples)} test images with identical "
          f"labels; mean F1 of imported vs original labels {agree:.4f}", flush=True)


def _watershed_in_torchscript(bundle: Path, data: Path, n: int) -> None:
    import torch

    from triageseg.datasets.layout import Dataset
    from triageseg.export.ts_watershed import scripted
    from triageseg.postprocess.metrics import aggregate, match_image
    from triageseg.postprocess.watershed import watershed
    from triageseg.segmenters.model import load_segmenter
    from triageseg.segmenters.predict import predict

    ds = Dataset(data)
    model, cfg, params = load_segmenter(bundle / "segmenters" / "_generalist")
    flood = scripted()
    t_net = t_sk = t_ts = 0.0
    agree, vs_gt_sk, vs_gt_ts = [], [], []
    for s in ds.select(split="test")[:n]:
        image, gt = ds.load(s)
        t0 = time.perf_counter()
        probs = predict(model, image, tile_size=cfg.tile_size, overlap=cfg.overlap)
        t1 = time.perf_counter()
        ref = watershed(probs, params)
        t2 = time.perf_counter()
        with torch.no_grad():
            lab = flood(torch.from_numpy(probs), params.marker_threshold, params.mask_threshold,
                        params.min_marker_size, params.min_size, min_score=params.min_score)
        t3 = time.perf_counter()
        lab = lab.numpy().astype(np.int64)
        t_net, t_sk, t_ts = t_net + t1 - t0, t_sk + t2 - t1, t_ts + t3 - t2
        agree.append(match_image(ref, lab))
        vs_gt_sk.append(match_image(gt, ref))
        vs_gt_ts.append(match_image(gt, lab))
    k = len(agree)
    print(f"watershed on {k} test images (generalist's probabilities): network {t_net / k:.3f} s/image, "
          f"skimage watershed {t_sk / k:.4f} s/image, TorchScript flood {t_ts / k:.4f} s/image "
          f"({t_ts / max(t_sk, 1e-9):.1f}x the watershed, {t_ts / max(t_net, 1e-9):.2f}x the network); "
          f"agreement (mean F1 flood vs watershed) {aggregate(agree).score:.4f}; "
          f"mean F1 vs ground truth: watershed {aggregate(vs_gt_sk).score:.4f}, flood {aggregate(vs_gt_ts).score:.4f}",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("/work/demo_base/bundle"))
    parser.add_argument("--data", type=Path, default=Path("/work/demo_base/data"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_bioimageio"))
    parser.add_argument("--no-fp16", action="store_true", help="fp32 packages only")
    parser.add_argument("--watershed-images", type=int, default=15)
    args = parser.parse_args()
    from triageseg import bundle as B

    args.out.mkdir(parents=True, exist_ok=True)
    manifest = B.read_manifest(args.bundle)
    names = ["router", *manifest["segmenters"]]
    dtypes = [False] if args.no_fp16 else [False, True]
    packages = _exports(args.bundle, args.out, names, dtypes)
    for float16 in dtypes:
        _round_trip(args.bundle, args.data, args.out, packages, names, float16)
    _watershed_in_torchscript(args.bundle, args.data, args.watershed_images)


if __name__ == "__main__":
    main()
