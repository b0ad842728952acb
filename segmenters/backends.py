"""Inference backends for a specialist: eager PyTorch, ONNX Runtime, OpenVINO; fp32 or bf16.

A backend is applied to a loaded segmenter by :func:`prepare_network`, which returns a
``torch.nn.Module`` that :func:`triageseg.segmenters.predict.predict` runs like any
other: the exported networks are wrapped in a module that keeps the eager one as a
submodule (for its parameters: input channels, device) and whose ``forward`` hands the
tile batch to the other runtime. So tiling, batching, D4 test-time augmentation, the
softmax and the blending are the same code for every backend.

Backends:

* ``torch``: eager PyTorch under ``torch.inference_mode`` (``predict``), in the
  channels_last memory format on CPU as on CUDA.
* ``onnx``: ONNX Runtime (``pip install triageseg[onnx]``), CPU only. The network is
  exported once per weights into a cache (:func:`cache_dir`), never into the bundle.
* ``openvino``: OpenVINO (``pip install triageseg[openvino]``), CPU only; it reads the
  same cached ONNX file. Its precision hint is always set, f32 for fp32 and bf16 for bf16
  (OpenVINO would otherwise pick bf16 by itself on CPUs with AMX).
* ``auto``: on a CPU with native bf16 (AMX or AVX512-BF16) and precision ``auto``, OpenVINO
  in bf16 when it is installed (:data:`AUTO_BF16`); otherwise the backend of :data:`AUTO_ORDER`
  that is installed; torch on CUDA/MPS.
  ``$TRIAGESEG_AUTO_BACKEND`` (:data:`AUTO_ENV`), when set, names what ``auto`` means
  instead (the test suite pins torch with it: an export per test bundle would cost more
  than the tests' tiny images gain). Where ``auto`` picked an exported backend and the
  export or its runtime fails (a cache folder that cannot be written, an exporter error),
  it runs on torch with one note; an explicitly asked backend raises instead.

Precision ``bf16`` (autocast on CPU; OpenVINO's bf16 hint) runs only where the CPU has
native bf16 (AMX or AVX512-BF16, :func:`cpu_bf16_support`); elsewhere fp32 with a note.
It changes the answers slightly (``BF16_PROB_TOLERANCE``); its F1 cost is what
``benchmarks/bench_inference.py --accuracy`` measures. Precision ``auto`` (the default) is
bf16 for the backends of :data:`AUTO_BF16` on such a CPU and fp32 everywhere else: bf16 is
the default only where its mean F1 was measured within 0.002 of fp32 on every modality.

A backend whose library is missing (or that cannot run on the device) falls back to torch
with one note (``warnings.warn(..., BackendNote)``, once per process and reason).

Example:
    >>> model, cfg, params = load_segmenter("bundle/segmenters/he")         # doctest: +SKIP
    >>> net = prepare_network(model, "bundle/segmenters/he", backend="onnx")  # doctest: +SKIP
    >>> probs = predict(net, image, tile_size=cfg.tile_size)                  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from triageseg.datasets.atomic import atomic_path, write_text_atomic
from triageseg.segmenters.threads import (  # noqa: F401 - the thread plan, re-exported where callers import it
    DECODE_CORE_FROM,
    DECODE_NICE,
    _spinning,
    configure_threads,
    decode_thread_init,
    limit_worker_threads,
    network_threads,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

BACKENDS = ("auto", "torch", "onnx", "openvino")
PRECISIONS = ("auto", "fp32", "bf16")
# What `auto` picks on a CPU, first installed wins. Measured on a quiet 2-core CPU
# (benchmarks/RESULTS.md, "Inference backends on a quiet machine"; e2e s/img, demo bundle):
# 512²: torch 0.466, ONNX Runtime 0.340, OpenVINO 0.312; 2048²: torch 12.2, ONNX Runtime
# 5.3, OpenVINO 5.9. ONNX Runtime first: within 10% of OpenVINO at 512², ahead at 2048²,
# the same labels as torch (largest probability difference 3.4e-6), and it is in the
# `test` extra, so CI runs the path users get. OpenVINO in fp32 is only taken when asked for
# (in bf16 it comes first on CPUs that have bf16: AUTO_BF16).
AUTO_ORDER: tuple[str, ...] = ("onnx", "torch")
# The backends whose bf16 is the default (precision `auto`) on a CPU with native bf16, and the one `auto` then
# prefers when installed. Measured on the demo test split at the size decision's scale (46 images, 2026-12-07,
# benchmarks/RESULTS.md): OpenVINO bf16 within 0.0016 mean F1 of fp32 on every modality and 1.3-1.6x faster
# than ONNX Runtime fp32 end to end (512² and 2048²); torch bf16 off by +0.0040 on IHC (over the 0.002 asked) and
# slower than ONNX Runtime fp32. fp32 everywhere else.
AUTO_BF16: tuple[str, ...] = ("openvino",)
# When set (torch | onnx | openvino), what `auto` means instead of AUTO_ORDER (tests/conftest.py pins torch).
AUTO_ENV = "TRIAGESEG_AUTO_BACKEND"
# The Python modules each optional backend needs (onnx: the exporter both read from).
_MODULES = {"onnx": ("onnxruntime", "onnx"), "openvino": ("openvino", "onnx")}
# Largest difference from eager fp32 probabilities that the tests accept per backend.
FP32_PROB_TOLERANCE = 1e-4
BF16_PROB_TOLERANCE = 0.1  # bf16 keeps 8 mantissa bits: ~0.4% per op, a few % after a deep net
ONNX_OPSET = 17
ONNX_FILE = "model.onnx"
CHECKSUM_FILE = "model.onnx.sha256"
OPENVINO_CACHE = "openvino"  # OpenVINO's compiled networks, in the export's cache folder
_noted: set[str] = set()


class BackendNote(UserWarning):
    """A backend or precision could not be honoured; inference goes on with what can run."""


def note(message: str) -> None:
    """Warn once per process per message (a fallback is said once, not per image)."""
    if message not in _noted:
        _noted.add(message)
        warnings.warn(message, BackendNote, stacklevel=3)


def available(backend: str) -> bool:
    """Whether the libraries of ``backend`` are installed (torch always is)."""
    return not _missing(backend)


def _missing(backend: str) -> list[str]:
    return [m for m in _MODULES.get(backend, ()) if importlib.util.find_spec(m) is None]


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none: macOS, Windows)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_bf16_support() -> str | None:
    """The native bf16 instructions of this CPU (``"amx_bf16"``, ``"avx512_bf16"``), or None.

    Without them bf16 is emulated and slower than fp32, so bf16 is refused there.
    """
    flags = cpu_flags()
    for flag in ("amx_bf16", "avx512_bf16"):
        if flag in flags:
            return flag
    import torch

    # no /proc/cpuinfo: ask torch's dispatcher which kernels it picked
    if "AMX" in str(torch.backends.cpu.get_cpu_capability()).upper():
        return "amx_bf16"
    return None


# ------------------------------------------------------------------ choice
@dataclass(frozen=True)
class Choice:
    """The backend and precision that will run, after fallbacks."""

    backend: str  # torch | onnx | openvino
    precision: str  # fp32 | bf16
    auto: bool = False  # picked by `auto`: a failing export falls back to torch (noted) instead of raising
    # the precision came from `auto` (not asked for): a fallback to torch takes fp32, torch's measured default
    precision_auto: bool = field(default=False, compare=False)


def resolve(backend: str = "auto", precision: str = "auto", device: str | torch.device = "cpu") -> Choice:
    """What runs for a requested ``backend`` and ``precision`` on ``device``; a fallback is noted once.

    ``precision="auto"`` is bf16 for a backend of :data:`AUTO_BF16` on a CPU with native
    bf16, fp32 otherwise (never a note: nothing asked for is refused).

    Raises:
        ValueError: an unknown backend or precision (the message lists the valid ones).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    on_cpu = str(getattr(device, "type", device)).split(":")[0] == "cpu"
    auto, precision_auto = backend == "auto", precision == "auto"
    if auto:
        backend = _auto_backend(on_cpu, bf16=precision in ("auto", "bf16") and on_cpu and _native_bf16())
    elif backend != "torch" and not available(backend):
        missing = _missing(backend) or list(_MODULES[backend])
        note(f"backend {backend!r} needs the Python package {' and '.join(map(repr, missing))}, not installed "
             f"(pip install 'triageseg[{backend}]'); running on torch")
        backend = "torch"
    elif backend != "torch" and not on_cpu:
        note(f"backend {backend!r} runs on the CPU only; running on torch on {device}")
        backend = "torch"
    if precision == "auto":
        precision = "bf16" if on_cpu and backend in AUTO_BF16 and _native_bf16() else "fp32"
    elif precision == "bf16" and not on_cpu:
        note(f"precision bf16 is for the CPU; on {device} the network already runs in half precision (AMP)")
        precision = "fp32"
    elif precision == "bf16" and cpu_bf16_support() is None:
        note("precision bf16 needs a CPU with AMX or AVX512-BF16 (emulated bf16 is slower than fp32); running fp32")
        precision = "fp32"
    return Choice(backend, precision, auto=auto and backend != "torch", precision_auto=precision_auto)


