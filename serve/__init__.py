"""``triageseg serve``: a web page to try a bundle on your own images.

- :mod:`~triageseg.serve.config`: :class:`ServeConfig`, the server's settings.
- :mod:`~triageseg.serve.jobs`: one uploaded image through the pipeline into a result folder,
  and the queue that runs those jobs one at a time on the device.
- :mod:`~triageseg.serve.limits`: what is refused before any work (too many pixels, decompression
  bombs, foreign ``Host`` headers, cross-site uploads).
- :mod:`~triageseg.serve.app`: the FastAPI application (page, upload, results, downloads).
- :mod:`~triageseg.serve.server`: load the bundle once, then run the app under uvicorn.

The page itself (``page/``) is static HTML, CSS and JavaScript with no outside resources,
so it works on a machine without internet access.
"""

from triageseg.serve.config import ServeConfig

__all__ = ["ServeConfig"]
