"""Predicted quality vs true quality: does ``quality`` rank the images that need a look?

Trains a bundle with the demo's budget (``workflow.train_bundle``, ``Budget``), each
segmenter fitting its quality model (``quality.json``) on its validation images during
training, then segments the held-out synthetic test split with the routed pipeline
(``Pipeline.segment``: router -> specialist or fallback -> watershed -> ``Result.quality``)
and compares the predicted quality with each image's true mean F1 (default protocol):
Spearman rank correlation per (true) modality and overall, plus the mean absolute error.
For reference it prints the Spearman of each raw signal alone (sign-flipped so that
higher should mean better), which is what the fitted regressor has to beat.

Goal: Spearman >= 0.7 overall.

Usage:
    python benchmarks/bench_quality.py [--budget 1] [--n 130] [--size 256] [--seed 0]
        [--out .bench/quality] [--device auto] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# Raw signals and the sign that makes "higher = better" for the reference table.
SIGNAL_SIGNS = {"object_confidence": 1, "boundary_entropy": -1, "uncertain_share": -1, "count_deviation": -1,
                "size_deviation": -1, "no_objects": -1, "router_confidence": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=1.0, help="Budget scale (1 = the demo's).")
    parser.add_argument("--n", type=int, default=130)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=".bench/quality")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--reuse", action="store_true", help="Reuse the data and bundle in --out when present.")
    args = parser.parse_args()

    import numpy as np

    from triageseg.datasets.layout import Dataset
    from triageseg.datasets.synth import make_dataset
    from triageseg.pipeline import Pipeline
    from triageseg.postprocess.metrics import match_image
    from triageseg.postprocess.quality import image_signals, spearman
    from triageseg.postprocess.watershed import watershed
    from triageseg.workflow import DEMO_SPLITS, Budget, train_bundle

    out = Path(args.out)
    data, bundle_dir = out / "data", out / "bundle"
    t0 = time.perf_counter()
    if not (args.reuse and (data / "splits.csv").is_file()):
        make_dataset(data, n=args.n, size=args.size, seed=args.seed, splits=DEMO_SPLITS, overwrite=True)
    if not (args.reuse and (bundle_dir / "bundle.json").is_file()):
        train_bundle(data, bundle_dir, budget=Budget(scale=args.budget), device=args.device, seed=args.seed,
                     progress=False, log=lambda _m: None)
    t_train = time.perf_counter() - t0

    pipe = Pipeline.from_bundle(bundle_dir, device=args.device)
    for name in pipe.available:
        q = pipe.quality_model(name)
        fit = "no quality.json" if q is None else (
            f"{q.fit.get('n_points')} points ({q.fit.get('n_images')} val images x epochs), alpha "
            f"{q.fit.get('alpha')}, signals {', '.join(q.signals)}")
        print(f"quality model {name}: {fit}")
    ds = Dataset(data)
    rows = []
    t1 = time.perf_counter()
    for sample in ds.select(split="test"):
        image, gt = ds.load(sample)
        d = pipe.decide(image)
        conf, used, decision = d.confidence, d.used_model, d.decision
        probs = pipe.probabilities(image, used)
        labels = watershed(probs, pipe.params(used))
        quality = pipe.quality(probs, labels, used, confidence=conf, ood_score=d.ood_score)  # as Pipeline.segment
        qm = pipe.quality_model(used)
        signals = image_signals(probs, labels, stats=None if qm is None else qm.stats, router_confidence=conf,
                                ood_score=d.ood_score)
        rows.append({"id": sample.id, "modality": sample.modality, "used_model": used, "decision": decision,
                     "quality": quality, "f1": float(match_image(gt, labels).mean_f1), "signals": signals})
    t_seg = time.perf_counter() - t1

    def table(subset: list[dict]) -> dict:
        pred = [r["quality"] for r in subset]
        true = [r["f1"] for r in subset]
        return {"n": len(subset), "spearman": spearman(pred, true),
                "mae": float(np.mean(np.abs(np.asarray(pred) - np.asarray(true)))),
                "true_f1_range": [float(min(true)), float(max(true))]}

    scored = [r for r in rows if r["quality"] is not None]
    results = {m: table([r for r in scored if r["modality"] == m]) for m in sorted({r["modality"] for r in scored})}
    results["overall"] = table(scored)
    print(f"\ntrained in {t_train:.0f} s; segmented {len(rows)} test images in {t_seg:.0f} s "
          f"({len(rows) - len(scored)} without a quality estimate)")
    print(f"{'modality':<14} {'images':>6} {'Spearman':>9} {'MAE':>6}  true F1 range")
    for name, r in results.items():
        lo, hi = r["true_f1_range"]
        print(f"{name:<14} {r['n']:>6} {r['spearman']:>9.3f} {r['mae']:>6.3f}  {lo:.3f} .. {hi:.3f}")
    goal = results["overall"]["spearman"] >= 0.7
    print(f"goal Spearman >= 0.7 overall: {'met' if goal else 'NOT met'} ({results['overall']['spearman']:.3f})")
    print("\nreference, one raw signal alone (overall Spearman with true F1, sign so that higher = better):")
    single = {}
    for sig, sign in SIGNAL_SIGNS.items():
        vals = [sign * r["signals"].get(sig, np.nan) for r in scored]
        single[sig] = spearman(vals, [r["f1"] for r in scored])
        print(f"  {sig:<18} {single[sig]:.3f}")
    methods = compare_methods(pipe, scored)
    (out / "quality_results.json").write_text(json.dumps(
        {"results": results, "single_signals": single, "methods": methods, "rows": rows,
         "train_seconds": round(t_train, 1), "segment_seconds": round(t_seg, 1)}, indent=2, default=float))


def compare_methods(pipe, rows: list[dict]) -> dict:
    """Refit every segmenter's quality model from its stored fit points with each method; overall test Spearman.

    The fit points are the ones training used (``quality.json: fit.points``, validation
    images only), so this compares the regressors on the same data they would be fitted on.
    """
    import numpy as np

    from triageseg.postprocess.quality import METHODS, fit_quality, spearman

    stored = {name: pipe.quality_model(name) for name in {r["used_model"] for r in rows}}
    if not all(q is not None and q.fit.get("points") for q in stored.values()):
        print("\n(method comparison skipped: a quality.json without fit points)")
        return {}
    print("\nregressor, refitted per segmenter on its validation points (overall test Spearman, MAE):")
    out = {}
    for method in METHODS:
        models = {}
        for name, q in stored.items():
            pts = [{k: v for k, v in p.items() if k != "f1"} for p in q.fit["points"]]
            models[name] = fit_quality(pts, [p["f1"] for p in q.fit["points"]], stats=q.stats, method=method)
        pred = [models[r["used_model"]].predict(r["signals"]) for r in rows]
        true = [r["f1"] for r in rows]
        out[method] = {"spearman": spearman(pred, true), "mae": float(np.mean(np.abs(np.subtract(pred, true))))}
        print(f"  {method:<8} Spearman {out[method]['spearman']:.3f}  MAE {out[method]['mae']:.3f}")
    return out


if __name__ == "__main__":
    main()
