"""`triageseg serve` against hostile and careless clients (issue 23, items 7, 8 and 12).

Decompression bombs refused from their header, memory released after failed analyses,
the Host and Origin checks, endless chunked uploads, and queued jobs dropped on SIGTERM.
The servers run the ``constant_bundle`` (conftest) on 127.0.0.1, as in ``test_serve.py``.
"""

from __future__ import annotations

import json
import re
import select
import signal
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
from test_serve import Server, http, upload

LIMIT_MB = 2
MAX_PIXELS = 2_000_000


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def flat_png(width: int, height: int) -> bytes:
    """A valid 8-bit grey PNG of zeros, compressed row by row (a 30000 x 30000 one is ~0.9 MB)."""
    packer = zlib.compressobj(9)
    row = bytes(1 + width)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def jpeg_header_only(width: int, height: int) -> bytes:
    """Start of image, a frame header declaring ``width`` x ``height``, end of image."""
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + sof + b"\xff\xd9"


def shared_tile_tiff(path: Path, side: int) -> Path:
    """A ``side`` x ``side`` tiled zlib TIFF whose tile offsets all point at its first tile."""
    tifffile.imwrite(path, np.zeros((side, side), np.uint8), tile=(256, 256), compression="zlib")
    with tifffile.TiffFile(path) as tif:
        tag = tif.pages[0].tags["TileOffsets"]
        offsets, where, count = tag.value, tag.valueoffset, len(tag.value)
        fmt = tif.byteorder + ("Q" if tag.dtype in (16, 18) else "I")
    data = bytearray(path.read_bytes())
    data[where:where + struct.calcsize(fmt[-1]) * count] = struct.pack(
        tif.byteorder + fmt[-1] * count, *([offsets[0]] * count))
    path.write_bytes(bytes(data))
    return path


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def results(server: Server) -> list[Path]:
    return list(server.temp_parent.glob("*/results/*"))


@pytest.fixture(scope="module")
def server(constant_bundle, tmp_path_factory):
    srv = Server(constant_bundle, tmp_path_factory.mktemp("hostile"), "--max-upload-mb", str(LIMIT_MB),
                 "--max-pixels", "2M")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


# ----------------------------------------------------------------- item 7: bombs


def test_too_many_pixels_is_refused_from_the_header(server, tmp_path):
    assert json.loads(http("GET", server.url + "/api/info")[2])["max_pixels"] == MAX_PIXELS
    before = results(server)
    status, result = upload(server, "wide.png", flat_png(2000, 1001))
    assert status == 413
    assert result["error"] == (
        "wide.png: 2000 x 1001 pixels (2.0 MP) is more than this server's limit of 2.0 MP; start the "
        "server with a larger --max-pixels, or segment the image with `triageseg segment`, which reads "
        "large images block by block")
    status, result = upload(server, "huge.jpg", jpeg_header_only(60000, 50000))
    assert status == 413 and result["error"].startswith("huge.jpg: 60000 x 50000 pixels (3000.0 MP) is more")
    tifffile.imwrite(tmp_path / "planes.tif", np.zeros((5, 1000, 1000), np.uint8), compression="zlib",
                     metadata={"axes": "ZYX"})
    status, result = upload(server, "planes.tif", (tmp_path / "planes.tif").read_bytes())
    assert status == 413 and result["error"].startswith("planes.tif: 1000 x 1000 pixels in 5 planes (5.0 MP)")
    assert results(server) == before and server.uploads() == []
    status, result = upload(server, "fits.png", flat_png(1000, 1000))  # under the limit: analysed
    assert (status, result["width"], result["height"]) == (200, 1000, 1000)


def test_tiff_whose_tiles_share_one_offset_is_refused(server, tmp_path):
    path = shared_tile_tiff(tmp_path / "bomb.tif", 1024)
    status, result = upload(server, "bomb.tif", path.read_bytes())
    assert status == 422
    assert result["error"] == ("bomb.tif: refused as a decompression bomb: the TIFF reuses the same compressed "
                               "data for many tiles (page 0: 16 tiles point at 1 distinct data offsets)")


