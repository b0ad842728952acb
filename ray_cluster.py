"""Joining a Ray cluster, or starting one for a run, and checking that its storage is shared.

``triageseg tune`` and the distributed ``triageseg segment`` connect the same way: with
no address a local Ray is started for the run and stopped afterwards; with ``auto`` or
``HOST:PORT`` the driver joins that cluster and only disconnects. Paths every node
writes to must be shared (a URI, or a network filesystem mounted at the same place).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

Log = Callable[[str], None]

# Filesystems whose mounts every node of a cluster can share.
SHARED_FS_TYPES = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "cephfs", "ceph",
                   "glusterfs", "fuse.glusterfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs", "9p", "virtiofs")


def _echo(message: str) -> None:
    print(message, flush=True)


def is_uri(storage: str) -> bool:
    """Whether ``storage`` is a URI (``s3://``, ``gs://``...) rather than a local path."""
    return "://" in storage and not storage.startswith("file://")


def resolve_storage(storage: str | os.PathLike | None, out: str | os.PathLike) -> str:
    """Storage as Ray wants it: an absolute local path, or the URI unchanged."""
    if storage is None:
        return str((Path(out) / "ray_results").resolve())
    storage = os.fspath(storage)
    if is_uri(storage):
        return storage
    if storage.startswith("file://"):
        storage = storage[len("file://"):]
    return str(Path(storage).expanduser().resolve())


def filesystem_type(path: str | os.PathLike) -> str | None:
    """Type of the filesystem holding ``path`` (from /proc/mounts), None where unknown."""
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    best, kind = "", None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")
        if (str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
            best, kind = mount, parts[2]
    return kind


def check_storage(storage: str, *, address: str | None, n_nodes: int, log: Log = _echo) -> None:
    """Refuse a node-local storage path on a multi-node cluster; warn on a one-node cluster.

    Trials write checkpoints from the node they run on; the driver and a resumed sweep
    read them back. Only a URI (s3://, gs://) or a network filesystem mounted at the
    same path everywhere (NFS...) is visible to every node.

    Raises:
        ValueError: ``address`` given, more than one node, and ``storage`` a local path
            that is not on a network filesystem.
    """
    if address is None or is_uri(storage):
        return
    fs = filesystem_type(storage)
    if fs is not None and (fs in SHARED_FS_TYPES or fs.startswith("nfs")):
        return
    advice = (
        "results and checkpoints need storage every node can reach: an NFS (or other network "
        "filesystem) path mounted at the same place on every node, or a URI such as "
        "--storage s3://BUCKET/triageseg-tune"
    )
    if n_nodes > 1:
        raise ValueError(
            f"--storage {storage} is a local path ({fs or 'unknown'} filesystem) but the cluster at "
            f"{address} has {n_nodes} nodes; {advice}"
        )
    log(
        f"warning: --storage {storage} is a local path; fine while the cluster at {address} has one "
        f"node, but once workers join, {advice}"
    )


@contextlib.contextmanager
def ray_connection(address: str | None, *, quiet: bool = False, log: Log = _echo) -> Iterator[dict[str, float]]:
    """Connect to Ray for the sweep; yields ``{"nodes": n, "CPU": cpus, "GPU": gpus}`` of the cluster.

    ``address=None`` starts a local Ray with every CPU of the machine and shuts it down
    afterwards; an address joins that cluster and disconnects afterwards. An existing
    connection in this process is reused and left open.
    """
    import ray

    owned = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {
            # Ray's INFO lines ("Checkpoint successfully created ...") would drown the trials' output.
            "logging_level": "WARNING",
            "logging_config": ray.LoggingConfig(log_level="WARNING"),
            "log_to_driver": not quiet,
        }
        if address is None:
            # "local": a new Ray even when `ray start` left a cluster address on this machine.
            kwargs["address"] = "local"
            kwargs["num_cpus"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            kwargs["include_dashboard"] = False
        else:
            kwargs["address"] = address
        try:
            ray.init(**kwargs)
        except ConnectionError as err:
            cause = err.__cause__
            hint = ""
            if cause is not None and "auth" in f"{type(cause).__name__} {cause}".lower():
                hint = (
                    "; the cluster requires its authentication token: set RAY_AUTH_MODE=token and "
                    "provide the token (the head's ~/.ray/auth_token copied here, or RAY_AUTH_TOKEN)"
                )
            raise ValueError(f"cannot connect to a Ray cluster at {address!r}: {err}{hint}") from None
        owned = True
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        res = ray.cluster_resources()
        log(
            f"ray: {len(nodes)} node(s), {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs"
            + (f" at {address}" if address else " (local)")
        )
        yield {"nodes": len(nodes), "CPU": float(res.get("CPU", 0)), "GPU": float(res.get("GPU", 0))}
    finally:
        if owned:
            ray.shutdown()