def _native_bf16() -> bool:
    return cpu_bf16_support() is not None


def _auto_backend(on_cpu: bool, bf16: bool = False) -> str:
    """What ``auto`` runs: ``$TRIAGESEG_AUTO_BACKEND`` when set, else (CPU) an installed backend of AUTO_BF16
    when ``bf16`` (the CPU has native bf16 and bf16 is allowed), else the first installed of AUTO_ORDER.

    The note when the AUTO_ORDER library is missing is said once per process: it is the
    only sign a user gets that the CPU could run faster.
    """
    pinned = os.environ.get(AUTO_ENV, "").strip().lower()
    if pinned:
        if pinned not in BACKENDS or pinned == "auto":
            raise ValueError(f"${AUTO_ENV}={pinned!r} is not a backend; valid: {', '.join(BACKENDS[1:])}")
        order = (pinned, "torch")
    else:
        order = AUTO_ORDER
    if not on_cpu:
        return "torch"  # CUDA/MPS: the exported backends here are CPU runtimes
    if bf16 and not pinned:
        order = tuple(b for b in AUTO_BF16 if available(b)) + order
    for backend in order:
        if available(backend):
            return backend
        if backend != "torch":
            missing = _missing(backend) or list(_MODULES[backend])
            note(f"backend auto: {' and '.join(map(repr, missing))} not installed, running on torch "
                 f"(pip install 'triageseg[{backend}]' runs the network faster on a CPU)")
            return "torch"
    return "torch"