def test_header_checks_at_the_default_limit(tmp_path):
    from triageseg.serve.limits import MAX_PIXELS_CAP, default_max_pixels, upload_problem

    limit = default_max_pixels()
    assert 1_000_000 <= limit <= MAX_PIXELS_CAP == 100_000_000
    # the bombs: an 855 KB PNG of 30000 x 30000, a small TIFF of 8192 x 8192
    png = tmp_path / "bomb.png"
    png.write_bytes(flat_png(30000, 30000))
    assert png.stat().st_size < 1_000_000
    status, message = upload_problem(png, "bomb.png", 100_000_000)
    assert status == 413 and message.startswith("bomb.png: 30000 x 30000 pixels (900.0 MP) is more than")
    tif = shared_tile_tiff(tmp_path / "bomb.tif", 8192)
    assert tif.stat().st_size < 200_000
    status, message = upload_problem(tif, "bomb.tif", 100_000_000)
    assert status == 422 and "1024 tiles point at 1 distinct data offsets" in message
    # far more expansion than deflate can give: zstd of a flat 9216 x 9216 image
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, np.zeros((9216, 9216), np.uint8), tile=(1024, 1024), compression="zstd")
    status, message = upload_problem(flat, "flat.tif", 100_000_000)
    assert status == 422 and message.startswith(f"flat.tif: refused as a decompression bomb: {flat.stat().st_size}")
    # a real image at deflate's best ratio is not a bomb
    assert upload_problem(png, "bomb.png", 10**9) is None


# ----------------------------------------------------------------- item 12: host, origin, chunked


def test_foreign_host_header_is_refused(server):
    port = server.port
    status, _, body = http("GET", server.url + "/api/info", headers={"Host": f"attacker.example:{port}"})
    assert status == 400
    assert json.loads(body)["error"] == (
        f"this server answers to 127.0.0.1, ::1, localhost, not to the host 'attacker.example:{port}'; "
        "start it with --allow-host NAME to accept another name")
    status, _, _ = http("GET", server.url + "/", headers={"Host": "attacker.example"})
    assert status == 400
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "LOCALHOST."):
        assert http("GET", server.url + "/api/info", headers={"Host": host})[0] == 200


def test_allowed_host_names():
    from triageseg.serve.limits import allowed_hosts

    assert allowed_hosts("127.0.0.1") == {"127.0.0.1", "localhost", "::1"}
    assert "lab.example" in allowed_hosts("127.0.0.1", ("Lab.Example",))
    assert allowed_hosts("127.0.0.1", ("*",)) is None
    assert {"127.0.0.1", socket.gethostname().lower()} <= allowed_hosts("0.0.0.0")


def test_cross_site_uploads_are_refused(server, images_small):
    url = f"{server.url}/api/segment?filename=cells.png"
    data = images_small.read_bytes()
    before = results(server)
    evil = {"Origin": "http://attacker.example"}
    status, _, body = http("POST", url, data, headers={"Content-Type": "text/plain", **evil})
    assert status == 403
    assert json.loads(body)["error"] == ("cross-site request refused: the page at http://attacker.example "
                                         "may not send uploads to this server")
    assert http("POST", url, data, headers=evil)[0] == 403
    assert http("POST", url, data, headers={"Sec-Fetch-Site": "cross-site"})[0] == 403
    assert http("POST", url, data, headers={"Origin": "null"})[0] == 403
    # a form or a simple fetch can only send these types: refused even without an Origin
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        status, _, body = http("POST", url, data, headers={"Content-Type": kind})
        assert status == 415, kind
        assert json.loads(body)["error"].startswith("cells.png: send the image file as the request body with "
                                                    "Content-Type: application/octet-stream (got ")
    assert results(server) == before and server.uploads() == []
    # the page itself: same origin, the API's type
    status, _, body = http("POST", url, data, headers={"Origin": server.url})
    assert status == 200 and json.loads(body)["count"] == 1
    assert http("POST", url, data, headers={"Content-Type": "image/png"})[0] == 200


@pytest.fixture
def images_small(tmp_path) -> Path:
    path = tmp_path / "cells.png"
    imagecodecs.imwrite(path, (np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8))
    return path


