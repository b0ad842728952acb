"""OME-Zarr (NGFF): lazy input at any level, label pyramids out, broken zarrs refused naming the file."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

pytest.importorskip("ome_zarr")

from triageseg.datasets.errors import DataError  # noqa: E402
from triageseg.datasets.omezarr import OmeZarrImage, read_record, verify_zarr, write_labels_zarr  # noqa: E402


def _labels(h: int = 700, w: int = 530) -> np.ndarray:
    rng = np.random.default_rng(0)
    labels = np.zeros((h, w), np.uint32)
    for k in range(1, 60):
        y, x = rng.integers(0, h - 12), rng.integers(0, w - 12)
        labels[y : y + 10, x : x + 10] = k
    labels[:200] = 0  # whole empty chunks: stored too, so a missing chunk is visible
    return labels


def _write(path: Path, labels: np.ndarray, **kwargs) -> list[tuple[int, int]]:
    asked = []

    def read_rows(y0: int, y1: int) -> np.ndarray:
        asked.append((y0, y1))
        return labels[y0:y1]

    write_labels_zarr(path, labels.shape, labels.dtype, read_rows, tile=128, smallest=200, **kwargs)
    return asked


def test_labels_round_trip_keeps_pixels_pixel_size_and_record(tmp_path):
    labels = _labels()
    path = tmp_path / "slide.ome.zarr"
    asked = _write(path, labels, pixel_size=(0.5, 0.25), record={"output": "slide.ome.zarr"})
    assert sorted(asked) == [(y, min(700, y + 128)) for y in range(0, 700, 128)]  # each strip read once
    with OmeZarrImage(path, labels="slide") as image:
        assert image.shape == labels.shape and image.dtype == np.uint32
        assert np.array_equal(image[0:700, 0:530], labels)
        assert np.array_equal(image[100:300, 50:60], labels[100:300, 50:60])
        assert image.pixel_size == pytest.approx((0.5, 0.25))
        assert image.levels == [(700, 530), (350, 265), (175, 133)]  # halved rounding up, as the OME-TIFF's
    for level in (1, 2):
        with OmeZarrImage(path, labels="slide", level=level) as coarse:
            assert coarse.pixel_size == pytest.approx((0.5 * 2**level, 0.25 * 2**level))  # exactly 2**k: strided
            h, w = coarse.shape
            assert np.array_equal(coarse[0:h, 0:w], labels[:: 2**level, :: 2**level])  # every 2**k-th pixel
    assert read_record(path) == {"output": "slide.ome.zarr"}
    assert verify_zarr(path, (700, 530)) is None
    assert "differs" in verify_zarr(path, (700, 531))
    assert not [p for p in tmp_path.iterdir() if p.name != "slide.ome.zarr"]  # no temporaries left


def test_ngff_image_input_any_level_channels_last(tmp_path):
    import zarr
    from ome_zarr.writer import write_image

    rgb = np.random.default_rng(1).integers(0, 255, (3, 300, 410), dtype=np.uint8)
    write_image(rgb, zarr.open_group(tmp_path / "in.ome.zarr", mode="w"), axes="cyx",
                scale={"c": 1.0, "y": 0.3, "x": 0.3}, axes_units={"y": "micrometer", "x": "micrometer"})
    with OmeZarrImage(tmp_path / "in.ome.zarr") as image:
        assert image.shape == (300, 410, 3) and image.pixel_size == pytest.approx((0.3, 0.3))
        assert np.array_equal(image[10:20, 5:9], np.moveaxis(rgb[:, 10:20, 5:9], 0, -1))
    with OmeZarrImage(tmp_path / "in.ome.zarr", level=1) as image:
        assert image.shape == (150, 205, 3) and image.pixel_size == pytest.approx((0.6, 0.6))
    with pytest.raises(DataError, match="level 9"):
        OmeZarrImage(tmp_path / "in.ome.zarr", level=9)


def test_broken_zarrs_are_refused_naming_the_file(tmp_path):
    labels = _labels()
    good = tmp_path / "good.ome.zarr"
    _write(good, labels, record={})

    no_root = tmp_path / "a.ome.zarr"
    shutil.copytree(good, no_root)
    (no_root / "zarr.json").unlink()
    with pytest.raises(DataError, match=r"a\.ome\.zarr/zarr\.json"):
        OmeZarrImage(no_root, labels="good")
    assert "zarr.json" in verify_zarr(no_root)

    no_level = tmp_path / "b.ome.zarr"
    shutil.copytree(good, no_level)
    (no_level / "labels" / "good" / "s1" / "zarr.json").unlink()
    with pytest.raises(DataError, match=r"b\.ome\.zarr/labels/good/s1/zarr\.json"):
        OmeZarrImage(no_level, labels="good")
    assert "s1" in verify_zarr(no_level)

    no_chunk = tmp_path / "c.ome.zarr"
    shutil.copytree(good, no_chunk)
    next((no_chunk / "labels" / "good" / "s0").rglob("c/0/0")).unlink()  # an empty chunk, cut off
    assert "chunks" in verify_zarr(no_chunk)

    cut_chunk = tmp_path / "d.ome.zarr"
    shutil.copytree(good, cut_chunk)
    chunk = cut_chunk / "labels" / "good" / "s0" / "c" / "3" / "1"
    chunk.write_bytes(chunk.read_bytes()[:7])
    with OmeZarrImage(cut_chunk, labels="good") as image, pytest.raises(DataError, match=r"d\.ome\.zarr/labels/good/s0"):
        image[384:512, 128:256]

    no_record = tmp_path / "e.ome.zarr"
    _write(no_record, labels)  # no record: what a write cut before its end leaves
    assert "record" in verify_zarr(no_record)
    assert verify_zarr(tmp_path / "missing.ome.zarr") is not None


def _mosaic(tmp_path: Path) -> Path:
    from triageseg.datasets.synth import synth_sample

    rng = np.random.default_rng(0)
    tiles = [synth_sample("fluorescence", size=192, rng=rng)[0] for _ in range(6)]
    image = np.concatenate([np.concatenate(tiles[:3], axis=1), np.concatenate(tiles[3:], axis=1)], axis=0)
    path = tmp_path / "in" / "mosaic.tif"
    path.parent.mkdir()
    tifffile.imwrite(path, image, tile=(128, 128), compression="zlib", resolution=(1 / 0.4, 1 / 0.4),
                     resolutionunit="MICROMETER", photometric="rgb" if image.ndim == 3 else "minisblack")
    return path


def test_segment_format_ome_zarr_equals_the_tiff_labels_and_resumes(tmp_path, tiny_bundle):
    from triageseg.cli.main import cli
    from triageseg.datasets.io import read_labels, read_pixel_size

    path = _mosaic(tmp_path)
    base = ["segment", str(path), "--bundle", str(tiny_bundle), "--quiet", "--block-size", "192", "--block-margin", "32"]
    res = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "tif"), "--blocks-above", "0"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "zarr"), "--format", "ome-zarr"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "zarr" / "mosaic.ome.zarr"
    expected = read_labels(tmp_path / "tif" / "mosaic.tif")
    with OmeZarrImage(out, labels="mosaic") as labels:
        assert np.array_equal(labels[0:384, 0:576], expected)  # the same block path: the same ids
        assert labels.pixel_size == pytest.approx((0.4, 0.4))
    row = next(csv.DictReader((tmp_path / "zarr" / "routing.csv").open()))
    assert row["output"] == "mosaic.ome.zarr" and row["mode"] == "blocks"
    assert read_record(out)["routing"]["output"] == "mosaic.ome.zarr"  # the routing.csv row, as in a TIFF

    # an OME-Zarr input, read lazily: the same labels as from the TIFF
    import zarr
    from ome_zarr.writer import write_image

    pixels = tifffile.imread(path)
    write_image(np.moveaxis(pixels, -1, 0) if pixels.ndim == 3 else pixels,
                zarr.open_group(tmp_path / "in" / "copy.ome.zarr", mode="w"),
                axes="cyx" if pixels.ndim == 3 else "yx", scale={"c": 1.0, "y": 0.4, "x": 0.4} if pixels.ndim == 3
                else {"y": 0.4, "x": 0.4}, axes_units={"y": "micrometer", "x": "micrometer"})
    res = CliRunner().invoke(cli, ["segment", str(tmp_path / "in" / "copy.ome.zarr"), "--bundle", str(tiny_bundle),
                                   "--quiet", "--block-size", "192", "--block-margin", "32",
                                   "--out", str(tmp_path / "fromzarr")])
    assert res.exit_code == 0, res.output
    assert np.array_equal(read_labels(tmp_path / "fromzarr" / "copy.tif"), expected)
    assert read_pixel_size(tmp_path / "fromzarr" / "copy.tif") == pytest.approx((0.4, 0.4))  # from the NGFF scale

    # a rerun skips the verified zarr; a half-written one (record missing) is done again
    res = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "zarr"), "--format", "ome-zarr"])
    assert res.exit_code == 0 and "1 skipped" in res.output.replace("already done", "skipped"), res.output
    import json

    meta = json.loads((out / "zarr.json").read_text())
    meta["attributes"].pop("triageseg")
    (out / "zarr.json").write_text(json.dumps(meta))
    assert verify_zarr(out) is not None
    res = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "zarr"), "--format", "ome-zarr"])
    assert res.exit_code == 0, res.output
    assert verify_zarr(out, (384, 576)) is None


def test_labels_to_a_uri_through_fsspec():
    labels = _labels(300, 200).astype(np.uint16)
    uri = "memory://bucket/run7/slide.ome.zarr"
    write_labels_zarr(uri, labels.shape, labels.dtype, lambda a, b: labels[a:b], tile=128, pixel_size=0.5,
                      record={"k": 1}, smallest=100)
    with OmeZarrImage(uri, labels="slide") as image:
        assert np.array_equal(image[0:300, 0:200], labels) and image.pixel_size == pytest.approx((0.5, 0.5))
    assert verify_zarr(uri, (300, 200)) is None and read_record(uri) == {"k": 1}
    assert verify_zarr("memory://bucket/run7/none.ome.zarr") is not None


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("shape", [(1031, 777), (2100, 1500)])
def test_bands_in_any_order_elsewhere_give_the_same_zarr_and_strided_levels(tmp_path, shape):
    """Bands pickled (as they travel to a Ray worker) and run last first: the same bytes as here, in order;
    every level is labels[::2**k, ::2**k] with sides halved rounding up and scale exactly 2**k, odd sides too."""
    import json

    cloudpickle = pytest.importorskip("cloudpickle")  # how Ray sends a task's function and arguments
    from triageseg.datasets.zarrpyramid import LabelTasks

    class Elsewhere(LabelTasks):
        def __init__(self):
            self.calls = []

        def map(self, fn, calls):
            for args in reversed(calls):
                self.calls.append(args[3:7])
                fn(*cloudpickle.loads(cloudpickle.dumps(args)))

    labels = _labels(*shape)
    labels[-1, :] = 77  # the last row and column: kept at every level only where the side is odd
    labels[:, -1] = 78
    tasks = Elsewhere()
    for folder, kwargs in (("here", {}), ("there", {"tasks": tasks}), ("stages", {"band_levels": 1})):
        write_labels_zarr(tmp_path / folder / "s.ome.zarr", shape, np.uint32, lambda a, b: labels[a:b], tile=64,
                          smallest=100, pixel_size=0.5, record={"k": 1}, **kwargs)
    # stages (0..2), (2..4), ...: bands of 4 chunk rows of level 0, then of level 2, ...
    n_levels = 5 if shape[0] < 2048 else 6
    assert sorted({c[:2] for c in tasks.calls}) == [(0, 2), (2, 4), (4, 5)][: 2 if n_levels == 5 else 3]
    assert sorted(c[2:] for c in tasks.calls if c[0] == 0) == [(y, min(shape[0], y + 256))
                                                               for y in range(0, shape[0], 256)]
    here = _tree(tmp_path / "here" / "s.ome.zarr")
    assert len(here) > 50
    assert here == _tree(tmp_path / "there" / "s.ome.zarr") == _tree(tmp_path / "stages" / "s.ome.zarr")
    h, w = shape
    expected = [(h, w)]
    while max(expected[-1]) > 100:
        expected.append((-(-expected[-1][0] // 2), -(-expected[-1][1] // 2)))
    meta = json.loads((tmp_path / "here" / "s.ome.zarr" / "labels" / "s" / "zarr.json").read_text())["attributes"]
    scales = [d["coordinateTransformations"][0]["scale"] for d in meta["ome"]["multiscales"][0]["datasets"]]
    assert scales == [[0.5 * 2**k, 0.5 * 2**k] for k in range(len(expected))]
    with OmeZarrImage(tmp_path / "here" / "s.ome.zarr", labels="s") as image:
        assert image.levels == expected and len(expected) == n_levels
    for k, (lh, lw) in enumerate(expected):
        with OmeZarrImage(tmp_path / "there" / "s.ome.zarr", labels="s", level=k) as level:
            assert np.array_equal(level[0:lh, 0:lw], labels[:: 2**k, :: 2**k])
    assert verify_zarr(tmp_path / "there" / "s.ome.zarr", shape) is None


def test_our_labels_read_by_ome_zarr_reader_as_a_multiscale_labels_image(tmp_path):
    """What napari-ome-zarr does: ome_zarr.reader finds the labels image and every level."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    labels = _labels()
    _write(tmp_path / "slide.ome.zarr", labels, pixel_size=0.5, record={})
    nodes = list(Reader(parse_url(str(tmp_path / "slide.ome.zarr" / "labels" / "slide")))())
    assert nodes and nodes[0].load(__import__("ome_zarr.reader").reader.Label) is not None
    data = nodes[0].data
    assert [tuple(d.shape) for d in data] == [(700, 530), (350, 265), (175, 133)]
    assert np.array_equal(np.asarray(data[2]), labels[::4, ::4])


