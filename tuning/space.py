"""Search spaces for the per-modality sweeps, kept as plain data.

A space maps a :class:`~triageseg.segmenters.train.TrainConfig` field to a
distribution spec (or to a fixed value)::

    {
        "lr": {"type": "loguniform", "low": 1e-4, "high": 3e-3},
        "boundary_mode": {"type": "choice", "values": ["touching", "all"]},
        "boundary_width": {"type": "randint", "low": 1, "high": 3},   # both ends included
        "epochs": 30,                                                  # fixed
    }

Each modality starts from :data:`DEFAULT_SPACE` plus its entry in
:data:`MODALITY_SPACES` (stained modalities get wider augmentation, H&E a stronger
boundary weight because its nuclei crowd). A JSON or YAML file overrides both: its
top-level keys apply to every modality, its ``modalities:`` section to one::

    lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
    epochs: 20
    modalities:
      he:
        aug_strength: {type: uniform, low: 0.5, high: 1.0}

Spaces become Ray Tune sampling objects only in :func:`to_tune`, so this module
imports nothing heavy.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from triageseg.datasets.errors import DataError

# Hyperparameters a sweep may search (each is a TrainConfig field).
TUNABLE = (
    "lr",
    "weight_decay",
    "boundary_weight",
    "dice_weight",
    "boundary_width",
    "boundary_mode",
    "crop_size",
    "batch_size",
    "aug_strength",
    "epochs",
    "scale",
)

# Distribution types and the keys each spec needs.
SPEC_TYPES = {
    "loguniform": ("low", "high"),
    "uniform": ("low", "high"),
    "randint": ("low", "high"),
    "choice": ("values",),
}

# Section of a space file holding per-modality overrides.
MODALITIES_KEY = "modalities"

DEFAULT_SPACE: dict[str, Any] = {
    "lr": {"type": "loguniform", "low": 1e-4, "high": 3e-3},
    "weight_decay": {"type": "loguniform", "low": 1e-6, "high": 1e-3},
    "boundary_weight": {"type": "uniform", "low": 1.0, "high": 8.0},
    "dice_weight": {"type": "uniform", "low": 0.0, "high": 1.0},
    "boundary_width": {"type": "randint", "low": 1, "high": 3},
    "boundary_mode": {"type": "choice", "values": ["touching", "all"]},
    "crop_size": {"type": "choice", "values": [192, 256]},
    "batch_size": {"type": "choice", "values": [4, 8]},
    "aug_strength": {"type": "uniform", "low": 0.0, "high": 0.6},
    "epochs": {"type": "choice", "values": [20, 40]},
    # Input resize for the network (segmenters.scale): nuclei much smaller or larger than
    # the rest of the data may segment better at another size.
    "scale": {"type": "choice", "values": [0.75, 1.0, 1.5]},
}

# Per-modality departures from DEFAULT_SPACE.
MODALITY_SPACES: dict[str, dict[str, Any]] = {
    # Bright, high-contrast nuclei on black: little colour or stain variation to mimic.
    "fluorescence": {"aug_strength": {"type": "uniform", "low": 0.0, "high": 0.5}},
    # Stain and illumination vary between slides: wider colour and contrast jitter.
    "brightfield": {"aug_strength": {"type": "uniform", "low": 0.2, "high": 0.9}},
    # H&E: strongest stain variation, and crowded nuclei that need a heavier boundary class.
    "he": {
        "aug_strength": {"type": "uniform", "low": 0.3, "high": 1.0},
        "boundary_weight": {"type": "uniform", "low": 2.0, "high": 12.0},
    },
    # IHC: stain variation like H&E (DAB strength varies most between slides), crowded glands.
    "ihc": {
        "aug_strength": {"type": "uniform", "low": 0.3, "high": 1.0},
        "boundary_weight": {"type": "uniform", "low": 2.0, "high": 12.0},
    },
}


def _where(source: str | os.PathLike | None) -> str | None:
    return None if source is None else os.fspath(source)


def _fail(source: str | os.PathLike | None, problem: str) -> None:
    if source is None:
        raise ValueError(problem)
    raise DataError(source, problem)


def _number(value: Any, *, name: str, key: str, source, integer: bool = False) -> float | int:
    # PyYAML reads "1e-4" (no dot) as a string: accept numeric strings.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            _fail(source, f"{name}.{key} must be a number, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(source, f"{name}.{key} must be a finite number, got {value!r}")
    if integer:
        if float(value) != int(value):
            _fail(source, f"{name}.{key} must be an integer, got {value!r}")
        return int(value)
    return float(value)


def validate_space(space: Mapping[str, Any], *, source: str | os.PathLike | None = None) -> dict[str, Any]:
    """Check a space (no ``modalities`` section) and return a normalised copy.

    Args:
        space: param -> spec dict or fixed value.
        source: file the space came from, named in errors (:class:`DataError`);
            without it errors are plain ``ValueError``.

    Returns:
        The space with numbers coerced (``"1e-4"`` -> ``1e-4``, randint bounds -> int).

    Raises:
        ValueError: an unknown parameter (the valid ones are listed), an unknown
            distribution type, missing or inconsistent bounds.
    """
    if not isinstance(space, Mapping):
        _fail(source, f"a search space must be a mapping of parameter -> spec, got {type(space).__name__}")
    out: dict[str, Any] = {}
    for name, spec in space.items():
        if name not in TUNABLE:
            _fail(source, f"unknown hyperparameter {name!r}; valid: {', '.join(TUNABLE)}")
        if not isinstance(spec, Mapping):
            if isinstance(spec, (list, tuple)):
                _fail(source, f"{name}: a list needs a spec: {{type: choice, values: [...]}}")
            out[name] = spec  # a fixed value
            continue
        kind = spec.get("type")
        if kind not in SPEC_TYPES:
            _fail(source, f"{name}: unknown type {kind!r}; valid: {', '.join(SPEC_TYPES)}")
        needed = SPEC_TYPES[kind]
        extra = sorted(set(spec) - set(needed) - {"type"})
        missing = [k for k in needed if k not in spec]
        if missing or extra:
            what = [f"missing {', '.join(missing)}"] if missing else []
            what += [f"unexpected {', '.join(extra)}"] if extra else []
            _fail(source, f"{name} ({kind}): {'; '.join(what)} (a {kind} spec has: {', '.join(needed)})")
        if kind == "choice":
            values = spec["values"]
            if not isinstance(values, (list, tuple)) or not values:
                _fail(source, f"{name}.values must be a non-empty list, got {values!r}")
            out[name] = {"type": "choice", "values": list(values)}
            continue
        integer = kind == "randint"
        low = _number(spec["low"], name=name, key="low", source=source, integer=integer)
        high = _number(spec["high"], name=name, key="high", source=source, integer=integer)
        if integer and low > high:
            _fail(source, f"{name}: low ({low}) must be <= high ({high}) (randint includes both ends)")
        if not integer and low >= high:
            _fail(source, f"{name}: low ({low}) must be < high ({high})")
        if kind == "loguniform" and low <= 0:
            _fail(source, f"{name}: loguniform needs low > 0, got {low}")
        out[name] = {"type": kind, "low": low, "high": high}
    return out


def split_overrides(
    overrides: Mapping[str, Any], *, source: str | os.PathLike | None = None
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Split an override mapping into (all-modality space, per-modality spaces), validated."""
    if not isinstance(overrides, Mapping):
        _fail(source, f"a space file must hold a mapping, got {type(overrides).__name__}")
    common = {k: v for k, v in overrides.items() if k != MODALITIES_KEY}
    per = overrides.get(MODALITIES_KEY) or {}
    if not isinstance(per, Mapping):
        _fail(source, f"{MODALITIES_KEY!r} must map modality -> space, got {type(per).__name__}")
    return (
        validate_space(common, source=source),
        {str(m): validate_space(s, source=source) for m, s in per.items()},
    )


