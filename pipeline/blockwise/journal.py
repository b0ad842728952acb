"""The journal of one huge image, what it is keyed on, and who may write the image's outputs.

The block path (:mod:`triageseg.pipeline.blockwise.large`) keeps an image's finished work in a
:class:`Journal` folder, ``.<name>.blocks/`` beside its outputs, until the outputs are
complete. Three things keep a rerun from ever producing wrong or stale results:

- **The key.** A journal records what its work was computed from (input file, bundle,
  settings); one with another key is discarded, and the run says why. The input is known
  by its path, size, modification time and :func:`content_fingerprint`, a hash of a
  bounded sample of its bytes, so an image replaced by another of the same size (with
  its time stamp put back) is not mistaken for the old one.
- **One writer per output.** :func:`claim_outputs` holds an exclusive lock,
  ``.<name>.lock``, while an image is segmented into a folder; a second run reaching the
  same image there stops with an error naming the lock and its holder.
- **No stale temporaries.** A killed run leaves its half-written outputs under temporary
  names (``.<name>.XXXXXXXX.part.tif``, ``.part.geojson``, ``.<name>.levels.XXXXXXXX/``).
  Holding the lock, :func:`claim_outputs` removes the ones of this image's outputs last
  modified before the lock was taken: no live run can be writing them.

Example:
    >>> with claim_outputs(out_dir, "scan"):                                      # doctest: +SKIP
    ...     journal = Journal(out_dir / ".scan.blocks", {"input": "scan.tif", "content": content_fingerprint(p)})
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from triageseg.datasets.atomic import write_json_atomic
from triageseg.datasets.errors import DataError
from triageseg.pipeline.blockwise.blocks import BlockResult
from triageseg.pipeline.blockwise.location import (
    Location,
    child,
    is_remote,
    location,
    make_dirs,
    names,
    read_bytes,
    remove_file,
    remove_tree,
    write_bytes,
)

logger = logging.getLogger(__name__)

# 2: probabilities on disk, blocks own whole objects (1: candidates, stitched)
# 3: the input's content fingerprint in the key, checksummed probability chunks
JOURNAL_FORMAT = 3
# content_fingerprint reads the first and last HEAD_BYTES and SAMPLES ranges of SAMPLE_BYTES between them
HEAD_BYTES = 64 * 1024
SAMPLES = 256
SAMPLE_BYTES = 4096
# What tempfile.mkstemp / TemporaryDirectory put between prefix and suffix (datasets.atomic, datasets.pyramid)
_RANDOM = r"[a-z0-9_]{8}"


def content_fingerprint(path: str | os.PathLike) -> str:
    """A hash of the file's size, first and last 64 KiB and 256 evenly spaced 4 KiB ranges.

    It reads at most about 1.1 MiB whatever the file's size (a 100k x 100k slide costs the
    same as a thumbnail), yet two images of the same size differ in it unless they are
    byte for byte equal at every sampled range. A file up to that size is hashed whole.
    It is a sample, not a full hash: an edit confined to bytes between the ranges of an
    uncompressed file is not seen (the modification time in the key still is).
    """
    size = os.stat(path).st_size
    digest = hashlib.blake2b(size.to_bytes(8, "little"), digest_size=16)
    with open(path, "rb") as fh:
        if size <= 2 * HEAD_BYTES + SAMPLES * SAMPLE_BYTES:
            digest.update(fh.read())
            return digest.hexdigest()
        inner = size - 2 * HEAD_BYTES - SAMPLE_BYTES
        offsets = [0, *(HEAD_BYTES + inner * k // (SAMPLES - 1) for k in range(SAMPLES)), size - HEAD_BYTES]
        for k, offset in enumerate(offsets):
            fh.seek(offset)
            digest.update(fh.read(HEAD_BYTES if k in (0, len(offsets) - 1) else SAMPLE_BYTES))
    return digest.hexdigest()


class Journal:
    """Finished blocks of one huge image, kept beside its output until the output is complete.

    ``journal.json`` holds a key (what the blocks were computed from: input file, settings)
    and a state (routing decision, normalisation). A journal with another key is discarded,
    so a changed input or setting never mixes old and new blocks; a warning says what changed.

    ``folder`` may be a URI (``s3://bucket/prefix/.<name>.blocks``): the journal then lives
    on object storage (:mod:`~triageseg.pipeline.blockwise.location`), each file one PUT.
    """

    def __init__(self, folder: str | os.PathLike, key: dict):
        self.folder: Location = location(folder)
        self.key = json.loads(json.dumps(key))
        self.state: dict | None = None
        try:
            text = read_bytes(child(self.folder, "journal.json"))
        except FileNotFoundError:
            text = None
        except OSError:
            text = b""
        if text is not None:
            try:
                data = json.loads(text)
            except ValueError:
                data = {}
            if isinstance(data, dict) and data.get("format") == JOURNAL_FORMAT and data.get("key") == self.key:
                self.state = data.get("state")
                return
            logger.warning("%s: %s; starting this image from the beginning", self.folder,
                           _why_discarded(data, self.key))
        if is_remote(self.folder):
            remove_tree(self.folder)
        elif self.folder.exists():
            shutil.rmtree(self.folder)
        make_dirs(self.folder)
        self._write()

    def _write(self) -> None:
        data = {"format": JOURNAL_FORMAT, "key": self.key, "state": self.state}
        if is_remote(self.folder):
            write_bytes(child(self.folder, "journal.json"), (json.dumps(data, indent=2) + "\n").encode("utf-8"))
        else:
            write_json_atomic(self.folder / "journal.json", data)

    def set_state(self, state: dict) -> None:
        """Record the state (JSON-ready) that every later block of this run must agree with."""
        self.state = json.loads(json.dumps(state))
        self._write()

    def block_path(self, index: int) -> Location:
        """Where block ``index``'s result lives."""
        return block_file(self.folder, index)

    def done(self) -> set[int]:
        """Indices of the finished blocks."""
        return {int(n[len("block_"):-len(".npz")]) for n in names(self.folder)
                if re.fullmatch(r"block_\d+\.npz", n)}

    def save(self, result: BlockResult) -> None:
        """Record a finished block (atomically: a block file is complete or absent)."""
        save_block(self.folder, result)

    def load(self, index: int) -> BlockResult:
        """A finished block's result.

        Raises:
            DataError: the block's file is missing or damaged (it is removed: the block is then not done).
        """
        try:
            return BlockResult.from_bytes(read_bytes(self.block_path(index)))
        except Exception as err:  # noqa: BLE001 - a damaged journal file: say which; it is computed again
            remove_file(self.block_path(index))
            problem = f"damaged block journal entry ({type(err).__name__}: {err})"
            raise DataError(self.block_path(index), problem) from None

    def remove(self) -> None:
        """Delete the journal (after the outputs are in place)."""
        remove_tree(self.folder)

    @property
    def remote(self) -> bool:
        """Whether the journal is on object storage."""
        return is_remote(self.folder)


def block_file(folder: str | os.PathLike, index: int) -> Location:
    """Where block ``index``'s result lives in the journal ``folder`` (a task writes it without opening the journal)."""
    return child(location(folder), f"block_{index:05d}.npz")


def save_block(folder: str | os.PathLike, result: BlockResult) -> None:
    """Write a finished block into the journal ``folder``, whole or not at all (a task does it without opening it)."""
    write_bytes(block_file(folder, result.index), result.to_bytes())


def journal_location(out_dir: str | os.PathLike, name: str, scratch: str | os.PathLike | None = None):
    """Where the journal of output ``name`` in ``out_dir`` lives: ``out_dir/.<name>.blocks``, or under ``scratch``.

    Under a scratch location (a shared folder or a URI such as ``s3://bucket/prefix``) the
    journal is ``<scratch>/<out folder name>-<hash of its path>/.<name>.blocks``: runs into
    different output folders never share a journal, and a rerun into the same one finds it.
    """
    if scratch is None:
        return Path(out_dir) / f".{name}.blocks"
    out = Path(out_dir).resolve()
    tag = f"{out.name}-{hashlib.blake2b(str(out).encode(), digest_size=4).hexdigest()}"
    return child(child(location(scratch), tag), f".{name}.blocks")


def _why_discarded(data, key: dict) -> str:
    """Why a journal manifest does not serve ``key``, in words."""
    if not isinstance(data, dict) or "key" not in data:
        return "unreadable journal manifest (journal.json)"
    if data.get("format") != JOURNAL_FORMAT:
        return f"journal of another format ({data.get('format')!r}, this version writes {JOURNAL_FORMAT})"
    old = data["key"] if isinstance(data["key"], dict) else {}
    changed = sorted(k for k in {*old, *key} if old.get(k) != key.get(k))
    if "content" in changed:
        return "the input's content changed since the journal was written (content fingerprint differs)"
    return f"journal of another input or settings ({', '.join(changed)} changed)"


# --------------------------------------------------------------------------- outputs: lock and stale temporaries


def temporaries(out_dir: str | os.PathLike, name: str, suffixes: tuple[str, ...] = (".tif", ".geojson")) -> list[Path]:
    """The temporaries of outputs ``<name><suffix>`` in ``out_dir``, as this package names them.

    Files ``.<name>.XXXXXXXX.part<suffix>`` (:func:`~triageseg.datasets.atomic.atomic_path`)
    and folders ``.<name>.levels.XXXXXXXX`` (:func:`~triageseg.datasets.pyramid.write_pyramid`'s levels,
    :func:`~triageseg.datasets.omezarr.write_labels_zarr`'s zarr before its rename) and
    ``.<name>.cores.XXXXXXXX`` (the rendered cores of a journal kept on object storage),
    ``XXXXXXXX`` being 8 of tempfile's random characters; nothing else, so another image's
    (``.<name>.b.XXXXXXXX.part.tif`` is ``<name>.b``'s) or a user's files never match.
    """
    stem = re.escape(name)
    ends = "|".join(re.escape(s) for s in suffixes)
    part = re.compile(rf"\.{stem}\.{_RANDOM}\.part(?:{ends})")
    levels = re.compile(rf"\.{stem}\.(?:levels|cores)\.{_RANDOM}")
    try:
        entries = list(os.scandir(out_dir))
    except FileNotFoundError:
        return []
    return sorted(Path(e.path) for e in entries
                  if (part.fullmatch(e.name) and e.is_file(follow_symlinks=False))
                  or (levels.fullmatch(e.name) and e.is_dir(follow_symlinks=False)))


def _last_modified(path: Path) -> float:
    """A file's modification time; for a folder, the latest of its own and its entries'."""
    times = [path.lstat().st_mtime]
    if path.is_dir() and not path.is_symlink():
        times += [e.stat(follow_symlinks=False).st_mtime for e in os.scandir(path)]
    return max(times)


def remove_stale_temporaries(out_dir: str | os.PathLike, name: str, *, before: float) -> list[Path]:
    """Remove :func:`temporaries` of ``name``'s outputs last modified before ``before`` (a time stamp).

    Call it only holding ``name``'s lock (:func:`claim_outputs`): a run writing those
    outputs holds it, so what was left unmodified since is a killed run's.

    Returns:
        What was removed.
    """
    removed = []
    for path in temporaries(out_dir, name):
        try:
            if _last_modified(path) >= before:
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
    if removed:
        logger.info("%s: removed %d temporary file(s) an interrupted run left: %s", Path(out_dir), len(removed),
                    ", ".join(p.name for p in removed))
    return removed


def _lock_holder(fd: int) -> str:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        text = os.pread(fd, 200, 0).decode("utf-8").strip()
        if text:
            return text
    return "unknown process"


def _lock(path: Path) -> int:
    """An exclusive lock on ``path`` (created if need be): its descriptor.

    Raises:
        DataError: another process holds it (naming the lock and what the holder wrote in it).
    """
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise DataError(path, f"another run ({holder}) is segmenting this image into the same folder; wait for "
                                  "it to finish or write to another --out") from None
        try:  # the last holder may have removed the file between our open and lock: lock the file now there
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextlib.contextmanager
def claim_outputs(out_dir: str | os.PathLike, name: str) -> Iterator[float]:
    """Hold the lock of output ``name`` in ``out_dir`` and remove its stale temporaries.

    The lock is ``out_dir/.<name>.lock`` (an advisory ``flock``, released by the kernel
    when its holder dies, so a killed run never blocks the next one; the file is removed
    on exit). Where there is no ``flock`` (Windows), nothing is locked and only
    temporaries last modified before the call are removed.

    Yields:
        The time the lock was taken.

    Raises:
        DataError: another live run holds the lock.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f".{name}.lock"
    try:
        fd = _lock(path)
    except ImportError:  # no fcntl
        fd = None
    started = time.time()
    try:
        if fd is not None:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        remove_stale_temporaries(out_dir, name, before=started)
        yield started
    finally:
        if fd is not None:
            path.unlink(missing_ok=True)  # before the unlock: a waiting run then finds a new file and locks that
            os.close(fd)
