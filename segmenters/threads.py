"""How many threads the network and the watershed get: no more busy threads than cores.

:func:`network_threads` is the plan (the network gets the cores less one per ``--workers``
process; the batch path's decode thread gets a core from 4 cores on, else a lower
priority); :func:`configure_threads` applies it to torch (ONNX Runtime and OpenVINO are
given the same count by :mod:`triageseg.segmenters.backends`); :func:`limit_worker_threads`
runs in each watershed worker process and :func:`decode_thread_init` in the decode thread.
Nothing here imports torch at import time: worker processes import this module.

How idle OpenMP threads wait (:func:`set_thread_waiting`, before torch is imported): a short spin, then sleep.

torch's OpenMP pool (libgomp) spins by default for about 300,000 iterations before a
waiting thread sleeps. When the cores are shared with other work, those spins steal the
cores the other threads need; with ``OMP_WAIT_POLICY=PASSIVE`` nothing spins, but every
one of an EfficientNet's hundreds of small operators then pays a wake-up. Measured on a
2-core CPU (efficientnet-b3 Unet training step, batch 4 of 128², 2 threads, s/step):

======================  =====  ==========================
policy                  quiet  two such processes at once
======================  =====  ==========================
default (spin 300,000)  0.36   1.9-2.2
``PASSIVE``             0.62   0.68-0.76
``GOMP_SPINCOUNT=1000`` 0.37   0.90-0.92
======================  =====  ==========================

So the default here is a spin of 1,000 iterations: as fast as spinning on a quiet
machine, and within 1.3x of ``PASSIVE`` on a shared one. The user's own
``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` wins.
"""

from __future__ import annotations

import os
import sys


def network_threads(workers: int = 0, cores: int | None = None, decode_thread: bool = False) -> int:
    """Threads for the network: the cores this process may use, less one per watershed worker.

    ``OMP_NUM_THREADS``, when set, wins (the user or a scheduler decided). Each ``--workers``
    process gets one thread (:func:`limit_worker_threads`), the network the rest, at least 1,
    so the two never ask for more threads than cores.

    ``decode_thread``: without workers, the batch path decodes the previous image in one
    thread while the network runs (:func:`decode_thread_init`). From 4 cores on it gets a
    core of its own (a quarter or less of the network's); below, the network keeps every
    core and the decode thread runs at a lower priority, taking what the network leaves
    idle (reading, tiling, blending), because giving it one of 2 cores would halve the
    network for a watershed that costs a fraction of it.
    """
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))  # cgroup/taskset aware, unlike os.cpu_count()
        except AttributeError:  # pragma: no cover - macOS, Windows
            cores = os.cpu_count() or 1
    reserved = max(0, int(workers))
    if not reserved and decode_thread and int(cores) >= DECODE_CORE_FROM:
        reserved = 1
    return max(1, int(cores) - reserved)


# From this many cores the decode thread of the batch path gets a core of its own (network_threads).
DECODE_CORE_FROM = 4
# How much lower the decode thread's priority is (Linux: the nice value is per thread).
DECODE_NICE = 10


def decode_thread_init() -> None:
    """In the batch path's decode thread: lower this thread's priority, so it yields the cores to the network.

    Linux keeps a nice value per thread (setpriority(2) on the thread id); elsewhere nothing
    changes and :func:`network_threads` is the only guard. Raising one's own nice value
    needs no privilege.
    """
    import threading

    tid = getattr(threading, "get_native_id", lambda: None)()
    if tid is None or not hasattr(os, "setpriority") or not os.path.exists("/proc/self/task"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + DECODE_NICE))
    except OSError:  # pragma: no cover - a sandbox that forbids it: the thread runs at normal priority
        pass


def configure_threads(workers: int = 0, decode_thread: bool | None = None) -> int:
    """Give the network :func:`network_threads` intra-op threads (:func:`set_network_threads`); returns it.

    ``decode_thread`` defaults to ``workers == 0`` (the batch path then decodes in a thread).
    """
    n = network_threads(workers, decode_thread=workers == 0 if decode_thread is None else decode_thread)
    return set_network_threads(n)


