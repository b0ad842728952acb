"""Make the README's screenshots of the web page, the napari plugin and the evaluation report, headless.

    python docs/make_screenshots.py --bundle demo_out/bundle [--out docs/]
    python docs/make_screenshots.py --steps report --report-html demo_out/report.html
    python docs/make_screenshots.py --steps curves --bundle demo_out/bundle [--curves-model _generalist]

Writes ``serve.png`` (the page of ``triageseg serve`` after two uploads) and ``napari.png``
(a viewer with the dock widget after Segment) with the default steps ``serve,napari``;
step ``finetune`` draws ``finetune.png`` (the correct -> add -> fine-tune panel after Before / after
on an IHC-like image the bundle never saw), step ``report`` renders a ``triageseg evaluate --report`` page to ``report.png`` (the top
of the page, in Chromium), step ``curves`` copies a training run's ``curves.png`` from the
bundle to ``curves.png`` (drawing it from the run's ``history.csv`` when the bundle has
none). The images are drawn by the synthetic
generator (seeded, not part of any training set): a fluorescence field saved as a 16-bit
TIFF with a 0.65 um pixel size, and an H&E field saved as a PNG.

Needs Debian's ``chromium`` and ``chromium-driver`` for the page, and ``xvfb`` plus the Qt
xcb libraries (``libxcb-icccm4 libxcb-keysyms1 libxcb-cursor0 libxcb-image0
libxcb-render-util0 libxcb-xinerama0 libxcb-shape0 libxkbcommon-x11-0``) for napari, which
runs in a child process on a private X server so the canvas is drawn by OpenGL.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars")


def example_images(folder: Path) -> tuple[Path, Path]:
    """A 16-bit fluorescence TIFF (0.65 um pixels) and an RGB H&E PNG from the synthetic generator."""
    import imagecodecs
    import tifffile

    from triageseg.datasets.synth import synth_sample

    fluo, _ = synth_sample("fluorescence", size=256, rng=np.random.default_rng(2026))
    he, _ = synth_sample("he", size=256, rng=np.random.default_rng(2027))
    gray = np.asarray(fluo, np.float64)
    gray = gray.mean(axis=2) if gray.ndim == 3 else gray
    tif = folder / "fluorescence_16bit.tif"
    tifffile.imwrite(tif, (gray * 257).round().astype(np.uint16), resolution=(1 / 0.65, 1 / 0.65),
                     resolutionunit="MICROMETER")
    png = folder / "he_field.png"
    imagecodecs.imwrite(png, np.asarray(he, np.uint8))
    return tif, png


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def web_screenshot(bundle: Path, images: list[Path], out_png: Path, workdir: Path) -> None:
    """Start ``triageseg serve`` on 127.0.0.1, upload ``images`` in Chromium, save the page."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = _free_port()
    log = (workdir / "serve.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "triageseg", "serve", "--bundle", str(bundle), "--port",
                               str(port), "--temp-dir", str(workdir / "serve_tmp")], stdout=log, stderr=log)
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(240):
            try:
                urllib.request.urlopen(url + "api/info", timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
        os.environ["SE_OFFLINE"] = "true"
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={workdir / 'profile'}", "--window-size=1280,1320"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            driver.get(url)
            wait = WebDriverWait(driver, 300)
            wait.until(lambda d: d.find_element(By.ID, "bundle-info").text.startswith("bundle"))
            driver.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in images))
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "article.result[data-state=done]"))
                       == len(images))
            wait.until(lambda d: d.execute_script(
                "return [...document.images].every(i => i.complete && i.naturalWidth > 0)"))
            driver.save_screenshot(str(out_png))
        finally:
            driver.quit()
    finally:
        server.terminate()
        server.wait(60)
        log.close()


