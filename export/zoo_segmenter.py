"""A foreign zoo model as a bundle entry: its TorchScript, run behind our specialist interface.

A run folder ``segmenters/<name>/`` of kind ``triageseg-bioimageio`` holds::

    model.torchscript.pt   the package's TorchScript weights, as imported
    config.json            kind, sha256 of that file, the package's input/output handling
    postprocess.json       watershed parameters (tuned on the bundle's data when given)

**Trust.** Bundles hold safetensors only, so loading one never executes anything. A
TorchScript file is a program (TorchScript ops, no arbitrary Python, but code all the same),
so it joins a bundle only when the user says ``trust=True`` (CLI: ``--trust``) at import,
and it is loaded only if its sha256 is still the one recorded then.

The wrapper takes what our specialists take (``B x 3 x H x W`` in [0, 1], percentile-normalised
over the whole image) and returns log-probabilities of our 3 classes, so ``predict``'s softmax
gives back the mapped probabilities exactly.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from triageseg import bundle as _bundle
from triageseg.datasets.errors import BundleError

KIND = "triageseg-bioimageio"
TORCHSCRIPT = _bundle.ZOO_TORCHSCRIPT
# Preprocessing ops of a package the wrapper reproduces in torch; others are refused at import.
PRE_OPS = ("scale_range", "clip", "zero_mean_unit_variance", "fixed_zero_mean_unit_variance", "scale_linear",
           "ensure_dtype")
POST_OPS = ("sigmoid", "softmax", "clip", "scale_linear", "ensure_dtype")
MAPPINGS = {
    "foreground_boundary": "2 channels: foreground (whole nucleus) and boundary probabilities, like the zoo's "
                           "DSB-trained UNet2D nuclei models",
    "three_class": "3 channels: background, interior, boundary probabilities (triageseg's own classes)",
}


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_zoo_run(run_dir: str | os.PathLike) -> bool:
    """Whether a run folder is an imported zoo model (its config.json says so)."""
    path = Path(run_dir) / _bundle.CONFIG
    if not path.is_file():
        return False
    try:
        return _bundle.read_json(path).get("kind") == KIND
    except BundleError:
        return False


def build_wrapper(ts_module, spec: dict[str, Any]):
    """The ``torch.nn.Module`` around a loaded TorchScript model (see the module docstring)."""
    import torch

    class ZooSegmenter(torch.nn.Module):
        def __init__(self, inner, spec):
            super().__init__()
            self.inner = inner
            self.spec = spec

        def forward(self, x):
            x = x.float()
            if int(self.spec["in_channels"]) == 1:
                x = x.mean(dim=1, keepdim=True)  # gray models: our RGB image back to one channel
            for op in self.spec["preprocessing"]:
                x = _apply(op, x)
            y = self.inner(x)
            if isinstance(y, (tuple, list)):
                y = y[0]
            for op in self.spec["postprocessing"]:
                y = _apply(op, y.float())
            p = to_three_classes(y.float(), self.spec["mapping"])
            return torch.log(p.clamp_min(1e-8))

    return ZooSegmenter(ts_module, spec)


def _dims(x, axes: list[str] | None) -> tuple[int, ...]:
    """Tensor dims of named axes in a ``B x C x H x W`` tensor (None: all but batch)."""
    index = {"batch": 0, "b": 0, "channel": 1, "c": 1, "y": 2, "x": 3}
    return tuple(index[a] for a in axes if a in index) if axes else (1, 2, 3)


def _apply(op: dict[str, Any], x):
    """One zoo processing op in torch, per sample as bioimageio.core computes it."""
    import torch

    kind, kw = op["id"], op.get("kwargs", {})
    if kind == "ensure_dtype":
        return x
    if kind == "clip":
        return x.clamp(min=kw.get("min"), max=kw.get("max"))
    if kind == "sigmoid":
        return torch.sigmoid(x)
    if kind == "softmax":
        return torch.softmax(x, dim=1)
    if kind == "scale_linear":
        gain = torch.as_tensor(kw.get("gain", 1.0), dtype=x.dtype, device=x.device)
        offset = torch.as_tensor(kw.get("offset", 0.0), dtype=x.dtype, device=x.device)
        if gain.ndim == 1:
            gain, offset = gain.view(1, -1, 1, 1), offset.view(1, -1, 1, 1) if offset.ndim == 1 else offset
        return x * gain + offset
    if kind == "fixed_zero_mean_unit_variance":
        mean = torch.as_tensor(kw["mean"], dtype=x.dtype, device=x.device)
        std = torch.as_tensor(kw["std"], dtype=x.dtype, device=x.device)
        if mean.ndim == 1:
            mean, std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
        return (x - mean) / std
    dims = _dims(x, kw.get("axes"))
    if 0 in dims:  # statistics over the batch are per sample here: one image at a time in triageseg
        dims = tuple(d for d in dims if d != 0) or (1, 2, 3)
    if kind == "zero_mean_unit_variance":
        mean = x.mean(dim=dims, keepdim=True)
        std = x.std(dim=dims, keepdim=True, unbiased=False)
        return (x - mean) / (std + kw.get("eps", 1e-6))
    if kind == "scale_range":
        flat = x.movedim(dims, tuple(range(4 - len(dims), 4))).flatten(4 - len(dims))
        lo = torch.quantile(flat, kw.get("min_percentile", 0.0) / 100.0, dim=-1, keepdim=True)
        hi = torch.quantile(flat, kw.get("max_percentile", 100.0) / 100.0, dim=-1, keepdim=True)
        shape = [1 if d in dims else x.shape[d] for d in range(4)]
        shape[0] = x.shape[0]
        lo, hi = lo.reshape(shape), hi.reshape(shape)
        return (x - lo) / (hi - lo + kw.get("eps", 1e-6))
    raise ValueError(f"unsupported processing op {kind!r}; supported: {', '.join(PRE_OPS + POST_OPS)}")


def to_three_classes(y, mapping: str):
    """Package output ``B x C x H x W`` (probabilities) -> our background / interior / boundary."""
    import torch

    y = y.clamp(0.0, 1.0)
    if mapping == "three_class":
        return y / y.sum(dim=1, keepdim=True).clamp_min(1e-8)
    if mapping == "foreground_boundary":
        fg, bnd = y[:, 0:1], y[:, 1:2]
        # The boundary lies on the nucleus rim: boundary within the foreground, interior the rest of it.
        return torch.cat([1.0 - fg, fg * (1.0 - bnd), fg * bnd], dim=1)
    raise ValueError(f"unknown output mapping {mapping!r}; supported: {', '.join(MAPPINGS)}")


def load_zoo_segmenter(run_dir: str | os.PathLike, *, device="cpu"):
    """Load an imported zoo model: ``(wrapper module, SegmenterConfig, WatershedParams)``.

    Raises:
        BundleError: missing files, or a TorchScript file whose sha256 is not the one trusted at import.
    """
    import torch

    from triageseg.postprocess.watershed import WatershedParams
    from triageseg.segmenters.model import POSTPROCESS, SegmenterConfig
    from triageseg.segmenters.predict import resolve_device

    run_dir = Path(run_dir)
    meta = _bundle.read_json(run_dir / _bundle.CONFIG)
    path = run_dir / TORCHSCRIPT
    if not path.is_file():
        raise BundleError(path, "missing TorchScript file of an imported zoo model")
    if sha256_of(path) != meta.get("trusted_sha256"):
        raise BundleError(path, "sha256 differs from the one trusted at import (the file was replaced); "
                                "import the package again with --trust if you trust the new file")
    try:
        config = SegmenterConfig.from_dict(meta.get("segmenter", {}), source=run_dir / _bundle.CONFIG)
        params = WatershedParams.from_json(run_dir / POSTPROCESS)
    except (TypeError, ValueError) as err:
        raise BundleError(run_dir, f"invalid imported model config ({err})") from None
    dev = resolve_device(device)
    inner = torch.jit.load(str(path), map_location=dev)
    return build_wrapper(inner, meta["io"]).eval().to(dev), config, params
