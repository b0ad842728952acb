"""Out-of-distribution routing: does the router know when an image is like nothing it was trained on?

Trains the router as the demo does (the demo's synthetic data: 130 images of 256 x 256,
fluorescence the majority; the demo's time budget) and fits every OOD method of
``triageseg.router.ood`` on its training split, each threshold calibrated on the
validation split. Then prints, per method:

- the false-reject rate on the synthetic test split (in-distribution images called unknown;
  goal <= 1 %);
- the AUROC of the score of the in-distribution test images against each OOD group (goal
  >= 0.95 each): the natural photographs bundled in the scikit-image wheel (whole and two
  256 px crops of each), uniform noise, blank and near-blank images (constants, faint noise,
  smooth ramps; all normalised as ``read_image`` would), and synthetic images of a modality
  left out of training (a router trained on the other two modalities, each of the three held
  out in turn, scored against that router's own test split);
- the share of each OOD group above the threshold (detected), and, for information, three
  scikit-image pictures that look like microscopy (the Hubble deep field, an
  immunohistochemistry slide, a retina) that are not in any goal.

Usage:
    python benchmarks/bench_ood.py [--out .bench/ood] [--router-seconds 30] [--seed 0] [--device cpu]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import time
from pathlib import Path

import numpy as np

PHOTOS = ("astronaut", "coffee", "chelsea", "camera", "rocket", "coins", "moon", "text", "page", "clock", "grass",
          "gravel", "brick", "horse", "cat", "colorwheel", "checkerboard", "logo")
LOOKALIKES = ("hubble_deep_field", "immunohistochemistry", "retina")


def skimage_images(names, rng: np.random.Generator, crops: int) -> tuple[list[np.ndarray], list[str]]:
    """Normalised pictures from ``skimage.data`` (those that load offline), plus ``crops`` random 256 px crops each."""
    import skimage.data

    from triageseg.datasets.io import normalize_image

    out, loaded = [], []
    for name in names:
        try:
            raw = np.asarray(getattr(skimage.data, name)())
        except Exception:  # noqa: BLE001 - a picture the wheel cannot give offline is left out
            continue
        raw = raw.astype(np.uint8) * 255 if raw.dtype == bool else raw
        loaded.append(name)
        out.append(normalize_image(raw, name=name))
        h, w = raw.shape[:2]
        for _ in range(crops):
            if min(h, w) <= 256:
                break
            t, left = int(rng.integers(0, h - 256)), int(rng.integers(0, w - 256))
            out.append(normalize_image(raw[t : t + 256, left : left + 256], name=name))
    return out, loaded


def noise_images(rng: np.random.Generator, n: int = 20) -> list[np.ndarray]:
    """Uniform noise, grey and colour, at a few sizes."""
    from triageseg.datasets.io import normalize_image

    out = []
    for i in range(n):
        size = (128, 256, 400)[i % 3]
        shape = (size, size) if i % 2 else (size, size, 3)
        out.append(normalize_image(rng.uniform(0, 255, shape).astype(np.uint8)))
    return out


def blank_images(rng: np.random.Generator) -> list[np.ndarray]:
    """Blank (constant) and near-blank images: faint noise on a constant, smooth ramps, one faint blob."""
    from triageseg.datasets.io import normalize_image

    out = []
    for v in (0, 40, 128, 230, 255):
        out.append(normalize_image(np.full((256, 256), v, np.uint8)))
        out.append(normalize_image(np.full((256, 256, 3), (v, 255 - v, v // 2), np.uint8)))
    for v in (20, 128, 235):
        base = np.full((256, 256, 3), v, np.float32)
        out.append(normalize_image(np.clip(base + rng.normal(0, 1.0, base.shape), 0, 255).astype(np.uint8)))
        yy, xx = np.mgrid[0:256, 0:256].astype(np.float32)
        out.append(normalize_image((base + 6 * (xx / 255)[..., None]).astype(np.uint8)))
        blob = base + 4 * np.exp(-((yy - 128) ** 2 + (xx - 128) ** 2) / 2000)[..., None]
        out.append(normalize_image(np.clip(blob, 0, 255).astype(np.uint8)))
    return out


def subset(data: Path, out: Path, keep: set[str]) -> Path:
    """A copy of the dataset ``data`` with only the modalities in ``keep``."""
    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    (out / "labels").mkdir()
    with (data / "modalities.csv").open() as fh:
        mods = {r["id"]: r["modality"] for r in csv.DictReader(fh)}
    ids = sorted(i for i, m in mods.items() if m in keep)
    for i in ids:
        for sub in ("images", "labels"):
            for f in (data / sub).glob(f"{i}.*"):
                shutil.copy2(f, out / sub / f.name)
    for name in ("modalities.csv", "splits.csv"):
        with (data / name).open() as fh:
            rows = [r for r in csv.DictReader(fh) if r["id"] in ids]
        with (out / name).open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return out


def image_scores(model, config, images, oods: dict, device) -> dict[str, np.ndarray]:
    """Per-image score of each fitted OOD model, views combined exactly as ``classify_views`` does."""
    from triageseg.router.model import image_views, router_outputs
    from triageseg.router.ood import ViewSet, combine_view_scores

    views = [image_views(im, config) for im in images]
    owner = np.concatenate([[i] * len(v) for i, v in enumerate(views)])
    thumbs = np.concatenate(views)
    logits, feats = router_outputs(model, config, thumbs, device=device)
    vs = ViewSet(logits, feats, thumbs)
    out = {}
    for name, ood in oods.items():
        s = ood.view_scores(vs)
        out[name] = np.array([combine_view_scores(s[owner == i]) for i in range(len(images))])
    return out


def fit_all(model, config, data: Path, device) -> dict:
    """Every OOD method fitted on the router's training split and calibrated on its validation split."""
    from triageseg.datasets.io import read_image
    from triageseg.datasets.layout import Dataset
    from triageseg.router.calibrate import fit_router_ood
    from triageseg.router.model import make_thumbnail
    from triageseg.router.ood import METHODS

    ds = Dataset(data)

    def thumbs(split):
        samples = [s for s in ds.select(split=split) if s.modality in config.class_names]
        return (np.stack([make_thumbnail(read_image(s.image_path), config.image_size) for s in samples]),
                np.array([config.class_names.index(s.modality) for s in samples]))

    (tr, tr_y), (va, _) = thumbs("train"), thumbs("val")
    return {m: fit_router_ood(model, config, tr, tr_y, va, method=m, device=device) for m in METHODS}


