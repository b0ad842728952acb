"""Joining a Ray cluster, or starting one for a run, and checking that its storage is shared.

``triageseg tune`` and the distributed ``triageseg segment`` connect the same way: with
no address a local Ray is started for the run and stopped afterwards; with ``auto`` or
``HOST:PORT`` the driver joins that cluster and only disconnects. Paths every node
writes to must be shared (a URI, or a network filesystem mounted at the same place).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

Log = Callable[[str], None]

# How long joining a cluster may take before the command gives up with a message.
DEFAULT_CONNECT_TIMEOUT_S = 30.0

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


def is_shared(path: str | os.PathLike, *, n_hosts: int) -> bool:
    """Whether every node of a cluster spread over ``n_hosts`` machines sees ``path``.

    True for a URI, for a network filesystem (NFS, Lustre...), and for any path while
    every node runs on this machine (the driver always runs beside one of them).
    """
    path = os.fspath(path)
    return n_hosts <= 1 or is_uri(path) or _on_network_fs(path)


def _on_network_fs(path: str | os.PathLike) -> bool:
    fs = filesystem_type(path)
    return fs is not None and (fs in SHARED_FS_TYPES or fs.startswith("nfs"))


def check_storage(
    storage: str,
    *,
    address: str | None,
    n_nodes: int,
    log: Log = _echo,
    option: str = "--storage",
    what: str = "results and checkpoints",
    example: str = "s3://BUCKET/triageseg-tune",
    n_hosts: int | None = None,
) -> None:
    """Refuse a node-local storage path on a multi-node cluster; warn on a one-node cluster.

    Trials (or segmentation tasks) write from the node they run on; the driver and a
    resumed run read back. Only a URI (s3://, gs://) or a network filesystem mounted at
    the same path everywhere (NFS...) is visible to every node.

    Args:
        storage: the path or URI given.
        address: the cluster joined (None: a local Ray, nothing to check).
        n_nodes: alive nodes of the cluster.
        log: where the one-node warning goes.
        option: the command-line option that set ``storage``, named in the messages.
        what: what is written there ("results and checkpoints", "label files"...).
        example: a URI for ``option`` shown as the alternative.
        n_hosts: machines the nodes run on (default ``n_nodes``); nodes that all run on
            this machine share its filesystem.

    Raises:
        ValueError: ``address`` given, nodes on more than one machine, and ``storage`` a
            local path that is not on a network filesystem.
    """
    if address is None or is_uri(storage):
        return
    hosts = n_nodes if n_hosts is None else n_hosts
    if _on_network_fs(storage):
        return
    fs = filesystem_type(storage)
    advice = (
        f"{what} need storage every node can reach: an NFS (or other network "
        "filesystem) path mounted at the same place on every node, or a URI such as "
        f"{option} {example}"
    )
    if hosts > 1:
        raise ValueError(
            f"{option} {storage} is a local path ({fs or 'unknown'} filesystem) but the cluster at "
            f"{address} has {n_nodes} nodes; {advice}"
        )
    where = "has one node" if n_nodes <= 1 else f"runs its {n_nodes} nodes on this machine"
    log(
        f"warning: {option} {storage} is a local path; fine while the cluster at {address} {where}, "
        f"but once workers join, {advice}"
    )


def _bootstrap_address(address: str) -> str | None:
    """HOST:PORT of the head for ``address``: as given, or resolved as ray.init does ('auto', RAY_ADDRESS)."""
    if address != "auto" and not os.environ.get("RAY_ADDRESS"):
        return address
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(address)
    except Exception:  # noqa: BLE001 - Ray's own ray.init gives the precise message then
        return None


# An HTTP/2 client preface and an empty SETTINGS frame: a gRPC server (the Ray head's GCS)
# answers with its own SETTINGS frame before any RPC, authentication or not.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_HTTP2_SETTINGS = 0x04


def wait_for_cluster(address: str, *, timeout: float) -> None:
    """Wait until the Ray head at ``address`` answers, at most ``timeout`` seconds.

    ``ray.init`` retries an unreachable head for many minutes without a word, and waits
    forever on a port that accepts connections but never answers. This probe (a TCP
    connect, retried, then the HTTP/2 greeting every gRPC server returns) turns both
    into one message.

    Raises:
        ValueError: nothing answered as a gRPC server in time; the message names the address.
    """
    target = _bootstrap_address(address)
    if target is None:
        return
    host, _, port_text = target.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        return
    at = "" if target == address else f" (contacted as {target})"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), port), timeout=_left(deadline, 2.0)) as sock:
                if os.environ.get("RAY_USE_TLS", "0") not in ("0", "") or _answers_http2(sock, deadline):
                    return
                raise ValueError(
                    f"cannot connect to a Ray cluster at {address}{at}: the port accepted the connection "
                    f"but did not answer as a Ray head within {timeout:g} s; check the address and port "
                    "(the head's GCS port, 6379 unless `ray start --port` said otherwise)"
                )
        except OSError as err:
            last = err
        left = deadline - time.monotonic()
        if left <= 0:
            reason = last.strerror or type(last).__name__
            raise ValueError(
                f"cannot connect to a Ray cluster at {address}{at}: nothing answered within {timeout:g} s "
                f"({reason}); check that `ray start --head` runs there and the port is open, "
                "or raise --connect-timeout"
            )
        time.sleep(min(0.25, left))


def _left(deadline: float, most: float) -> float:
    return max(0.05, min(most, deadline - time.monotonic()))


def _answers_http2(sock: socket.socket, deadline: float) -> bool:
    """Whether the server on ``sock`` sends an HTTP/2 SETTINGS frame before ``deadline``."""
    try:
        sock.sendall(_HTTP2_PREFACE)
        header = b""
        while len(header) < 9:
            sock.settimeout(_left(deadline, deadline - time.monotonic()))
            chunk = sock.recv(9 - len(header))
            if not chunk:
                return False
            header += chunk
    except OSError:
        return False
    return header[3] == _HTTP2_SETTINGS


def cluster_info() -> dict[str, float]:
    """``{"nodes", "hosts", "CPU", "GPU", "node_CPU"}`` of the connected Ray: alive nodes, the machines they
    run on, the cluster's CPUs and GPUs, and the CPUs of its smallest node that has any (0: none)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    res = ray.cluster_resources()
    hosts = {n.get("NodeManagerAddress") for n in nodes}
    node_cpus = [float((n.get("Resources") or {}).get("CPU", 0)) for n in nodes]
    return {"nodes": len(nodes), "hosts": len(hosts), "CPU": float(res.get("CPU", 0)),
            "GPU": float(res.get("GPU", 0)), "node_CPU": min((c for c in node_cpus if c > 0), default=0.0)}


@contextlib.contextmanager
def ray_connection(
    address: str | None,
    *,
    quiet: bool = False,
    log: Log = _echo,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
) -> Iterator[dict[str, float]]:
    """Connect to Ray for the run; yields :func:`cluster_info` (nodes, hosts, CPUs, GPUs).

    ``address=None`` starts a local Ray with every CPU of the machine and shuts it down
    afterwards; an address joins that cluster and disconnects afterwards. An existing
    connection in this process is reused and left open.

    Raises:
        ValueError: the cluster did not answer within ``connect_timeout`` seconds, or
            refused the connection (the message names the address).
    """
    import ray

    if connect_timeout <= 0:
        raise ValueError(f"--connect-timeout must be > 0 seconds, got {connect_timeout:g}")
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
            wait_for_cluster(address, timeout=connect_timeout)
        try:
            with _bounded_gcs_retries(connect_timeout if address is not None else None):
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
        except RuntimeError as err:
            # What ray.init raises when the port answers but no Ray head is behind it.
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"cannot connect to a Ray cluster at {address!r}: {first}") from None
        owned = True
    try:
        info = cluster_info()
        log(
            f"ray: {info['nodes']} node(s), {info['CPU']:g} CPUs, {info['GPU']:g} GPUs"
            + (f" at {address}" if address else " (local)")
        )
        yield info
    finally:
        if owned:
            ray.shutdown()


@contextlib.contextmanager
def _bounded_gcs_retries(timeout: float | None) -> Iterator[None]:
    # ray.init retries the head about once a second, 20 times by default; cap the count
    # at the timeout unless the user set Ray's own knob.
    key = "RAY_gcs_server_port_wait_time_s"
    if timeout is None or key in os.environ:
        yield
        return
    os.environ[key] = str(max(1, int(timeout)))
    try:
        yield
    finally:
        os.environ.pop(key, None)
