"""Draw samples from the synthetic generator of another commit (for before/after comparisons).

The repository root is the package, so ``git archive REV`` unpacked into a temporary
folder plus a ``triageseg`` symlink to it is an importable copy of the old code. Samples
are drawn in a subprocess that imports that copy only, and come back as an ``.npz``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# The commit before issue 19's generator changes (the package split, same samples as before).
BEFORE = "68a6e42"

_DRAW = r"""
import json, sys, time
import numpy as np
from triageseg.datasets.synth import synth_sample
spec = json.loads(sys.argv[1])
out = {}
synth_sample(spec["modalities"][0], size=32, rng=np.random.default_rng(0))  # imports
for m in spec["modalities"]:
    images, labels, ms = [], [], []
    for i in range(spec["n"]):
        t = time.perf_counter()
        im, lab = synth_sample(m, size=spec["size"], rng=np.random.default_rng([spec["seed"], i]))
        ms.append(1000 * (time.perf_counter() - t))
        images.append(im); labels.append(lab)
    out[m + "/images"] = np.stack(images); out[m + "/labels"] = np.stack(labels); out[m + "/ms"] = np.array(ms)
np.savez_compressed(spec["out"], **out)
"""


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def draw(modalities, *, n: int, size: int, seed: int, rev: str | None = None) -> dict[str, dict[str, np.ndarray]]:
    """``{modality: {"images", "labels", "ms"}}`` from the generator at ``rev`` (None: this checkout).

    Sample ``i`` of a modality uses ``default_rng([seed, i])``; ``ms`` is the time per
    sample in milliseconds (imports excluded). Modalities the old code lacks are skipped.
    """
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if rev is None:
            pkg = repo_root()
        else:
            pkg = tmp / "src"
            pkg.mkdir()
            archive = subprocess.run(["git", "-C", str(repo_root()), "archive", rev], check=True, capture_output=True)
            subprocess.run(["tar", "-x", "-C", str(pkg)], input=archive.stdout, check=True)
        path = tmp / "path"
        path.mkdir()
        (path / "triageseg").symlink_to(pkg)
        known = _modalities(path)
        mods = [m for m in modalities if m in known]
        spec = {"modalities": mods, "n": n, "size": size, "seed": seed, "out": str(tmp / "draw.npz")}
        env = {**os.environ, "PYTHONPATH": str(path), "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-c", _DRAW, json.dumps(spec)], check=True, env=env)
        with np.load(tmp / "draw.npz") as z:
            return {m: {k: z[f"{m}/{k}"] for k in ("images", "labels", "ms")} for m in mods}


def _modalities(path: Path) -> list[str]:
    code = "from triageseg.datasets.synth import MODALITIES; print(','.join(MODALITIES))"
    env = {**os.environ, "PYTHONPATH": str(path)}
    done = subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True, text=True)
    return done.stdout.strip().split(",")
