"""One run at a time per output folder.

Two ``segment`` runs writing into one ``--out`` at once would each rewrite ``routing.csv``
from their own rows and lose the other's. :func:`out_dir_lock` takes an exclusive
``flock`` on ``<out>/.triageseg.lock`` for the run; a second run is refused at once with
a message naming the first one's pid (waiting silently behind a run that may last hours
would look like a hang). The kernel drops the lock when the holder exits, however it
exits, so a killed run never leaves a stale lock. Where ``fcntl`` is missing (Windows)
runs are not locked.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from triageseg.pipeline.local.records import OutputConflict

LOCK_FILE = ".triageseg.lock"


@contextlib.contextmanager
def out_dir_lock(out_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the output folder's lock while the block runs (the folder must exist).

    Raises:
        OutputConflict: another run holds it (named by its pid).
    """
    try:
        import fcntl
    except ImportError:  # no flock on this platform
        yield
        return
    path = Path(out_dir) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            raise OutputConflict(out_dir, f"another triageseg run (pid {other}) is writing into this output folder; "
                                          "wait for it to end and rerun (the outputs it made are kept), or choose "
                                          "another output folder (--out)") from None
        # the file is never removed: a process that opened it just before would lock a deleted file
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