def prepare_network(model: torch.nn.Module, run_dir: str | os.PathLike | None, *, backend: str = "auto",
                    precision: str = "auto", device: str | torch.device = "cpu",
                    threads: int | None = None, choice: Choice | None = None) -> torch.nn.Module:
    """The module ``predict`` should run for ``model`` with the chosen backend and precision.

    Args:
        model: the eager segmenter (eval mode, on ``device``).
        run_dir: its run folder (``config.json`` + ``model.safetensors``), which keys the
            export cache; ``None`` keys it by the weights in memory.
        backend, precision: as for :func:`resolve`.
        device: where ``model`` runs.
        threads: intra-op threads of an exported backend (default: the network's, ``threads.current_threads``).
        choice: an already resolved :class:`Choice` (a :class:`~triageseg.pipeline.Pipeline`
            resolves once); it wins over ``backend`` and ``precision``.

    Returns:
        ``model`` itself (torch fp32; moved to channels_last), or a wrapping module.
    """
    import torch

    from triageseg.segmenters.threads import current_threads

    choice = choice or resolve(backend, precision, device)
    if choice.backend != "torch":
        threads = threads or current_threads()
        try:
            path = export_onnx(model, run_dir)
            run = runner(choice, path, threads)
            if run_dir is not None:  # what serving it without the eager network needs (segmenters.served)
                from triageseg.segmenters.predict import _input_channels
                from triageseg.segmenters.served import write_meta

                write_meta(path, {"in_channels": _input_channels(model)})
        except Exception as err:  # noqa: BLE001 - `auto` must never be worse than torch
            if not choice.auto:
                raise
            note(f"backend auto: {choice.backend} could not run this network ({type(err).__name__}: {err}); "
                 "running on torch")
            choice = Choice("torch", "fp32" if choice.precision_auto else choice.precision)
        else:
            return _ExportedNet(model, run, choice.backend)
    model = model.to(memory_format=torch.channels_last)  # NHWC: faster convolutions on CPU too
    return _Bf16Net(model) if choice.precision == "bf16" else model


