"""Size triage on a synthetic zoom series: estimate error, its cost, and F1 per zoom with and without it.

Test images of each modality are drawn at zoom 0.5, 1, 2, 3, 4 and 6 of the modality's
typical nucleus size (``synth_sample(diameter=...)``: rendered at base size and resized,
so nuclei span ~8 to ~120 px). Each image is one tissue shown at every zoom (``--series same``:
drawn on a ``--size`` canvas, resized to ``size * zoom``), as a real image resized. No hint is
given to the pipeline.

Printed:
1. The size estimate per method (``mask``: the default, ``log``: scale-space blobs):
   median and 95th percentile of |log2(estimated / true median diameter)|, per modality and overall.
2. Its cost: milliseconds per 512 x 512 image, and the segment time of the same image (--bundle).
3. With --bundle: mean F1 (IoU 0.5:0.95, pooled per image) per zoom, for
   ``off`` (today's code: every image at the segmenter's own scale), ``estimated`` (size triage)
   and ``given`` (the true diameter passed as --diameter: the ceiling of size triage).
   A bundle trained before size triage has no training diameter; ``--data DIR`` gives each
   segmenter the median label diameter of its modality's training images there, so the
   old bundle's models can be measured with size triage.

Usage:
    python -m triageseg.benchmarks.bench_scale --bundle /work/demo_base/bundle --data /work/demo_base/data
    python benchmarks/bench_scale.py --budget 2     # estimate only, 2 images per modality and zoom
"""

from __future__ import annotations

import argparse
import time

import numpy as np

ZOOMS = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0)
MODALITIES = ("fluorescence", "brightfield", "he")
_SEED_ORDER = MODALITIES + ("ihc",)  # the layout seed of each modality (--modalities ihc: not in the default series)


# How the series is drawn: "same" (the default) is one tissue per image shown at every zoom: it is drawn
# on a canvas of `size` pixels and resized by the zoom (side size * zoom), as a real image taken under
# another objective. "grow" is the first version: side size * max(1, zoom / 2), so the canvas was
# size / zoom * max(1, zoom / 2) (2x size at zoom 0.5, size at 1, size / 2 at zooms 2-6): the zooms compared
# different tissue, with 4x fewer nuclei per image at zooms 2-6 than at zoom 1.
SERIES = ("same", "grow")


def zoom_series(n: int, size: int, seed: int = 123, modalities=MODALITIES, series: str = "same"):
    """(modality, zoom, image float32 HxWx3, labels) for n images per modality and zoom (see :data:`SERIES`)."""
    from triageseg.datasets.synth import synth_sample
    from triageseg.datasets.synth.styles import STYLES

    if series not in SERIES:
        raise ValueError(f"unknown series {series!r}; valid: {', '.join(SERIES)}")
    for m in modalities:
        r_lo, r_hi = STYLES[m].radius
        typical = 2.0 * np.sqrt(r_lo * r_hi)
        for z in ZOOMS:
            for i in range(n):
                rng = np.random.default_rng([seed, _SEED_ORDER.index(m), i])  # the same draw at every zoom
                side = int(round(size * z)) if series == "same" else int(size * max(1.0, z / 2))
                img, lab = synth_sample(m, size=side, rng=rng, diameter=typical * z)
                yield m, z, img.astype(np.float32) / 255.0, lab


def estimate_errors(series, methods=("mask", "mask-area", "log")) -> dict:
    from triageseg.router.size import estimate_diameter, median_diameter, signal_for

    errs: dict = {}
    for m, z, img, lab in series:
        true = median_diameter(lab)
        for method in methods:  # each modality on its own signal, as a bundle trained now measures it
            est = estimate_diameter(img, method=method, signal=signal_for(m)).diameter
            err = np.inf if est is None or true is None else abs(np.log2(est / true))
            errs.setdefault(method, {}).setdefault(m, []).append(err)
    return errs


def cost_ms(method: str, repeats: int = 5) -> float:
    from triageseg.datasets.synth import synth_sample
    from triageseg.router.size import estimate_diameter

    img = synth_sample("fluorescence", size=512, rng=np.random.default_rng(0))[0].astype(np.float32) / 255
    estimate_diameter(img, method=method)
    t0 = time.perf_counter()
    for _ in range(repeats):
        estimate_diameter(img, method=method)
    return 1000 * (time.perf_counter() - t0) / repeats


def _train_sizes(data, limit: int = 24) -> dict[str, tuple[float | None, float]]:
    """Segmenter name -> (training diameter, size calibration) from its training images in ``data``."""
    from triageseg.datasets.layout import Dataset
    from triageseg.segmenters.data import canonical_diameter, size_calibration

    ds = Dataset(data)
    out = {}
    groups = {m: ds.select(split="train", modality=m) for m in ds.modalities}
    groups["_generalist"] = ds.select(split="train")
    for name, samples in groups.items():
        loaded = [ds.load(s) for s in samples[:limit]]
        out[name] = (canonical_diameter([lab for _, lab in loaded]), size_calibration(loaded))
    return out


