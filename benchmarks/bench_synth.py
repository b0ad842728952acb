"""Time the synthetic generator: 100 images of 256x256 on one core (goal: < 20 s).

Usage: python benchmarks/bench_synth.py [--n 100] [--size 256] [--out DIR] [--before REV]

Prints the wall time of ``make_dataset`` (generation + PNG/TIFF writing + index),
then the generation time alone per modality, and with ``--before REV`` (default
68a6e42, the generator before issue 19) the ms per sample of that commit's generator
beside this one's, both drawn in subprocesses on the same seeds.
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
    parser.add_argument("--before", default="68a6e42", help="commit whose generator to time beside this one ('' skips)")
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
    if args.before:
        _before_after(args.before, args.size, MODALITIES)


def _before_after(rev: str, size: int, modalities) -> None:
    """ms per sample of the generator at ``rev`` and of this checkout, same seeds, one subprocess each."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from old_generator import draw

    k = 10
    old = draw(modalities, n=k, size=size, seed=0, rev=rev)
    new = draw(modalities, n=k, size=size, seed=0, rev=None)
    print(f"  ms per {size}x{size} sample (median of {k}), generator at {rev} -> this checkout:")
    for m in modalities:
        before = f"{np.median(old[m]['ms']):6.1f}" if m in old else "   (none)"
        print(f"    {m:12s} {before} -> {np.median(new[m]['ms']):6.1f}")


if __name__ == "__main__":
    main()
