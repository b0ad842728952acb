"""``triageseg evaluate`` and the folder evaluation behind it."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner

import triageseg.cli.evaluate_cmd as evaluate_cmd  # registers the command
from triageseg.cli.groups import cli
from triageseg.datasets.errors import DataError
from triageseg.datasets.io import read_labels, write_labels
from triageseg.postprocess.folders import evaluate_folders
from triageseg.postprocess.metrics import PROTOCOLS, evaluate
from triageseg.postprocess.report import format_table


def square(value, top, left, size=8, shape=(32, 32)):
    lab = np.zeros(shape, np.uint16)
    lab[top:top + size, left:left + size] = value
    return lab


@pytest.fixture
def folders(tmp_path):
    """Three GT images over two modalities; predictions with known errors."""
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gts = {
        "a": square(1, 2, 2) + square(2, 20, 20),
        "b": square(5, 4, 4),
        "c": square(9, 10, 10, size=10),
    }
    preds = {
        "a": square(3, 2, 3) + square(4, 20, 20),  # one shifted by 1 px (IoU 56/72), one exact
        "b": np.zeros((32, 32), np.uint16),  # missed
        "c": square(9, 10, 10, size=10) + square(2, 0, 24, size=4),  # exact + one extra
    }
    for key in gts:
        write_labels(gt_dir / f"{key}.tif", gts[key])
        write_labels(pred_dir / f"{key}.tif", preds[key])
    mods = tmp_path / "modalities.csv"
    mods.write_text("id,modality\na,fluorescence\nb,fluorescence\nc,he\nzz,he\n")
    return gt_dir, pred_dir, mods, gts, preds


def run(*args):
    return CliRunner().invoke(cli, ["evaluate", *map(str, args)])


def test_protocol_names_agree():
    assert evaluate_cmd._PROTOCOLS == PROTOCOLS


def test_table_json_and_csv(folders, tmp_path):
    gt_dir, pred_dir, mods, gts, preds = folders
    out_json, out_csv = tmp_path / "r" / "s.json", tmp_path / "s.csv"
    res = run(pred_dir, gt_dir, "--modalities", mods, "--json", out_json, "--csv", out_csv)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert any(line.startswith("fluorescence") for line in lines)
    assert any(line.startswith("he") for line in lines)
    overall = next(line for line in lines if line.startswith("overall"))
    assert overall.split()[1:3] == ["3", "4/4"]  # images, objects gt/pred
    data = json.loads(out_json.read_text())
    assert list(data) == ["protocol", "thresholds", "overall", "per_modality", "per_image"]
    assert list(data["overall"]) == ["mean_f1", "f1", "precision", "recall", "tp", "fp", "fn", "n_images"]
    assert set(data["per_modality"]) == {"fluorescence", "he"}
    assert data["per_modality"]["fluorescence"]["n_images"] == 2
    expected = evaluate([gts[k] for k in "abc"], [preds[k] for k in "abc"])
    assert data["overall"]["mean_f1"] == pytest.approx(expected.mean_f1)
    assert data["overall"]["tp"] == expected.tp.tolist()
    # exact counts: at IoU 0.5 a matches 2, b misses 1, c matches 1 and has 1 extra
    assert (data["overall"]["tp"][0], data["overall"]["fp"][0], data["overall"]["fn"][0]) == (3, 1, 1)
    assert [e["id"] for e in data["per_image"]] == ["a", "b", "c"]
    assert data["per_image"][1]["modality"] == "fluorescence"
    rows = list(csv.DictReader(io.StringIO(out_csv.read_text())))
    assert [r["id"] for r in rows] == ["a", "b", "c"] and rows[2]["fp@0.50"] == "1"


@pytest.mark.parametrize("protocol", ["caicedo2019", "dsb2018"])
def test_other_protocols(folders, protocol, tmp_path):
    gt_dir, pred_dir, _, _, _ = folders
    res = run(pred_dir, gt_dir, "--protocol", protocol, "--json", tmp_path / "s.json")
    assert res.exit_code == 0, res.output
    assert f"protocol {protocol}" in res.output
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["protocol"] == protocol
    assert len(data["thresholds"]) == (9 if protocol == "caicedo2019" else 10)
    assert ("mean_ap" in data["overall"]) == (protocol == "dsb2018")
    assert ("errors" in data["overall"]) == (protocol == "caicedo2019")


def test_missing_pairs_are_errors_naming_ids(folders):
    gt_dir, pred_dir, _, _, _ = folders
    (pred_dir / "b.tif").unlink()
    res = run(pred_dir, gt_dir)
    assert res.exit_code == 1 and "no prediction for ground-truth ids: b" in res.output
    allowed = evaluate_folders(pred_dir, gt_dir, allow_missing=True)
    assert allowed.missing_pred == ("b",) and allowed.overall.fn[0] == 1
    assert run(pred_dir, gt_dir, "--allow-missing").exit_code == 0
    write_labels(pred_dir / "extra.tif", square(1, 0, 0))
    res = run(pred_dir, gt_dir)
    assert res.exit_code == 1 and "no prediction for ground-truth ids: b" in res.output
    assert "for predicted ids: extra" in res.output


def test_data_errors_exit_1_with_the_file(folders, tmp_path):
    gt_dir, pred_dir, mods, _, _ = folders
    write_labels(pred_dir / "c.tif", np.zeros((16, 16), np.uint16))
    res = run(pred_dir, gt_dir)
    assert res.exit_code == 1 and "c.tif" in res.output and "shape" in res.output
    assert "Traceback" not in res.output
    res = run(tmp_path / "nowhere", gt_dir)
    assert res.exit_code == 1 and "nowhere" in res.output
    partial = tmp_path / "partial.csv"
    partial.write_text("id,modality\na,fluorescence\n")
    res = run(pred_dir, gt_dir, "--modalities", partial)
    assert res.exit_code == 1 and "no modality for ids: b, c" in res.output
    bad = tmp_path / "bad.csv"
    bad.write_text("name,kind\na,x\n")
    res = run(pred_dir, gt_dir, "--modalities", bad)
    assert res.exit_code == 1 and "id,modality" in res.output


def test_usage_errors_exit_2(folders):
    gt_dir, pred_dir, _, _, _ = folders
    assert run(pred_dir, gt_dir, "--protocol", "coco").exit_code == 2
    assert run(pred_dir).exit_code == 2


def test_dataset_root_and_synthetic_data(synth_data, tmp_path):
    pred_dir = tmp_path / "pred"
    for path in sorted((synth_data / "labels").glob("*.tif")):
        write_labels(pred_dir / path.name, read_labels(path))  # perfect predictions
    report = evaluate_folders(pred_dir, synth_data)  # a dataset root: labels/ + modalities.csv
    assert report.overall.mean_f1 == 1.0 and report.overall.n_images == 24
    assert set(report.per_modality) == {"fluorescence", "brightfield", "he"}
    table = format_table(report)
    assert table.splitlines()[-1].startswith("overall")
    res = run(pred_dir, synth_data)
    assert res.exit_code == 0 and "brightfield" in res.output
    one = tmp_path / "one.csv"
    one.write_text("id,modality\n" + "".join(f"{p.stem},all\n" for p in pred_dir.glob("*.tif")))
    res = run(pred_dir, synth_data, "--modalities", one)  # explicit CSV with a dataset root
    assert res.exit_code == 0 and "\nall " in res.output and "brightfield" not in res.output


def test_duplicate_ids_are_refused(folders):
    gt_dir, pred_dir, _, gts, _ = folders
    write_labels(pred_dir / "a.png", gts["a"].astype(np.uint8))
    with pytest.raises(DataError, match="two files with id 'a'"):
        evaluate_folders(pred_dir, gt_dir)


def test_help():
    res = CliRunner().invoke(cli, ["evaluate", "--help"])
    assert res.exit_code == 0 and "--allow-missing" in res.output and "--protocol" in res.output


def test_report_from_results_groups_by_modality():
    from triageseg.postprocess.folders import report_from_results
    from triageseg.postprocess.metrics import match_image

    a, b = square(1, 2, 2), square(1, 10, 10)
    results = [match_image(a, a, id="x"), match_image(b, np.zeros_like(b), id="y"), match_image(a, a, id="z")]
    report = report_from_results(results, {"x": "he", "y": "he"})
    assert sorted(report.per_modality) == ["he", "unknown"]
    assert report.per_modality["he"].n_images == 2 and report.per_modality["he"].fn[0] == 1
    assert report.overall.n_images == 3 and report.to_dict()["per_image"][2]["modality"] == "unknown"
    plain = report_from_results(results)
    assert plain.per_modality == {} and format_table(plain).splitlines()[-1].startswith("overall")


def test_moved_names_still_import_from_metrics():
    from triageseg.postprocess import folders, metrics, report

    assert metrics.evaluate_folders is folders.evaluate_folders and metrics.FolderReport is folders.FolderReport
    assert metrics.report_from_results is folders.report_from_results
    assert metrics.read_modalities is folders.read_modalities and metrics.format_table is report.format_table
    with pytest.raises(AttributeError, match="no_such_name"):
        metrics.no_such_name  # noqa: B018