# The network's thread count, set before torch was imported: the exported runtimes read it
# (current_threads), and torch takes it when a device is first resolved (devices.resolve_device).
_pending: int | None = None


def set_network_threads(n: int) -> int:
    """The network's intra-op threads: torch's, and the exported runtimes' (ONNX Runtime, OpenVINO); returns it.

    A network served from its export (:mod:`triageseg.segmenters.served`) runs without
    torch, and importing torch costs a fresh process about a second, so torch is not
    imported for this: with torch not loaded yet, the count is kept, the runtimes read it
    (:func:`current_threads`), and torch is given it the first time a device is resolved
    (:func:`take_pending`), before any eager network runs.
    """
    global _pending
    n = max(1, int(n))
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
        _pending = None
    else:
        _pending = n
    return n


def current_threads() -> int:
    """The network's intra-op threads now: the count set and not yet handed to torch, else torch's.

    Without torch loaded and nothing set: :func:`network_threads` (the cores this process may use).
    """
    if _pending is not None:
        return _pending
    if "torch" in sys.modules:
        return int(sys.modules["torch"].get_num_threads())
    return network_threads()


def take_pending(torch) -> None:
    """Hand a count set before torch was loaded to torch (called once torch is imported for a device)."""
    global _pending
    if _pending is not None:
        torch.set_num_threads(_pending)
        _pending = None


def limit_worker_threads() -> None:
    """In a watershed worker process: one thread for every thread pool already loaded."""
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn brings it
        return
    threadpool_limits(1)


def _spinning() -> bool:
    """Whether idle runtime threads (ONNX Runtime, OpenVINO) may spin: :func:`runtime_may_spin`."""
    return runtime_may_spin()


# ------------------------------------------------------------------ waiting
SPIN_COUNT = "1000"


def set_thread_waiting(environ: dict | None = None) -> None:
    """Set ``GOMP_SPINCOUNT`` to :data:`SPIN_COUNT` unless the user chose a wait policy.

    Only takes effect before the OpenMP runtime starts (before torch is imported).
    """
    env = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
        env["GOMP_SPINCOUNT"] = SPIN_COUNT


# ------------------------------------------------------------------ memory
HUGEPAGE_ENV = "NUMPY_MADVISE_HUGEPAGE"


def set_memory_advice(environ: dict | None = None) -> None:
    """NumPy's large arrays without transparent-huge-page advice, unless the user chose (``$NUMPY_MADVISE_HUGEPAGE``).

    NumPy asks the kernel for huge pages (``madvise(MADV_HUGEPAGE)``) on every array of 4 MiB
    or more. Where the kernel compacts memory synchronously for such requests (Ubuntu's
    default ``transparent_hugepage/defrag = madvise``) and free memory is fragmented, each
    fresh array can stall in compaction. The tiled path allocates many (the resized image,
    the tile rows, the probabilities): on a 2-core VM a 2048 x 2048 image took 5.0-5.7 s end
    to end with the advice and 3.8-3.9 s without (benchmarks/RESULTS.md, 2026-12-07). The
    variable is set for child processes too (watershed workers, Ray workers). Where NumPy is
    already imported (and ``environ`` is this process's), its switch is turned off as well.
    """
    env = os.environ if environ is None else environ
    if HUGEPAGE_ENV in env:
        return
    env[HUGEPAGE_ENV] = "0"
    if environ is None and "numpy" in sys.modules:
        import numpy as np

        core = getattr(np, "_core", None) or getattr(np, "core", None)
        switch = getattr(getattr(core, "multiarray", None), "_set_madvise_hugepage", None)
        if switch is not None:  # a private NumPy switch (1.20+): if it is gone, only the variable is set
            switch(False)


def runtime_may_spin(environ: dict | None = None) -> bool:
    """Whether other runtimes (ONNX Runtime, OpenVINO) may spin their idle threads.

    Not when OpenMP was asked to wait passively or to spin only briefly (the default above):
    a spinning pool on shared cores is what both settings avoid.
    """
    env = os.environ if environ is None else environ
    if env.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE":
        return False
    spin = env.get("GOMP_SPINCOUNT", "").strip()
    if spin:
        try:
            return float(spin) >= 100_000
        except ValueError:
            return True
    return True
