"""Where a block journal lives: a local (or NFS) folder, or a URI on object storage (``s3://``...).

The journal of a huge image (:mod:`~triageseg.pipeline.blockwise.journal`) and its probability
store (:mod:`~triageseg.pipeline.blockwise.probstore`) go through these few helpers, so the
same code keeps them in a folder beside the labels or under an object-store prefix every
node of a cluster reaches. A local location is a :class:`~pathlib.Path` (written with the
temp-then-rename of :mod:`triageseg.datasets.atomic`); a URI stays a ``str`` and goes
through fsspec (``s3fs`` for ``s3://``; the endpoint and keys come from the usual
environment, e.g. ``AWS_ENDPOINT_URL``). An object store has no rename, but one PUT of a
small object appears whole or not at all, so each file is written in one PUT.

Listings on object storage are read fresh (fsspec caches them; another node may have
added files since).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from triageseg.ray_cluster import is_uri

Location = Path | str  # a local folder or file (Path), or a URI (str)


def location(where: str | os.PathLike) -> Location:
    """``where`` as a :data:`Location`: a URI kept as a string (no trailing ``/``), anything else a Path."""
    text = os.fspath(where)
    return text.rstrip("/") if is_uri(text) else Path(text)


def is_remote(where: Location) -> bool:
    """Whether ``where`` is a URI (object storage), not a local path."""
    return isinstance(where, str) and is_uri(where)


def child(folder: Location, name: str) -> Location:
    """``folder/name``."""
    return f"{folder}/{name}" if is_remote(folder) else Path(folder) / name


def parent(where: Location) -> Location:
    """The folder holding ``where``."""
    return where.rsplit("/", 1)[0] if is_remote(where) else Path(where).parent


def name_of(where: Location) -> str:
    """The last component of ``where``."""
    return where.rsplit("/", 1)[1] if is_remote(where) else Path(where).name


def filesystem(uri: str):
    """``(fsspec filesystem, path inside it)`` of a URI."""
    import fsspec

    return fsspec.core.url_to_fs(uri)


def read_bytes(where: Location) -> bytes:
    """A file's bytes. Raises FileNotFoundError when it is not there."""
    if not is_remote(where):
        return Path(where).read_bytes()
    fs, path = filesystem(where)
    return fs.cat_file(path)


def write_bytes(where: Location, data: bytes) -> None:
    """Write a file whole or not at all (a rename locally, one PUT on object storage)."""
    if not is_remote(where):
        from triageseg.datasets.atomic import atomic_path

        with atomic_path(where) as tmp:
            Path(tmp).write_bytes(data)
        return
    fs, path = filesystem(where)
    fs.pipe_file(path, data)


def remove_file(where: Location) -> None:
    """Delete a file if it is there."""
    if not is_remote(where):
        Path(where).unlink(missing_ok=True)
        return
    fs, path = filesystem(where)
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)
    fs.invalidate_cache(path)


def is_dir(where: Location) -> bool:
    """Whether a folder (on object storage: a prefix with objects under it) is there."""
    if not is_remote(where):
        return Path(where).is_dir()
    fs, path = filesystem(where)
    fs.invalidate_cache(path)
    return fs.isdir(path)


def names(folder: Location) -> list[str]:
    """Names of the files directly in ``folder`` (empty when it is not there), listed now."""
    if not is_remote(folder):
        try:
            return [e.name for e in os.scandir(folder) if e.is_file()]
        except FileNotFoundError:
            return []
    fs, path = filesystem(folder)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "file"]


def infos(folder: Location) -> dict[str, dict]:
    """``{name: info}`` of the objects directly under a URI folder, listed now (fsspec's ``ls`` details)."""
    fs, path = filesystem(folder)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: e for e in entries if e.get("type") == "file"}


def make_dirs(folder: Location) -> None:
    """Create a folder (nothing to do on object storage: prefixes need no creating)."""
    if not is_remote(folder):
        Path(folder).mkdir(parents=True, exist_ok=True)


def remove_tree(folder: Location) -> None:
    """Delete a folder and everything under it, if it is there."""
    if not is_remote(folder):
        shutil.rmtree(folder, ignore_errors=True)
        return
    fs, path = filesystem(folder)
    fs.invalidate_cache(path)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)
    fs.invalidate_cache(path)


def zarr_store(folder: Location, *, read_only: bool = False):
    """A zarr store at ``folder``: the path itself locally, an fsspec store for a URI."""
    if not is_remote(folder):
        return folder
    import zarr

    return zarr.storage.FsspecStore.from_url(folder, read_only=read_only)