def test_a_failed_band_leaves_no_output_and_a_temporary_claim_outputs_knows(tmp_path):
    from triageseg.pipeline.blockwise.journal import temporaries

    labels = _labels()

    def read_rows(y0, y1):
        if y0 >= 512:
            raise OSError("worker lost")
        return labels[y0:y1]

    with pytest.raises(OSError, match="worker lost"):
        write_labels_zarr(tmp_path / "slide.ome.zarr", labels.shape, labels.dtype, read_rows, tile=128, smallest=200)
    assert list(tmp_path.iterdir()) == []  # nothing under the output's name, the temporary removed
    # a killed writer's temporary (.slide.levels.XXXXXXXX) is one claim_outputs removes
    (tmp_path / ".slide.levels.ab3_x9zq").mkdir()
    assert temporaries(tmp_path, "slide") == [tmp_path / ".slide.levels.ab3_x9zq"]


def test_a_cut_coarse_level_is_refused_naming_it(tmp_path):
    labels = _labels()
    path = tmp_path / "slide.ome.zarr"
    _write(path, labels, record={})
    next((path / "labels" / "slide" / "s2").rglob("c/1/0")).unlink()
    assert "level 's2' holds 3 of 4 chunks" in verify_zarr(path)
    chunk = path / "labels" / "slide" / "s1" / "c" / "1" / "1"
    chunk.write_bytes(chunk.read_bytes()[:5])
    with OmeZarrImage(path, labels="slide", level=1) as image, \
            pytest.raises(DataError, match=r"slide\.ome\.zarr/labels/slide/s1"):
        image[128:256, 128:256]


