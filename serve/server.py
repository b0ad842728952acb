"""Load the bundle once, then serve the page under uvicorn until Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
import socket
import sys
from collections.abc import Callable

import numpy as np

from triageseg.serve.config import ServeConfig


def load_models(pipe) -> None:
    """Load the router and every segmenter of ``pipe`` now, so no request waits for a model to load.

    The router also runs once on a blank image: a broken router file shows at start, not at
    the first upload.
    """
    if pipe.manifest.get("has_router"):
        pipe.route([np.zeros((64, 64, 3), np.float32)])
    for name in pipe.available:
        pipe.segmenter(name)


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (not yet listening), or an OSError naming the address."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def _exit_on_sigterm(signum, _frame) -> None:
    # uvicorn re-raises the signal it stopped on; without a handler SIGTERM would end the
    # process before the temp folder is removed
    raise SystemExit(128 + signum)


def _server(app, config: ServeConfig, queue):
    """A uvicorn server that, on Ctrl-C or SIGTERM, drops the queued jobs before it waits for the running one."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # the waiting requests answer 503 at once; uvicorn then waits for the running job
            # only, and removes nothing its answer still links to before that answer is sent
            queue.drop_pending()
            super().handle_exit(sig, frame)

    return Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                 access_log=False, lifespan="off"))


def serve(config: ServeConfig, *, echo: Callable[[str], None] = print) -> None:
    """Run the web page for ``config.bundle`` until interrupted; the temp folder is removed on the way out.

    Args:
        config: what to serve and where.
        echo: where the start-up lines go.

    Raises:
        BundleError: the bundle is missing, corrupt or has a broken model file.
        OSError: the address cannot be bound (port taken, unknown host).
    """
    from triageseg.pipeline import Pipeline
    from triageseg.serve.app import create_app
    from triageseg.serve.jobs import DeviceQueue, Workspace

    sock = bind(config.host, config.port)  # a taken port fails now, not after the models load
    try:
        pipe = Pipeline.from_bundle(config.bundle, device=config.device, tile_size=config.tile_size)
        load_models(pipe)
    except BaseException:
        sock.close()
        raise
    workspace = Workspace(config.temp_dir, keep=config.keep_results)
    queue = DeviceQueue()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        app = create_app(pipe, config, workspace=workspace, queue=queue)
        server = _server(app, config, queue)
        host = f"[{config.host}]" if ":" in config.host else config.host
        echo(f"triageseg serve: bundle {pipe.path} ({', '.join(pipe.available)}) on {pipe.device_name}")
        echo(f"open http://{host}:{config.port}/ (Ctrl-C to stop)")
        echo(f"limits: uploads up to {config.max_upload_mb:g} MB, images up to {config.max_pixels / 1e6:g} MP "
             "(--max-upload-mb, --max-pixels)")
        if not config.is_loopback:
            echo(f"warning: listening on {config.host}: anyone who can reach this machine can use the page "
                 "(there is no login)")
        sys.stdout.flush()
        server.run(sockets=[sock])
    finally:
        sock.close()
        queue.close()
        workspace.close()
        signal.signal(signal.SIGTERM, previous)
