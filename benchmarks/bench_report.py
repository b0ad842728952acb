"""What the HTML report costs: the demo's report step alone, and ``evaluate --report`` against ``evaluate``.

1. The demo's step (``workflow.demo_report``) on the demo's test split: 45 synthetic
   images of 256x256 (the demo's 130 images and splits), predictions made from the ground
   truth with known errors (objects dropped, shifted, merged) so the scores vary, K = 6.
   Timed in a fresh process (first call: matplotlib and Pillow imports included) and again
   warm, best of ``--repeat``. The demo's wall time was 284 s on a quiet machine.
2. ``triageseg evaluate PRED GT`` with and without ``--report`` on the same folders, in
   child processes (wall time, so imports count as a user sees them).

Run: ``.venv/bin/python benchmarks/bench_report.py`` (under a minute).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402


def make_demo_split(root: Path, n: int, size: int) -> tuple[Path, Path]:
    """The demo's dataset and predictions of its test split with known errors; (data, predictions)."""
    from scipy import ndimage as ndi

    from triageseg.datasets.io import read_labels, write_labels
    from triageseg.datasets.layout import Dataset
    from triageseg.datasets.synth import make_dataset
    from triageseg.workflow import DEMO_SPLITS

    data = make_dataset(root / "data", n=n, size=size, seed=0, splits=DEMO_SPLITS)
    pred_dir = root / "predictions"
    rng = np.random.default_rng(0)
    for k, s in enumerate(Dataset(data).select(split="test")):
        gt = read_labels(s.label_path)
        ids = np.unique(gt[gt > 0])
        drop = rng.choice(ids, size=len(ids) * (k % 4) // 8, replace=False) if len(ids) else []
        pred = np.where(np.isin(gt, drop), 0, gt)
        pred = np.roll(pred, k % 3, axis=1)
        if k % 5 == 0:  # merge touching objects: one label per connected foreground component
            pred = ndi.label(pred > 0)[0]
        write_labels(pred_dir / f"{s.id}.tif", pred.astype(np.uint32))
    return data, pred_dir


def demo_step(data: Path, pred_dir: Path, out: Path, worst: int) -> float:
    """Score the predictions as evaluate_bundle does, then time the demo's report step only."""
    from triageseg.datasets.io import read_labels
    from triageseg.datasets.layout import Dataset
    from triageseg.postprocess.folders import report_from_results
    from triageseg.postprocess.metrics import match_image
    from triageseg.workflow import BundleScores, demo_report

    samples = Dataset(data).select(split="test")
    results = [match_image(read_labels(s.label_path), read_labels(pred_dir / f"{s.id}.tif"), id=s.id)
               for s in samples]
    confusion: dict[str, dict[str, int]] = {}
    for s in samples:
        confusion.setdefault(s.modality, {}).setdefault(s.modality, 0)
        confusion[s.modality][s.modality] += 1
    routing = {s.id: {"modality": s.modality, "confidence": "0.99", "decision": "routed", "used_model": s.modality}
               for s in samples}
    scores = BundleScores("default", report_from_results(results, {s.id: s.modality for s in samples}), None, 1.0,
                          confusion=confusion, routing=routing)
    shutil.copytree(pred_dir, out / "predictions", dirs_exist_ok=True)
    _, seconds = demo_report(out, scores, data, worst=worst)
    return seconds


def child(args) -> None:
    seconds = [demo_step(args.data, args.pred, args.out, args.worst) for _ in range(args.repeat)]
    size = (args.out / "report.html").stat().st_size
    print(f"CHILD {seconds[0]:.3f} {min(seconds[1:] or seconds):.3f} {size}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=130, help="images of the demo dataset (its test split is 34.5%%)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--worst", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--pred", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    root = Path(tempfile.mkdtemp(prefix="triageseg-bench-report-"))
    try:
        data, pred = make_demo_split(root, args.n, args.size)
        n_test = len(list(pred.glob("*.tif")))
        print(f"demo test split: {n_test} images of {args.size}x{args.size}, worst {args.worst}")
        cmd = [sys.executable, __file__, "--child", "--data", str(data), "--pred", str(pred), "--out",
               str(root / "demo_out"), "--worst", str(args.worst), "--repeat", str(args.repeat)]
        line = next(x for x in subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()
                    if x.startswith("CHILD"))
        cold, warm, size = line.split()[1:]
        print(f"demo report step: {float(cold):.2f} s in a fresh process (imports included), "
              f"{float(warm):.2f} s warm (best of {max(1, args.repeat - 1)}); report.html {int(size) / 1e3:.0f} kB")
        print(f"share of the demo's 284 s wall time: {100 * float(cold) / 284:.2f}%")
        gt_test = root / "gt_test"  # the test split's labels only, as `evaluate` pairs whole folders
        gt_test.mkdir()
        for p in pred.glob("*.tif"):
            shutil.copyfile(data / "labels" / p.name, gt_test / p.name)
        exe = [sys.executable, "-m", "triageseg", "evaluate", str(pred), str(gt_test), "--modalities",
               str(data / "modalities.csv")]
        walls = {}
        report_args = ["--report", str(root / "r.html"), "--images", str(data / "images")]
        for name, extra in (("evaluate", []), ("evaluate --report", report_args)):
            best = float("inf")
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                subprocess.run(exe + extra, check=True, capture_output=True)
                best = min(best, time.perf_counter() - t0)
            walls[name] = best
            print(f"{name:<20} {best:.2f} s wall (best of {args.repeat}, {n_test} images)")
        print(f"--report adds {walls['evaluate --report'] - walls['evaluate']:.2f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
