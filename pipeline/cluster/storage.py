"""Where a cluster run reads and writes: local (or NFS) paths and URIs alike.

Every node of a Ray cluster reads inputs and writes outputs through these helpers.
Local paths use the temp-then-rename of :mod:`triageseg.datasets.atomic`; a URI
(``s3://``, ``gs://``, ``hdfs://``, ``abfs://``...) goes through pyarrow's filesystems,
or fsspec's for the schemes pyarrow does not know. A URI output is uploaded in one
stream from a finished local file, so an object store (one PUT, or a multipart upload
that appears only when complete) never shows half a file.

The bundle can travel the same way: :func:`bundle_payload` packs its files once on the
driver, and :func:`materialize_bundle` writes one copy per node from the object store.
"""

from __future__ import annotations

import csv
import fnmatch
import glob
import hashlib
import io
import json
import os
import posixpath
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from triageseg.datasets.atomic import atomic_path
from triageseg.datasets.errors import DataError
from triageseg.ray_cluster import is_uri


def filesystem(uri: str):
    """``(pyarrow FileSystem, path inside it)`` for a URI: pyarrow's own, else fsspec's, wrapped."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ValueError, ImportError) as err:
        raise DataError(uri, f"no filesystem for this URI ({err})") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(folder: str, name: str) -> str:
    """``folder/name`` for a local folder or a URI (URIs always use ``/``)."""
    if is_uri(folder):
        return folder.rstrip("/") + "/" + name
    return os.path.join(folder, name)


def basename(location: str) -> str:
    """The file name of a local path or URI."""
    return PurePosixPath(location.rstrip("/")).name if is_uri(location) else Path(location).name


def names_in(folder: str) -> set[str]:
    """Names of the files directly in ``folder`` (empty when it does not exist), from one listing."""
    if not is_uri(folder):
        try:
            return {e.name for e in os.scandir(folder) if e.is_file()}
        except FileNotFoundError:
            return set()
    import pyarrow.fs as pafs

    fs, path = filesystem(folder)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    return {posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File}


def list_images(folder: str, suffixes: tuple[str, ...], *, recursive: bool) -> list[tuple[str, str]]:
    """``(URI, output name)`` of the image files under a URI folder, sorted.

    Names keep the path below ``folder`` (``sub/a.png`` -> ``sub__a``), as for local folders.
    """
    import pyarrow.fs as pafs

    fs, path = filesystem(folder)
    base = path.rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=recursive, allow_not_found=True))
    found = []
    for info in infos:
        rel = info.path[len(base):].lstrip("/")
        name = posixpath.basename(rel)
        if info.type != pafs.FileType.File or name.startswith(".") or not name.lower().endswith(suffixes):
            continue
        stem = PurePosixPath(rel).with_suffix("")
        found.append((join(folder, rel), "__".join(stem.parts)))
    return sorted(found)


def expand_uri(item: str, suffixes: tuple[str, ...], *, recursive: bool) -> tuple[list[str], list[str]]:
    """A URI input (file, folder or glob of file names) -> (image URIs, output names).

    Raises:
        DataError: nothing there, or a folder without images.
    """
    import pyarrow.fs as pafs

    fs, path = filesystem(item)
    if glob.has_magic(item):
        parent, pattern = item.rstrip("/").rsplit("/", 1)
        found = [(u, n) for u, n in list_images(parent, suffixes, recursive=False)
                 if fnmatch.fnmatch(basename(u), pattern)]
        if not found:
            raise DataError(item, "the pattern matches no file")
        return [u for u, _ in found], [PurePosixPath(basename(u)).stem for u, _ in found]
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [item], [PurePosixPath(basename(item)).stem]
    if info.type == pafs.FileType.Directory:
        found = list_images(item, suffixes, recursive=recursive)
        if not found:
            raise DataError(item, f"no images ({', '.join(suffixes)}) in this folder"
                            + ("" if recursive else "; use --recursive for subfolders"))
        return [u for u, _ in found], [n for _, n in found]
    raise DataError(item, "no such file or folder")


def fetch(uri: str, folder: str | os.PathLike) -> Path:
    """Download ``uri`` into ``folder`` (same file name, so readers that go by the suffix work)."""
    fs, path = filesystem(uri)
    local = Path(folder) / basename(uri)
    try:
        with fs.open_input_stream(path) as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (OSError, FileNotFoundError) as err:
        raise DataError(uri, f"cannot read ({err})") from None
    return local


def upload(local: str | os.PathLike, uri: str) -> None:
    """Copy a finished local file to ``uri`` in one stream (the object appears when complete)."""
    fs, path = filesystem(uri)
    parent = posixpath.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    with open(local, "rb") as src, fs.open_output_stream(path) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def read_text(location: str) -> str | None:
    """Text of a small file (local path or URI), None when it does not exist."""
    if not is_uri(location):
        path = Path(location)
        return path.read_text(encoding="utf-8") if path.is_file() else None
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as src:
        return src.read().decode("utf-8")


def write_text(location: str, text: str) -> None:
    """Write a small text file atomically (rename locally, one upload for a URI)."""
    if not is_uri(location):
        with atomic_path(location) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return
    with tempfile.TemporaryDirectory(prefix="triageseg-") as tmp:
        local = Path(tmp) / basename(location)
        local.write_text(text, encoding="utf-8")
        upload(local, location)


def remove_partial_files(folder: str | os.PathLike, names) -> int:
    """Delete temporary files that a killed writer left beside ``names``' outputs; returns how many.

    :func:`triageseg.datasets.atomic.atomic_path` names them ``.<stem>.<random>.part<ext>``
    in the output folder (and in ``overlays/``); a worker killed mid-write cannot
    remove its own.
    """
    folder = Path(folder)
    removed = 0
    for sub in (folder, folder / "overlays"):
        if not sub.is_dir():
            continue
        for name in names:
            for stale in sub.glob(f".{glob.escape(name)}.*part*"):
                stale.unlink(missing_ok=True)
                removed += 1
    return removed


def check_settings_at(out: str, settings: dict, *, overwrite: bool = False) -> None:
    """``batch.check_settings`` for a local folder or a URI: refuse to resume into outputs made with other settings.

    Raises:
        OutputConflict: naming each differing setting, then and now.
    """
    from triageseg.pipeline.local.batch import OUTPUT_SETTINGS, SEGMENT_CONFIG, OutputConflict, check_settings

    if not is_uri(out):
        check_settings(out, settings, overwrite=overwrite)
        return
    text = read_text(join(out, SEGMENT_CONFIG))
    if overwrite or text is None or not any(n.endswith(".tif") for n in names_in(out)):
        return
    try:
        recorded = json.loads(text)
    except ValueError:
        recorded = {}
    diffs = [f"{key}: {recorded.get(key)!r} then, {settings[key]!r} now" for key in OUTPUT_SETTINGS
             if isinstance(recorded, dict) and recorded.get(key) != settings[key]]
    if diffs or not isinstance(recorded, dict):
        raise OutputConflict(out, "holds outputs made with other settings (" + "; ".join(diffs) + "); rerun with "
                                  "those settings to resume, pass --overwrite to redo every input with the new "
                                  "ones, or choose another output folder (--out)")


def write_failures_at(out: str, failures) -> None:
    """``batch.write_failures`` for a local folder or a URI (``failures.csv``: file, problem)."""
    from triageseg.pipeline.local.batch import FAILURES_CSV, write_failures

    if not is_uri(out):
        write_failures(out, failures)
    elif failures:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["file", "problem"])
        writer.writerows((str(p), problem) for p, problem in failures)
        write_text(join(out, FAILURES_CSV), buf.getvalue())


# ---------------------------------------------------------------------------- the bundle


def bundle_payload(bundle: str | os.PathLike) -> tuple[str, dict[str, bytes]]:
    """``(digest, {relative path: bytes})`` of every file in a bundle, to ship through the object store."""
    root = Path(bundle)
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    digest = hashlib.sha256()
    for rel, data in files.items():
        digest.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()[:16], files


def materialize_bundle(digest: str, files: dict[str, bytes], root: str | os.PathLike | None = None) -> Path:
    """A node-local copy of a shipped bundle under ``root`` (default the temp dir), written once per node.

    Actors on the same node share it: the first writes it to a temporary folder and
    renames it into place; a later one (or one that lost the race) uses what is there.
    """
    root = Path(root if root is not None else tempfile.gettempdir()) / "triageseg-bundles"
    final = root / digest
    if (final / "bundle.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{digest}.", dir=root))
    try:
        for rel, data in files.items():
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        os.chmod(staging, 0o755)
        try:
            os.rename(staging, final)
        except OSError:
            if not (final / "bundle.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