# size triage off; the mask estimate (one vote per object: the default); the first version (area-weighted);
# the default + the probe; the true diameter
MODES = ("off", "mask", "mask-area", "probe", "given")


def f1_per_zoom(bundle, data, n: int, size: int, modalities=MODALITIES, seed: int = 123,
                modes=MODES, series: str = "same") -> tuple[dict, dict]:
    """Mean F1 per mode and zoom, and |log2(decided / true diameter)| per mode (the pipeline's own decision)."""
    from triageseg.postprocess.metrics import match_image
    from triageseg.router.size import median_diameter

    scores: dict = {}
    errors: dict = {}
    pipes = _pipes(bundle, data, modes)
    for m, z, img, lab in zoom_series(n, size, seed=seed, modalities=modalities, series=series):
        true = median_diameter(lab)
        for mode, pipe in pipes.items():
            pipe.diameter = true if mode == "given" else None
            r = pipe.segment(img)
            scores.setdefault(mode, {}).setdefault(z, []).append(match_image(lab, r.labels).mean_f1)
            if mode in ("mask", "mask-area", "probe"):
                err = np.inf if r.diameter is None else abs(np.log2(r.diameter / true))
                errors.setdefault(mode, {}).setdefault(m, []).append(err)
    return scores, errors


def _pipes(bundle, data, modes=MODES) -> dict:
    """One pipeline per mode; an old bundle's segmenters get their training sizes from ``data``."""
    from triageseg.pipeline import Pipeline

    known = _train_sizes(data) if data else {}
    if known:
        print("training sizes from --data: " + ", ".join(f"{k} {d:g} px (calibration {c:g})"
                                                       for k, (d, c) in known.items()))
    pipes = {}
    for mode in modes:
        pipes[mode] = Pipeline.from_bundle(bundle, device="cpu", size_probe=mode == "probe",
                                           size_method="mask-area" if mode == "mask-area" else "mask")
        for name in pipes[mode].available:
            d, d_um, fixed, calibration = pipes[mode].size_config(name)
            if d is None and name in known:
                d, calibration = known[name][0] * fixed, known[name][1]
            pipes[mode]._size_configs[name] = (None if mode == "off" else d, d_um, fixed, calibration)
    return pipes


def real_zooms(bundle, data, image_path: str, mask_path: str, *, max_side: int = 1024) -> dict:
    """F1@0.5 and objects found / true per mode and zoom of a real image with its masks (check only)."""
    from triageseg.datasets.io import read_image, read_labels
    from triageseg.postprocess.metrics import match_image
    from triageseg.router.size import median_diameter
    from triageseg.segmenters.scale import resize_image, resize_labels, scaled_shape

    image, labels = read_image(image_path), read_labels(mask_path)
    pipes = _pipes(bundle, data)
    out: dict = {}
    for z in ZOOMS:
        shape = scaled_shape(image.shape, z)
        img, lab = resize_image(image, shape), resize_labels(labels, shape)
        c0, c1 = min(max_side, shape[0]), min(max_side, shape[1])
        y0, x0 = (shape[0] - c0) // 2, (shape[1] - c1) // 2
        img, lab = img[y0 : y0 + c0, x0 : x0 + c1], lab[y0 : y0 + c0, x0 : x0 + c1]
        true = median_diameter(lab)
        n_true = len(np.unique(lab[lab > 0]))
        for mode, pipe in pipes.items():
            pipe.diameter = true if mode == "given" else None
            r = pipe.segment(img)
            m = match_image(lab, r.labels)
            out.setdefault(mode, {})[z] = (float(m.f1[0]), int(r.labels.max()), n_true, r.diameter, true)
    return out


def segment_costs(bundle, data, repeats: int = 5) -> dict:
    """Seconds per 512 x 512 image: the segment with the size given vs estimated, at zoom 1 and 4 (fluorescence).

    The two modes alternate, image by image, and each figure is the median of ``repeats``.
    """
    from triageseg.datasets.synth import synth_sample
    from triageseg.datasets.synth.styles import STYLES
    from triageseg.router.size import median_diameter

    pipes = _pipes(bundle, data)
    r_lo, r_hi = STYLES["fluorescence"].radius
    out = {}
    for z in (1.0, 4.0):
        img, lab = synth_sample("fluorescence", size=512, rng=np.random.default_rng(9),
                                diameter=2 * np.sqrt(r_lo * r_hi) * z)
        img = img.astype(np.float32) / 255
        times = {"given": [], "mask": []}
        pipes["given"].diameter = median_diameter(lab)
        pipes["mask"].diameter = None
        for mode in times:
            pipes[mode].segment(img, modality="fluorescence")  # warm
        for _ in range(repeats):
            for mode in times:
                t0 = time.perf_counter()
                pipes[mode].segment(img, modality="fluorescence")
                times[mode].append(time.perf_counter() - t0)
        for mode, t in times.items():
            out[(z, mode)] = float(np.median(t))
    return out


