"""A resumed `segment` trusts only what it can verify, and nothing a run made is lost (issue 23).

Damaged pyramidal label files are redone; outputs asked for on a rerun are made from the
label files; routing.csv rows are rebuilt from the label files; two runs into one --out are
refused; GeoJSON polygons are valid geometry; worker processes die with their parent.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner


def _cli():
    from triageseg.cli.main import cli

    return cli


def _tiffs(folder: Path, n: int, shape=(64, 64), seed=0, start=0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        path = folder / f"img{i:02d}.tif"
        tifffile.imwrite(path, (rng.random(shape) * 4000).astype(np.uint16))
        paths.append(path)
    return paths


def _rows(out: Path) -> list[dict]:
    with (out / "routing.csv").open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _segment(args, tiny_bundle, out):
    return CliRunner().invoke(_cli(), ["segment", *map(str, args), "--bundle", str(tiny_bundle), "--out", str(out),
                                       "--modality", "he", "--quiet"])


# ------------------------------------------------------------------ 3: damaged pyramidal label files


def _pyramid(path: Path) -> np.ndarray:
    from triageseg.datasets.pyramid import write_pyramid

    labels = (np.random.default_rng(1).random((2100, 1300)) * 60).astype(np.uint16)
    write_pyramid(path, labels.shape, np.uint16, lambda y0, y1: labels[y0:y1], tile=256, name=path.stem)
    return labels


def _level_end(path: Path, level: int) -> int:
    with tifffile.TiffFile(path) as tif:
        page = tif.series[0].levels[level].keyframe
        return int(page.dataoffsets[-1]) + int(page.databytecounts[-1])


def test_verify_output_checks_every_pyramid_level_and_the_ome_xml(tmp_path):
    from triageseg.pipeline.local.records import verify_output

    path = tmp_path / "p.tif"
    _pyramid(path)
    data = path.read_bytes()
    assert verify_output(path, (2100, 1300)) is None

    path.write_bytes(data[:-100])  # the OME-XML, written last, is cut off; every level's pixels are there
    assert "OME" in verify_output(path, (2100, 1300))
    path.write_bytes(data[: len(data) * 3 // 4])
    assert verify_output(path, (2100, 1300)) is not None

    path.write_bytes(data)
    end = _level_end(path, 0)
    path.write_bytes(data[: end + 2000])  # level 0 whole, level 1 cut
    assert verify_output(path, (2100, 1300)) is not None

    # same size, the last tile of level 1 overwritten: its extents are fine, it does not decode
    path.write_bytes(data)
    with tifffile.TiffFile(path) as tif:
        page = tif.series[0].levels[1].keyframe
        offset, count = int(page.dataoffsets[-1]), int(page.databytecounts[-1])
    broken = bytearray(data)
    broken[offset : offset + count] = b"\x55" * count
    path.write_bytes(bytes(broken))
    problem = verify_output(path, (2100, 1300))
    assert problem is not None and "level 1" in problem


def test_resume_redoes_a_block_wise_output_whose_ome_xml_is_gone(tiny_bundle, tmp_path):
    folder = tmp_path / "d"
    _tiffs(folder, 1, shape=(1100, 200))
    out = tmp_path / "out"
    args = [folder / "img00.tif", "--blocks-above", "0", "--block-size", "512"]
    assert _segment(args, tiny_bundle, out).exit_code == 0
    good = (out / "img00.tif").read_bytes()
    with tifffile.TiffFile(out / "img00.tif") as tif:
        assert len(tif.series[0].levels) == 2
    (out / "img00.tif").write_bytes(good[:-50])
    res = _segment(args, tiny_bundle, out)
    assert res.exit_code == 0, res.output
    assert "segmented 1 image(s)" in res.output and "incomplete" in res.output
    assert (out / "img00.tif").read_bytes() == good


# ------------------------------------------------------------------ 4: outputs asked for on a rerun


def test_outputs_asked_for_on_a_rerun_are_made_from_the_label_files(tiny_bundle, tmp_path):
    from roifile import roiread

    files = _tiffs(tmp_path / "d", 2, shape=(80, 72))
    out = tmp_path / "out"
    assert _segment([tmp_path / "d"], tiny_bundle, out).exit_code == 0
    labels = {p.name: p.read_bytes() for p in out.glob("*.tif")}

    res = _segment([tmp_path / "d", "--geojson", "--rois", "--overlays"], tiny_bundle, out)
    assert res.exit_code == 0, res.output
    assert "segmented 0 image(s), skipped 2" in res.output
    assert "made 6 missing output(s)" in res.output
    assert {p.name: p.read_bytes() for p in out.glob("*.tif")} == labels  # not segmented again
    from triageseg.datasets.io import read_labels

    for path in files:
        lab = read_labels(out / f"{path.stem}.tif")
        n = len(np.unique(lab[lab > 0]))
        features = json.loads((out / f"{path.stem}.geojson").read_text())["features"]
        assert len(features) == n and {f["properties"]["classification"]["name"] for f in features} <= {"he"}
        assert len(roiread(out / f"{path.stem}.rois.zip")) == n
        from PIL import Image

        with Image.open(out / "overlays" / f"{path.stem}.png") as im:
            assert im.size == (72, 80)
    assert json.loads((out / "segment_config.json").read_text())["geojson"] is True
    # what a first run with those options writes
    fresh = tmp_path / "fresh"
    assert _segment([tmp_path / "d", "--geojson", "--overlays"], tiny_bundle, fresh).exit_code == 0
    for path in files:
        for rel in (f"{path.stem}.geojson", f"overlays/{path.stem}.png"):
            assert (out / rel).read_bytes() == (fresh / rel).read_bytes(), rel

    # damaged or deleted extras are noticed and made again; good ones are left alone
    geo = (out / "img00.geojson").read_bytes()
    (out / "img00.geojson").write_bytes(geo[: len(geo) // 2])
    (out / "img01.rois.zip").unlink()
    (out / "overlays" / "img00.png").write_bytes(b"\x89PNG")
    kept = (out / "img01.geojson").stat().st_mtime_ns
    res = _segment([tmp_path / "d", "--geojson", "--rois", "--overlays"], tiny_bundle, out)
    assert res.exit_code == 0, res.output
    assert "made 3 missing output(s)" in res.output
    assert (out / "img00.geojson").read_bytes() == geo
    assert zipfile.ZipFile(out / "img01.rois.zip").testzip() is None
    assert (out / "img01.geojson").stat().st_mtime_ns == kept


def test_geojson_asked_for_on_a_rerun_of_a_block_wise_image(tiny_bundle, tmp_path):
    folder = tmp_path / "d"
    _tiffs(folder, 1, shape=(300, 260))
    out = tmp_path / "out"
    args = [folder, "--blocks-above", "0", "--block-size", "128", "--block-margin", "32"]
    assert _segment(args, tiny_bundle, out).exit_code == 0
    label = (out / "img00.tif").read_bytes()
    res = _segment([*args, "--geojson"], tiny_bundle, out)
    assert res.exit_code == 0 and "made 1 missing output(s)" in res.output, res.output
    assert (out / "img00.tif").read_bytes() == label
    made = (out / "img00.geojson").read_bytes()
    # the same file as a first run with --geojson writes
    fresh = tmp_path / "fresh"
    assert _segment([*args, "--geojson"], tiny_bundle, fresh).exit_code == 0
    assert made == (fresh / "img00.geojson").read_bytes()


# ------------------------------------------------------------------ 5: routing.csv rows are never lost


def test_unreadable_routing_csv_is_an_error_and_a_deleted_one_is_rebuilt(tiny_bundle, tmp_path):
    folder = tmp_path / "d"
    _tiffs(folder, 4)
    out = tmp_path / "out"
    assert _segment([folder], tiny_bundle, out).exit_code == 0
    before = {r["output"]: r for r in _rows(out)}
    _tiffs(folder, 1, seed=5, start=4)

    data = (out / "routing.csv").read_bytes()
    (out / "routing.csv").write_bytes(data[:40] + b"\xff" + data[40:])
    res = _segment([folder], tiny_bundle, out)
    assert res.exit_code != 0
    assert "routing.csv" in res.output and "delete it and rerun" in res.output
    assert not (out / "img04.tif").exists()

    (out / "routing.csv").unlink()
    res = _segment([folder], tiny_bundle, out)
    assert res.exit_code == 0, res.output
    rows = {r["output"]: r for r in _rows(out)}
    assert sorted(rows) == [f"img0{i}.tif" for i in range(5)]
    for name, row in before.items():
        for key in ("file", "modality", "confidence", "used_model", "decision", "objects", "mode", "quality"):
            assert rows[name][key] == row[key], (name, key)


def test_rows_of_another_run_into_the_same_out_are_rebuilt(tiny_bundle, tmp_path):
    folder = tmp_path / "d"
    _tiffs(folder, 6)
    out = tmp_path / "out"
    assert _segment([str(folder / "img0[0-2].tif")], tiny_bundle, out).exit_code == 0
    assert _segment([str(folder / "img0[3-5].tif")], tiny_bundle, out).exit_code == 0
    rows = _rows(out)
    assert len(rows) == 6
    # what a lost update leaves: the rows of the second run overwritten by the first's
    with (out / "routing.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[:3])
    res = _segment([str(folder / "img0[0-2].tif")], tiny_bundle, out)
    assert res.exit_code == 0, res.output
    assert sorted(r["output"] for r in _rows(out)) == [f"img0{i}.tif" for i in range(6)]


def test_a_second_run_into_the_same_out_is_refused_naming_the_first(tiny_bundle, tmp_path):
    from triageseg.pipeline.local.outlock import out_dir_lock

    folder = tmp_path / "d"
    _tiffs(folder, 2)
    out = tmp_path / "out"
    out.mkdir()
    with out_dir_lock(out):
        res = _segment([folder], tiny_bundle, out)
    assert res.exit_code != 0
    assert f"pid {os.getpid()}" in res.output and "another" in res.output
    assert not list(out.glob("*.tif"))
    assert _segment([folder], tiny_bundle, out).exit_code == 0  # the lock went with the first run


# ------------------------------------------------------------------ 6: GeoJSON polygons are valid


def _dense_labels(seed=0, shape=(90, 108)) -> np.ndarray:
    """Pixel noise of a few ids: every kind of corner contact, holes and diagonal-only pieces."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 40, (shape[0] // 3, shape[1] // 3))
    labels = np.kron(coarse, np.ones((3, 3), np.int64))
    noise = rng.random(shape) < 0.25
    labels[noise] = rng.integers(0, 40, int(noise.sum()))
    return labels.astype(np.uint32)


