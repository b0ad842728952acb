"""Time the synthetic generator: 100 images of 256x256 on one core (goal: < 20 s).

Usage: python benchmarks/bench_synth.py [--n 100] [--size 256] [--out DIR]

Prints the wall time of ``make_dataset`` (generation + PNG/TIFF writing + index),
then the generation time alone per modality.
"""

from __future__ import annotations

import os

# One core: pin BLAS/OpenMP pools before NumPy loads, and the process to one CPU.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None, help="keep the dataset here (default: a temp dir)")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    from triageseg.datasets.layout import Dataset
    from triageseg.datasets.synth import MODALITIES, make_dataset, synth_sample

    synth_sample("he", size=32, rng=np.random.default_rng(0))  # warm up imports
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "synth"
        started = time.perf_counter()
        make_dataset(out, n=args.n, size=args.size, seed=0, overwrite=True)
        total = time.perf_counter() - started
        counts = {m: sum(v.values()) for m, v in Dataset(out).counts().items()}
    status = "OK" if total < 20.0 * args.n / 100 * (args.size / 256) ** 2 else "SLOW"
    print(
        f"make_dataset: {args.n} images of {args.size}x{args.size} on 1 core: {total:.2f} s "
        f"({1000 * total / args.n:.1f} ms/image) [{status}; goal < 20 s per 100 at 256x256]"
    )
    print(f"  counts: {counts}")
    for modality in MODALITIES:
        k = 20
        started = time.perf_counter()
        nuclei = [int(synth_sample(modality, size=args.size, rng=np.random.default_rng(i))[1].max()) for i in range(k)]
        ms = 1000 * (time.perf_counter() - started) / k
        print(
            f"  synth_sample {modality:12s} {ms:6.1f} ms/image, nuclei per image {min(nuclei)}-{max(nuclei)} "
            f"(mean {np.mean(nuclei):.0f})"
        )


if __name__ == "__main__":
    main()
