"""``triageseg serve``: the web page for trying a bundle on your own images."""

from __future__ import annotations

import click

from triageseg.cli.groups import cli


def _pixels(text: str) -> int:
    """``--max-pixels``: a positive count of pixels, ``M`` for millions (``100M``, ``2.5M``)."""
    value = text.strip().upper()
    try:
        pixels = float(value[:-1]) * 1e6 if value.endswith("M") else float(value)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a number of pixels (e.g. 100000000 or 100M)") from None
    if not pixels >= 1:
        raise click.BadParameter(f"{text!r} must be at least 1 pixel")
    return int(pixels)


@cli.command("serve")
@click.option("--bundle", "bundle_path", required=True, type=click.Path(exists=True, file_okay=False),
              help="Model bundle (from `triageseg train all`), loaded once at start.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. The default serves this machine only. WARNING: --host 0.0.0.0 "
                   "lets every machine that can reach this one upload images and use your models; "
                   "the page has no login.")
@click.option("--port", type=click.IntRange(1, 65535), default=7860, show_default=True, help="TCP port.")
@click.option("--max-upload-mb", type=click.FloatRange(min=0, min_open=True), default=512.0, show_default=True,
              help="Largest image file accepted, in MB; larger uploads are refused with a message.")
@click.option("--max-pixels", callback=lambda _c, _p, v: None if v is None else _pixels(v), default=None,
              metavar="N[M]", help="Largest image accepted, in pixels of all planes (100M = 100 megapixels); "
              "larger ones are refused from their header, before decoding. Default: 100M, or less where "
              "this machine's memory would not hold the analysis.")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="Also answer requests addressed to NAME (repeatable; '*' for any). By default only "
                   "the --host address and localhost are, which stops DNS rebinding.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--tile-size", type=click.IntRange(min=32), default=None,
              help="Segmenter tile side in pixels, a multiple of 32 (default: each model's own).")
@click.option("--temp-dir", type=click.Path(file_okay=False), default=None,
              help="Where the server's temp folder for uploads and results is made (default: the "
                   "system's); it is removed when the server stops.")
def serve(bundle_path, host, port, max_upload_mb, max_pixels, allow_hosts, device, tile_size, temp_dir):
    """Serve a web page to try a bundle on your own images.

    Drop images (PNG, JPEG, TIFF incl. 16-bit) on the page; for each it shows the routing
    decision with every class probability, the nuclei overlaid (outlines or filled) and
    counted, a per-nucleus table, and downloads of the label TIFF, the ROI zip and the CSV.
    Uploads are analysed one at a time on the device, in arrival order. Each upload lives in
    a temp folder only while it is analysed; results are kept for download until the server
    stops. Stop it with Ctrl-C.
    """
    from triageseg.serve.config import ServeConfig
    from triageseg.serve.server import serve as run

    if tile_size is not None and tile_size % 32:
        raise click.BadParameter(f"{tile_size} is not a multiple of 32", param_hint="--tile-size")
    config = ServeConfig(bundle=bundle_path, host=host, port=port, max_upload_mb=max_upload_mb, device=device,
                         tile_size=tile_size, temp_dir=temp_dir, max_pixels=max_pixels, allow_hosts=allow_hosts)
    try:
        run(config, echo=click.echo)
    except KeyboardInterrupt:  # Ctrl-C outside the server's own signal handling (it returns when it handled it)
        pass
    click.echo("stopped")  # either way: the server has shut down and its temp folder is gone
