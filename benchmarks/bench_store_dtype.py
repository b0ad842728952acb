"""What a lower-precision probability store would cost: labels and F1 decoded from float32 vs rounded probabilities.

The block path keeps each image's class probabilities in a store
(``pipeline/blockwise/probstore.py``, float32) and decodes the labels from it; the in-memory path
decodes the float32 probabilities directly, so the two agree. A float16 or uint8 store
would take 2.5-17x less scratch (RESULTS.md), but the watershed would see rounded
probabilities. This measures the cost on real decodes: for each test image of a dataset,
the bundle's routed pipeline gives the float32 probabilities (in memory), and the labels
are decoded three times, from them, from them rounded to float16, and from them rounded
to 256 levels (uint8, x255). Reported per store dtype: mean F1 (protocol ``default``)
against the ground truth, the difference to float32, the fraction of images whose labels
change at all, and the fraction of pixels labelled differently (foreground/background or
object membership, matched by identity of the label images).

Run: ``.venv/bin/python benchmarks/bench_store_dtype.py --bundle B --data D [--split test]``
(accuracy only, nothing timed; a minute or two on a CPU for ~50 images of 256 px).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

STORES = {
    "float32": lambda p: p,
    "float16": lambda p: p.astype(np.float16).astype(np.float32),
    "uint8": lambda p: (np.rint(np.clip(p, 0, 1) * 255).astype(np.uint8) / np.float32(255)).astype(np.float32),
}


def test_ids(data: Path, split: str) -> list[str]:
    with open(data / "splits.csv", newline="") as fh:
        return [r["id"] for r in csv.DictReader(fh) if r["split"] == split]


def measure(bundle: Path, data: Path, split: str, device: str = "cpu") -> dict:
    """Per store dtype: mean F1, images whose labels change, share of pixels that change."""
    from triageseg.datasets.io import read_image, read_labels
    from triageseg.pipeline import Pipeline
    from triageseg.postprocess.metrics import match_image
    from triageseg.postprocess.watershed import watershed

    pipe = Pipeline.from_bundle(bundle, device=device)
    ids = test_ids(data, split)
    f1 = {k: [] for k in STORES}
    changed = {k: 0 for k in STORES}
    pixels = {k: 0 for k in STORES}
    total = 0
    for name in ids:
        image_path = next((data / "images").glob(f"{name}.*"))
        image = read_image(image_path)
        gt = read_labels(data / "labels" / f"{name}.tif")
        d = pipe.decide(image)
        probs = pipe.probabilities(image, d.used_model, d.scale)
        params = pipe.params(d.used_model, d.scale)
        reference = None
        for kind, rounding in STORES.items():
            labels = watershed(rounding(probs), params)
            f1[kind].append(match_image(gt, labels).mean_f1)
            if reference is None:
                reference = labels
                continue
            # the same partition whatever the numbering: (label, reference label) pairs one to one
            same = np.array_equal(labels, reference)
            changed[kind] += not same
            pixels[kind] += int(np.count_nonzero(_remapped(labels, reference) != reference))
        total += reference.size
    out = {"images": len(ids), "split": split, "bundle": str(bundle), "data": str(data)}
    for kind in STORES:
        out[kind] = {"mean_f1": round(float(np.mean(f1[kind])), 4),
                     "delta_f1": round(float(np.mean(f1[kind]) - np.mean(f1["float32"])), 6),
                     "max_abs_image_delta_f1": round(float(np.max(np.abs(np.subtract(f1[kind], f1["float32"])))), 4),
                     "images_changed": changed[kind], "share_images_changed": round(changed[kind] / len(ids), 3),
                     "share_pixels_changed": round(pixels[kind] / total, 6)}
    return out


def _remapped(labels: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``labels`` renumbered to the reference object each overlaps most (0 stays 0): pixels that differ then differ."""
    out = np.zeros_like(reference)
    mask = labels > 0
    if not mask.any():
        return out
    pairs, counts = np.unique(np.stack([labels[mask], reference[mask]]), axis=1, return_counts=True)
    best = {}
    for (a, b), c in zip(pairs.T, counts, strict=True):
        if c > best.get(a, (0, 0))[1]:
            best[a] = (b, c)
    lut = np.zeros(int(labels.max()) + 1, reference.dtype)
    for a, (b, _) in best.items():
        lut[a] = b
    return lut[labels]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    print(json.dumps(measure(args.bundle, args.data, args.split), indent=2))


if __name__ == "__main__":
    main()