def napari_screenshot(bundle: Path, image: Path, out_png: Path) -> None:
    """Open ``image`` in napari, Segment it with the dock widget, save the window (runs under Xvfb)."""
    import napari
    from qtpy.QtWidgets import QApplication

    from triageseg.datasets.io import read_image_raw, read_pixel_size

    viewer = napari.Viewer(show=True)
    viewer.window.resize(1500, 860)
    pixel_size = read_pixel_size(image)
    viewer.add_image(read_image_raw(image), name=image.stem, **({"scale": pixel_size} if pixel_size else {}))
    _, widget = viewer.window.add_plugin_dock_widget("triageseg", "Nuclei segmentation")
    widget.bundle_edit.setText(str(bundle))
    widget.set_bundle(str(bundle))
    widget.run(segment=True)
    deadline = time.monotonic() + 600
    name = f"{image.stem} labels"
    while name not in [layer.name for layer in viewer.layers] or not widget.segment_button.isEnabled():
        QApplication.processEvents()
        time.sleep(0.05)
        if time.monotonic() > deadline:
            raise TimeoutError(f"segmenting {image} in napari took over 10 minutes: {widget.status.text()}")
    viewer.layers[name].contour = 2
    for _ in range(20):
        QApplication.processEvents()
        time.sleep(0.05)
    viewer.screenshot(str(out_png), canvas_only=False, flash=False)
    viewer.close()


def finetune_screenshot(bundle: Path, out_png: Path, workdir: Path, *, steps: int = 30) -> None:
    """The correct -> add -> fine-tune loop in napari (runs under Xvfb): an IHC-like image the bundle never saw.

    Four corrected images are already in the dataset; the shown one is segmented, its labels
    replaced by the true ones (the correction), added, the bundle fine-tuned for ``steps``
    steps, and Before / after adds the new bundle's labels.
    """
    import napari
    from qtpy.QtWidgets import QApplication

    from triageseg.datasets.synth_variants import variant_sample
    from triageseg.finetune import add_to_training_set

    def wait(ready, what: str, seconds: float = 900) -> None:
        deadline = time.monotonic() + seconds
        while not ready():
            QApplication.processEvents()
            time.sleep(0.05)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} took over {seconds:.0f} s")

    os.environ["TRIAGESEG_CONFIG_DIR"] = str(workdir / "config")
    rng = np.random.default_rng(2028)
    data = workdir / "corrections"
    for i in range(4):
        image, labels = variant_sample("ihc", size=256, rng=rng)
        add_to_training_set(data, image, labels, "ihc", f"ihc_{i}")
    image, truth = variant_sample("ihc", size=256, rng=rng)
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1500, 1000)
    viewer.add_image(image, name="ihc_field")
    _, widget = viewer.window.add_plugin_dock_widget("triageseg", "Nuclei segmentation")
    widget.bundle_edit.setText(str(bundle))
    widget.set_bundle(str(bundle))
    widget.run(segment=True)
    wait(lambda: "ihc_field labels" in [layer.name for layer in viewer.layers] and widget.segment_button.isEnabled(),
         "segmenting")
    panel = widget.finetune_panel
    viewer.layers["ihc_field labels"].data = truth  # the correction
    panel.refresh()
    panel.labels_combo.setCurrentText("ihc_field labels")
    panel.modality_combo.setCurrentText("ihc")
    panel.set_dataset(str(data))
    panel.add()
    panel.steps_spin.setValue(steps)
    panel.out_edit.setText(str(workdir / "bundle-ft1"))
    panel.start_finetune()
    wait(lambda: panel.result is not None and panel.finetune_button.isEnabled(), "fine-tuning")
    panel.before_after()
    wait(lambda: "ihc_field labels (fine-tuned)" in [layer.name for layer in viewer.layers]
         and panel.finetune_button.isEnabled(), "before / after")
    viewer.layers["ihc_field labels"].visible = False
    viewer.layers["ihc_field labels (fine-tuned)"].contour = 2
    for _ in range(20):
        QApplication.processEvents()
        time.sleep(0.05)
    viewer.screenshot(str(out_png), canvas_only=False, flash=False)
    viewer.close()


