"""`triageseg serve`: a real server on 127.0.0.1 driven over HTTP, and once in a real browser.

The server runs the ``constant_bundle`` (conftest), whose results are known exactly: routing
falls back to the generalist, which finds one nucleus covering the whole image; the forced
``he`` segmenter finds none.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile

from triageseg.datasets.io import normalize_image, read_labels, read_pixel_size

MODELS = ["_generalist", "brightfield", "fluorescence", "he"]
DEEP_SHAPE = (64, 80)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``triageseg serve`` in a child process on 127.0.0.1, stopped by its PID."""

    def __init__(self, bundle: Path, workdir: Path, *extra: str, port: int | None = None):
        self.port = port or free_port()
        self.temp_parent = workdir / "serve_tmp"
        self.log_path = workdir / f"serve_{self.port}.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
        cmd = [sys.executable, "-m", "triageseg", "serve", "--bundle", str(bundle), "--port", str(self.port),
               "--device", "cpu", "--temp-dir", str(self.temp_parent), *extra]
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/api/info", timeout=2):
                    return
            except OSError:
                time.sleep(0.25)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()


    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Signal the server (if still running), wait for it, return its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode

    def uploads(self) -> list[Path]:
        return [p for p in self.temp_parent.glob("*/uploads/**/*")]


def http(method: str, url: str, body: bytes | None = None, timeout: float = 120.0, headers: dict | None = None):
    """(status, headers, body bytes) of one request; HTTP errors are answers too.

    A body goes as ``application/octet-stream`` (the API's type) unless ``headers`` say otherwise.
    """
    headers = {"Content-Type": "application/octet-stream", **(headers or {})} if body is not None else headers
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def upload(server: Server, name: str, data: bytes, **params):
    query = urllib.parse.urlencode({"filename": name, **params})
    status, _, body = http("POST", f"{server.url}/api/segment?{query}", data)
    return status, json.loads(body)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """A 16-bit TIFF with a 0.5 um pixel size, an RGB PNG, a truncated PNG, a text file, a z-stack."""
    folder = tmp_path_factory.mktemp("serve_images")
    rng = np.random.default_rng(3)
    tifffile.imwrite(folder / "deep.tif", (rng.random(DEEP_SHAPE) * 60000).astype(np.uint16),
                     resolution=(2.0, 2.0), resolutionunit="MICROMETER")
    imagecodecs.imwrite(folder / "rgb.png", (rng.random((48, 56, 3)) * 255).astype(np.uint8))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (folder / "notes.txt").write_text("not an image")
    tifffile.imwrite(folder / "stack.tif", np.zeros((7, 32, 32), np.uint8), metadata={"axes": "ZYX"})
    imagecodecs.imwrite(folder / "big.png", (rng.random((256, 256, 3)) * 255).astype(np.uint8))
    return {p.name: p for p in folder.iterdir()}


@pytest.fixture(scope="module")
def server(constant_bundle, tmp_path_factory):
    srv = Server(constant_bundle, tmp_path_factory.mktemp("serve"), "--max-upload-mb", "1")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()
    leftovers = list(srv.temp_parent.iterdir())
    assert leftovers == [], f"the server left its temp folder behind: {leftovers}"