def endless_upload(port: int) -> tuple[bytes, int]:
    """Send a chunked upload until the server answers; return its answer (read to its declared
    length) and the bytes sent. The client goes on sending while the answer waits unread."""
    request = (f"POST /api/segment?filename=endless.tif HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    piece = bytes(256 * 1024)
    chunk = b"%x\r\n" % len(piece) + piece + b"\r\n"
    sent, cap = 0, 512 * 2**20
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        sock.settimeout(2)
        while sent < cap and not select.select([sock], [], [], 0)[0]:
            try:
                sock.sendall(chunk)
            except (TimeoutError, OSError):
                break
            sent += len(piece)
        sock.settimeout(30)
        answer, length = b"", None
        while length is None or len(answer) < length:
            try:
                part = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not part:
                break
            answer += part
            if length is None and b"\r\n\r\n" in answer:
                found = re.search(rb"content-length: *(\d+)", answer.split(b"\r\n\r\n")[0], re.I)
                length = answer.index(b"\r\n\r\n") + 4 + int(found.group(1)) if found else None
    return answer, sent


def test_endless_chunked_upload_is_cut_off(server):
    # five times: a server that closed at once, with the client's bytes unread, lost its answer
    # to the connection's reset about every other time
    for _ in range(5):
        answer, sent = endless_upload(server.port)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert re.search(rb"\(more than 6\.\d MB sent; the server stopped reading\)", answer), answer
        assert sent < 64 * 2**20, f"the server read {sent / 2**20:.0f} MB of an endless upload"
    assert server.uploads() == []
    assert http("GET", server.url + "/api/info")[0] == 200


# ----------------------------------------------------------------- item 8: memory; item 12: shutdown


@pytest.fixture(scope="module")
def roomy(constant_bundle, tmp_path_factory):
    """A server with room for large uploads (64 MB, 100 MP); the shutdown test, last, stops it."""
    srv = Server(constant_bundle, tmp_path_factory.mktemp("roomy"), "--max-upload-mb", "64", "--max-pixels", "100M")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def truncated_png(width: int, height: int, keep: float) -> bytes:
    """An RGB PNG of a soft pattern (compresses well), cut after ``keep`` of its bytes."""
    y, x = np.mgrid[:height, :width]
    image = np.stack([(x * 7 + y) % 251, (x + 3 * y) % 241, (x ^ y) % 239], axis=-1).astype(np.uint8)
    data = imagecodecs.png_encode(image, level=1)
    return data[: int(len(data) * keep)]


def stack_tiff(path: Path, planes: int, side: int) -> Path:
    """A z-stack (refused after it is decoded): ``planes`` x ``side`` x ``side`` bytes of low-entropy noise."""
    rng = np.random.default_rng(5)
    tifffile.imwrite(path, rng.integers(0, 4, (planes, side, side), dtype=np.uint8), compression="zlib",
                     metadata={"axes": "ZYX"})
    return path


@pytest.mark.parametrize("kind", ["truncated_png", "decoded_stack"])
def test_failed_uploads_release_their_memory(roomy, tmp_path, kind):
    if kind == "truncated_png":  # libpng kept ~the decoded size for good on each failure
        name, data = "cut.png", truncated_png(7000, 7000, keep=0.97)
        expected = "cut.png: cannot decode PNG image: truncated PNG ("
    else:  # the traceback kept the decoded stack alive until a full garbage collection
        name, data = "stack.tif", stack_tiff(tmp_path / "stack.tif", 9, 3300).read_bytes()
        expected = "stack.tif: 3-D stack or time series is not supported"
    assert len(data) < 64 * 2**20
    assert upload(roomy, "warm.png", truncated_png(64, 64, keep=1.0))[0] == 200
    start = rss_mb(roomy.proc.pid)
    for _ in range(5):
        status, result = upload(roomy, name, data)
        assert status == 422 and result["error"].startswith(expected), result
    grown = rss_mb(roomy.proc.pid) - start
    assert grown < 200, f"the server's memory grew by {grown:.0f} MB over 5 failed uploads of {name}"


# Last in this module: it stops the roomy server.
def test_sigterm_drops_queued_jobs_with_503(roomy):
    slow = truncated_png(1400, 1400, keep=1.0)  # seconds on the CPU: the others queue behind it
    small = truncated_png(48, 40, keep=1.0)
    answers: dict[str, tuple] = {}

    def send(name: str, data: bytes) -> None:
        answers[name] = upload(roomy, name, data)

    threads = [threading.Thread(target=send, args=("slow.png", slow))]
    threads[0].start()
    deadline = time.monotonic() + 120
    while json.loads(http("GET", roomy.url + "/api/info")[2])["queue"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    for i in range(2):
        threads.append(threading.Thread(target=send, args=(f"queued{i}.png", small)))
        threads[-1].start()
    while json.loads(http("GET", roomy.url + "/api/info")[2])["queue"] < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    stopped_at = time.time()
    roomy.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(180)
    assert roomy.stop() == 128 + signal.SIGTERM  # the conventional exit status of a SIGTERM stop
    statuses = {name: status for name, (status, _) in answers.items()}
    assert set(statuses) == {"slow.png", "queued0.png", "queued1.png"}
    assert set(statuses.values()) <= {200, 503} and 503 in statuses.values(), statuses
    for status, result in answers.values():
        if status == 200:  # only a job that was already running when the signal came
            assert result["started_at"] < stopped_at
        else:
            assert result["error"].endswith(": the server is shutting down; the upload was dropped before its "
                                            "analysis started")
    assert list(roomy.temp_parent.iterdir()) == []