def split_images(data: Path, split: str, modalities=None) -> list[np.ndarray]:
    from triageseg.datasets.io import read_image
    from triageseg.datasets.layout import Dataset

    ds = Dataset(data)
    return [read_image(s.image_path) for s in ds.select(split=split)
            if modalities is None or s.modality in modalities]


def train(data: Path, run_dir: Path, args) -> tuple:
    from triageseg.router.model import load_router
    from triageseg.router.train import train_router

    t0 = time.perf_counter()
    r = train_router(data, run_dir, epochs=30, seed=args.seed, device=args.device,
                     time_budget_s=args.router_seconds, progress=False)
    model, config = load_router(run_dir, device=args.device)
    print(f"  router {run_dir.name}: classes {list(config.class_names)}, {r.steps} steps in {r.epochs_run} epochs, "
          f"val accuracy {r.val_accuracy}, test accuracy {r.test_accuracy:.3f}, {time.perf_counter() - t0:.0f} s")
    return model, config


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    return float(roc_auc_score(y, np.r_[inside, outside]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".bench/ood"))
    parser.add_argument("--router-seconds", type=float, default=30.0, help="router training budget (demo: 30)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    from triageseg.datasets.synth import make_dataset
    from triageseg.router.ood import DEFAULT_METHOD, METHODS
    from triageseg.workflow import DEMO_SPLITS

    torch.set_num_threads(min(2, torch.get_num_threads()))
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    data = make_dataset(args.out / "data", n=130, size=256, seed=args.seed, splits=DEMO_SPLITS, overwrite=True)
    photos, loaded = skimage_images(PHOTOS, rng, crops=2)
    lookalikes, look_loaded = skimage_images(LOOKALIKES, rng, crops=0)
    groups = {"photos": photos, "noise": noise_images(rng), "blank": blank_images(rng)}
    print(f"OOD groups: photos {len(photos)} ({len(loaded)} scikit-image pictures: {', '.join(loaded)}; "
          f"whole + 2 crops), noise {len(groups['noise'])}, blank/near-blank {len(groups['blank'])}")

    print("training the router on all three modalities (the demo's data and budget)")
    model, config = train(data, args.out / "router_all", args)
    oods = fit_all(model, config, data, args.device)
    test = image_scores(model, config, split_images(data, "test"), oods, args.device)
    scored = {g: image_scores(model, config, ims, oods, args.device) for g, ims in groups.items()}
    looks = image_scores(model, config, lookalikes, oods, args.device)

    held: dict[str, dict] = {}
    for left_out in config.class_names:
        keep = set(config.class_names) - {left_out}
        print(f"training a router without {left_out}")
        sub = subset(data, args.out / f"data_without_{left_out}", keep)
        m2, c2 = train(sub, args.out / f"router_without_{left_out}", args)
        o2 = fit_all(m2, c2, sub, args.device)
        inside = image_scores(m2, c2, split_images(sub, "test"), o2, args.device)
        outside = image_scores(m2, c2, [im for sp in ("train", "val", "test")
                                        for im in split_images(data, sp, {left_out})], o2, args.device)
        held[left_out] = {m: (auroc(inside[m], outside[m]), float((outside[m] > o2[m].threshold).mean()),
                              float((inside[m] > o2[m].threshold).mean()), len(outside[m])) for m in METHODS}

    print()
    print(f"{len(test[DEFAULT_METHOD])} in-distribution test images; AUROC of the score vs each OOD group "
          f"(goal >= 0.95), false-reject rate (goal <= 0.01)")
    cols = ["photos", "noise", "blank"] + [f"w/o {m}" for m in config.class_names]
    print(f"{'method':<11} {'threshold':>10} {'false rej':>9} " + " ".join(f"{c:>15}" for c in cols))
    for m in METHODS:
        cells = [f"{auroc(test[m], scored[g][m]):.3f}" for g in groups] + [f"{held[h][m][0]:.3f}" for h in held]
        frr = float((test[m] > oods[m].threshold).mean())
        print(f"{m:<11} {oods[m].threshold:>10.4g} {frr:>9.3f} " + " ".join(f"{c:>15}" for c in cells))
    print()
    print("share of each group above the threshold (detected as unknown modality):")
    print(f"{'method':<11} " + " ".join(f"{c:>15}" for c in cols) + f" {'look-alikes':>28}")
    for m in METHODS:
        cells = [f"{(scored[g][m] > oods[m].threshold).mean():.3f}" for g in groups]
        cells += [f"{held[h][m][1]:.3f} (n={held[h][m][3]})" for h in held]
        look = " ".join(f"{n[:6]}:{'unk' if s > oods[m].threshold else 'in'}" for n, s in zip(look_loaded, looks[m]))
        print(f"{m:<11} " + " ".join(f"{c:>15}" for c in cells) + f" {look:>28}")
    print()
    print("false-reject rate of the routers trained without one modality (their own test split):")
    for m in METHODS:
        print(f"{m:<11} " + " ".join(f"w/o {h}: {held[h][m][2]:.3f}" for h in held))
    print(f"\nmethod used by default: {DEFAULT_METHOD}; {time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