def test_page_and_info(server):
    status, headers, body = http("GET", server.url + "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    page = body.decode()
    for needle in ('id="files"', "multiple", 'id="modality"', 'value="filled"', 'id="opacity"', "/static/app.js"):
        assert needle in page
    status, _, script = http("GET", server.url + "/static/app.js")
    assert status == 200 and b"/api/segment" in script
    status, _, body = http("GET", server.url + "/api/info")
    info = json.loads(body)
    assert status == 200
    assert (info["models"], info["modalities"], info["has_router"]) == (MODELS, MODELS[1:], True)
    assert (info["max_upload_mb"], info["max_upload_bytes"], info["queue"]) == (1.0, 1048576, 0)


def test_tiff_in_json_and_files_out(server, images, constant_bundle):
    from triageseg.pipeline import Pipeline
    from triageseg.router.model import Prediction

    raw = tifffile.imread(images["deep.tif"])
    status, result = upload(server, "deep.tif", images["deep.tif"].read_bytes())
    assert status == 200, result
    h, w = DEEP_SHAPE
    assert (result["filename"], result["height"], result["width"]) == ("deep.tif", h, w)
    assert result["pixel_size_um"] == pytest.approx([0.5, 0.5])
    # the same router, in this process, on the same normalised image: the same probabilities
    pipe = Pipeline.from_bundle(constant_bundle, device="cpu")
    expected = pipe.route([normalize_image(raw)])[0]
    routing = result["routing"]
    assert routing["probabilities"] == pytest.approx(expected.probs, abs=1e-5)
    assert sum(routing["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert (routing["modality"], routing["forced"]) == (expected.modality, False)
    assert routing["confidence"] == pytest.approx(expected.confidence, abs=1e-5)
    used, decision = pipe.choose(Prediction(expected.modality, routing["confidence"], expected.probs))
    assert (routing["used_model"], routing["decision"]) == (used, decision) == ("_generalist", decision)
    assert decision.startswith("low confidence")
    # the generalist calls every pixel nucleus: one nucleus, the whole image
    assert result["count"] == 1
    (row,) = result["nuclei"]
    assert (row["id"], row["area_px"]) == (1, h * w)
    assert row["area_um2"] == pytest.approx(h * w * 0.25)
    assert row["mean_intensity"] == pytest.approx(raw.mean(), rel=1e-9)
    assert (row["centroid_y"], row["centroid_x"]) == pytest.approx(((h - 1) / 2, (w - 1) / 2))

    files = {k: server.url + v for k, v in result["files"].items()}
    status, headers, body = http("GET", files["labels.tif"])
    assert status == 200 and 'filename="deep_labels.tif"' in headers["content-disposition"]
    labels_path = Path(tempfile.mkdtemp()) / "labels.tif"
    try:
        labels_path.write_bytes(body)
        assert np.array_equal(read_labels(labels_path), np.ones(DEEP_SHAPE, np.uint32))
        assert read_pixel_size(labels_path) == pytest.approx((0.5, 0.5))
    finally:
        shutil.rmtree(labels_path.parent)
    status, headers, body = http("GET", files["rois.zip"])
    assert status == 200 and 'filename="deep_rois.zip"' in headers["content-disposition"]
    assert zipfile.ZipFile(io.BytesIO(body)).namelist() == ["00001.roi"]
    status, headers, body = http("GET", files["nuclei.csv"])
    assert status == 200 and 'filename="deep_nuclei.csv"' in headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert [(r["id"], r["area_px"], float(r["area_um2"])) for r in rows] == [("1", str(h * w), h * w * 0.25)]
    layers = {}
    for key in ("image.png", "outlines.png", "filled.png", "overlay.png"):
        status, headers, body = http("GET", files[key])
        assert status == 200 and headers["content-type"] == "image/png"
        layers[key] = imagecodecs.png_decode(body)
    assert layers["image.png"].shape == (h, w, 3) and layers["overlay.png"].shape == (h, w, 3)
    # one nucleus over the whole image: filled everywhere, and no outline (the image edge is none)
    assert (layers["filled.png"][..., 3] == 255).all()
    assert (layers["outlines.png"][..., 3] == 0).all()
    assert server.uploads() == []  # the upload is gone once its job ended


def test_forced_modality_overrides_the_router(server, images):
    status, result = upload(server, "rgb.png", images["rgb.png"].read_bytes(), modality="he")
    assert status == 200, result
    routing = result["routing"]
    assert (routing["modality"], routing["used_model"], routing["forced"], routing["confidence"]) == (
        "he", "he", True, None)
    assert routing["decision"].startswith("forced; the router's top-1 was ")
    assert sorted(routing["probabilities"]) == sorted(MODELS[1:])
    assert (result["count"], result["nuclei"], result["pixel_size_um"]) == (0, [], None)
    status, _, body = http("GET", server.url + result["files"]["rois.zip"])
    assert zipfile.ZipFile(io.BytesIO(body)).namelist() == []
    status, result = upload(server, "rgb.png", images["rgb.png"].read_bytes(), modality="phase")
    assert status == 422
    assert result["error"] == (
        "rgb.png: unknown modality 'phase'; this bundle has segmenters for: " + ", ".join(MODELS))


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("broken.png", "broken.png: cannot decode PNG image: truncated PNG (28 bytes, no IEND chunk at the end)"),
        ("notes.txt", "notes.txt: unsupported image extension '.txt'; expected one of .png, .tif, .tiff, .jpg, .jpeg"),
        ("stack.tif", "stack.tif: 3-D stack or time series is not supported"),
        ("empty.png", "empty.png: empty file (0 bytes)"),
    ],
)
def test_bad_file_is_an_error_and_the_server_goes_on(server, images, name, problem):
    data = images[name].read_bytes() if name in images else b""
    status, result = upload(server, name, data)
    assert status == 422 and result["error"].startswith(problem)
    assert server.uploads() == []
    status, result = upload(server, "rgb.png", images["rgb.png"].read_bytes())
    assert (status, result["count"]) == (200, 1)


def test_upload_over_the_limit_is_refused_with_a_message(server):
    status, result = upload(server, "huge.tif", b"\x00" * (1024 * 1024 + 1))
    assert status == 413
    assert result["error"] == ("huge.tif: the file is larger than the upload limit of 1 MB (1.0 MB sent); "
                               "start the server with a larger --max-upload-mb")
    assert server.uploads() == []
    assert http("GET", server.url + "/api/info")[0] == 200


def test_uploads_are_analysed_one_at_a_time(server, images):
    data = images["big.png"].read_bytes()
    results: list = [None, None]

    def send(i: int) -> None:
        results[i] = upload(server, f"big{i}.png", data)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [status for status, _ in results] == [200, 200]
    first, second = sorted((r for _, r in results), key=lambda r: r["started_at"])
    assert first["finished_at"] <= second["started_at"]  # never both on the device at once
    assert first["count"] == second["count"] == 1


def test_unknown_results_are_not_found(server):
    assert http("GET", server.url + "/api/results/0123456789abcdef/labels.tif")[0] == 404
    assert http("GET", server.url + "/api/results/0123456789abcdef/secret.txt")[0] == 404
    assert http("GET", server.url + "/api/results/..%2F..%2Fetc/passwd")[0] == 404


def test_help_warns_about_listening_on_every_interface():
    from click.testing import CliRunner

    from triageseg.cli.main import cli
    from triageseg.serve.config import ServeConfig

    out = " ".join(CliRunner().invoke(cli, ["serve", "--help"]).output.split())
    assert "WARNING: --host 0.0.0.0 lets every machine that can reach this one upload images" in out
    assert "[default: 127.0.0.1]" in out and "[default: 512.0" in out
    assert ServeConfig(bundle="b").is_loopback and not ServeConfig(bundle="b", host="0.0.0.0").is_loopback
    with pytest.raises(ValueError, match="multiple of 32"):
        ServeConfig(bundle="b", tile_size=100)


CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Debian's Chromium, no network of its own: no sync, updates, field trials or QUIC probes.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1000")


@pytest.fixture
def browser(tmp_path):
    """Debian's Chromium driven by selenium through Debian's chromedriver (never a downloaded one)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("the selenium package (pip install 'triageseg[test]')")
    if missing:
        reason = f"the browser test needs {', '.join(missing)} (apt-get install chromium chromium-driver)"
        if os.geteuid() == 0:  # CI runs as root and .ci/run installs them: missing there is a failure
            pytest.fail(reason)
        pytest.skip(reason + "; not root, so not installed here")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not look for drivers online
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_in_a_real_browser_upload_shows_table_and_overlay(server, images, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    def card(name):
        return browser.find_element(By.CSS_SELECTOR, f"article.result[data-file='{name}']")

    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "bundle-info").text.startswith("bundle bundle"))
    options = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#modality option")]
    assert options == ["", *MODELS]
    # two files at once: a good 16-bit TIFF and a corrupt PNG
    browser.find_element(By.ID, "files").send_keys(f"{images['deep.tif']}\n{images['broken.png']}")
    wait.until(lambda d: {c.get_attribute("data-state") for c in d.find_elements(By.CSS_SELECTOR, "article.result")}
               == {"done", "error"})
    good, bad = card("deep.tif"), card("broken.png")
    assert bad.find_element(By.CSS_SELECTOR, ".status").text.startswith("broken.png: cannot decode PNG image")
    assert not bad.find_element(By.CSS_SELECTOR, ".body").is_displayed()

    h, w = DEEP_SHAPE
    rows = good.find_elements(By.CSS_SELECTOR, "table.nuclei tbody tr")
    mean = tifffile.imread(images["deep.tif"]).mean()
    assert [r.text for r in rows] == [f"1 {h * w} {h * w * 0.25:.2f} {mean:.2f} {(h - 1) / 2:.1f}, {(w - 1) / 2:.1f}"]
    assert good.find_element(By.CSS_SELECTOR, ".count").text == "1 nucleus"
    assert good.find_element(By.CSS_SELECTOR, ".used-model").text == "_generalist"
    probs = good.find_elements(By.CSS_SELECTOR, "table.probabilities tbody tr")
    assert sorted(r.text.split()[0] for r in probs) == sorted(MODELS[1:])

    overlay = good.find_element(By.CSS_SELECTOR, "img.overlay")
    loaded = "return arguments[0].complete && arguments[0].naturalWidth"
    wait.until(lambda d: d.execute_script(loaded, overlay) == w)
    assert overlay.get_attribute("src").endswith("/outlines.png") and overlay.is_displayed()
    assert browser.execute_script(loaded, good.find_element(By.CSS_SELECTOR, "img.base")) == w
    browser.find_element(By.CSS_SELECTOR, "input[name=style][value=filled]").click()
    wait.until(lambda d: overlay.get_attribute("src").endswith("/filled.png"))
    wait.until(lambda d: d.execute_script(loaded, overlay) == w)
    slider = browser.find_element(By.ID, "opacity")
    slider.send_keys(Keys.HOME)
    assert overlay.value_of_css_property("opacity") == "0"
    for _ in range(5):
        slider.send_keys(Keys.ARROW_RIGHT)
    assert overlay.value_of_css_property("opacity") == "0.05"
    # the download links point at the files the server serves
    href = good.find_element(By.CSS_SELECTOR, "a.dl-labels").get_attribute("href")
    status, headers, _ = http("GET", href)
    assert status == 200 and 'filename="deep_labels.tif"' in headers["content-disposition"]
    browser.save_screenshot(str(tmp_path / "page.png"))


# Last in this module: it stops the module's server.
def test_ctrl_c_stops_the_server_and_removes_its_temp_folder(server, constant_bundle, images):
    assert upload(server, "rgb.png", images["rgb.png"].read_bytes())[0] == 200
    assert len(list(server.temp_parent.glob("*/results/*/labels.tif"))) >= 1
    # a second server on the same port is refused at once, before loading any model
    clash = subprocess.run([sys.executable, "-m", "triageseg", "serve", "--bundle", str(constant_bundle),
                            "--port", str(server.port)], capture_output=True, text=True, timeout=120)
    assert clash.returncode == 1
    assert clash.stderr.strip() == f"error: cannot listen on 127.0.0.1:{server.port}: Address already in use"
    assert server.stop(signal.SIGINT) == 0
    assert server.log().splitlines()[-1] == "stopped"
    assert list(server.temp_parent.iterdir()) == []
