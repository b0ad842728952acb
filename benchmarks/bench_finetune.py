"""Correct k images, fine-tune for minutes: how much better is the bundle on a domain it never saw?

A shifted domain is drawn from the synthetic generator without touching its renderers
(``datasets.synth_variants``): ``ihc`` (H&E re-stained as IHC: brown DAB tissue, blue nuclei;
a modality the bundle does not know, so fine-tuning adds a specialist and a router class) or
``zoom`` (fluorescence at 2x magnification; the fluorescence specialist is fine-tuned).

For k = 1, 2, 5, 10 images of the domain "corrected" by taking their true labels
(``finetune.add_to_training_set``, every 5th to val), ``finetune.finetune`` writes a new bundle
within ``--minutes`` of CPU. Printed, as mean per-image F1 (default protocol) on ``--n-test``
held-out images of the domain:

- ``before``: the bundle as given, routed as ``segment`` routes;
- ``after``: the new bundle, routed;
- ``scratch``: a specialist trained from random weights on the same k images, same steps and budget;
- ``50 images``: the same fine-tune on 50 corrected images (the "label a dataset" alternative).

Goal: k = 5 gives +0.15 over ``before`` and >= 90 % of the 50-image specialist.
Then which images to correct: the 5 of ``--pool`` candidates with the lowest predicted quality
(``Result.quality``, what ``segment --review`` ranks by) against 5 random ones; both gains printed.

Usage:
    python benchmarks/bench_finetune.py --bundle demo_out/bundle [--variant ihc] [--ks 1,2,5,10]
        [--n-test 30] [--minutes 5] [--pool 20] [--out .bench/finetune] [--skip scratch,fifty,select]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np


def draw(variant: str, n: int, size: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from triageseg.datasets.synth_variants import variant_sample

    rng = np.random.default_rng(seed)
    return [variant_sample(variant, size=size, rng=rng) for _ in range(n)]


def collect(folder: Path, samples, modality: str, prefix: str = "img") -> Path:
    from triageseg.finetune import add_to_training_set

    shutil.rmtree(folder, ignore_errors=True)
    for i, (image, labels) in enumerate(samples):
        add_to_training_set(folder, image, labels, modality, f"{prefix}{i:03d}")
    return folder


def routed_f1(bundle: Path, test, device: str) -> tuple[float, dict[str, int]]:
    """Mean per-image F1 of the routed pipeline on the test images, and which models it used."""
    from triageseg.datasets.io import normalize_image
    from triageseg.pipeline import Pipeline
    from triageseg.postprocess.metrics import match_image

    pipe = Pipeline.from_bundle(bundle, device=device)
    scores, used = [], {}
    for image, labels in test:
        res = pipe.segment(normalize_image(image))
        used[res.used_model] = used.get(res.used_model, 0) + 1
        scores.append(match_image(labels, res.labels).mean_f1)
    return float(np.mean(scores)), used


def forced_f1(bundle: Path, model: str, test, device: str) -> float:
    from triageseg.datasets.io import normalize_image
    from triageseg.pipeline import Pipeline
    from triageseg.postprocess.metrics import match_image

    pipe = Pipeline.from_bundle(bundle, device=device)
    return float(np.mean([match_image(labels, pipe.segment(normalize_image(image), modality=model).labels).mean_f1
                          for image, labels in test]))


def scratch_specialist(bundle: Path, data: Path, out: Path, modality: str, *, steps: int, minutes: float,
                       device: str, seed: int) -> Path:
    """A specialist from random weights on the same images, steps and time: a bundle with only it."""
    from triageseg import bundle as B
    from triageseg.datasets.layout import Dataset
    from triageseg.finetune.run import LR_SCALE, _start_model, _train_config, stage_data
    from triageseg.segmenters.train import train_segmenter

    manifest = B.read_manifest(bundle)
    init = modality if modality in manifest.get("modalities", []) else _start_model(manifest, bundle)
    staged = out / "data"
    shutil.rmtree(out, ignore_errors=True)
    stage_data(Dataset(data), modality, staged)  # as the fine-tune stages them (val, or train as val)
    cfg = _train_config(bundle, init, modality, steps, staged, seed=seed, budget_s=minutes * 60 * 0.75)
    cfg = cfg.replace(init_from=None, freeze_bn=False, lr=cfg.lr / LR_SCALE, warmup_epochs=1.0)
    train_segmenter(cfg, staged, B.segmenter_dir(out / "bundle", modality), device=device, progress=False,
                    overwrite=True)
    B.update_manifest(out / "bundle")
    return out / "bundle"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="the bundle to start from (e.g. the demo's)")
    parser.add_argument("--variant", default="ihc", choices=["ihc", "zoom"])
    parser.add_argument("--ks", default="1,2,5,10")
    parser.add_argument("--n-test", type=int, default=30)
    parser.add_argument("--pool", type=int, default=20, help="candidates for the lowest-quality vs random choice")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=None, help="override the planned steps (reduced runs)")
    parser.add_argument("--fifty-steps", type=int, default=None, help="steps of the 50-image run (default: planned)")
    parser.add_argument("--skip", default="", help="comma-separated: scratch, fifty, select")
    parser.add_argument("--out", type=Path, default=Path(".bench/finetune"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from triageseg.finetune import finetune, plan_steps

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    ks = [int(k) for k in args.ks.split(",") if k.strip()]  # empty: only the 50-image run and/or the selection
    modality = "ihc" if args.variant == "ihc" else "fluorescence"
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    test = draw(args.variant, args.n_test, args.size, args.seed + 1000)
    train_pool = draw(args.variant, max([*ks, 50 if "fifty" not in skip else 0]), args.size, args.seed + 2000)
    results: dict = {"variant": args.variant, "modality": modality, "minutes": args.minutes, "n_test": len(test),
                     "size": args.size, "bundle": str(args.bundle), "rows": []}
    t0 = time.perf_counter()
    before, used = routed_f1(args.bundle, test, args.device)
    results["before"] = {"f1": before, "used": used}
    print(f"before: mean F1 {before:.3f} on {len(test)} {args.variant} images (models used: {used})", flush=True)

    def tune(k: int, samples, tag: str, steps: int | None = args.steps) -> dict:
        data = collect(out / f"data_{tag}", samples, modality)
        target = out / f"bundle_{tag}"
        shutil.rmtree(target, ignore_errors=True)
        res = finetune(args.bundle, data, target, modality=modality, minutes=args.minutes, steps=steps,
                       device=args.device, seed=args.seed, overwrite=True)
        after, used_after = routed_f1(target, test, args.device)
        row = {"k": k, "tag": tag, "after": after, "used": used_after, "val_before": res.val_f1_before,
               "val_after": res.val_f1_after, "kept": res.kept, "epochs": res.epochs_completed,
               "stopped": res.stopped, "seconds": res.seconds, "steps": res.steps_planned, "router": res.router}
        if "scratch" not in skip and tag.startswith("k"):
            sb = scratch_specialist(args.bundle, data, out / f"scratch_{tag}", modality,
                                    steps=args.steps or plan_steps(res.n_train), minutes=args.minutes,
                                    device=args.device, seed=args.seed)
            row["scratch"] = forced_f1(sb, modality, test, args.device)
        print(json.dumps(row), flush=True)
        return row

    for k in ks:
        results["rows"].append(tune(k, train_pool[:k], f"k{k}"))
    if "fifty" not in skip:
        results["fifty"] = tune(50, train_pool[:50], "fifty", args.fifty_steps)

    if "select" not in skip:
        from triageseg.datasets.io import normalize_image
        from triageseg.pipeline import Pipeline

        pool = draw(args.variant, args.pool, args.size, args.seed + 3000)
        pipe = Pipeline.from_bundle(args.bundle, device=args.device)
        quality = [pipe.segment(normalize_image(img)).quality for img, _ in pool]
        q = np.array([np.nan if v is None else float(v) for v in quality])
        if np.isnan(q).all():
            print("select: the bundle has no quality model; skipped")
        else:
            lowest = [int(i) for i in np.argsort(np.nan_to_num(q, nan=np.inf))[:5]]
            random5 = [int(i) for i in np.random.default_rng(args.seed).choice(len(pool), 5, replace=False)]
            low = tune(5, [pool[i] for i in lowest], "lowest5")
            rnd = tune(5, [pool[i] for i in random5], "random5")
            results["select"] = {"lowest": lowest, "random": random5, "gain_lowest": low["after"] - before,
                                 "gain_random": rnd["after"] - before}

    results["seconds"] = round(time.perf_counter() - t0, 1)
    fifty = results.get("fifty", {}).get("after")
    print()
    print(f"{args.variant}: mean F1 on {len(test)} held-out {args.size}x{args.size} images "
          f"(fine-tune budget {args.minutes} min)")
    print(f"{'k':>4}{'before':>9}{'after':>9}{'gain':>8}{'scratch':>9}{'% of 50':>9}")
    for row in results["rows"]:
        pct = f"{100 * row['after'] / fifty:.0f}%" if fifty else "-"
        scratch = f"{row['scratch']:.3f}" if "scratch" in row else "-"
        print(f"{row['k']:>4}{before:>9.3f}{row['after']:>9.3f}{row['after'] - before:>+8.3f}{scratch:>9}{pct:>9}")
    if fifty is not None:
        print(f"{50:>4}{before:>9.3f}{fifty:>9.3f}{fifty - before:>+8.3f}")
    if "select" in results:
        s = results["select"]
        print(f"5 lowest-quality images: gain {s['gain_lowest']:+.3f}; 5 random images: gain {s['gain_random']:+.3f}")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"results: {out / 'results.json'} ({results['seconds']} s)")


if __name__ == "__main__":
    main()
