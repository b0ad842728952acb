"""Post-processing figures: round-trip fidelity, watershed speed, target speed.

1. Round trip: synthetic labels -> ``make_targets`` -> one-hot probabilities ->
   ``watershed`` (default parameters) -> mean F1 (protocol ``default``) against the
   labels, for every boundary width 1..5 and both modes. Goal: >= 0.99 everywhere.
2. Watershed speed in ms per megapixel on one core, on realistic (smoothed, noisy,
   softmax) 3-class maps made from 1024x1024 synthetic label images. Goal: < 30 ms/MP
   on a typical map. CPU time of this process (``time.process_time``), best of
   ``--repeat``, so other load on the machine inflates it less than wall time would.
3. ``make_targets`` speed in ms per megapixel.

Run: ``.venv/bin/python benchmarks/bench_postprocess.py`` (about a minute).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core, before NumPy/SciPy load

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402

from triageseg.datasets.synth import MODALITIES, synth_sample  # noqa: E402
from triageseg.postprocess.metrics import evaluate  # noqa: E402
from triageseg.postprocess.targets import MODES, make_targets, nucleus_widths  # noqa: E402
from triageseg.postprocess.watershed import watershed  # noqa: E402


def one_hot(targets: np.ndarray) -> np.ndarray:
    return np.eye(3, dtype=np.float32)[targets].transpose(2, 0, 1)


def realistic_probs(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A network-like map: smoothed one-hot logits plus smooth noise, through a softmax."""
    logits = 6.0 * ndi.gaussian_filter(one_hot(make_targets(labels)), (0, 1.2, 1.2))
    noise = rng.normal(0.0, 1.0, logits.shape).astype(np.float32)
    logits += 1.5 * ndi.gaussian_filter(noise, (0, 2.0, 2.0))
    logits -= logits.max(axis=0, keepdims=True)
    probs = np.exp(logits)
    return probs / probs.sum(axis=0, keepdims=True)


def touching_ellipses(
    rng: np.random.Generator, size: int = 512, n: int = 90, radius: tuple[float, float] = (8, 30)
) -> np.ndarray:
    """Touching ellipses (70 % in five clusters), each at most 20 % hidden by others."""
    lab = np.zeros((size, size), np.int32)
    depth = np.full((size, size), np.inf)
    yy, xx = np.mgrid[:size, :size]
    centres = rng.uniform(0.1 * size, 0.9 * size, (5, 2))
    for k in range(1, n + 1):
        if rng.random() < 0.7:
            cy, cx = centres[rng.integers(5)] + rng.normal(0, 0.07 * size, 2)
        else:
            cy, cx = rng.uniform(0, size, 2)
        r, aspect, theta = rng.uniform(*radius), rng.uniform(1, 2), rng.uniform(0, np.pi)
        u = ((xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)) / (r * np.sqrt(aspect))
        v = (-(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)) / (r / np.sqrt(aspect))
        nr = np.sqrt(u * u + v * v)
        inside = nr <= 1
        if not inside.any() or (depth[inside] <= 1).mean() > 0.2:
            continue
        win = inside & (nr < depth)
        lab[win] = k
        depth[win] = nr[win]
    out = np.zeros_like(lab)  # keep each nucleus' largest piece
    for k, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is not None:
            pieces, _ = ndi.label(lab[sl] == k)
            sizes = np.bincount(pieces.ravel())
            sizes[0] = 0
            if sizes.max() >= 20:
                out[sl][pieces == sizes.argmax()] = k
    return out


def fidelity_table(labels: list[np.ndarray], title: str) -> float:
    n_objects = sum(np.unique(lab).size - 1 for lab in labels)
    areas = np.concatenate([np.bincount(lab.ravel())[1:] for lab in labels])
    touching = sum(int(((lab[:, 1:] != lab[:, :-1]) & (lab[:, 1:] > 0) & (lab[:, :-1] > 0)).sum()) for lab in labels)
    print(f"{title}: {len(labels)} images, {n_objects} nuclei, median area {int(np.median(areas[areas > 0]))} px, "
          f"{touching} touching pixel pairs")
    full = []
    for width in range(1, 6):
        w = np.concatenate([nucleus_widths(lab, width)[np.unique(lab)[1:]] for lab in labels])
        full.append(f"{100 * (w == width).mean():9.0f}%")
    print(f"{'width':22s}" + "".join(f"{w:>10d}" for w in range(1, 6)))
    print(f"{'nuclei at full width':22s}" + "".join(full))
    worst = 1.0
    for mode in MODES:
        row = []
        for width in range(1, 6):
            preds = [watershed(one_hot(make_targets(lab, width=width, mode=mode))) for lab in labels]
            f1 = evaluate(labels, preds).mean_f1
            worst = min(worst, f1)
            row.append(f"{f1:10.4f}")
        print(f"{'mean F1, ' + mode:22s}" + "".join(row))
    return worst


def cpu_ms(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4, help="synthetic images per modality for the round trip")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)

    print("Round trip labels -> make_targets -> one-hot -> watershed (default parameters), "
          "mean F1 (default protocol)")
    labels = [synth_sample(m, size=args.size, rng=rng)[1] for m in MODALITIES for _ in range(args.images)]
    worst = fidelity_table(labels, f"synthetic generator ({', '.join(MODALITIES)}, {args.size}x{args.size})")
    big = [touching_ellipses(rng) for _ in range(3)]
    worst = min(worst, fidelity_table(big, "large touching ellipses (radius 8-30 px, 512x512)"))
    print(f"worst {worst:.4f} (goal >= 0.99)\n")

    print("Watershed speed, one core, realistic 3-class maps of 1024x1024 (CPU ms per megapixel)")
    maps = {"typical (BBBC039-like density)": touching_ellipses(rng, size=1024, n=600, radius=(6, 16))}
    for modality in MODALITIES:
        maps[f"synthetic {modality}"] = synth_sample(modality, size=1024, rng=rng)[1]
    for name, lab in maps.items():
        probs = realistic_probs(lab, rng)
        ms = cpu_ms(lambda: watershed(probs), args.repeat)
        result = evaluate([lab], [watershed(probs)])
        print(f"  {name:32s} {np.unique(lab).size - 1:5d} nuclei, {100 * (lab > 0).mean():4.1f}% foreground: "
              f"{ms / (lab.size / 1e6):6.1f} ms/MP  (decoded F1@0.5 {result.f1[0]:.3f})")
    print("  goal < 30 ms/MP on a typical map\n")

    print("make_targets speed, one core, 1024x1024 (CPU ms per megapixel)")
    lab = synth_sample("fluorescence", size=1024, rng=rng)[1]
    for mode in MODES:
        cells = []
        for width in (1, 2, 3, 5):
            ms = cpu_ms(lambda: make_targets(lab, width=width, mode=mode), args.repeat)
            cells.append(f"width {width}: {ms / (lab.size / 1e6):5.1f}")
        print(f"  {mode:9s} " + "   ".join(cells))


if __name__ == "__main__":
    main()