def runner(choice: Choice, onnx_path: str | os.PathLike, threads: int, outputs: int = 1):
    """``numpy -> numpy`` runner of an exported network for ``choice`` (onnx or openvino).

    With ``outputs`` > 1 the runner returns that many arrays (a tuple), in the export's order.
    """
    if choice.backend == "onnx":
        return _ort_runner(Path(onnx_path), threads, outputs)
    return _openvino_runner(Path(onnx_path), threads, choice.precision, outputs)


def backend_of(net: torch.nn.Module) -> str:
    """``torch``, ``torch-bf16``, ``onnx`` or ``openvino``: what :func:`prepare_network` made."""
    return getattr(net, "backend_name", "torch")


# ------------------------------------------------------------------ wrappers
@functools.cache
def _wrappers():
    """The wrapper module classes, made on first use so that importing this module does not import torch
    (watershed worker processes import it for :func:`limit_worker_threads`)."""
    import torch

    class Bf16Net(torch.nn.Module):
        """The eager network under CPU bf16 autocast; logits back in fp32 for the softmax."""

        backend_name = "torch-bf16"

        def __init__(self, eager):
            super().__init__()
            self.eager = eager

        def forward(self, x):
            with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
                return self.eager(x).float()

    class ExportedNet(torch.nn.Module):
        """An exported network behind the module interface ``predict`` expects.

        The eager module stays a submodule: ``predict`` reads the input channels and the
        device from its parameters. Only the exported runner computes.
        """

        def __init__(self, eager, runner, name: str):
            super().__init__()
            self.eager = eager
            self._runner = runner
            self.backend_name = name

        def numpy_forward(self, arr):
            """What ``predict`` runs: a float32 numpy batch to numpy logits (as a served network runs)."""
            return self._runner(arr)

        def forward(self, x):
            arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
            return torch.from_numpy(self._runner(arr))

    return Bf16Net, ExportedNet


# A new module starts in training mode: the wrappers take the eager network's mode, so that predict() finds
# a loaded model in eval mode and does not walk its modules to switch on every image.
def _Bf16Net(eager):  # noqa: N802 - reads as the class it makes
    return _wrappers()[0](eager).train(eager.training)


def _ExportedNet(eager, runner, name: str):  # noqa: N802
    return _wrappers()[1](eager, runner, name).train(eager.training)


def _ort_runner(path: Path, threads: int, outputs: int = 1):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1  # one graph at a time: all threads go to its operators
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if _spinning() else "0")
    session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: np.ndarray):
        out = session.run(None, {name: x})
        return out[0] if outputs == 1 else tuple(out[:outputs])

    return run


def _openvino_runner(path: Path, threads: int, precision: str, outputs: int = 1):
    import openvino as ov

    core = ov.Core()
    # OpenVINO keeps the compiled network beside the ONNX file (OPENVINO_CACHE): a later load reads it instead of
    # parsing and compiling again (0.13 s against 0.69 s per segmenter on 2 cores); a damaged blob is compiled
    # again by OpenVINO itself (tests/test_backends.py). Keyed by OpenVINO on the model, device and settings.
    config = {"INFERENCE_NUM_THREADS": int(threads), "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
              "CACHE_DIR": str(Path(path).parent / OPENVINO_CACHE)}
    compiled = core.compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()

    def run(x: np.ndarray):
        res = request.infer({0: x})
        out = tuple(np.array(res[compiled.output(i)], dtype=np.float32, copy=True) for i in range(outputs))
        return out[0] if outputs == 1 else out

    return run