def _print_costs(bundle, data, methods=("mask",)) -> None:
    """The estimate's own cost and the segment time of a 512 x 512 image with the size given and estimated."""
    for method in methods:
        print(f"  {method:5s} cost {cost_ms(method):.1f} ms per 512x512 image")
    if bundle is None:
        return
    costs = segment_costs(bundle, data)
    for z in (1.0, 4.0):
        given, est = costs[(z, "given")], costs[(z, "mask")]
        print(f"  segment 512x512 at zoom {z:g}: {given:.3f} s with the size given, {est:.3f} s estimated "
              f"(+{100 * (est / given - 1):.0f} %); {given / 0.262144:.3f} s per megapixel")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=None, help="Bundle to measure F1 per zoom with (none: estimate only).")
    ap.add_argument("--data", default=None, help="Its training data (gives an old bundle its training diameters).")
    ap.add_argument("--budget", type=int, default=4, help="Images per modality and zoom.")
    ap.add_argument("--size", type=int, default=256,
                    help="Side of the drawn tissue (series 'same': the zoom-1 image; zoom z is size * z).")
    ap.add_argument("--series", default="same", choices=SERIES,
                    help="same: one tissue resized to every zoom; grow: the first version (other tissue per zoom).")
    ap.add_argument("--real", action="append", default=[], metavar="IMAGE:MASK",
                    help="A real image and its instance masks, checked at every zoom (never trained on).")
    ap.add_argument("--modalities", default=",".join(MODALITIES), help="Modalities of the synthetic series.")
    ap.add_argument("--no-synth", action="store_true", help="Skip the synthetic series (with --real).")
    ap.add_argument("--seed", type=int, default=123, help="Seed of the synthetic series (123: the recorded figures).")
    ap.add_argument("--modes", default=",".join(MODES), help=f"Size modes of the F1 table (of {','.join(MODES)}).")
    ap.add_argument("--no-cost", action="store_true", help="Skip the timings (a loaded machine).")
    ap.add_argument("--cost-only", action="store_true", help="Only the timings (a quiet machine), with --bundle.")
    args = ap.parse_args(argv)
    if args.cost_only:
        _print_costs(args.bundle, args.data)
        return

    for pair in args.real:
        image_path, mask_path = pair.split(":")
        res = real_zooms(args.bundle, args.data, image_path, mask_path)
        print(f"real image {image_path}: F1@0.5 (objects found/true; decided diameter / true) per zoom")
        for mode, per in res.items():
            print(f"  {mode:6s} " + "  ".join(
                f"{z:g}: {f1:.3f} ({k}/{n}; {'-' if d is None else f'{d:.0f}'}/{t:.0f})"
                for z, (f1, k, n, d, t) in per.items()))
    if args.no_synth:
        return
    mods = tuple(args.modalities.split(","))
    modes = tuple(args.modes.split(","))
    if set(modes) - set(MODES):
        ap.error(f"unknown modes {sorted(set(modes) - set(MODES))}; valid: {','.join(MODES)}")
    errs = estimate_errors(zoom_series(args.budget, args.size, seed=args.seed, modalities=mods, series=args.series))
    print(f"size estimate, |log2(est/true)| over {args.budget} image(s) per modality x zoom "
          f"{','.join(f'{z:g}' for z in ZOOMS)} ({args.size} px, series {args.series}; inf = no estimate)")
    for method, per in errs.items():
        allv = np.concatenate([np.asarray(v) for v in per.values()])
        line = "  ".join(f"{m} {np.median(v):.3f}/{np.percentile(v, 95):.3f}" for m, v in per.items())
        print(f"  {method:5s} median/p95: all {np.median(allv):.3f}/{np.percentile(allv, 95):.3f}  {line}  "
              f"(goal 0.15/0.40)")
    for method in [] if args.no_cost else errs:
        print(f"  {method:5s} cost {cost_ms(method):.1f} ms per 512x512 image (a loaded machine: indicative only)")
    if args.bundle and not args.no_cost:
        _print_costs(args.bundle, args.data, methods=())
    if args.bundle:
        scores, errors = f1_per_zoom(args.bundle, args.data, args.budget, args.size, modalities=mods, seed=args.seed,
                                     modes=modes, series=args.series)
        print("the pipeline's size decision (calibrated by the segmenter; probe: checked by the segmenter; "
              "mask-area: the first version), "
              "|log2(decided/true)| median/p95:")
        for mode, per in errors.items():
            allv = np.concatenate([np.asarray(v) for v in per.values()])
            line = "  ".join(f"{m} {np.median(v):.3f}/{np.percentile(v, 95):.3f}" for m, v in per.items())
            print(f"  {mode:5s} all {np.median(allv):.3f}/{np.percentile(allv, 95):.3f}  {line}")
        print("mean F1 (IoU 0.5:0.95) per zoom; goal: every zoom within 0.03 of zoom 1")
        print("  mode       " + " ".join(f"{z:>7g}" for z in ZOOMS))
        for mode, per in scores.items():
            print(f"  {mode:10s} " + " ".join(f"{np.mean(per[z]):7.3f}" for z in ZOOMS))


if __name__ == "__main__":
    main()
