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
run. The wrapper keeps a stand-in module where the eager network was: what the pipeline
reads from it (the input channels, the device, the router's feature width and class
count) comes from the config and from ``meta.json``, written beside the export the first
time the eager path makes or finds it. Whatever is missing or does not match (no cache,
a damaged file, no ``meta.json``, a GPU, the torch backend, an imported bioimage.io
model) returns None, and the caller builds the eager network as before; a weights file
damaged after its export hashes to another key, so it is refused by the eager load with
the file named.
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
        threads: intra-op threads of the runtime (default: torch's current count).
        outputs: how many outputs the runner returns.
    """
    import torch

    from triageseg.bundle import CONFIG, WEIGHTS
    from triageseg.segmenters.predict import resolve_device

    if choice.backend == "torch" or resolve_device(device).type != "cpu":
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
        run = _backends.runner(fp32, path, threads or torch.get_num_threads(), outputs=outputs)
    except Exception:  # noqa: BLE001 - anything wrong here is for the eager path to report or repair
        return None
    return run, meta


def segmenter_stand_in(in_channels: int):
    """What an exported segmenter's wrapper keeps in place of the eager Unet: one 1 x 1 convolution.

    ``predict`` reads the input channels from the first convolution and the device from
    the first parameter; the stand-in answers both and computes nothing.
    """
    import torch

    return torch.nn.Sequential(torch.nn.Conv2d(int(in_channels), 1, kernel_size=1, bias=False)).eval()


def router_stand_in(feature_dim: int, classes: int):
    """What an exported router's wrapper keeps in place of the eager ViT: its head, and timm's method names.

    :func:`~triageseg.router.ood.router_feature_dim` reads the head's input width; the
    methods exist so that the wrapper is recognised as a ViT's, and refuse to compute.
    """
    import torch

    class RouterStandIn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(int(feature_dim), int(classes))
            self.num_features = int(feature_dim)

        def _served(self, *_args, **_kwargs):
            raise RuntimeError("this router is served from its export; only the exported runner computes")

        forward = forward_features = forward_head = _served

    return RouterStandIn().eval()
