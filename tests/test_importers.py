"""datasets.importers: DSB 2018 and BBBC039 folders built in their exact on-disk format."""

from __future__ import annotations

import hashlib
import json

import imagecodecs
import numpy as np
import pytest
import tifffile

from triageseg.datasets.errors import DataError
from triageseg.datasets.importers import (
    decode_colour_labels,
    import_bbbc039,
    import_dsb2018,
    merge_binary_masks,
)
from triageseg.datasets.io import read_image, read_labels
from triageseg.datasets.layout import Dataset


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(imagecodecs.png_encode(array))


def _tree(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _dsb_image(root, key, boxes, shape=(12, 14)):
    """<id>/images/<id>.png (RGBA, as in stage1_train) and one 0/255 mask png per box."""
    rgba = np.zeros(shape + (4,), np.uint8)
    rgba[..., 3] = 255
    for k, (y0, y1, x0, x1) in enumerate(boxes):
        rgba[y0:y1, x0:x1, :3] = 100 + 40 * k
        mask = np.zeros(shape, np.uint8)
        mask[y0:y1, x0:x1] = 255
        _png(root / key / "masks" / f"m{k:02d}.png", mask)
    _png(root / key / "images" / f"{key}.png", rgba)


def test_merge_binary_masks_smaller_wins_then_first():
    big = np.zeros((6, 6), bool)
    big[0:4, 0:4] = True
    small = np.zeros((6, 6), bool)
    small[2:4, 2:5] = True
    labels, overlap = merge_binary_masks([big, small])
    assert overlap == 4
    assert labels[3, 3] == 2 and labels[0, 0] == 1 and labels[2, 4] == 2
    same_a = np.zeros((6, 6), bool)
    same_a[0:2, 0:2] = True
    same_b = np.zeros((6, 6), bool)
    same_b[1:3, 1:3] = True
    labels, overlap = merge_binary_masks([same_a, same_b])
    assert overlap == 1 and labels[1, 1] == 1  # equal areas: the first mask wins


def test_import_dsb2018_with_classes(tmp_path):
    src = tmp_path / "stage1_train"
    _dsb_image(src, "aaa", [(1, 5, 1, 5), (3, 7, 3, 9)])  # overlapping pair
    _dsb_image(src, "bbb", [(2, 6, 2, 6)])
    _dsb_image(src, "ccc", [(0, 3, 0, 3)])
    _dsb_image(src, "ddd", [])
    (src / "ddd" / "masks").mkdir(parents=True)
    _dsb_image(src, "eee", [(5, 9, 5, 9)])
    classes = tmp_path / "classes.csv"
    classes.write_text(
        "filename,foreground,background\naaa.png,white,black\nbbb.png,purple,purple\n"
        "ccc.png,white,black\nddd.png,green,black\n"
    )
    before = _tree(src)
    dst = import_dsb2018(src, tmp_path / "out", classes_csv=classes)
    assert _tree(src) == before  # the source is never modified
    ds = Dataset(dst)
    ds.check()
    assert [s.id for s in ds.samples] == ["aaa", "bbb", "ccc", "ddd", "eee"]
    assert {s.id: s.modality for s in ds.samples} == {
        "aaa": "fluorescence",
        "bbb": "he",
        "ccc": "fluorescence",
        "ddd": "unknown",
        "eee": "unknown",
    }
    assert {s.split for s in ds.samples} <= {"train", "val"}
    assert ds.select(modality="fluorescence", split="val") and ds.select(modality="fluorescence", split="train")
    labels = read_labels(dst / "labels" / "aaa.tif")
    # mask 0 has 16 px, mask 1 has 24 px: the shared pixels (rows 3-4, cols 3-4) go to mask 0
    assert labels[4, 4] == 1 and labels[5, 5] == 2 and labels[2, 2] == 1 and labels.max() == 2
    assert np.bincount(labels.ravel()).tolist() == [168 - 16 - 20, 16, 20]
    assert read_labels(dst / "labels" / "ddd.tif").max() == 0
    assert (dst / "images" / "aaa.png").read_bytes() == (src / "aaa" / "images" / "aaa.png").read_bytes()
    assert read_image(dst / "images" / "aaa.png").shape == (12, 14, 3)  # RGBA read, alpha dropped
    info = json.loads((dst / "import.json").read_text())
    assert info["overlap_pixels"] == 4 and info["n_images"] == 5
    assert any("green/black" in n for n in info["notes"]) and any("train/val split" in n for n in info["notes"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.csv", "out", "stage1_train"]  # no staging left


def test_import_dsb2018_is_deterministic_and_without_classes_unknown(tmp_path):
    src = tmp_path / "stage1_train"
    for i in range(6):
        _dsb_image(src, f"id{i}", [(1, 4, 1, 4)])
    a = import_dsb2018(src, tmp_path / "a")
    b = import_dsb2018(src, tmp_path / "b")
    assert (a / "splits.csv").read_text() == (b / "splits.csv").read_text()
    ds = Dataset(a)
    assert ds.modalities == ["unknown"]
    assert [s.split for s in ds.samples].count("val") == 1  # round(6 * 0.2)
    assert any("no classes.csv" in n for n in json.loads((a / "import.json").read_text())["notes"])
    custom = import_dsb2018(
        src,
        tmp_path / "c",
        classes_csv=_write(tmp_path / "k.csv", "filename,foreground,background\nid0.png,White,Black\n"),
        modality_map={("white", "black"): "dapi"},
    )
    assert Dataset(custom).samples[0].modality == "dapi"


def _write(path, text):
    path.write_text(text)
    return path


def test_import_dsb2018_errors(tmp_path):
    src = tmp_path / "s"
    _dsb_image(src, "aaa", [(1, 4, 1, 4)])
    _png(src / "aaa" / "masks" / "bad.png", np.zeros((5, 5), np.uint8))
    with pytest.raises(DataError, match=r"bad.png: mask shape \(5, 5\) != image shape \(12, 14\)"):
        import_dsb2018(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (src / "aaa" / "masks" / "bad.png").unlink()
    with pytest.raises(DataError, match="outside the source"):
        import_dsb2018(src, src / "inside")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(DataError, match="not empty"):
        import_dsb2018(src, tmp_path / "full")
    import_dsb2018(src, tmp_path / "full", overwrite=True)
    assert not (tmp_path / "full" / "x").exists()
    with pytest.raises(DataError, match="expected a header 'filename,foreground,background'"):
        import_dsb2018(src, tmp_path / "o2", classes_csv=_write(tmp_path / "c.csv", "a,b\n"))
    with pytest.raises(DataError, match="source folder not found"):
        import_dsb2018(tmp_path / "nope", tmp_path / "o3")


def _bbbc039(root, names, splits):
    """images/<name>.tif 16-bit, masks/<name>.png RGB colour-coded, metadata/*.txt listing mask names."""
    shape = (16, 20)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        image = np.full(shape, 300 + i, np.uint16)
        image[2:8, 2:9] = 4000
        tifffile.imwrite(root / "images" / f"{name}.tif", image)
        mask = np.zeros(shape + (3,), np.uint8)
        mask[2:8, 2:5, 0] = 2  # touching pair: values 2 and 3 ...
        mask[2:8, 5:9, 0] = 3
        mask[11:14, 1:4, 0] = 1  # ... and two separate nuclei sharing the value 1
        mask[11:14, 12:16, 0] = 1
        _png(root / "masks" / f"{name}.png", mask)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    for list_name, members in splits.items():
        (root / "metadata" / list_name).write_text("".join(f"{names[j]}.png\n" for j in members))


def test_decode_colour_labels_rgb_and_gray():
    mask = np.zeros((6, 8, 3), np.uint8)
    mask[0:2, 0:2, 0] = 1
    mask[0:2, 5:8, 0] = 1
    mask[3:6, 0:3, 0] = 2
    mask[3:6, 3:5, 0] = 3  # touches the value-2 nucleus
    labels = decode_colour_labels(mask)
    assert labels.max() == 4 and labels[0, 0] != labels[0, 6] and labels[4, 1] != labels[4, 3]
    gray = np.zeros((6, 8), np.uint16)
    gray[0:2, 0:2] = 7
    gray[3:6, 0:3] = 300
    gray[3:6, 3:5] = 301
    assert decode_colour_labels(gray).max() == 3
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[0:2, 0:2] = (10, 20, 30)
    colour[0:2, 2:4] = (10, 20, 31)  # differs in blue only: another nucleus
    assert decode_colour_labels(colour).max() == 2


def test_import_bbbc039(tmp_path):
    src = tmp_path / "BBBC039"
    names = [f"IXMtest_A0{i}_s1_w1{i}" for i in range(5)]
    _bbbc039(src, names, {"training.txt": [0, 1, 2], "validation.txt": [3], "test.txt": [4]})
    before = _tree(src)
    dst = import_bbbc039(src, tmp_path / "out")
    assert _tree(src) == before
    ds = Dataset(dst)
    ds.check()
    assert ds.modalities == ["fluorescence"]
    assert {s.id: s.split for s in ds.samples} == dict(
        zip(names, ["train", "train", "train", "val", "test"], strict=True)
    )
    image, labels = ds.load(ds.samples[0])
    assert image.shape == (16, 20, 3) and labels.max() == 4
    assert np.unique(labels[2:8, 2:5]).size == 1 and labels[4, 3] != labels[4, 6]
    assert labels[12, 2] != labels[12, 13] and labels[12, 2] > 0
    assert tifffile.imread(dst / "images" / f"{names[0]}.tif").dtype == np.uint16


def test_import_bbbc039_errors_and_missing_metadata(tmp_path):
    src = tmp_path / "b"
    names = ["x0", "x1", "x2", "x3"]
    _bbbc039(src, names, {"training.txt": [0, 1], "test.txt": [0]})
    with pytest.raises(DataError, match="also listed for train"):
        import_bbbc039(src, tmp_path / "o1")
    (src / "metadata" / "test.txt").write_text("x9.png\n")
    with pytest.raises(DataError, match="test.txt: lists 'x9.png' but images/ has no such image"):
        import_bbbc039(src, tmp_path / "o2")
    (src / "metadata" / "test.txt").write_text("x3.png\n")
    (src / "masks" / "x3.png").unlink()
    with pytest.raises(DataError, match="no mask for image x3.tif"):
        import_bbbc039(src, tmp_path / "o3")
    _bbbc039(src, names, {})
    for p in (src / "metadata").iterdir():
        p.unlink()
    (src / "metadata").rmdir()
    ds = Dataset(import_bbbc039(src, tmp_path / "o4"))
    assert sorted(s.split for s in ds.samples) == ["test", "train", "train", "val"]


def _run_cli(*args):
    from click.testing import CliRunner

    import triageseg.cli.data_cmds  # noqa: F401  (registers the data commands)
    from triageseg.cli.groups import cli

    return CliRunner().invoke(cli, list(args))


def test_cli_import(tmp_path):
    src = tmp_path / "BBBC039"
    _bbbc039(src, ["a", "b", "c"], {"training.txt": [0, 1], "test.txt": [2]})
    result = _run_cli("data", "import", "bbbc039", str(src), str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert f"3 images in {tmp_path / 'out'}: fluorescence 3 (train 2 test 1)" in result.output
    assert "note: metadata/validation.txt missing" in result.output
    dsb = tmp_path / "stage1_train"
    _dsb_image(dsb, "k1", [(1, 4, 1, 4)])
    _dsb_image(dsb, "k2", [(1, 4, 1, 4)])
    classes = _write(
        tmp_path / "classes.csv", "filename,foreground,background\nk1.png,purple,white\nk2.png,purple,white\n"
    )
    result = _run_cli("data", "import", "dsb2018", str(dsb), str(tmp_path / "d"), "--classes", str(classes))
    assert result.exit_code == 0, result.output
    assert "he 2 (train 1 val 1)" in result.output
    assert _run_cli("data", "import", "dsb2018", str(dsb), str(tmp_path / "d")).exit_code == 1  # not empty
    assert _run_cli("data", "import", "coco", str(dsb), str(tmp_path / "z")).exit_code == 2
    assert _run_cli("data", "import", "--help").exit_code == 0
