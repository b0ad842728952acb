"""A proxy of the demo's H&E training: one generator's H&E data against another's, specialist only.

The demo (``workflow.run_demo``) trains a shared base on all modalities (360 steps), then
each specialist continues from it for 30 steps. To see what a change of the H&E generator
does without a whole demo run, this script trains only what the H&E data reaches:

- ``gen_old`` / ``gen_new``: the demo bundle's generalist (the base + 120 steps on all
  modalities; the base itself is not kept in a bundle) -> 30 H&E steps on the old / new data;
- ``base_new``: a base retrained on the new data (360 steps, all modalities; only the H&E
  images differ from the demo's data) -> 30 H&E steps: the demo's own recipe on the new data.
  The same recipe on the demo's data (``base_old``) reproduces the demo's H&E specialist bit
  for bit on CPU, so the demo's specialist is the old side of this pair.

Each variant is scored as a copy of the demo bundle with its H&E specialist replaced
(symlinks; the demo bundle is never written): mean F1 and F1@0.5 on the H&E test images
of both datasets (forced to the H&E specialist; how many the router sends to it), and on
the real TCIA H&E image (checked, never trained on): the object count, and the objects by
their mean hematoxylin (``rgb2hed``; the tissue between nuclei is ~0.025, nuclei > 0.06).

Usage (new data: ``make_dataset(OUT/data_new, n=130, size=256, seed=0, splits=DEMO_SPLITS,
diameter_range=DEMO_DIAMETERS)`` from this checkout, written when missing):
    python benchmarks/bench_he_proxy.py --demo /work/demo_cur --out /work/he_proxy \
        --real .bench/real/histo.jpg [--variants demo,gen_old,gen_new,base_new]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

SPECIALIST_STEPS = 30  # the demo's steps per specialist (Budget(): 480 * 0.25 / 4 modalities)


def _config(data: Path, modality: str | None):
    """The demo's TrainConfig (workflow.train_bundle) for ``modality`` on ``data``."""
    from triageseg.datasets.layout import Dataset
    from triageseg.segmenters.data import canonical_diameter
    from triageseg.segmenters.train import TrainConfig
    from triageseg.workflow import Budget

    b = Budget()
    ds = Dataset(data)
    canon = canonical_diameter([ds.load(s)[1] for s in ds.select(split="train")])
    return TrainConfig(modality=modality, diameter=canon, batch_size=b.batch_size, crop_size=b.crop_size, lr=b.lr,
                       aug_strength=b.aug_strength, max_val_images=b.max_val_images, seed=0,
                       decoder_channels=tuple(b.decoder_channels))


