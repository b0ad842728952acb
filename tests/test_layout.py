"""datasets.layout: listing samples, selecting, checking shapes, index files."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tifffile

from triageseg.datasets.errors import DataError
from triageseg.datasets.io import write_labels
from triageseg.datasets.layout import Dataset, Sample, write_index


def _make(root, ids=("a", "b", "c"), shape=(8, 10)):
    (root / "images").mkdir(parents=True)
    for i, key in enumerate(ids):
        tifffile.imwrite(root / "images" / f"{key}.tif", np.full(shape, i * 10 + 1, np.uint16))
        lab = np.zeros(shape, np.uint16)
        lab[1:4, 1:4] = i + 1
        write_labels(root / "labels" / f"{key}.tif", lab)
    return root


def test_samples_modalities_splits_and_select(tmp_path):
    root = _make(tmp_path / "ds")
    write_index(
        root, modalities={"a": "he", "b": "fluorescence", "c": "he"}, splits={"a": "train", "b": "val", "c": "test"}
    )
    assert (root / "modalities.csv").read_text() == "id,modality\na,he\nb,fluorescence\nc,he\n"
    ds = Dataset(root)
    assert ds.root == root and len(ds) == 3
    assert ds.samples[0] == Sample("a", root / "images/a.tif", root / "labels/a.tif", "he", "train")
    assert ds.modalities == ["fluorescence", "he"]
    assert [s.id for s in ds.select(modality="he")] == ["a", "c"]
    assert [s.id for s in ds.select(split="train", modality="he")] == ["a"]
    assert [s.id for s in ds.select(split=("val", "test"))] == ["b", "c"]
    with pytest.raises(ValueError, match="valid: train, val, test"):
        ds.select(split="validation")
    ds.check()
    image, labels = ds.load(ds.samples[1])
    assert image.shape == (8, 10, 3) and image.dtype == np.float32
    assert labels.dtype == np.uint32 and labels.max() == 2
    assert ds.counts() == {"he": {"train": 1, "test": 1}, "fluorescence": {"val": 1}}


def test_ids_hash_depends_on_ids_only(tmp_path):
    ds = Dataset(_make(tmp_path / "ds"))
    h = Dataset.ids_hash(ds.samples)
    assert h == ds.ids_hash(list(reversed(ds.samples)))
    assert h != ds.ids_hash(ds.samples[:2]) and len(h) == 64


def test_missing_csv_gives_none_and_missing_labels_are_reported(tmp_path):
    root = _make(tmp_path / "ds")
    (root / "labels" / "b.tif").unlink()
    ds = Dataset(root)
    assert all(s.modality is None and s.split is None for s in ds.samples)
    assert ds.samples[1].label_path is None and ds.modalities == []
    with pytest.raises(DataError, match="b.tif: no labels"):
        ds.check()
    with pytest.raises(DataError, match="no labels"):
        ds.load(ds.samples[1])


def test_check_names_shape_mismatch(tmp_path):
    root = _make(tmp_path / "ds")
    write_labels(root / "labels" / "c.tif", np.zeros((8, 9), np.uint8))
    ds = Dataset(root)
    with pytest.raises(DataError, match=r"c.tif: labels shape \(8, 9\) != image shape \(8, 10\)"):
        ds.check()
    with pytest.raises(DataError, match="labels shape"):
        ds.load(ds.samples[2])


def test_bad_layouts(tmp_path):
    with pytest.raises(DataError, match="no images/ folder"):
        Dataset(tmp_path)
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="no images"):
        Dataset(tmp_path)
    root = _make(tmp_path / "ds")
    shutil.copy(root / "images" / "a.tif", root / "images" / "a.png")
    with pytest.raises(DataError, match="share the id 'a'"):
        Dataset(root)
    (root / "images" / "a.png").unlink()
    (root / "splits.csv").write_text("id,split\na,train\nb,holdout\n")
    with pytest.raises(DataError, match="unknown split"):
        Dataset(root)
    (root / "splits.csv").write_text("id,split\na,train\nzzz,val\n")
    with pytest.raises(DataError, match="splits.csv: 1 id.*zzz"):
        Dataset(root)
    (root / "splits.csv").write_text("name,split\na,train\n")
    with pytest.raises(DataError, match="expected a header 'id,split'"):
        Dataset(root)
    with pytest.raises(ValueError, match="unknown split"):
        write_index(root, modalities={}, splits={"a": "training"})