def report_screenshot(report_html: Path, out_png: Path, workdir: Path, *, width: int = 1180,
                      max_height: int = 2200) -> None:
    """Open a ``triageseg evaluate --report`` page in headless Chromium and save its top ``max_height`` pixels."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={workdir / 'profile-report'}", f"--window-size={width},900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(report_html.resolve().as_uri())
        height = int(driver.execute_script("return document.documentElement.scrollHeight"))
        driver.set_window_size(width, min(height, max_height))
        driver.execute_script("return [...document.images].every(i => i.complete)")
        driver.save_screenshot(str(out_png))
    finally:
        driver.quit()


def curves_image(bundle: Path, out_png: Path, model: str = "_generalist") -> Path:
    """Copy the ``curves.png`` of segmenter ``model`` (else the first in the bundle) to ``out_png``.

    A bundle trained before training runs drew their curves has none: the curves are then
    drawn from the run's ``history.csv`` (train loss, per-class IoU, validation mean F1).

    Returns:
        The curves.png or history.csv it came from.
    """
    import csv

    preferred = bundle / "segmenters" / model
    found = sorted(preferred.glob("curves.png")) or sorted(bundle.rglob("curves.png"))
    if found:
        shutil.copyfile(found[0], out_png)
        return found[0]
    histories = sorted(preferred.glob("history.csv")) or sorted(bundle.rglob("history.csv"))
    if not histories:
        raise SystemExit(f"{bundle}: no curves.png and no history.csv to draw one from")
    from triageseg.postprocess.plots import write_curves

    with histories[0].open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    f1 = [float(r["val_mean_f1"]) if r.get("val_mean_f1") else -1.0 for r in rows]
    best = float(rows[f1.index(max(f1))]["epoch"]) if rows and max(f1) >= 0 else None
    panels = [("loss", [("train_loss", "train"), ("val_loss", "validation")]),
              ("per-class IoU (validation)", [(f"iou_{c}", c) for c in ("background", "interior", "boundary")]),
              ("validation mean F1", [("val_mean_f1", "mean F1")])]
    write_curves(out_png, rows, panels, best=best, title=f"{histories[0].parent.name}: training curves")
    return histories[0]


STEPS = ("serve", "napari", "report", "curves", "finetune")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="a trained bundle (make demo: demo_out/bundle); "
                                                    "for the serve, napari and curves steps")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="where the PNGs go")
    parser.add_argument("--steps", default="serve,napari", help=f"comma-separated, of {', '.join(STEPS)}")
    parser.add_argument("--report-html", type=Path, help="for the report step: a page of triageseg evaluate --report")
    parser.add_argument("--curves-model", default="_generalist", help="for the curves step: whose curves.png")
    parser.add_argument("--napari-child", type=Path, help=argparse.SUPPRESS)  # the image, inside Xvfb
    parser.add_argument("--finetune-child", type=Path, help=argparse.SUPPRESS)  # a work folder, inside Xvfb
    args = parser.parse_args(argv)
    if args.finetune_child is not None:
        finetune_screenshot(args.bundle, args.out / "finetune.png", args.finetune_child)
        return
    if args.napari_child is not None:
        napari_screenshot(args.bundle, args.napari_child, args.out / "napari.png")
        return
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        parser.error(f"unknown steps {unknown}; valid: {', '.join(STEPS)}")
    if args.bundle is None and set(steps) & {"serve", "napari", "curves", "finetune"}:
        parser.error("--bundle is needed for the serve, napari, curves and finetune steps")
    if "report" in steps and (args.report_html is None or not args.report_html.is_file()):
        parser.error("the report step needs --report-html FILE (a page of triageseg evaluate --report)")
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="triageseg-screenshots-"))
    try:
        if {"serve", "napari"} & set(steps):
            tif, png = example_images(workdir)
        if "serve" in steps:
            web_screenshot(args.bundle, [tif, png], args.out / "serve.png", workdir)
            print(f"wrote {args.out / 'serve.png'}")
        if "napari" in steps:
            env = {**os.environ, "QT_QPA_PLATFORM": "xcb"}
            subprocess.run(["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24", sys.executable, __file__, "--bundle",
                            str(args.bundle), "--out", str(args.out), "--napari-child", str(png)],
                           check=True, env=env)
            print(f"wrote {args.out / 'napari.png'}")
        if "finetune" in steps:
            env = {**os.environ, "QT_QPA_PLATFORM": "xcb"}
            subprocess.run(["xvfb-run", "-a", "-s", "-screen 0 1600x1100x24", sys.executable, __file__, "--bundle",
                            str(args.bundle), "--out", str(args.out), "--finetune-child", str(workdir)],
                           check=True, env=env)
            print(f"wrote {args.out / 'finetune.png'}")
        if "report" in steps:
            report_screenshot(args.report_html, args.out / "report.png", workdir)
            print(f"wrote {args.out / 'report.png'}")
        if "curves" in steps:
            source = curves_image(args.bundle, args.out / "curves.png", args.curves_model)
            print(f"wrote {args.out / 'curves.png'} (from {source})")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
