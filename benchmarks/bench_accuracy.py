"""Accuracy: routed specialists vs one generalist vs a classical baseline, same training budget.

On a held-out synthetic test split: trains a bundle (router, one specialist per modality,
a generalist with as many optimiser steps as all specialists together, see
``workflow.Budget``), then prints the per-modality mean F1 (default protocol) of the routed
pipeline, the generalist alone and the classical baseline (Otsu threshold +
distance-transform watershed, no learning), and the router's accuracy.

With ``--seeds 0,1,2`` it repeats everything (data, router, models) per seed and prints
each seed's table, then the mean over seeds, how many seeds each goal held in, and the
mean routed-minus-generalist difference with its standard error (paired by seed): one
seed's minority-modality scores rest on 9 test images and move by a few hundredths from
seed to seed.

Goals: router accuracy >= 0.99; routed mean F1 above the generalist's overall and on every
minority modality; both far above the classical baseline.

Usage:
    python benchmarks/bench_accuracy.py [--budget 1] [--n 130] [--size 256] [--seeds 0]
        [--out .bench/accuracy] [--device auto] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def run_seed(args: argparse.Namespace, seed: int, out: Path) -> dict:
    """Data, bundle and scores for one seed; returns the per-modality F1 of the three systems."""
    from triageseg.datasets.layout import Dataset
    from triageseg.datasets.synth import make_dataset
    from triageseg.postprocess.classical import classical_segment
    from triageseg.postprocess.folders import report_from_results
    from triageseg.postprocess.metrics import match_image
    from triageseg.workflow import DEMO_SPLITS, Budget, evaluate_bundle, format_comparison, scores_to_dict, train_bundle

    data, bundle_dir = out / "data", out / "bundle"
    t0 = time.perf_counter()
    reused = []
    if args.reuse and (data / "splits.csv").is_file():
        reused.append("data")
    else:
        make_dataset(data, n=args.n, size=args.size, seed=seed, splits=DEMO_SPLITS, overwrite=True)
    if args.reuse and (bundle_dir / "bundle.json").is_file():
        reused.append("bundle")
    else:
        train_bundle(data, bundle_dir, budget=Budget(scale=args.budget), device=args.device, seed=seed,
                     progress=False, log=lambda _m: None)
    t_train = time.perf_counter() - t0

    scores = evaluate_bundle(bundle_dir, data, split="test", device=args.device, progress=False)
    ds = Dataset(data)
    results, modality_of = [], {}
    for sample in ds.select(split="test"):
        image, gt = ds.load(sample)
        results.append(match_image(gt, classical_segment(image), id=sample.id))
        modality_of[sample.id] = sample.modality
    classical = report_from_results(results, modality_of)

    counts = {m: len(ds.select(modality=m)) for m in ds.modalities}
    print(f"\n== seed {seed}: {len(ds.samples)} images of {args.size}x{args.size} "
          f"({', '.join(f'{m}: {c}' for m, c in counts.items())}); test split {len(modality_of)} images; "
          + (f"reused {' and '.join(reused)}" if len(reused) == 2
             else f"budget x{args.budget}; data + training {t_train:.0f} s"))
    print(format_comparison(scores, classical=classical))
    systems = {"routed": scores.routed, "generalist": scores.generalist, "classical": classical}
    table = {
        name: {**{m: r.mean_f1 for m, r in rep.per_modality.items()}, "overall": rep.overall.mean_f1}
        for name, rep in systems.items() if rep is not None
    }
    result = {"seed": seed, "f1": table, "test_images": {m: r.n_images for m, r in scores.routed.per_modality.items()},
              "router_accuracy": scores.router_accuracy,
              "train_seconds": None if "bundle" in reused else round(t_train, 1),
              "scores": scores_to_dict(scores), "classical": classical.to_dict()}
    (out / "bench_accuracy.json").write_text(json.dumps(result, indent=2))
    return result


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of ``a[i] - b[i]`` over seeds and its standard error (0 for one seed).

    The seeds pair the two systems (same data, same shared base), so the spread of the
    per-seed differences, not of the scores, says whether a difference is more than noise.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"need two equally long, non-empty lists; got {len(a)} and {len(b)} values")
    diffs = [x - y for x, y in zip(a, b)]
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return mean, 0.0
    var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, (var / len(diffs)) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=1.0, help="training budget multiplier (workflow.Budget.scale)")
    parser.add_argument("--n", type=int, default=130, help="synthetic images (the demo's splits: 54/11.5/34.5 %%)")
    parser.add_argument("--size", type=int, default=256, help="image side")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; each gets its own data and models")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=".bench/accuracy", help="work folder (one sub-folder per seed)")
    parser.add_argument("--reuse", action="store_true", help="reuse data and bundles already in --out")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]

    runs = [run_seed(args, seed, Path(args.out) / f"seed{seed}") for seed in seeds]

    mods = sorted(runs[0]["test_images"])
    majority = max(mods, key=lambda m: runs[0]["test_images"][m])
    systems = [s for s in ("routed", "generalist", "classical") if s in runs[0]["f1"]]
    print(f"\n== mean over {len(runs)} seed(s) {seeds}")
    header = f"{'modality':<16}{'images':>7}" + "".join(f"{s:>12}" for s in systems)
    print(header + "\n" + "-" * len(header))
    for m in mods + ["overall"]:
        n_img = sum(r["test_images"][m] for r in runs) if m != "overall" else sum(
            sum(r["test_images"].values()) for r in runs)
        print(f"{m:<16}{n_img:>7}" + "".join(f"{sum(r['f1'][s][m] for r in runs) / len(runs):>12.3f}" for s in systems))
    print("\ngoals (seeds met / seeds):")
    router_ok = sum((r["router_accuracy"] or 0) >= 0.99 for r in runs)
    print(f"  router accuracy >= 0.99: {router_ok}/{len(runs)} "
          f"(min {min(r['router_accuracy'] or 0 for r in runs):.3f})")
    if "generalist" in systems:
        for m in ["overall"] + [m for m in mods if m != majority]:
            wins = sum(r["f1"]["routed"][m] > r["f1"]["generalist"][m] for r in runs)
            diffs = ", ".join(f"{r['f1']['routed'][m] - r['f1']['generalist'][m]:+.3f}" for r in runs)
            mean, se = paired_difference([r["f1"]["routed"][m] for r in runs], [r["f1"]["generalist"][m] for r in runs])
            label = "overall" if m == "overall" else f"minority {m}"
            print(f"  routed > generalist, {label}: {wins}/{len(runs)} (differences {diffs}; "
                  f"mean {mean:+.3f} +- {se:.3f} s.e.)")
    for s in ("routed", "generalist"):
        if s in systems:
            gap = sum(r["f1"][s]["overall"] - r["f1"]["classical"]["overall"] for r in runs) / len(runs)
            print(f"  {s} above classical overall: {gap:+.3f} on average")
    summary = {"args": vars(args), "runs": [{k: r[k] for k in ("seed", "f1", "test_images", "router_accuracy",
                                                                  "train_seconds")} for r in runs]}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_accuracy_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwritten: {Path(args.out) / 'bench_accuracy_summary.json'}")


if __name__ == "__main__":
    main()
