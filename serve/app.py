"""The web application: the page, the upload endpoint, the results and their downloads.

HTTP interface (the page uses nothing else, so scripts can too):

- ``GET /``: the page; ``GET /static/...``: its script and style.
- ``GET /api/info``: the bundle's models, the device, the upload limit, the queue length.
- ``POST /api/segment?filename=NAME[&modality=M]`` with the image file as the raw request
  body: routes and segments it and answers the result as JSON (see
  :func:`triageseg.serve.jobs.analyse_file`) plus ``id`` and ``files`` (download URLs).
  Errors answer ``{"error": message}``: 413 over the upload limit, 422 an unreadable or
  unsupported image or an unknown modality, 500 anything unexpected; the server goes on.
- ``GET /api/results/<id>/<file>``: ``labels.tif``, ``rois.zip``, ``nuclei.csv``,
  ``overlay.png`` (downloads) and ``image.png``, ``outlines.png``, ``filled.png`` (page layers).

The body is streamed to the temp folder and counted as it arrives, so an upload over the
limit is never held in memory nor kept on disk.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from triageseg._version import __version__
from triageseg.datasets.errors import BundleError, DataError
from triageseg.serve.config import ServeConfig
from triageseg.serve.jobs import RESULT_FILES, DeviceQueue, Workspace, analyse_file, safe_filename

PAGE_DIR = Path(__file__).parent / "page"
AUTO = ("", "auto")
log = logging.getLogger("triageseg.serve")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _receive(request, dest: Path, limit: int) -> tuple[int, bool]:
    """Stream the request body into ``dest``: (bytes received, whether kept); over ``limit`` bytes nothing is kept."""
    declared = request.headers.get("content-length", "")
    over = declared.isdigit() and int(declared) > limit
    size = 0
    with dest.open("wb") as fh:
        # read to the end even when over the limit, so the client gets the answer, not a reset
        async for chunk in request.stream():
            size += len(chunk)
            over = over or size > limit
            if not over:
                fh.write(chunk)
    if over:
        dest.unlink(missing_ok=True)
    return max(size, int(declared) if declared.isdigit() else 0), not over


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 // 10 else f"{n / 1024:.1f} KB"


def _too_large(name: str, size: int, config: ServeConfig) -> str:
    return (f"{name}: the file is larger than the upload limit of {config.max_upload_mb:g} MB "
            f"({_size(size)} sent); start the server with a larger --max-upload-mb")


def run_job(pipe, workspace: Workspace, token: str, path: Path, name: str, modality: str | None,
            queued_at: float, diameter: float | None = None) -> dict:
    """One upload on the device thread: analyse it into its result folder, then remove the upload."""
    started = time.time()
    out = workspace.result_dir(token)
    try:
        result = analyse_file(pipe, path, out, filename=name, modality=modality, diameter=diameter)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
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


def create_app(pipe, config: ServeConfig, *, workspace: Workspace, queue: DeviceQueue) -> FastAPI:
    """The FastAPI application serving ``pipe`` (a loaded :class:`~triageseg.pipeline.single.Pipeline`).

    Args:
        pipe: the pipeline every request runs on (its models already loaded).
        config: the server's settings (upload limit).
        workspace: the temp folder for uploads and results.
        queue: the device queue every analysis runs on.
    """
    # the interactive API docs load their script from a CDN; this server works offline
    app = FastAPI(title="triageseg", version=__version__, docs_url=None, redoc_url=None)
    app.mount("/static", StaticFiles(directory=PAGE_DIR), name="static")

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
            "device": str(pipe.device),
            "max_upload_mb": config.max_upload_mb,
            "max_upload_bytes": config.max_upload_bytes,
            "queue": queue.pending,
        }

    @app.post("/api/segment")
    async def segment(request: Request, filename: str = "upload", modality: str | None = None,
                      diameter: str | None = None):
        from triageseg.router.size import check_diameter

        name = safe_filename(filename)
        given = None
        if diameter is not None and diameter.strip() and diameter.strip().lower() not in AUTO:
            try:  # refused before the upload is read
                given = check_diameter(diameter.strip())
            except ValueError as err:
                return _error(422, f"{name}: {err}")
        forced = None if modality is None or modality.strip().lower() in AUTO else modality.strip()
        token, folder = workspace.new_upload()
        submitted = False
        try:
            path = folder / name
            size, kept = await _receive(request, path, config.max_upload_bytes)
            if not kept:
                return _error(413, _too_large(name, size, config))
            if forced is not None:
                pipe.check_modality(forced)  # before the image is queued and decoded
            future = queue.submit(run_job, pipe, workspace, token, path, name, forced, time.time(), given)
            submitted = True
            return await asyncio.wrap_future(future)
        except BundleError as err:  # a broken model file: the message names it
            return _error(500, str(err))
        except DataError as err:
            return _error(422, str(err) if err.path == name else f"{name}: {err.problem}")
        except ValueError as err:  # e.g. no segmenter for the router's choice
            return _error(422, f"{name}: {err}")
        except Exception as err:  # noqa: BLE001 - one bad request must not stop the server
            log.exception("analysis of %s failed", name)
            return _error(500, f"{name}: {type(err).__name__}: {err}")
        finally:
            if not submitted:  # a submitted job removes its upload itself, when it ends
                workspace.discard_upload(token)

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