# ------------------------------------------------------------------ export cache
def cache_root() -> Path:
    """``$TRIAGESEG_CACHE``, else ``$XDG_CACHE_HOME/triageseg``, else ``~/.cache/triageseg``."""
    if os.environ.get("TRIAGESEG_CACHE"):
        return Path(os.environ["TRIAGESEG_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "triageseg"


def cache_key(model: torch.nn.Module, run_dir: str | os.PathLike | None, kind: str = "segmenter") -> str:
    """Hash of the weights, the config, what is exported (``kind``) and the versions an export depends on.

    16 hex digits. ``kind`` keeps apart two exports of one network with other outputs
    (the router's export gives its logits and its pooled features).
    """
    from triageseg._version import __version__
    from triageseg.bundle import CONFIG, WEIGHTS

    h = hashlib.sha256()
    h.update(json.dumps({"torch": _torch_version(), "triageseg": __version__, "opset": ONNX_OPSET,
                         "kind": kind}).encode())
    files = [Path(run_dir) / WEIGHTS, Path(run_dir) / CONFIG] if run_dir is not None else []
    if files and all(f.is_file() for f in files):
        for f in files:
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    else:  # weights in memory only
        for k, v in model.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@functools.cache
def _torch_version() -> str:
    """The installed torch's version, from its package metadata: a served export is found without importing torch."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:  # pragma: no cover - a torch not installed as a distribution
        import torch

        return torch.__version__


def cache_dir(model: torch.nn.Module, run_dir: str | os.PathLike | None, kind: str = "segmenter") -> Path:
    """The export cache folder of this network: :func:`cache_root` / :func:`cache_key`."""
    return cache_root() / cache_key(model, run_dir, kind)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_onnx(model: torch.nn.Module, run_dir: str | os.PathLike | None, *, kind: str = "segmenter",
                export=None) -> Path:
    """The cached ONNX file of ``model``, exported (atomically) when absent or damaged.

    The file's SHA-256 is kept beside it; a file that does not match (truncated, edited,
    a half-written copy) is noted and exported again.

    Args:
        model, run_dir: the network and its run folder (the cache key, :func:`cache_key`).
        kind: what is exported, part of the key (``segmenter``; ``router``).
        export: ``export(model, path)`` writes the ONNX file (default: a segmenter's,
            dynamic batch and sides); it is called inside :func:`atomic_path`'s temp name.
    """
    folder = cache_dir(model, run_dir, kind)
    path, checksum = folder / ONNX_FILE, folder / CHECKSUM_FILE
    if path.is_file() and checksum.is_file():
        try:
            recorded = checksum.read_text(encoding="ascii").split()[0]
        except (OSError, IndexError, UnicodeDecodeError):
            recorded = ""
        if recorded == file_sha256(path):
            return path
        note(f"{path}: the cached export does not match its checksum (damaged); exporting it again")
    folder.mkdir(parents=True, exist_ok=True)
    _check_onnx()
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's constant-folding chatter
        (export or _export)(model, tmp)
    write_text_atomic(checksum, f"{file_sha256(path)}  {ONNX_FILE}\n")
    return path


def _check_onnx() -> None:
    try:
        import onnx  # noqa: F401 - the exporter needs it; say so plainly rather than deep in torch
    except ImportError:
        raise RuntimeError("exporting to ONNX needs the Python package 'onnx' (pip install 'triageseg[onnx]')") \
            from None


def _export(model: torch.nn.Module, path: Path) -> None:
    """A segmenter, torch -> ONNX (TorchScript exporter, dynamic batch and sides)."""
    import torch

    param = next(model.parameters())
    channels = next(m.in_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    example = torch.zeros(1, channels, 64, 64, device=param.device)
    torch.onnx.export(model.eval(), (example,), str(path), dynamo=False, opset_version=ONNX_OPSET,
                      input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                                    "logits": {0: "batch", 2: "height", 3: "width"}})