def test_every_geojson_feature_of_a_dense_label_image_is_valid(tmp_path):
    shapely_geometry = pytest.importorskip("shapely.geometry")
    from triageseg.pipeline.blockwise.geojson import write_geojson

    labels = _dense_labels()
    path = write_geojson(tmp_path / "dense.geojson", labels, modality="he")
    features = json.loads(path.read_text())["features"]
    ids = np.unique(labels[labels > 0])
    assert sorted(f["properties"]["label"] for f in features) == ids.tolist()
    invalid = []
    for feature in features:
        shape = shapely_geometry.shape(feature["geometry"])
        if not shape.is_valid:
            invalid.append(feature["properties"]["label"])
        # each piece covers its pixels up to the 1/6 px inset (holes are filled in)
        assert shape.area >= 0.5 * feature["properties"]["area_px"]
    assert invalid == []


def test_diagonal_pieces_become_a_multipolygon_of_valid_rings():
    shapely_geometry = pytest.importorskip("shapely.geometry")
    from triageseg.pipeline.blockwise.geojson import mask_geometry

    mask = np.array([[1, 0, 0], [0, 1, 1], [0, 1, 0]], bool)
    geometry = mask_geometry(mask, 10, 20)
    assert geometry["type"] == "MultiPolygon" and len(geometry["coordinates"]) == 2
    assert shapely_geometry.shape(geometry).is_valid
    ring = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 0]], bool)  # a 4-connected ring touching itself at a corner
    geometry = mask_geometry(ring)
    assert geometry["type"] == "Polygon" and shapely_geometry.shape(geometry).is_valid


