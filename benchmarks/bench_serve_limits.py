"""`triageseg serve` against bombs and failing uploads: the server's memory and the seconds to answer.

Starts ``triageseg serve`` (CPU, 127.0.0.1, ``--max-upload-mb 64``) on a bundle, sends each
case and reads the server's resident memory from ``/proc`` (Linux only): VmRSS before and
after, and VmHWM (its peak so far). Cases:

- ``bomb.png``: an 855 KB PNG of 30000 x 30000 zeros (0.84 GB decoded);
- ``bomb.tif``: a tiled 8192 x 8192 TIFF whose 1024 tile offsets all point at one tile;
- ``cut.png`` x 5: an RGB PNG of 7000 x 7000 cut at 97 % of its bytes (decoding fails);
- ``stack.tif`` x 5: a 9 x 3300 x 3300 z-stack (98 MP, under the default limit), refused after it is decoded;
- ``legit.png``: an RGB PNG of 2048 x 2048, analysed: the peak growth per pixel, which sizes
  the default ``--max-pixels`` (``serve/limits.py``, BYTES_PER_PIXEL).

``--code DIR`` runs the server from another checkout (DIR holds the ``triageseg`` package),
e.g. the code before the fix. The two bombs are only sent to such a server with
``--old-bombs``, and then under an address-space cap (``--cap-gb``): without one the PNG
bomb took the whole machine's memory.

Usage:
    python benchmarks/bench_serve_limits.py [--bundle B] [--code DIR] [--old-bombs] [--cap-gb 8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _proc_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def flat_png(width: int, height: int) -> bytes:
    packer = zlib.compressobj(9)
    row = bytes(1 + width)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def shared_tile_tiff(path: Path, side: int) -> bytes:
    import tifffile

    tifffile.imwrite(path, np.zeros((side, side), np.uint8), tile=(256, 256), compression="zlib")
    with tifffile.TiffFile(path) as tif:
        tag = tif.pages[0].tags["TileOffsets"]
        code = "Q" if tag.dtype in (16, 18) else "I"
        offsets, where, order = tag.value, tag.valueoffset, tif.byteorder
    data = bytearray(path.read_bytes())
    data[where:where + struct.calcsize(code) * len(offsets)] = struct.pack(order + code * len(offsets),
                                                                          *([offsets[0]] * len(offsets)))
    return bytes(data)


def pattern_png(width: int, height: int, keep: float = 1.0) -> bytes:
    import imagecodecs

    y, x = np.mgrid[:height, :width]
    image = np.stack([(x * 7 + y) % 251, (x + 3 * y) % 241, (x ^ y) % 239], axis=-1).astype(np.uint8)
    data = imagecodecs.png_encode(image, level=1)
    return data[: int(len(data) * keep)]


def stack_tiff(path: Path) -> bytes:
    import tifffile

    rng = np.random.default_rng(5)
    tifffile.imwrite(path, rng.integers(0, 4, (9, 3300, 3300), dtype=np.uint8), compression="zlib",
                     metadata={"axes": "ZYX"})
    return path.read_bytes()


def tiny_bundle(root: Path) -> Path:
    """Untrained router and segmenters (the architecture of a real bundle, small decoder)."""
    import torch

    from triageseg import bundle as B
    from triageseg.router.model import RouterConfig, create_router, save_router
    from triageseg.segmenters.model import SegmenterConfig, create_segmenter, save_segmenter

    torch.manual_seed(0)
    mods = ("fluorescence", "brightfield", "he")
    rcfg = RouterConfig(class_names=mods, image_size=32)
    save_router(B.router_dir(root), create_router(rcfg), rcfg)
    for name in (*mods, B.GENERALIST):
        cfg = SegmenterConfig(decoder_channels=(16, 16, 16, 16, 16), tile_size=256, overlap=32,
                              modality=None if name == B.GENERALIST else name)
        save_segmenter(B.segmenter_dir(root, name), create_segmenter(cfg), cfg, params=None)
    B.update_manifest(root, modalities=list(mods))
    return root


def start_server(bundle: Path, code: Path | None, workdir: Path, cap_gb: float | None):
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    if code is not None:
        env["PYTHONPATH"] = str(code)

    def cap():
        if cap_gb:
            limit = int(cap_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    cmd = [sys.executable, "-m", "triageseg", "serve", "--bundle", str(bundle), "--port", str(port),
           "--device", "cpu", "--max-upload-mb", "64", "--temp-dir", str(workdir / "tmp")]
    log = (workdir / f"serve_{port}.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=cap)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log.name}")
        try:
            with urllib.request.urlopen(url + "/api/info", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server not ready")


def send(url: str, name: str, data: bytes, timeout: float = 1800) -> tuple[int, str, float]:
    req = urllib.request.Request(f"{url}/api/segment?filename={name}", data=data, method="POST",
                                 headers={"Content-Type": "application/octet-stream"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, body = err.code, err.read()
    except OSError as err:  # the server died (out of memory) or reset the connection
        return 0, f"{type(err).__name__}: {err}", time.perf_counter() - start
    seconds = time.perf_counter() - start
    try:
        message = json.loads(body).get("error", "analysed")
    except ValueError:
        message = body[:100].decode(errors="replace")
    return status, message, seconds


def run_case(proc, url: str, name: str, data: bytes, repeat: int) -> dict:
    pid = proc.pid
    before = _proc_mb(pid, "VmRSS")
    answers = [send(url, name, data) for _ in range(repeat)]
    alive = proc.poll() is None
    row = {
        "case": name, "upload_kb": round(len(data) / 1024, 1), "repeat": repeat,
        "status": sorted({a[0] for a in answers}), "message": answers[-1][1][:140],
        "seconds_each": [round(a[2], 2) for a in answers],
        "rss_before_mb": round(before), "rss_after_mb": round(_proc_mb(pid, "VmRSS")) if alive else None,
        "peak_mb": round(_proc_mb(pid, "VmHWM")) if alive else None, "server_alive": alive,
    }
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None, help="bundle to serve (default: a tiny untrained one)")
    parser.add_argument("--code", type=Path, default=None, help="folder holding the triageseg package to run")
    parser.add_argument("--old-bombs", action="store_true", help="send the bombs even with --code")
    parser.add_argument("--cap-gb", type=float, default=None, help="address-space cap of the server, in GiB")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_serve_limits_"))
    bundle = args.bundle or tiny_bundle(work / "bundle")
    proc, url = start_server(bundle, args.code, work, args.cap_gb)
    rows = []
    try:
        rows.append(run_case(proc, url, "legit.png", pattern_png(2048, 2048), 1))
        if rows[-1]["peak_mb"]:
            grown = rows[-1]["peak_mb"] - rows[-1]["rss_before_mb"]
            print(f"legit.png: peak growth {grown} MB = {grown * 2**20 / 2048**2:.0f} bytes per pixel", flush=True)
        rows.append(run_case(proc, url, "cut.png", pattern_png(7000, 7000, keep=0.97), 5))
        rows.append(run_case(proc, url, "stack.tif", stack_tiff(work / "stack.tif"), 5))
        if args.code is None or args.old_bombs:
            rows.append(run_case(proc, url, "bomb.tif", shared_tile_tiff(work / "bomb.tif", 8192), 1))
            rows.append(run_case(proc, url, "bomb.png", flat_png(30000, 30000), 1))
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(120)
    (work / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"results in {work / 'results.json'}")


if __name__ == "__main__":
    main()
