"""Worker processes that never outlive the run that started them.

A spawn worker of :class:`concurrent.futures.ProcessPoolExecutor` holds both ends of its
call-queue pipe, so when its parent is SIGKILLed it never reads EOF and waits for work
forever (and keeps the multiprocessing resource tracker alive with it). :func:`die_with_parent`,
run in each worker at start, ends the worker when its parent is gone: on Linux the kernel
sends it SIGKILL (``PR_SET_PDEATHSIG``), and everywhere a daemon thread checks once a
second that the parent is still its parent.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCH_INTERVAL_S = 1.0


def die_with_parent(parent_pid: int) -> None:
    """End this process when ``parent_pid`` (the process that started it) exits.

    Call it in the child, with the parent's pid taken in the parent (``os.getpid()``
    there): a parent that died before the call is then noticed too.
    """
    if sys.platform.startswith("linux"):
        _pdeathsig()
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    thread = threading.Thread(target=_watch, args=(parent_pid,), name="triageseg-parent-watch", daemon=True)
    thread.start()


def _pdeathsig() -> None:
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        # SIGKILL: the worker holds no state worth saving (its outputs are written atomically)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # no prctl (another libc): the watchdog thread still runs


def _watch(parent_pid: int) -> None:
    # the portable fallback: an orphan is re-parented (to init or a subreaper), so its ppid changes
    event = threading.Event()
    while not event.wait(WATCH_INTERVAL_S):
        if os.getppid() != parent_pid:
            os._exit(1)