def test_labels_to_s3_band_by_band_equal_the_local_zarr(s3_server, s3_bucket, tmp_path):
    """An s3:// output (moto on 127.0.0.1): bands written straight to the bucket, the record last; every
    level equals the local folder's, and verify_zarr accepts it (and refuses it once a chunk is gone)."""
    labels = _labels(531, 300)
    uri = f"{s3_bucket}/run/slide.ome.zarr"
    for target in (uri, tmp_path / "slide.ome.zarr"):
        write_labels_zarr(target, labels.shape, labels.dtype, lambda a, b: labels[a:b], tile=64, smallest=100,
                          pixel_size=0.5, record={"k": 1})
    assert verify_zarr(uri, labels.shape) is None and read_record(uri) == {"k": 1}
    with OmeZarrImage(tmp_path / "slide.ome.zarr", labels="slide") as image:
        levels = image.levels
    assert len(levels) == 4
    for k, (h, w) in enumerate(levels):
        with OmeZarrImage(uri, labels="slide", level=k) as there, \
                OmeZarrImage(tmp_path / "slide.ome.zarr", labels="slide", level=k) as here:
            assert np.array_equal(there[0:h, 0:w], here[0:h, 0:w]) and there.pixel_size == here.pixel_size
    fs = s3_server["fs"]
    fs.rm(f"{uri.removeprefix('s3://')}/labels/slide/s3/c/0/0")
    fs.invalidate_cache()
    assert "level 's3'" in verify_zarr(uri)