def load_space_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a space override file (``.json``, ``.yaml`` or ``.yml``) and validate it.

    Returns:
        The raw override mapping (top-level params plus an optional ``modalities`` section).

    Raises:
        DataError: unreadable file, bad syntax, unknown parameter or bad spec.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "search space file not found")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(path, f"not valid JSON ({err})") from None
    elif suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise DataError(path, f"not valid YAML ({err})") from None
    else:
        raise DataError(path, f"unknown space file type {suffix!r}; valid: .json, .yaml, .yml")
    data = {} if data is None else data
    split_overrides(data, source=path)
    return data


def resolve_space(
    modality: str | None,
    *,
    overrides: Mapping[str, Any] | None = None,
    fixed: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The search space for one modality: defaults, then modality, then file, then fixed values.

    Args:
        modality: modality name (unknown names get :data:`DEFAULT_SPACE` only).
        overrides: a space-file mapping (see :func:`load_space_file`).
        fixed: values pinned by the caller (e.g. ``{"epochs": 2}`` from ``--epochs``);
            they win over everything.

    Returns:
        A validated param -> spec/fixed-value dict.
    """
    space = copy.deepcopy(DEFAULT_SPACE)
    space.update(copy.deepcopy(MODALITY_SPACES.get(modality or "", {})))
    if overrides:
        common, per = split_overrides(overrides)
        space.update(common)
        space.update(per.get(modality or "", {}))
    if fixed:
        space.update(validate_space(dict(fixed)))
    return validate_space(space)


def sampled_names(space: Mapping[str, Any]) -> list[str]:
    """Parameters of ``space`` that are sampled (not fixed)."""
    return [k for k, v in space.items() if isinstance(v, Mapping)]


def max_value(space: Mapping[str, Any], name: str, default: Any = None) -> Any:
    """Largest value ``name`` can take in ``space`` (``default`` when absent)."""
    spec = space.get(name, default)
    if not isinstance(spec, Mapping):
        return spec
    if spec["type"] == "choice":
        return max(spec["values"])
    return spec["high"]


def corner_values(space: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Two assignments that between them touch every bound and every choice.

    Used to check a space against ``TrainConfig`` before any trial starts, so a bad
    value fails in a second instead of in every trial.
    """
    n = max([len(v["values"]) for v in space.values() if isinstance(v, Mapping) and v["type"] == "choice"] + [2])
    rows = []
    for i in range(n):
        row = {}
        for name, spec in space.items():
            if not isinstance(spec, Mapping):
                row[name] = spec
            elif spec["type"] == "choice":
                row[name] = spec["values"][i % len(spec["values"])]
            else:
                row[name] = spec["low"] if i % 2 == 0 else spec["high"]
        rows.append(row)
    return rows


def to_tune(space: Mapping[str, Any]) -> dict[str, Any]:
    """Turn a validated space into a Ray Tune ``param_space`` (fixed values stay constants)."""
    from ray import tune

    out: dict[str, Any] = {}
    for name, spec in space.items():
        if not isinstance(spec, Mapping):
            out[name] = spec
        elif spec["type"] == "loguniform":
            out[name] = tune.loguniform(spec["low"], spec["high"])
        elif spec["type"] == "uniform":
            out[name] = tune.uniform(spec["low"], spec["high"])
        elif spec["type"] == "randint":
            out[name] = tune.randint(spec["low"], spec["high"] + 1)  # tune's upper bound is exclusive
        else:
            out[name] = tune.choice(list(spec["values"]))
    return out
