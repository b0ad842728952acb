"""What ``serve`` refuses before any work is done: too many pixels, decompression bombs, foreign hosts.

- :func:`default_max_pixels`: the pixel limit that fits this machine's memory.
- :func:`upload_problem`: reads an uploaded file's header (never its pixels) and says why it
  must not be decoded: more pixels than ``--max-pixels``, or a file that expands far more
  than any real compression does (a decompression bomb).
- :class:`RequestGuard`: ASGI middleware refusing requests that name another host (DNS
  rebinding) and uploads sent by another site's page (cross-site requests).
"""

from __future__ import annotations

import json
import os
import socket
from urllib.parse import urlsplit

from triageseg.datasets.errors import DataError
from triageseg.datasets.headers import read_header

MAX_PIXELS_CAP = 100_000_000  # the default never exceeds 100 MP, however much memory there is
# Peak resident memory of one analysis per pixel of the image (float32 image, probabilities,
# distance map, labels, outputs): 85 measured for 8-bit RGB by benchmarks/bench_serve_limits.py;
# 120 leaves room for 16-bit input. The default limit keeps one analysis within half the memory.
BYTES_PER_PIXEL = 120
# No real compression expands this much: deflate stops at 1032:1, LZW near 2700:1 only for
# flat images. Applied above BOMB_MIN_BYTES decoded, where a flat image is not worth analysing.
MAX_EXPANSION = 1100
BOMB_MIN_BYTES = 64 * 2**20
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def default_max_pixels() -> int:
    """``--max-pixels`` when not given: 100 MP, or fewer where memory would not hold one analysis."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no way to ask, keep the cap
        return MAX_PIXELS_CAP
    return max(1_000_000, min(MAX_PIXELS_CAP, memory // 2 // BYTES_PER_PIXEL // 1_000_000 * 1_000_000))


def _mp(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} MP"


def upload_problem(path, name: str, max_pixels: int) -> tuple[int, str] | None:
    """``(HTTP status, message)`` when the uploaded file at ``path`` must not be decoded, else None.

    Args:
        path: the uploaded file.
        name: the name the user knows it by, used in the messages.
        max_pixels: the server's ``--max-pixels``.
    """
    try:
        header, notes = read_header(path)
    except DataError as err:
        return 422, f"{name}: {err.problem}"
    if header.pixels > max_pixels:
        planes = f" in {header.planes} planes" if header.planes > 1 else ""
        return 413, (f"{name}: {header.width} x {header.height} pixels{planes} ({_mp(header.pixels)}) is more "
                     f"than this server's limit of {_mp(max_pixels)}; start the server with a larger "
                     "--max-pixels, or segment the image with `triageseg segment`, which reads large "
                     "images block by block")
    if notes:
        return 422, (f"{name}: refused as a decompression bomb: the TIFF reuses the same compressed "
                     f"data for many tiles ({notes[0]})")
    size = os.path.getsize(path)
    if header.decoded_bytes > BOMB_MIN_BYTES and header.decoded_bytes > MAX_EXPANSION * size:
        return 422, (f"{name}: refused as a decompression bomb: {size} bytes would decode to "
                     f"{header.decoded_bytes / 2**20:.0f} MB, more than {MAX_EXPANSION} times its size")
    return None


def _hostname(host: str) -> str:
    """The name part of a Host header: no port, no IPv6 brackets, lower case, no trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def allowed_hosts(bound: str, extra: tuple[str, ...] = ()) -> frozenset[str] | None:
    """Host names requests may use: the bound address, localhost, ``extra``; None when ``extra`` has ``*``.

    A server bound to every interface (0.0.0.0, ::) also answers to this machine's name and addresses.
    """
    if "*" in extra:
        return None
    names = {*LOCAL_NAMES, _hostname(bound), *(_hostname(h) for h in extra)}
    if bound in ("0.0.0.0", "::", ""):
        names |= _own_names()
    return frozenset(names)


def _own_names() -> set[str]:
    names = {socket.gethostname().lower(), socket.getfqdn().lower()}
    try:
        names |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        pass
    return names


async def _answer(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """ASGI middleware: refuse a foreign ``Host`` (400) and a cross-site state-changing request (403).

    DNS rebinding points a hostile name at 127.0.0.1, so a page from that name can read this
    server's answers; its requests still carry the hostile name in ``Host``. A page on
    another site can also send a simple POST here (a form, or ``fetch`` with ``text/plain``);
    its ``Origin`` (and ``Sec-Fetch-Site``) names the other site.

    Args:
        app: the ASGI application.
        hosts: the accepted host names (:func:`allowed_hosts`); None accepts any.
    """

    def __init__(self, app, *, hosts: frozenset[str] | None):
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if self.hosts is not None and _hostname(host) not in self.hosts:
            names = ", ".join(sorted(self.hosts))
            return await _answer(send, 400, f"this server answers to {names}, not to the host {host!r}; "
                                            f"start it with --allow-host NAME to accept another name")
        if scope["method"] not in SAFE_METHODS:
            origin = headers.get("origin")
            foreign = origin is not None and urlsplit(origin).netloc.lower() != host.lower()
            if foreign or headers.get("sec-fetch-site") == "cross-site":
                return await _answer(send, 403, f"cross-site request refused: the page at {origin or 'another site'} "
                                                "may not send uploads to this server")
        return await self.app(scope, receive, send)