def test_rois_of_a_dense_label_image_are_one_per_object(tmp_path):
    from roifile import roiread

    from triageseg.pipeline.local.outputs import write_rois

    labels = _dense_labels(seed=3)
    write_rois(tmp_path / "r.zip", labels)
    rois = roiread(tmp_path / "r.zip")
    assert sorted(int(r.name) for r in rois) == np.unique(labels[labels > 0]).tolist()


# ------------------------------------------------------------------ 9: workers die with their parent


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_workers_and_resource_tracker_exit_when_the_parent_is_killed(tiny_bundle, tmp_path):
    psutil = pytest.importorskip("psutil")
    _tiffs(tmp_path / "d", 60)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "triageseg", "segment", str(tmp_path / "d"), "--bundle",
                             str(tiny_bundle), "--out", str(out), "--workers", "1", "--modality", "he", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    parent = psutil.Process(proc.pid)
    children: list = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            children = parent.children(recursive=True)
            if len(children) >= 2 and list(out.glob("*.tif")):  # the worker + the resource tracker, working
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        assert len(children) >= 2
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _, alive = psutil.wait_procs(children, timeout=15)
        assert [p.pid for p in alive if p.status() != psutil.STATUS_ZOMBIE] == []
    finally:
        for child in children:  # only what this test started
            if child.is_running():
                child.kill()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
