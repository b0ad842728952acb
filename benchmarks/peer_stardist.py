"""StarDist 2D as a peer of ``bench_inference.py``, run by the Python of a separate environment.

TensorFlow and StarDist are not dependencies of triageseg (and pin other NumPy versions),
so they live in their own virtual environment, e.g.::

    python -m venv /work/peers
    /work/peers/bin/pip install stardist "tensorflow-cpu<2.16" tifffile

``bench_inference.py --peers-python /work/peers/bin/python`` starts this script in that
environment once and sends it one request per image; the stage seconds are measured here,
inside the peer, so the pipe between the two processes is not counted. This file imports
nothing from triageseg (the peer environment does not have it).

Protocol (JSON lines): the first line out is ``{"ready": true, "versions": {...}}``; then
for every line in, ``{"image": TIFF path, "labels": .npy path of its ground truth}``, one
line out, ``{"read", "route", "net", "tiling", "watershed", "e2e", "objects"}`` (seconds,
the same stages as the triageseg tools) or ``{"error": message}``.

What is measured (the issue's definition): StarDist 2D, 32 rays, grid 2, random weights
(the compute of a trained model); the network on the whole image, as ``predict_instances``
runs it; end to end = read + normalise + network + NMS, where the NMS runs on outputs made
from the ground truth (``edt_prob``, ``star_dist``, not timed), as a trained network would
give them, because NMS on random outputs is 5-8x slower.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def build(threads: int):
    """The StarDist model (random weights) with TensorFlow at ``threads`` threads."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    from stardist.models import Config2D, StarDist2D

    cfg = Config2D(n_rays=32, grid=(2, 2), n_channel_in=1)
    return StarDist2D(cfg, name="bench", basedir=tempfile.mkdtemp(prefix="stardist-"))


def measure(model, image_path: str, labels):
    """(stage seconds, label image) of one image, ``labels`` its ground truth (see the module docstring).

    Also what ``bench_inference.StarDistTool`` runs when StarDist is installed beside triageseg.
    """
    import numpy as np
    import tifffile
    from csbdeep.utils import normalize
    from stardist import edt_prob, star_dist
    from stardist.geometry import polygons_to_label
    from stardist.nms import non_maximum_suppression

    t0 = time.perf_counter()
    image = tifffile.imread(image_path)
    image = normalize(image.mean(axis=2) if image.ndim == 3 else image, 1, 99.8)
    t1 = time.perf_counter()
    model.keras_model.predict(image[None, ..., None].astype(np.float32), verbose=0)  # as predict_instances
    t2 = time.perf_counter()
    prob = edt_prob(labels)[::2, ::2]  # trained-like outputs (not timed: a trained network gives them)
    dist = star_dist(labels, 32)[::2, ::2]
    t3 = time.perf_counter()
    points, probi, disti = non_maximum_suppression(dist, prob, grid=(2, 2), prob_thresh=0.5, nms_thresh=0.4)
    out = polygons_to_label(disti, points, prob=probi, shape=labels.shape)
    t4 = time.perf_counter()
    return {"read": t1 - t0, "route": 0.0, "net": t2 - t1, "tiling": 0.0, "watershed": t4 - t3,
            "e2e": (t2 - t0) + (t4 - t3)}, out


def run(model, image_path: str, labels_path: str) -> dict:
    """Stage seconds and object count of one image, its ground truth in a ``.npy`` file."""
    import numpy as np

    stages, out = measure(model, image_path, np.load(labels_path))
    return {**stages, "objects": int(len(np.unique(out)) - 1)}


def versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("stardist", "csbdeep", "tensorflow-cpu", "numpy")
            if _installed(name)} | {"python": sys.version.split()[0]}


def _installed(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(name)
    except PackageNotFoundError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    out = sys.stdout
    sys.stdout = sys.stderr  # library chatter must not corrupt the protocol
    try:
        model = build(args.threads)
    except Exception as err:  # noqa: BLE001 - said to the benchmark, which skips the tool
        out.write(json.dumps({"ready": False, "error": f"{type(err).__name__}: {err}"}) + "\n")
        out.flush()
        return
    out.write(json.dumps({"ready": True, "versions": versions()}) + "\n")
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            reply = run(model, req["image"], req["labels"])
        except Exception as err:  # noqa: BLE001 - one bad request is reported, the peer stays up
            reply = {"error": f"{type(err).__name__}: {err}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
