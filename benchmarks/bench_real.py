"""Real images from public packages: segmentation, a classical baseline, and the realism check.

No labelled real dataset can be downloaded here, but a few real microscopy images ship
inside public packages. They are used to CHECK, never to train or tune:

==============  ============  ======================================================  ======
name            modality      source                                                  labels
==============  ============  ======================================================  ======
dsb_fluo        fluorescence  stardist 0.9.2 ``data/images/img2d.tif`` (DSB 2018)     yes
u2os_hoechst    fluorescence  mahotas 1.4.18 ``demos/data/nuclear.png`` (U2OS)        no
tcia_he         he            stardist 0.9.2 ``data/images/histo.jpg`` (TCIA H&E)     no
skimage_ihc     ihc           scikit-image ``data.immunohistochemistry()``            no
==============  ============  ======================================================  ======

The stardist and mahotas images come from their PyPI wheels (``pip download --no-deps``,
once, into ``--cache``; only the image files are kept). For each image it prints:

- with ``--bundle``: the routed modality, confidence, OOD score against the bundle's
  threshold, object count, and F1@0.5 / mean F1 (default protocol) where labels exist;
  an overlay PNG per image (``--docs``, default ``docs/real_<name>.png``);
- the classical baseline (Otsu + distance watershed) on the same image, same scores;
- the realism check: summary statistics (``benchmarks/realism.py``) of the real image
  beside those of synthetic samples of its modality from the generator at ``--before``
  (default 68a6e42, before issue 19) and from this checkout.

Usage:
    python benchmarks/bench_real.py [--bundle B] [--cache .bench/real] [--docs docs]
        [--before 68a6e42] [--n-synth 8] [--no-overlays] [--tag _before] [--no-realism]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

WHEELS = {
    "stardist==0.9.2": {"stardist/data/images/img2d.tif", "stardist/data/images/mask2d.tif",
                        "stardist/data/images/histo.jpg"},
    "mahotas==1.4.18": {"mahotas/demos/data/nuclear.png"},
}


@dataclass(frozen=True)
class RealImage:
    name: str
    modality: str  # the modality it is (what the router should say)
    path: Path  # image file (read with datasets.io.read_image, as `segment` does)
    labels: Path | None  # instance labels when the package ships them


def fetch(cache: Path) -> list[RealImage]:
    """The real images, fetched once into ``cache`` (pip wheels for stardist and mahotas)."""
    cache.mkdir(parents=True, exist_ok=True)
    for spec, members in WHEELS.items():
        if all((cache / Path(m).name).exists() for m in members):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            "-d", tmp, spec], check=True, capture_output=True)
            wheel = next(Path(tmp).glob("*.whl"))
            with zipfile.ZipFile(wheel) as z:
                for m in members:
                    with z.open(m) as src, open(cache / Path(m).name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
    ihc = cache / "skimage_ihc.png"
    if not ihc.exists():
        import imageio.v3 as iio
        from skimage import data

        iio.imwrite(ihc, data.immunohistochemistry())
    return [
        RealImage("dsb_fluo", "fluorescence", cache / "img2d.tif", cache / "mask2d.tif"),
        RealImage("u2os_hoechst", "fluorescence", cache / "nuclear.png", None),
        RealImage("tcia_he", "he", cache / "histo.jpg", None),
        RealImage("skimage_ihc", "ihc", ihc, None),
    ]


def _raw(path: Path) -> np.ndarray:
    from triageseg.datasets.io import read_image_raw

    raw = read_image_raw(path)
    if raw.ndim == 3 and raw.shape[2] >= 3 and np.array_equal(raw[..., 0], raw[..., 1]):
        raw = raw[..., 0]  # a grey image stored as RGB
    return raw


def _scores(labels: np.ndarray, gt: np.ndarray | None) -> str:
    from triageseg.postprocess.metrics import match_image

    text = f"{int(labels.max()):4d} objects"
    if gt is not None:
        r = match_image(gt, labels)
        text += f" (true {r.n_true}), F1@0.5 {r.f1_at(0.5):.3f}, mean F1 {r.mean_f1:.3f}"
    return text


def _overlay(image: np.ndarray, labels: np.ndarray, out: Path, title: str) -> None:
    """The image with the predicted outlines in yellow, at most 640 px wide (atomic write)."""
    import imageio.v3 as iio
    from skimage.segmentation import find_boundaries

    from triageseg.datasets.atomic import atomic_path

    rgb = (np.clip(image, 0, 1) * 255).astype(np.uint8).copy()
    edge = find_boundaries(labels, mode="inner")
    rgb[edge] = (255, 230, 0)
    step = max(1, int(np.ceil(rgb.shape[1] / 640)))
    with atomic_path(out) as tmp:
        iio.imwrite(tmp, rgb[::step, ::step], extension=".png")
    print(f"    overlay: {out} ({title})")


def _display(path: Path, normalised: np.ndarray) -> np.ndarray:
    """What a user sees: the stored colours of an 8-bit RGB image, else the normalised one."""
    from triageseg.datasets.io import read_image_raw

    raw = read_image_raw(path)
    if raw.dtype == np.uint8 and raw.ndim == 3 and raw.shape[2] >= 3:
        return raw[..., :3].astype(np.float32) / 255.0
    return normalised


def segment_real(images: list[RealImage], bundle: Path | None, docs: Path | None, tag: str = "") -> None:
    from triageseg.bundle import GENERALIST
    from triageseg.datasets.io import read_image, read_labels
    from triageseg.postprocess.classical import classical_segment

    pipe = None
    if bundle is not None:
        from triageseg.pipeline.local.single import load_pipeline

        pipe = load_pipeline(bundle)
        pipe.load_router()
        print(f"bundle {bundle}: OOD threshold {pipe.ood_threshold}")
    for item in images:
        image = read_image(item.path)
        gt = read_labels(item.labels) if item.labels else None
        print(f"{item.name} ({item.modality}, {image.shape[1]}x{image.shape[0]}):")
        channel = "gray" if item.modality == "fluorescence" else "hematoxylin"
        print(f"  classical (Otsu + watershed): {_scores(classical_segment(image, channel=channel), gt)}")
        if pipe is None:
            continue
        res = pipe.segment(image)
        thr = pipe.ood_threshold
        ood = "n/a" if res.ood_score is None else f"{res.ood_score:.3f}" + (
            f" ({'below' if thr is None or res.ood_score <= thr else 'ABOVE'} threshold {thr:.3f})" if thr else "")
        conf = "forced" if res.confidence is None else f"{res.confidence:.2f}"
        print(f"  bundle: routed {res.modality} ({conf}, used {res.used_model}), OOD {ood}, "
              f"quality {res.quality if res.quality is None else round(res.quality, 3)}")
        print(f"  bundle: {_scores(res.labels, gt)}")
        if GENERALIST in pipe.available and res.used_model != GENERALIST:
            # The routed comparison on real images too: the generalist at its own size decision.
            print(f"  generalist: {_scores(pipe.segment(image, modality=GENERALIST).labels, gt)}")
        if docs is not None:
            _overlay(_display(item.path, image), res.labels, docs / f"real_{item.name}{tag}.png",
                     f"{res.modality}, {int(res.labels.max())} nuclei")


def realism(images: list[RealImage], before: str | None, n: int) -> None:
    from old_generator import draw
    from realism import compare, image_stats, median_stats

    mods = sorted({i.modality for i in images})
    new = draw(mods, n=n, size=256, seed=0, rev=None)
    old = draw(mods, n=n, size=256, seed=0, rev=before) if before else {}
    print(f"\nrealism: real image vs median of {n} synthetic 256x256 samples of its modality "
          f"(before = generator at {before}, after = this checkout)")
    for item in images:
        real = image_stats(_raw(item.path), item.modality)
        after = median_stats(list(new[item.modality]["images"]), item.modality)
        prev = median_stats(list(old[item.modality]["images"]), item.modality) if item.modality in old else None
        if prev is None and before:
            print(f"  {item.name}: the generator at {before} has no {item.modality} modality")
        print(f"  {item.name} ({item.modality}):")
        print("\n".join(compare(real, prev, after)))
        if prev is not None:
            closer = sum(abs(after[k] - real[k]) < abs(prev[k] - real[k]) for k in real if k in after and k in prev)
            print(f"    after closer to real on {closer} of {sum(k in prev for k in real)} statistics")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None, help="bundle to segment the real images with")
    parser.add_argument("--cache", type=Path, default=Path(".bench/real"), help="where the real images are kept")
    parser.add_argument("--docs", type=Path, default=Path("docs"), help="folder for the overlay PNGs")
    parser.add_argument("--no-overlays", action="store_true", help="write no overlay PNGs")
    parser.add_argument("--tag", default="", help="suffix of the overlay names (real_<name><tag>.png)")
    parser.add_argument("--no-realism", action="store_true", help="skip the realism statistics")
    parser.add_argument("--before", default="68a6e42", help="commit of the 'before' generator ('' skips)")
    parser.add_argument("--n-synth", type=int, default=8, help="synthetic samples per modality for the realism check")
    args = parser.parse_args()
    images = fetch(args.cache)
    segment_real(images, args.bundle, None if args.no_overlays else args.docs, args.tag)
    if not args.no_realism:
        realism(images, args.before or None, args.n_synth)


if __name__ == "__main__":
    main()
