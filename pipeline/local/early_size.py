"""The size estimate of an in-memory image measured while the router runs, not after it.

Deciding an image is two independent measurements on 2+ cores: the router (a ViT on six
views, in a runtime whose own threads release the GIL) and the size estimate (NumPy,
SciPy and OpenCV on one core, most of it outside the GIL). Only which signal the size is
measured on depends on the route (:func:`triageseg.router.size_signals.signal_for`: the
haematoxylin for H&E and IHC, ``auto`` for the rest), so the ``auto`` estimate is taken
on the calling thread while the router runs on a worker thread, and used when the routed
segmenter measures ``auto``; otherwise it is dropped and the right one taken after the
route, as before. The decision is the same either way (the same function on the same
pixels); only the wall time changes. Measured on 2 cores (OpenVINO router, ``OMP_WAIT_POLICY=PASSIVE``,
16 images per set, medians of 3 interleaved rounds), the decision one after the other / side
by side: synthetic 512 x 512 fluorescence 66.7 / 51.9 ms, 256 x 256 brightfield 21.5 / 16.2
ms, fluorescence 20.5 / 14.9 ms; H&E 31.4 / 37.6 ms and IHC 34.7 / 40.3 ms, where the early
estimate is dropped (``benchmarks/RESULTS.md``).

It runs only where it can gain: no forced modality (the router runs anyway), no size given
(``--diameter``), no pixel size that may decide instead, size triage on for some segmenter,
and at least two threads for this process (a ``--workers`` child with one thread would
only interleave the two on its core and waste the estimate on stained images).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

_EXECUTOR: tuple[int, ThreadPoolExecutor] | None = None
_EXECUTOR_LOCK = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    """One worker thread per process (made again in a forked child, where the parent's threads do not exist)."""
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None or _EXECUTOR[0] != os.getpid():
            _EXECUTOR = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="triageseg-route"))
        return _EXECUTOR[1]


def worth_it(pipe, modality: str | None, pixel_size) -> bool:
    """Whether :func:`route_and_estimate` can save time for this image (see the module docstring)."""
    from triageseg.segmenters.threads import current_threads

    if modality is not None or pipe.diameter is not None or (pixel_size is not None and pipe.use_pixel_size):
        return False
    if current_threads() < 2:
        return False
    return any(pipe.size_config(name)[0] is not None for name in pipe.available)


def route_and_estimate(pipe, image):
    """(``() -> Prediction`` of the router, ``{"auto": SizeEstimate}`` or ``{}``), the two measured side by side.

    A failure of the early estimate is not raised here: the estimate is left out and taken
    again after the route (which reports a bad image first, as it always has).
    """
    from triageseg.router.size import estimate_image

    future = _executor().submit(lambda: pipe.route([image])[0])
    try:
        early = {"auto": estimate_image(image, method=pipe.size_method, signal="auto")}
    except Exception:  # noqa: BLE001 - measured again, in order, after the route
        early = {}
    return future.result, early
