"""Training checkpoints: everything an interrupted run needs to resume exactly, and the checks around it.

A checkpoint (``run_dir/checkpoint/last.pt``) keeps model, optimiser, scaler, step, the
history so far and the Python/NumPy/torch RNG states, written atomically after every
epoch and read back with ``weights_only=True`` (no code runs on load).
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from triageseg.datasets.atomic import atomic_path
from triageseg.datasets.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from triageseg.segmenters.config import TrainConfig

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "last.pt"
CHECKPOINT_FORMAT = "triageseg-train-checkpoint-1"
# Config fields that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = ("time_budget_s",)


def rng_states() -> dict[str, Any]:
    import torch

    np_state = np.random.get_state()
    states: dict[str, Any] = {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [np_state[0], [int(v) for v in np_state[1]], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    import torch

    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])



def save_checkpoint(ckpt_dir: Path, state: dict[str, Any]) -> None:
    import torch

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(ckpt_dir / CHECKPOINT_FILE) as tmp:
        torch.save(state, str(tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means the file is unusable
        raise DataError(path, f"corrupt or unreadable training checkpoint ({err})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise DataError(path, f"not a triageseg training checkpoint (expected format {CHECKPOINT_FORMAT})")
    return state


def refuse_or_discard(ckpt_path: Path, config: TrainConfig, *, overwrite: bool, log: Callable[[str], None]) -> None:
    """An interrupted run's checkpoint without ``resume``: refused, or deleted with ``overwrite`` (said so)."""
    try:
        state = load_checkpoint(ckpt_path)
        where = f" (epoch {int(state['epoch'])} of {int(state['config']['epochs'])})"
    except (DataError, KeyError, TypeError, ValueError):
        where = ""
    if not overwrite:
        raise DataError(ckpt_path, f"checkpoint of an interrupted run{where}; continue it with resume=True "
                                   "(CLI: --resume) or start afresh with overwrite=True (CLI: --overwrite), "
                                   "which deletes it")
    log(f"note: deleting the checkpoint of an interrupted run{where} in {ckpt_path.parent}; starting "
        f"{config.run_name} afresh")
    shutil.rmtree(ckpt_path.parent, ignore_errors=True)



def config_differences(saved: Mapping[str, Any], config: TrainConfig) -> list[str]:
    now = config.to_dict()
    return [
        f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}"
        for k in now
        if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]
    ]

