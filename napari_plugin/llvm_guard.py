"""Keep triton out of a napari process whose OpenGL driver already loaded LLVM.

On Linux, Mesa's OpenGL (software rendering, and many Intel/AMD drivers) loads the system's
libLLVM when napari's canvas starts. torch imports triton when ``torch._dynamo`` loads (the
segmenters import it), and triton's own LLVM then crashes the process (a segfault on import,
whichever thread imports it). triageseg never compiles with triton, so in such a process the
plugin marks triton as absent before torch looks for it; torch then runs without it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

log = logging.getLogger("triageseg.napari_plugin")


def llvm_loaded(maps: str) -> bool:
    """Whether a ``/proc/<pid>/maps`` text shows a system libLLVM mapped into the process."""
    return any("/libLLVM" in line for line in maps.splitlines())


def keep_triton_out() -> bool:
    """Mark triton absent when this process has libLLVM loaded and triton is not imported yet.

    Returns:
        True when triton was blocked.
    """
    if "triton" in sys.modules or not sys.platform.startswith("linux"):
        return False
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    if not llvm_loaded(maps):
        return False
    sys.modules["triton"] = None  # `import triton` now raises ImportError: torch takes it as not installed
    log.info("OpenGL loaded libLLVM in this process: triton is kept out (its own LLVM would crash it)")
    return True
