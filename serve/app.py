"""The web application: the page, the upload endpoint, the results and their downloads.

HTTP interface (the page uses nothing else, so scripts can too):

- ``GET /``: the page; ``GET /static/...``: its script and style.
- ``GET /api/info``: the bundle's models, the device, the upload limit, the queue length.
- ``POST /api/segment?filename=NAME[&modality=M]`` with the image file as the raw request
  body (``Content-Type: application/octet-stream`` or ``image/*``): routes and segments it
  and answers the result as JSON (see :func:`triageseg.serve.jobs.analyse_file`) plus ``id``
  and ``files`` (download URLs). Errors answer ``{"error": message}``: 400 a ``Host`` that
  is not this server's, 403 an upload from another site's page, 413 over the upload limit
  or ``--max-pixels``, 415 another content type, 422 an unreadable or unsupported image, a
  decompression bomb or an unknown modality, 503 the server is stopping, 500 anything
  unexpected; the server goes on.
- ``GET /api/results/<id>/<file>``: ``labels.tif``, ``rois.zip``, ``nuclei.csv``,
  ``overlay.png`` (downloads) and ``image.png``, ``outlines.png``, ``filled.png`` (page layers).

The body is streamed to the temp folder and counted as it arrives, so an upload over the
limit is never held in memory nor kept on disk; reading stops a little past the limit. The
image's header is read before the job is queued, so a file with too many pixels is refused
without being decoded.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
import traceback
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from triageseg._version import __version__
from triageseg.datasets.errors import BundleError, DataError
from triageseg.serve.config import ServeConfig
from triageseg.serve.jobs import RESULT_FILES, DeviceQueue, ShuttingDown, Workspace, analyse_file, safe_filename
from triageseg.serve.limits import RequestGuard, allowed_hosts, upload_problem

PAGE_DIR = Path(__file__).parent / "page"
AUTO = ("", "auto")
# read this much past the upload limit so a client that sends a little too much gets the
# answer rather than a reset; then stop reading (and close the connection)
DRAIN_BYTES = 4 * 2**20
# after answering a request whose body was not read to its end, go on reading (and dropping)
# for this long or this much before the connection closes: a socket closed with unread data
# sends a reset, and a reset can destroy the answer before the client has read it
LINGER_SECONDS, LINGER_BYTES = 2.0, 16 * 2**20
UPLOAD_TYPES = ("application/octet-stream",)  # besides image/*: none a form or a simple fetch can send
log = logging.getLogger("triageseg.serve")


class _LingeringAnswer(JSONResponse):
    """A JSON answer sent in full, then held open while the rest of the request body is read and dropped.

    The answer goes out first (its length is declared, so the client knows it is complete);
    the connection closes after :data:`LINGER_SECONDS` or :data:`LINGER_BYTES`, or as soon as
    the client stops sending. Closed at once, the server's socket would answer the bytes
    still in flight with a reset, which may discard the answer in the client's buffer.
    """

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body, "more_body": True})
        loop = asyncio.get_running_loop()
        deadline, dropped = loop.time() + LINGER_SECONDS, 0
        while dropped < LINGER_BYTES and (left := deadline - loop.time()) > 0:
            try:
                message = await asyncio.wait_for(receive(), left)
            except TimeoutError:
                break
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
            dropped += len(message.get("body", b""))
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _error(status: int, message: str, *, close: bool = False) -> JSONResponse:
    """``{"error": message}``; ``close`` when the request body was not read to its end."""
    if close:
        return _LingeringAnswer({"error": message}, status_code=status, headers={"connection": "close"})
    return JSONResponse({"error": message}, status_code=status)


async def _receive(request, dest: Path, limit: int) -> tuple[int, bool, bool]:
    """Stream the request body into ``dest``: (bytes received, whether kept, whether read to the end).

    Over ``limit`` bytes nothing is kept, and reading stops :data:`DRAIN_BYTES` past the limit
    (at once when the declared length is beyond that): an endless chunked upload is cut off.
    """
    declared = request.headers.get("content-length", "")
    declared = int(declared) if declared.isdigit() else None
    if declared is not None and declared > limit + DRAIN_BYTES:
        return declared, False, False
    size, over, cut = 0, declared is not None and declared > limit, False
    with dest.open("wb") as fh:
        async for chunk in request.stream():
            size += len(chunk)
            over = over or size > limit
            if not over:
                fh.write(chunk)
            elif size > limit + DRAIN_BYTES:
                cut = True
                break
    if over:
        dest.unlink(missing_ok=True)
    return max(size, declared or 0), not over, not cut


def _release(err: BaseException) -> None:
    """Drop the locals of the finished frames in ``err``'s tracebacks (and its causes'), e.g. decoded images.

    The exception outlives the request in reference cycles (the future holds it, its traceback
    holds the frame that holds the future), so without this a failed analysis keeps its
    arrays until the next full garbage collection.
    """
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        traceback.clear_frames(err.__traceback__)
        err = err.__cause__ or err.__context__


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 // 10 else f"{n / 1024:.1f} KB"


def _too_large(name: str, size: int, config: ServeConfig, complete: bool = True) -> str:
    sent = f"{_size(size)} sent" if complete else f"more than {_size(size)} sent; the server stopped reading"
    return (f"{name}: the file is larger than the upload limit of {config.max_upload_mb:g} MB "
            f"({sent}); start the server with a larger --max-upload-mb")


def _failure(name: str, err: Exception) -> JSONResponse:
    """The answer to a failed request; the exception's frames are released on the way."""
    try:
        if isinstance(err, BundleError):  # a broken model file: the message names it
            return _error(500, str(err))
        if isinstance(err, DataError):
            return _error(422, str(err) if err.path == name else f"{name}: {err.problem}")
        if isinstance(err, ValueError):  # e.g. no segmenter for the router's choice
            return _error(422, f"{name}: {err}")
        log.error("analysis of %s failed", name, exc_info=err)
        return _error(500, f"{name}: {type(err).__name__}: {err}")
    finally:
        _release(err)


