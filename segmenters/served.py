"""Serving a cached export without building the eager network first.

An exported backend (ONNX Runtime, OpenVINO; :mod:`triageseg.segmenters.backends`) runs
the ONNX file in the export cache, but the first path to it builds the eager network
(an efficientnet-b3 Unet, a timm ViT), loads its weights and hashes them, only to find
the file already there. Building them imports timm (and through it torchvision and
``torch._dynamo``): about 2 s of a fresh process's start on a 2-core CPU, paid by every
``triageseg segment`` of one image and by every Ray actor before its first image.

:func:`cached_runner` skips that when it can: the cache key is a hash of the run folder's
files (:func:`~triageseg.segmenters.backends.cache_key`), so the export of exactly these
weights and this config is found without the network, checked against its SHA-256, and
run. What the pipeline reads from a network (the input channels, the router's feature
width and class count) comes from the config and from ``meta.json``, written beside the
export the first time the eager path makes or finds it. A served network is not a torch
module (:class:`ServedNet`, :class:`ServedRouter`): ``predict`` and ``router_outputs`` run
it on numpy arrays, so a process that only serves exports on the CPU never imports torch
(about another second of its start: a one-image ``triageseg segment``, a Ray actor).
Whatever is missing or does not match (no cache, a damaged file, no ``meta.json``, a GPU,
the torch backend, an imported bioimage.io model) returns None, and the caller builds the
eager network as before; a weights file damaged after its export hashes to another key, so
it is refused by the eager load with the file named.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from triageseg.segmenters import backends as _backends

META_FILE = "meta.json"  # beside model.onnx in the export cache: what the stand-in module needs


def write_meta(onnx_path: str | os.PathLike, meta: dict) -> None:
    """Record ``meta`` beside a cached export (atomically; unchanged content is not rewritten).

    A cache folder that cannot be written (read-only, full) is left as it is: the export
    still runs, only later processes build the eager network again.
    """
    from triageseg.datasets.atomic import write_text_atomic

    path = Path(onnx_path).parent / META_FILE
    text = json.dumps(meta, sort_keys=True) + "\n"
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    try:
        write_text_atomic(path, text)
    except OSError:
        pass


def cached_runner(run_dir: str | os.PathLike, choice, device, *, kind: str, threads: int | None = None,
                  outputs: int = 1) -> tuple | None:
    """``(runner, meta)`` of the cached export of ``run_dir``, or None when the eager path must run.

    Args:
        run_dir: the run folder (``config.json`` + ``model.safetensors``).
        choice: the resolved backend (:class:`~triageseg.segmenters.backends.Choice`).
        device: where the pipeline runs (only the CPU is served from the cache).
        kind: the export's kind (``segmenter``, ``router``), part of the cache key.
        threads: intra-op threads of the runtime (default: the network's, ``segmenters.threads.current_threads``).
        outputs: how many outputs the runner returns.
    """
    from triageseg.bundle import CONFIG, WEIGHTS
    from triageseg.devices import device_name
    from triageseg.segmenters.threads import current_threads

    if choice.backend == "torch" or device_name(device).split(":")[0] != "cpu":
        return None
    run_dir = Path(run_dir)
    if not ((run_dir / WEIGHTS).is_file() and (run_dir / CONFIG).is_file()):
        return None
    folder = _backends.cache_dir(None, run_dir, kind)
    path = folder / _backends.ONNX_FILE
    try:
        recorded = (folder / _backends.CHECKSUM_FILE).read_text(encoding="ascii").split()[0]
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or recorded != _backends.file_sha256(path):
            return None  # the eager path notes the damage and exports again
        fp32 = _backends.Choice(choice.backend, "fp32", auto=choice.auto) if kind == "router" else choice
        run = _backends.runner(fp32, path, threads or current_threads(), outputs=outputs)
    except Exception:  # noqa: BLE001 - anything wrong here is for the eager path to report or repair
        return None
    return run, meta


class _Served:
    """What a network served from its export shows the pipeline in place of a torch module.

    ``predict`` and ``router_outputs`` run it through its numpy method (no torch: a process
    that only serves exports never imports it); the module methods they would otherwise
    call on a network answer as for a model in eval mode on the CPU.
    """

    training = False

    def __init__(self, run, name: str):
        self._run = run
        self.backend_name = name

    def eval(self):
        return self

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError("a network served from its export cannot train")
        return self


class ServedNet(_Served):
    """An exported segmenter: ``numpy_forward(N x C x h x w float32) -> N x classes x h x w`` logits."""

    def __init__(self, run, name: str, in_channels: int):
        super().__init__(run, name)
        self.in_channels = int(in_channels)

    def numpy_forward(self, arr):
        return self._run(arr)


class ServedRouter(_Served):
    """An exported router: ``numpy_logits_and_features(N x 3 x S x S float32) -> (logits, features)``.

    ``feature_dim`` and ``classes`` come from ``meta.json`` (the ViT's head); the OOD check reads them.
    """

    def __init__(self, run, name: str, feature_dim: int, classes: int):
        super().__init__(run, name)
        self.feature_dim, self.classes = int(feature_dim), int(classes)

    def numpy_logits_and_features(self, arr):
        return self._run(arr)
