"""A copy of a bundle whose segmenters' size calibrations are measured again with today's size estimate.

``SegmenterConfig.size_calibration`` (label diameter over ``router.size`` estimate, median over
the segmenter's training images) is measured by ``segmenters.train`` when it trains. When the
estimate changes, a bundle's calibrations no longer describe it; this measures them again on
the same training images (split ``train`` of the segmenter's modality in ``DATA``, each image on
its modality's signal, as ``train`` does, recorded as ``size_signal``) and writes a copy of the
bundle, so that the figures of ``bench_scale.py`` before and after an estimator change compare
the same models. Segmenters without size triage, or calibrated on the ``auto`` signal (bundles
before the per-modality signal), are copied unchanged.

Usage:
    python benchmarks/recalibrate_sizes.py BUNDLE DATA OUT
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path


def recalibrate(bundle: Path, data: Path, out: Path) -> dict[str, tuple[float, float]]:
    """Write the recalibrated copy of ``bundle`` to ``out`` (must not exist); segmenter -> (old, new)."""
    from triageseg.datasets.atomic import write_json_atomic
    from triageseg.datasets.layout import Dataset
    from triageseg.router.size import SIZE_SIGNAL_MODE, signal_for
    from triageseg.segmenters.data import size_calibration

    if out.exists():
        raise FileExistsError(f"{out}: already exists; give a new folder")
    ds = Dataset(data)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    shutil.copytree(bundle, tmp / "b")
    changed = {}
    for seg in sorted((tmp / "b" / "segmenters").iterdir()):
        path = seg / "config.json"
        cfg = json.loads(path.read_text())
        if cfg.get("diameter") is None or cfg.get("size_signal", "auto") == "auto":
            continue
        samples = ds.select(split="train", modality=cfg.get("modality"))
        if not samples:
            raise ValueError(f"{data}: no training images of modality {cfg.get('modality')!r} for {seg.name}")
        loaded = [ds.load(s) for s in samples]
        signals = [signal_for(s.modality or cfg.get("modality"), SIZE_SIGNAL_MODE) for s in samples]
        new = size_calibration(loaded, signals)
        changed[seg.name] = (cfg["size_calibration"], new)
        write_json_atomic(path, {**cfg, "size_calibration": new, "size_signal": SIZE_SIGNAL_MODE})
    (tmp / "b").rename(out)
    tmp.rmdir()
    return changed


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("data", type=Path, help="the bundle's training data")
    ap.add_argument("out", type=Path, help="the copy to write (a new folder)")
    args = ap.parse_args(argv)
    for name, (old, new) in recalibrate(args.bundle, args.data, args.out).items():
        print(f"{name}: size_calibration {old:g} -> {new:g}")


if __name__ == "__main__":
    main()
