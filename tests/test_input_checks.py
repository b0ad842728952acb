"""Small input checks: CSVs from spreadsheets, hostile bundle.json values, synth sizes, empty masks."""

from __future__ import annotations

import json
import os
import shutil

import imagecodecs
import numpy as np
import pytest
from click.testing import CliRunner

from triageseg import bundle as B
from triageseg.datasets.errors import BundleError, DataError

EXCEL = "\ufeffid,modality\r\nimg0,he\r\nimg1,fluorescence\r\n"  # Excel's "CSV UTF-8": BOM and CRLF
SPACED = "id, modality\nimg0, he\nimg1, fluorescence\n"


@pytest.mark.parametrize("text", [EXCEL, SPACED], ids=["bom", "spaced-header"])
def test_modalities_csv_from_excel_or_with_spaces_is_read(tmp_path, text):
    from triageseg.postprocess.folders import read_modalities

    path = tmp_path / "modalities.csv"
    path.write_bytes(text.encode("utf-8"))
    assert read_modalities(path) == {"img0": "he", "img1": "fluorescence"}


@pytest.mark.parametrize("text", [EXCEL, SPACED], ids=["bom", "spaced-header"])
def test_cluster_reads_known_modalities_from_excel_or_spaced_csv(tmp_path, text):
    from triageseg.router.discovery import _list_images

    for name in ("img0", "img1"):
        imagecodecs.imwrite(tmp_path / f"{name}.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "modalities.csv").write_bytes(text.encode("utf-8"))
    ids, _, known = _list_images(tmp_path)
    assert dict(zip(ids, known, strict=True)) == {"img0": "he", "img1": "fluorescence"}


def test_a_bad_modalities_header_is_shown_as_it_is(tmp_path):
    from triageseg.postprocess.folders import read_modalities

    path = tmp_path / "m.csv"
    path.write_text("name\tmodality\nimg0\the\n")
    with pytest.raises(DataError, match=r"m.csv.*'name\\tmodality'"):
        read_modalities(path)


@pytest.fixture
def manifest_of(tiny_bundle, tmp_path):
    root = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, root, copy_function=os.link)  # hard links: only bundle.json is rewritten

    def edit(**fields):
        manifest = json.loads((root / B.MANIFEST).read_text())
        manifest.update(fields)
        (root / B.MANIFEST).unlink()  # a new file, not the hard-linked one
        (root / B.MANIFEST).write_text(json.dumps(manifest))
        return root

    return edit


@pytest.mark.parametrize("value", ["high", None, [0.5], 1.5, -0.1])
def test_a_bad_confidence_threshold_names_bundle_json(manifest_of, value):
    from triageseg.pipeline import Pipeline

    root = manifest_of(fallback={"confidence_threshold": value, "policy": "generalist_else_top1"})
    with pytest.raises(BundleError) as info:
        Pipeline.from_bundle(root, device="cpu")
    assert str(root / B.MANIFEST) in str(info.value) and "confidence_threshold" in str(info.value)


def test_a_string_segmenters_value_is_refused(manifest_of):
    from triageseg.pipeline import Pipeline

    root = manifest_of(segmenters="he")
    with pytest.raises(BundleError, match="bundle.json.*segmenters must be a list"):
        Pipeline.from_bundle(root, device="cpu")


@pytest.mark.parametrize("entry", ["../../outside", "/abs/he", "a/b", "..", ".", ""])
def test_segmenter_entries_must_be_folder_names_inside_the_bundle(manifest_of, tmp_path, entry):
    from triageseg.pipeline import Pipeline

    root = manifest_of(segmenters=["he", entry])
    if entry == "../../outside":  # a real model there must not be reachable
        shutil.copytree(B.segmenter_dir(root, "he"), B.segmenter_dir(root, entry).resolve(), copy_function=os.link)
    with pytest.raises(BundleError) as info:
        Pipeline.from_bundle(root, device="cpu")
    assert "bundle.json" in str(info.value) and repr(entry) in str(info.value)


def test_synth_refuses_a_huge_size_before_writing_anything(tmp_path):
    from triageseg.cli import data_cmds
    from triageseg.cli.main import cli
    from triageseg.datasets.synth import MAX_SIZE, make_dataset

    assert data_cmds._MAX_SIZE == MAX_SIZE  # kept apart so `--help` stays import-light
    out = tmp_path / "syn"
    res = CliRunner().invoke(cli, ["data", "synth", "--out", str(out), "--n", "2", "--size", "100000"])
    assert res.exit_code == 2 and "--size" in res.output and str(MAX_SIZE) in res.output
    assert not out.exists()
    with pytest.raises(ValueError, match=f"size must be .*{MAX_SIZE}"):
        make_dataset(out, n=2, size=100000)
    assert not out.exists()


def test_dsb_image_with_an_empty_masks_folder_is_noted(tmp_path):
    from triageseg.cli.main import cli

    src = tmp_path / "stage1_train"
    for key, boxes in (("full", [(1, 4, 1, 4)]), ("empty", [])):
        (src / key / "images").mkdir(parents=True)
        (src / key / "masks").mkdir()
        imagecodecs.imwrite(src / key / "images" / f"{key}.png", np.full((8, 8, 3), 50, np.uint8))
        for y0, y1, x0, x1 in boxes:
            mask = np.zeros((8, 8), np.uint8)
            mask[y0:y1, x0:x1] = 255
            imagecodecs.imwrite(src / key / "masks" / "m0.png", mask)
    res = CliRunner().invoke(cli, ["data", "import", "dsb2018", str(src), str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "note: 1 image(s) with an empty masks/ folder imported with no nuclei: empty" in res.output
    notes = json.loads((tmp_path / "out" / "import.json").read_text())["notes"]
    assert any("empty masks/ folder" in n for n in notes)
