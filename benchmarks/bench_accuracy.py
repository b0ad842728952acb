"""Accuracy: routed specialists vs one generalist vs a classical baseline, same training budget.

On a held-out synthetic test split: trains a bundle (router, one specialist per modality,
a generalist with as many optimiser steps as all specialists together), then prints the
per-modality mean F1 (default protocol) of the routed pipeline, the generalist alone and
the classical baseline (Otsu threshold + distance-transform watershed, no learning), and
the router's accuracy.

Goals: router accuracy >= 0.99; routed mean F1 above the generalist's overall and on every
minority modality; both far above the classical baseline.

Usage:
    python benchmarks/bench_accuracy.py [--budget 1] [--n 120] [--size 192] [--out .bench/accuracy] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=1.0, help="training budget multiplier (workflow.Budget.scale)")
    parser.add_argument("--n", type=int, default=120, help="synthetic images")
    parser.add_argument("--size", type=int, default=192, help="image side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=".bench/accuracy", help="work folder (data, bundle, results)")
    parser.add_argument("--reuse", action="store_true", help="reuse data and bundle already in --out")
    args = parser.parse_args()

    from triageseg.datasets.layout import Dataset
    from triageseg.datasets.synth import make_dataset
    from triageseg.postprocess.classical import classical_segment
    from triageseg.postprocess.metrics import match_image, report_from_results
    from triageseg.workflow import Budget, evaluate_bundle, format_comparison, scores_to_dict, train_bundle

    out = Path(args.out)
    data, bundle_dir = out / "data", out / "bundle"
    t0 = time.perf_counter()
    if not (args.reuse and (data / "splits.csv").is_file()):
        make_dataset(data, n=args.n, size=args.size, seed=args.seed, overwrite=True)
    if not (args.reuse and (bundle_dir / "bundle.json").is_file()):
        train_bundle(data, bundle_dir, budget=Budget(scale=args.budget), device=args.device, seed=args.seed,
                     progress=False)
    t_train = time.perf_counter() - t0

    scores = evaluate_bundle(bundle_dir, data, split="test", device=args.device, progress=False)
    ds = Dataset(data)
    results, modality_of = [], {}
    t_classic = time.perf_counter()
    for sample in ds.select(split="test"):
        image, gt = ds.load(sample)
        results.append(match_image(gt, classical_segment(image), id=sample.id))
        modality_of[sample.id] = sample.modality
    classical = report_from_results(results, modality_of)
    t_classic = time.perf_counter() - t_classic

    ds_all = Dataset(data)
    shape = ds_all.load(ds_all.samples[0])[1].shape
    print(f"synthetic data: {len(ds_all.samples)} images of {shape[0]}x{shape[1]} "
          f"({', '.join(f'{m}: {len(ds_all.select(modality=m))}' for m in ds_all.modalities)}); "
          f"test split {len(ds_all.select(split='test'))} images; "
          + ("reused data and bundle" if args.reuse else f"budget x{args.budget}; data + training {t_train:.0f} s"))
    print(format_comparison(scores, classical=classical))
    counts = {m: r.n_images for m, r in scores.routed.per_modality.items()}
    majority = max(counts, key=counts.get)
    routed, general = scores.routed, scores.generalist
    print()
    print("goals:")
    print(f"  router accuracy >= 0.99: {scores.router_accuracy:.3f} "
          f"{'met' if (scores.router_accuracy or 0) >= 0.99 else 'NOT met'}")
    if general is not None:
        ok = routed.overall.mean_f1 > general.overall.mean_f1
        print(f"  routed > generalist overall: {routed.overall.mean_f1:.3f} vs {general.overall.mean_f1:.3f} "
              f"{'met' if ok else 'NOT met'}")
        for m in sorted(counts):
            if m == majority:
                continue
            a, b = routed.per_modality[m].mean_f1, general.per_modality[m].mean_f1
            print(f"  routed > generalist on minority {m}: {a:.3f} vs {b:.3f} {'met' if a > b else 'NOT met'}")
    print(f"  classical baseline overall: {classical.overall.mean_f1:.3f} ({t_classic:.1f} s)")
    result = {"scores": scores_to_dict(scores), "classical": classical.to_dict(), "train_seconds": round(t_train, 1),
              "args": vars(args)}
    (out / "bench_accuracy.json").write_text(json.dumps(result, indent=2))
    print(f"\nwritten: {out / 'bench_accuracy.json'}")


if __name__ == "__main__":
    main()
