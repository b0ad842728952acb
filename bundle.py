"""The model bundle on disk: ``bundle.json`` plus one run folder per model.

```
bundle/
  bundle.json                               format version, modalities, fallback, ood, provenance
  router/{config.json, model.safetensors, ood.json, ood.safetensors}
  segmenters/<modality>/{config.json, model.safetensors, postprocess.json, history.csv}
  segmenters/_generalist/...
```

Weights are safetensors only, so loading a bundle never unpickles or executes
anything. This module holds the format-level helpers shared by ``router/`` and
``segmenters/``; each of those saves and loads its own run folder with them.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from pathlib import Path
from typing import Any

from triageseg._version import __version__
from triageseg.datasets.atomic import atomic_path, write_json_atomic
from triageseg.datasets.errors import BundleError

BUNDLE_FORMAT = 1
MANIFEST = "bundle.json"
GENERALIST = "_generalist"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
ZOO_TORCHSCRIPT = "model.torchscript.pt"  # imported bioimage.io model, trusted at import (export.zoo_segmenter)


def segmenter_dir(bundle: str | os.PathLike, modality: str) -> Path:
    """Run folder of the specialist for ``modality`` (``_generalist`` for the generalist)."""
    return Path(bundle) / "segmenters" / modality


def router_dir(bundle: str | os.PathLike) -> Path:
    """Run folder of the router."""
    return Path(bundle) / "router"


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON object, raising :class:`BundleError` naming the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(path, "missing file")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(path, f"not valid JSON ({err})") from None
    if not isinstance(obj, dict):
        raise BundleError(path, "expected a JSON object")
    return obj


def save_weights(path: str | os.PathLike, state_dict: dict, metadata: dict[str, str] | None = None) -> None:
    """Save a torch state dict as safetensors, atomically.

    Tensors are made contiguous and cloned so shared storage (tied weights) is allowed.
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().clone().cpu() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_weights(path: str | os.PathLike) -> dict:
    """Load a safetensors file into a dict of CPU tensors, naming the file on failure."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise BundleError(path, "missing weights file")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise BundleError(path, f"corrupt or truncated safetensors file ({err})") from None


def load_into(model, path: str | os.PathLike) -> None:
    """Load safetensors weights into ``model`` strictly, explaining a mismatch."""
    state = load_weights(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shape_bad = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shape_bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensors (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        if shape_bad:
            parts.append(f"{len(shape_bad)} shape mismatches (e.g. {shape_bad[0]})")
        raise BundleError(path, "weights do not match the config beside them: " + "; ".join(parts))
    # NaN weights give NaN probabilities, and NaN < threshold is False: a NaN router would
    # send every image to one specialist past the low-confidence fallback
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise BundleError(path, f"{len(bad)} of {len(state)} tensors hold NaN or infinite values (e.g. {bad[0]}): "
                                "the training diverged or the file is damaged; retrain this model")
    model.load_state_dict(state, strict=True)


def provenance(**extra: Any) -> dict[str, Any]:
    """Who made this and when: package version, UTC date, plus ``extra`` (data path, id hash, seed)."""
    return {
        "triageseg_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def read_manifest(bundle: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``bundle.json``; refuse an unknown format version."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(bundle, "bundle folder does not exist")
    manifest = read_json(bundle / MANIFEST)
    fmt = manifest.get("format_version")
    if fmt != BUNDLE_FORMAT:
        raise BundleError(
            bundle / MANIFEST, f"unknown bundle format version {fmt!r} (this triageseg reads {BUNDLE_FORMAT})"
        )
    _check_manifest(bundle / MANIFEST, manifest)
    return manifest


def is_run_name(name: object) -> bool:
    """Whether ``name`` is a plain folder name (a run folder inside the bundle, never a path out of it)."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and not os.path.isabs(name))


def _check_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Refuse values a loader would misread: they come from a file anyone may have edited."""
    segmenters = manifest.get("segmenters", [])
    if not isinstance(segmenters, list):
        raise BundleError(path, f"segmenters must be a list of folder names, got {segmenters!r}")
    for name in segmenters:
        if not is_run_name(name):
            raise BundleError(path, f"segmenters entry {name!r} is not a folder name inside segmenters/ "
                                    "(no path separators, '.', '..' or absolute paths)")
    fallback = manifest.get("fallback", {})
    if not isinstance(fallback, dict):
        raise BundleError(path, f"fallback must be an object, got {fallback!r}")
    threshold = fallback.get("confidence_threshold", 0.6)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise BundleError(path, f"fallback.confidence_threshold must be a number in [0, 1], got {threshold!r}")
    ood = manifest.get("ood")
    if ood is not None:
        if not isinstance(ood, dict):
            raise BundleError(path, f"ood must be an object (method, threshold) or null, got {ood!r}")
        value = ood.get("threshold")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise BundleError(path, f"ood.threshold must be a finite number, got {value!r}")


def update_manifest(bundle: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    """Create or update ``bundle.json`` with ``fields``; keeps the list of segmenters current.

    ``segmenters`` is rebuilt from the run folders that hold weights, so the manifest
    never lists a model that is not there.
    """
    bundle = Path(bundle)
    bundle.mkdir(parents=True, exist_ok=True)
    path = bundle / MANIFEST
    manifest: dict[str, Any] = read_json(path) if path.is_file() else {}
    if manifest and manifest.get("format_version") != BUNDLE_FORMAT:
        raise BundleError(path, f"unknown bundle format version {manifest.get('format_version')!r}")
    manifest.setdefault("format_version", BUNDLE_FORMAT)
    manifest.setdefault("fallback", {"confidence_threshold": 0.6, "policy": "generalist_else_top1"})
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(manifest.get(key), dict):
            manifest[key] = {**manifest[key], **value}
        else:
            manifest[key] = value
    seg_root = bundle / "segmenters"
    # A run folder counts when it holds weights: safetensors, or an imported zoo model's trusted TorchScript.
    found = sorted(p.name for p in seg_root.iterdir() if (p / WEIGHTS).is_file() or (p / ZOO_TORCHSCRIPT).is_file()
                   ) if seg_root.is_dir() else []
    manifest["segmenters"] = found
    manifest["modalities"] = sorted(set(manifest.get("modalities", [])) | {m for m in found if m != GENERALIST})
    manifest["has_router"] = (router_dir(bundle) / WEIGHTS).is_file()
    manifest["has_generalist"] = GENERALIST in found
    write_json_atomic(path, manifest)
    return manifest