def _finetune(cfg, init: Path, steps: int = SPECIALIST_STEPS):
    """A continuation from ``init`` as the demo's specialists are trained (lower lr, warm-up, frozen BN)."""
    from triageseg.workflow import Budget

    b = Budget()
    epochs, per = b.schedule(steps)
    return cfg.replace(epochs=epochs, steps_per_epoch=per, init_from=str(init), lr=b.lr * b.finetune_lr_scale,
                       warmup_epochs=min(b.finetune_warmup_steps, steps // 2) / per, freeze_bn=b.freeze_bn)


def _train(out: Path, name: str, cfg, data: Path) -> Path:
    from triageseg.segmenters.train import train_segmenter

    run = out / "runs" / name
    if (run / "model.safetensors").is_file() and (run / "config.json").is_file():
        print(f"[{name}] already trained, kept", flush=True)
        return run
    t0 = time.perf_counter()
    res = train_segmenter(cfg, data, run, device="cpu", progress=False, overwrite=True)
    print(f"[{name}] {cfg.epochs}x{cfg.steps_per_epoch} steps at diameter {cfg.diameter}, val mean F1 "
          f"{res.val_mean_f1_tuned:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return run


def train_variant(name: str, demo: Path, out: Path) -> Path:
    """Train (or find) the H&E specialist of one variant; returns its run folder."""
    old, new, bundle = demo / "data", out / "data_new", demo / "bundle"
    if name == "demo":
        return bundle / "segmenters" / "he"
    demo_diameter = json.loads((bundle / "segmenters" / "he" / "config.json").read_text())["diameter"]
    if name in ("gen_old", "gen_new"):
        data = old if name == "gen_old" else new
        cfg = _config(data, "he").replace(diameter=demo_diameter)  # the generalist's own training size
        return _train(out, name, _finetune(cfg, bundle / "segmenters" / "_generalist"), data)
    if name in ("base_old", "base_new"):
        from triageseg.workflow import Budget

        data = old if name == "base_old" else new
        cfg = _config(data, None)
        epochs, per = Budget().schedule(360)
        base = _train(out, f"{name}_base", cfg.replace(epochs=epochs, steps_per_epoch=per, tune_postprocess=False),
                      data)
        return _train(out, name, _finetune(cfg.replace(modality="he"), base), data)
    raise ValueError(f"unknown variant {name!r}")


def _variant_bundle(out: Path, demo_bundle: Path, name: str, he_dir: Path) -> Path:
    """The demo bundle with its H&E specialist replaced, as symlinks (the demo bundle is not written)."""
    b = out / "bundles" / name
    if b.exists():
        shutil.rmtree(b)
    (b / "segmenters").mkdir(parents=True)
    shutil.copy(demo_bundle / "bundle.json", b / "bundle.json")
    (b / "router").symlink_to((demo_bundle / "router").resolve())
    for seg in (demo_bundle / "segmenters").iterdir():
        (b / "segmenters" / seg.name).symlink_to((he_dir if seg.name == "he" else seg).resolve())
    return b


def score(bundle: Path, datasets: dict[str, Path], real: Path) -> dict:
    """Synthetic H&E test scores per dataset, and the real image's objects by mean hematoxylin."""
    from scipy import ndimage
    from skimage.color import rgb2hed

    from triageseg.datasets.io import read_image, read_image_raw
    from triageseg.datasets.layout import Dataset
    from triageseg.pipeline import Pipeline
    from triageseg.postprocess.metrics import aggregate, match_image

    pipe = Pipeline.from_bundle(bundle, device="cpu")
    pipe.load_router()
    row: dict = {}
    for tag, data in datasets.items():
        ds = Dataset(data)
        results, to_he = [], 0
        for s in ds.select(split="test", modality="he"):
            image, gt = ds.load(s)
            results.append(match_image(gt, pipe.segment(image, modality="he").labels, id=s.id))
            to_he += pipe.decide(image).modality == "he"
        ev = aggregate(results)
        row[tag] = {"mean_f1": round(ev.mean_f1, 3), "f1@0.5": round(float(ev.f1[0]), 3),
                    "routed_he": f"{to_he}/{len(results)}"}
    res = pipe.segment(read_image(real))
    hema = rgb2hed(read_image_raw(real)[..., :3])[..., 0]
    ids = np.arange(1, int(res.labels.max()) + 1)
    mean_h = ndimage.mean(hema, res.labels, ids) if ids.size else np.zeros(0)
    row["real"] = {"routed": res.modality, "count": int(ids.size), "H<0.04": int((mean_h < 0.04).sum()),
                   "H0.04-0.06": int(((mean_h >= 0.04) & (mean_h < 0.06)).sum()),
                   "H>=0.06": int((mean_h >= 0.06).sum())}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, required=True, help="a demo output folder (bundle/ and data/)")
    parser.add_argument("--out", type=Path, required=True, help="work folder: new data, runs, variant bundles")
    parser.add_argument("--real", type=Path, required=True, help="a real H&E image (checked, never trained on)")
    parser.add_argument("--variants", default="demo,gen_old,gen_new,base_new")
    args = parser.parse_args()
    new = args.out / "data_new"
    if not (new / "splits.csv").is_file():
        from triageseg.datasets.synth import make_dataset
        from triageseg.workflow import DEMO_DIAMETERS, DEMO_SPLITS

        n = json.loads((args.demo / "data" / "synth.json").read_text())["n"]
        make_dataset(new, n=n, size=256, seed=0, splits=DEMO_SPLITS, diameter_range=DEMO_DIAMETERS)
    datasets = {"old data": args.demo / "data", "new data": new}
    table = {}
    for name in args.variants.split(","):
        run = train_variant(name, args.demo, args.out)
        table[name] = score(_variant_bundle(args.out, args.demo / "bundle", name, run), datasets, args.real)
        print(name, json.dumps(table[name]), flush=True)
    tmp = args.out / "scores.json.tmp"
    tmp.write_text(json.dumps(table, indent=1))
    tmp.replace(args.out / "scores.json")


if __name__ == "__main__":
    main()