def run_job(pipe, workspace: Workspace, token: str, path: Path, name: str, modality: str | None,
            queued_at: float, diameter: float | None = None) -> dict:
    """One upload on the device thread: analyse it into its result folder, then remove the upload."""
    started = time.time()
    out = workspace.result_dir(token)
    try:
        result = analyse_file(pipe, path, out, filename=name, modality=modality, diameter=diameter)
    except BaseException as err:
        shutil.rmtree(out, ignore_errors=True)
        _release(err)  # the decoded image goes now, not at the next garbage collection
        raise
    finally:
        workspace.discard_upload(token)
    workspace.keep_result(token, Path(name).stem)
    result.update(
        id=token,
        files={key: f"/api/results/{token}/{key}" for key in RESULT_FILES},
        queued_seconds=round(started - queued_at, 3),
        started_at=started,
        finished_at=time.time(),
    )
    return result


async def _segment(request, name: str, modality: str | None, pipe, config: ServeConfig, workspace: Workspace,
                   queue: DeviceQueue, *, diameter: str | None = None) -> JSONResponse | dict:
    """``POST /api/segment``: check the request, receive the file, check its header, queue its analysis."""
    from triageseg.router.size import check_diameter

    given = None
    if diameter is not None and diameter.strip() and diameter.strip().lower() not in AUTO:
        try:  # refused before the upload is read
            given = check_diameter(diameter.strip())
        except ValueError as err:
            return _error(422, f"{name}: {err}", close=True)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in UPLOAD_TYPES and not kind.startswith("image/"):
        return _error(415, f"{name}: send the image file as the request body with Content-Type: "
                           f"application/octet-stream (got {kind or 'no content type'!r})", close=True)
    forced = None if modality is None or modality.strip().lower() in AUTO else modality.strip()
    token, folder = workspace.new_upload()
    future = None
    try:
        path = folder / name
        size, kept, complete = await _receive(request, path, config.max_upload_bytes)
        if not kept:
            return _error(413, _too_large(name, size, config, complete), close=not complete)
        if forced is not None:
            pipe.check_modality(forced)  # before the image is queued and decoded
        refused = await asyncio.to_thread(upload_problem, path, name, config.max_pixels)
        if refused is not None:  # too many pixels or a bomb: never decoded
            return _error(*refused)
        future = queue.submit(run_job, pipe, workspace, token, path, name, forced, time.time(), given)
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        if future is None or not future.cancelled():
            raise
        return _error(503, f"{name}: the server is shutting down; the upload was dropped before its "
                           "analysis started")
    except ShuttingDown:
        return _error(503, f"{name}: the server is shutting down; send the file again when it is back")
    except Exception as err:  # noqa: BLE001 - one bad request must not stop the server
        return _failure(name, err)
    finally:
        if future is None or future.cancelled():  # a job that ran removed its upload itself
            workspace.discard_upload(token)
        future = None  # the future holds a failed job's exception, whose traceback holds this frame


def create_app(pipe, config: ServeConfig, *, workspace: Workspace, queue: DeviceQueue) -> FastAPI:
    """The FastAPI application serving ``pipe`` (a loaded :class:`~triageseg.pipeline.local.single.Pipeline`).

    Args:
        pipe: the pipeline every request runs on (its models already loaded).
        config: the server's settings (upload limit).
        workspace: the temp folder for uploads and results.
        queue: the device queue every analysis runs on.
    """
    # the interactive API docs load their script from a CDN; this server works offline
    app = FastAPI(title="triageseg", version=__version__, docs_url=None, redoc_url=None)
    app.mount("/static", StaticFiles(directory=PAGE_DIR), name="static")
    app.add_middleware(RequestGuard, hosts=allowed_hosts(config.host, config.allow_hosts))

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(PAGE_DIR / "index.html", media_type="text/html")

    @app.get("/api/info")
    def info() -> dict:
        return {
            "version": __version__,
            "bundle": pipe.path.name,
            "modalities": pipe.specialists,
            "models": pipe.available,
            "has_router": bool(pipe.manifest.get("has_router")),
            "confidence_threshold": pipe.confidence_threshold,
            "device": pipe.device_name,
            "max_upload_mb": config.max_upload_mb,
            "max_upload_bytes": config.max_upload_bytes,
            "max_pixels": config.max_pixels,
            "queue": queue.pending,
        }

    @app.post("/api/segment")
    async def segment(request: Request, filename: str = "upload", modality: str | None = None,
                      diameter: str | None = None):
        return await _segment(request, safe_filename(filename), modality, pipe, config, workspace, queue,
                              diameter=diameter)

    @app.get("/api/results/{token}/{name}")
    def result_file(token: str, name: str):
        found = workspace.lookup(token, name)
        if found is None:
            return _error(404, f"no result file {name!r} for id {token!r} "
                               f"(the newest {workspace.keep} results are kept)")
        path, download = found
        if RESULT_FILES[name][1]:
            return FileResponse(path, filename=download)
        return FileResponse(path)

    return app
