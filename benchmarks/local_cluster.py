"""A Ray cluster of several nodes on this machine, for benchmarks that kill one (``bench_distributed.py --mode kill``).

Each node is a ``ray start`` in its own session (so its daemons share one process group)
with its own temp dir and free ports; :meth:`LocalCluster.stop` stops every group by its
id, and :meth:`LocalCluster.kill_node` SIGKILLs a node's raylet and workers by PID, as a
lost machine would vanish.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# no token file in ~/.ray, no usage stats, a dead node declared dead within seconds
RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "OMP_WAIT_POLICY": "PASSIVE",
    "HF_HUB_OFFLINE": "1",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def processes() -> list[tuple[int, int, int]]:
    """(pid, parent pid, process group) of every process."""
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                out.append((int(proc.name), int(fields[1]), int(fields[2])))
            except (OSError, IndexError, ValueError):
                pass
    return out


class LocalCluster:
    """A head of ``head_cpus`` and one node of ``cpus`` CPUs each per entry of ``nodes``, on 127.0.0.1."""

    def __init__(self, head_cpus: int = 1, nodes: tuple[int, ...] = (1,), object_store_mb: int = 300):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.groups: list[int] = []
        self.temps: list[str] = []
        try:
            self._start("--head", "--port", str(self.port), "--num-cpus", str(head_cpus), "--include-dashboard=false",
                        "--object-store-memory", str(object_store_mb << 20))
            for cpus in nodes:
                self._start("--address", self.address, "--num-cpus", str(cpus),
                            "--object-store-memory", str(object_store_mb << 20))
        except BaseException:
            self.stop()
            raise

    def _start(self, *args: str) -> None:
        temp = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # short: socket paths
        self.temps.append(temp)
        ports = []
        for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
                     "--metrics-export-port"):
            ports += [flag, str(free_port())]  # several nodes on one machine: no fixed default ports
        proc = subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", *args, "--node-ip-address", "127.0.0.1",
             "--temp-dir", temp, "--disable-usage-stats", *ports],
            env={**os.environ, **RAY_ENV, "TMPDIR": temp}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True)
        output = proc.communicate(timeout=300)[0].decode()
        self.groups.append(proc.pid)  # the session (and process group) of the node's daemons
        if proc.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{output}")

    def raylet(self, node: int) -> int | None:
        """The PID of node ``node``'s raylet (0: the head)."""
        group = self.groups[node]
        return next((pid for pid, _, pgid in processes() if pgid == group and "raylet/raylet" in cmdline(pid)), None)

    def workers(self, node: int) -> list[int]:
        raylet = self.raylet(node)
        return [pid for pid, ppid, _ in processes() if raylet is not None and ppid == raylet]

    def kill_node(self, node: int) -> list[str]:
        """SIGKILL node ``node``'s raylet and its workers by PID; what the workers were running."""
        raylet, workers = self.raylet(node), self.workers(node)
        doing = [cmdline(pid)[:60] for pid in workers]
        for pid in [p for p in (raylet, *workers) if p is not None]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return doing

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, every process group this cluster started; its temp dirs removed."""
        for pgid in reversed(self.groups):
            for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + wait
                while time.monotonic() < deadline:
                    try:
                        os.killpg(pgid, 0)
                    except ProcessLookupError:
                        break
                    time.sleep(0.2)
        self.groups = []
        for temp in self.temps:
            shutil.rmtree(temp, ignore_errors=True)
        self.temps = []

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
