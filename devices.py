"""Device selection shared by the router, the segmenters and the pipeline."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICE_SPECS = "auto, cpu, cuda, cuda:N, mps"


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` (or a torch.device) into an available torch.device.

    ``auto`` (or ``None``) picks CUDA, then MPS, then CPU.

    Raises:
        ValueError: unknown spec, or a device this machine does not have.
    """
    import torch

    from triageseg.segmenters.threads import take_pending

    take_pending(torch)  # a thread count set before torch was loaded (segmenters.threads)
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = "auto" if spec is None else str(spec).strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise ValueError("device 'mps' requested but MPS is not available on this machine")
        return torch.device("mps")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} requested but CUDA is not available on this machine")
        if spec == "cuda":
            return torch.device("cuda")
        index = spec.split(":", 1)[1]
        if not index.isdigit():
            raise ValueError(f"bad device {spec!r}; valid: {DEVICE_SPECS}")
        if int(index) >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return torch.device(spec)
    raise ValueError(f"unknown device {spec!r}; valid: {DEVICE_SPECS}")


# Device files of the accelerators torch can use here: NVIDIA's driver, AMD's ROCm, WSL2's GPU bridge.
_ACCELERATOR_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def device_name(spec: str | torch.device | None = "auto") -> str:
    """``str(resolve_device(spec))`` (``cpu``, ``cuda``, ``cuda:1``, ``mps``), without importing torch where it can.

    ``cpu``, and ``auto`` on a machine with no accelerator device file and torch not yet
    loaded, are the CPU without asking torch: a process serving exported networks
    (:mod:`triageseg.segmenters.served`) then never imports it (about a second of a fresh
    process's start). Anything else, and a bad spec, goes through :func:`resolve_device`.
    """
    if spec is None or isinstance(spec, str):
        text = "auto" if spec is None else spec.strip().lower()
        if text == "cpu" or (text == "auto" and "torch" not in sys.modules and not _may_have_accelerator()):
            return "cpu"
    return str(resolve_device(spec))


def _may_have_accelerator() -> bool:
    if sys.platform == "darwin":  # MPS: torch must say
        return True
    return any(os.path.exists(path) for path in _ACCELERATOR_FILES)
