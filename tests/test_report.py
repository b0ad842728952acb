"""``triageseg evaluate --report``: the self-contained HTML report and the demo's report step."""

from __future__ import annotations

import csv
import re

import numpy as np
import pytest
from click.testing import CliRunner

import triageseg.cli.evaluate_cmd  # noqa: F401  (registers the command)
from triageseg.cli.groups import cli
from triageseg.datasets.errors import DataError
from triageseg.datasets.io import read_labels, write_labels
from triageseg.postprocess.folders import evaluate_folders, report_from_results, with_files
from triageseg.postprocess.metrics import match_image
from triageseg.postprocess.report import (
    confusion_from_routing,
    error_analysis,
    format_table,
    read_routing,
    render_report,
    worst_images,
    write_report,
)

EVIL = "<script>alert(1)</script>"


def square(value, top, left, size=8, shape=(32, 32)):
    lab = np.zeros(shape, np.uint16)
    lab[top:top + size, left:left + size] = value
    return lab


@pytest.fixture
def folders(tmp_path):
    """Three GT images over two modalities (one with a name to escape); predictions with known errors.

    Per-image mean F1 (default protocol): b 0 (missed), c 2/3 (one extra), a 0.8 (one object
    shifted by 1 px: IoU 56/72, matched up to 0.75): the order is b, c, a, not alphabetical.
    """
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gts = {"a": square(1, 2, 2) + square(2, 20, 20), "b": square(5, 4, 4), "c": square(9, 10, 10, size=10)}
    preds = {
        "a": square(3, 2, 3) + square(4, 20, 20),
        "b": np.zeros((32, 32), np.uint16),
        "c": square(9, 10, 10, size=10) + square(2, 0, 24, size=4),
    }
    for key in gts:
        write_labels(gt_dir / f"{key}.tif", gts[key])
        write_labels(pred_dir / f"{key}.tif", preds[key])
    mods = tmp_path / "modalities.csv"
    mods.write_text(f"id,modality\na,fluorescence\nb,fluorescence\nc,{EVIL}\n")
    return gt_dir, pred_dir, mods


def write_routing(pred_dir, rows):
    with (pred_dir / "routing.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file", "output", "modality", "confidence", "used_model", "decision"])
        writer.writeheader()
        for key, routed, conf, decision in rows:
            writer.writerow({"file": f"in/{key}.png", "output": f"{key}.tif", "modality": routed, "confidence": conf,
                             "used_model": routed, "decision": decision})


def pngs(page: str) -> int:
    return page.count('src="data:image/png;base64,')


def worst_ids(page: str) -> list[str]:
    section = page.split('id="worst"', 1)[1]
    return re.findall(r"<h3>(.*?)</h3>", section)


def test_report_contents_and_nothing_external(folders):
    gt_dir, pred_dir, mods = folders
    report = evaluate_folders(pred_dir, gt_dir, modalities=mods)
    page = render_report(report, worst=2)
    # the table exactly as the CLI prints it (escaped), figures included
    import html

    assert html.escape(format_table(report)) in page
    assert f"{report.overall.mean_f1:.4f}" in page and f"{report.per_modality['fluorescence'].mean_f1:.4f}" in page
    assert pngs(page) == 2 + 2  # F1 against IoU, errors by area, one per worst image
    assert worst_ids(page) == ["b", "c"]
    assert 'id="confusion"' not in page  # no routing.csv, no confusion matrix
    assert 'id="errors"' in page and "merges" in page
    assert "outlines are drawn on black" in page  # no images given
    # nothing external, nothing executable, every text escaped
    assert 'src="http' not in page and "href=" not in page and "<link" not in page and "<script" not in page
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'src="([^"]*)"', page))
    assert html.escape(EVIL) in page


def test_worst_images_are_ordered_by_per_image_f1(folders):
    gt_dir, pred_dir, _ = folders
    report = evaluate_folders(pred_dir, gt_dir)
    f1 = {r.id: r.mean_f1 for r in report.overall.per_image}
    assert f1["b"] == 0.0 and f1["c"] == pytest.approx(2 / 3) and f1["a"] == pytest.approx(0.8)
    assert [r.id for r in worst_images(report, 6)] == ["b", "c", "a"]
    assert [r.id for r in worst_images(report, 1)] == ["b"] and worst_images(report, 0) == []
    page = render_report(report, worst=6)
    assert worst_ids(page) == ["b", "c", "a"] and pngs(page) == 2 + 3


def test_confusion_matrix_from_routing_csv(folders, tmp_path):
    gt_dir, pred_dir, mods = folders
    write_routing(pred_dir, [("a", "fluorescence", "0.99", "routed"), ("b", EVIL, "0.6", "routed"),
                             ("c", "he", "0.4", "unknown modality -> generalist")])
    routing = read_routing(pred_dir / "routing.csv")
    report = evaluate_folders(pred_dir, gt_dir, modalities=mods)
    confusion, left_out = confusion_from_routing(routing, report.modality_of)
    assert confusion == {"fluorescence": {"fluorescence": 1, EVIL: 1}, EVIL: {"unknown modality": 1}}
    assert left_out == 0
    page = render_report(report, routing=routing, worst=1)
    assert 'id="confusion"' in page and "router accuracy: 1/3 = 0.333" in page and "<script" not in page
    assert "decision routed" in page.split('id="worst"')[1]  # b's routing under its picture
    res = CliRunner().invoke(cli, ["evaluate", str(pred_dir), str(gt_dir), "--modalities", str(mods),
                                   "--report", str(tmp_path / "out" / "r.html"), "--worst", "1"])
    assert res.exit_code == 0, res.output
    assert 'id="confusion"' in (tmp_path / "out" / "r.html").read_text()
    no_modalities = render_report(evaluate_folders(pred_dir, gt_dir), routing=routing, worst=0)
    assert 'id="confusion"' not in no_modalities and "no confusion matrix" in no_modalities
    assert 'id="worst"' not in no_modalities and pngs(no_modalities) == 2


def test_forced_rows_and_missing_rows_are_left_out():
    routing = {"x": {"modality": "he", "confidence": "", "decision": "forced"},
               "y": {"modality": "he", "confidence": "0.9", "decision": "routed"}}
    confusion, left_out = confusion_from_routing(routing, {"x": "he", "y": "he", "z": "he", "w": None})
    assert confusion == {"he": {"he": 1}} and left_out == 3


def test_read_routing_errors_name_the_file(tmp_path):
    bad = tmp_path / "routing.csv"
    bad.write_text("name,kind\na,b\n")
    with pytest.raises(DataError, match="routing.csv.*'output' and 'modality'"):
        read_routing(bad)
    with pytest.raises(DataError, match="nowhere.csv"):
        read_routing(tmp_path / "nowhere.csv")


def test_error_analysis_matches_the_caicedo_protocol(folders):
    gt_dir, pred_dir, _ = folders
    default = evaluate_folders(pred_dir, gt_dir)
    caicedo = evaluate_folders(pred_dir, gt_dir, protocol="caicedo2019")
    assert error_analysis(default) == error_analysis(caicedo)
    assert error_analysis(default)["b"].missed == (1, 0, 0, 0)
    plain = report_from_results(default.overall.per_image)  # results without their files
    assert error_analysis(plain) is None and "not available" in render_report(plain)


def test_images_beside_labels_and_their_shapes(synth_data, tmp_path):
    pred_dir = tmp_path / "pred"
    for path in sorted((synth_data / "labels").glob("*.tif"))[:5]:
        lab = read_labels(path)
        write_labels(pred_dir / path.name, np.where(lab % 3 == 0, 0, lab).astype(np.uint16))
    one = tmp_path / "five.csv"
    one.write_text("id,modality\n" + "".join(f"{p.stem},x\n" for p in pred_dir.glob("*.tif")))
    gt = tmp_path / "gt" / "labels"
    gt.mkdir(parents=True)
    for path in pred_dir.glob("*.tif"):
        (gt / path.name).write_bytes((synth_data / "labels" / path.name).read_bytes())
    (tmp_path / "gt" / "images").symlink_to(synth_data / "images")
    out = tmp_path / "report.html"
    res = CliRunner().invoke(cli, ["evaluate", str(pred_dir), str(gt), "--modalities", str(one), "--report",
                                   str(out), "--worst", "3"])
    assert res.exit_code == 0, res.output
    page = out.read_text()
    assert "on black" not in page and pngs(page) == 2 + 3 and "images: " in page
    # an image whose shape differs from its labels is an error naming the image file
    small = tmp_path / "small"
    small.mkdir()
    from PIL import Image

    report = evaluate_folders(pred_dir, gt, modalities=one)
    for r in report.overall.per_image:
        Image.fromarray(np.zeros((10, 12), np.uint8)).save(small / f"{r.id}.png")
    with pytest.raises(DataError, match=r"small/.*\.png.*differs"):
        render_report(report, images=small, worst=1)


def run(*args):
    return CliRunner().invoke(cli, ["evaluate", *map(str, args)])


def test_cli_errors_name_the_file(folders, tmp_path):
    gt_dir, pred_dir, _ = folders
    res = run(pred_dir, tmp_path / "no_gt", "--report", tmp_path / "r.html")
    assert res.exit_code == 1 and "no_gt" in res.output and not (tmp_path / "r.html").exists()
    res = run(pred_dir, gt_dir, "--report", tmp_path)  # a folder: click's usage error
    assert res.exit_code == 2 and str(tmp_path) in res.output and "directory" in res.output
    with pytest.raises(DataError, match="is a folder"):
        write_report(tmp_path, evaluate_folders(pred_dir, gt_dir))
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    res = run(pred_dir, gt_dir, "--report", blocker / "r.html")  # under a file: cannot be written
    assert res.exit_code == 1 and "file.txt" in res.output and "not a folder" in res.output
    write_labels(pred_dir / "c.tif", np.zeros((16, 16), np.uint16))
    res = run(pred_dir, gt_dir, "--report", tmp_path / "r.html")
    assert res.exit_code == 1 and "c.tif" in res.output and "shape" in res.output
    assert not (tmp_path / "r.html").exists()
    assert run(pred_dir, gt_dir, "--report", tmp_path / "r.html", "--worst", "-1").exit_code == 2
    res = CliRunner().invoke(cli, ["evaluate", "--bundle", str(tmp_path), "--data", str(tmp_path), "--images",
                                   str(tmp_path)])
    assert res.exit_code == 2 and "--images" in res.output


def test_write_report_is_atomic_and_reports_write_errors(folders, tmp_path, monkeypatch):
    gt_dir, pred_dir, _ = folders
    report = evaluate_folders(pred_dir, gt_dir)
    target = tmp_path / "deep" / "er" / "report.html"
    assert write_report(target, report, worst=1) == target and target.read_text().endswith("</html>\n")
    import triageseg.datasets.atomic as atomic

    def full(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic, "write_text_atomic", full)
    with pytest.raises(DataError, match="report.html: cannot write the report: No space left"):
        write_report(target, report, worst=1)
    assert target.read_text().endswith("</html>\n")  # the old report is intact


def test_demo_report_step(synth_data, tmp_path):
    """The demo's step: the routed results of evaluate_bundle -> out/report.html; curves found by glob."""
    from triageseg.datasets.layout import Dataset
    from triageseg.workflow import BundleScores, demo_plot_lines, demo_report

    out = tmp_path / "demo_out"
    ds = Dataset(synth_data)
    samples = ds.select(split="test")
    results, routing = [], {}
    for k, s in enumerate(samples):
        gt = read_labels(s.label_path)
        pred = np.roll(gt, k, axis=1)  # image k shifted by k px: F1 falls with k
        write_labels(out / "predictions" / f"{s.id}.tif", pred)
        results.append(match_image(gt, pred, id=s.id))
        routing[s.id] = {"modality": s.modality, "confidence": "0.9", "decision": "routed", "used_model": s.modality}
    routed = report_from_results(results, {s.id: s.modality for s in samples})
    confusion = {m: {m: sum(s.modality == m for s in samples)} for m in {s.modality for s in samples}}
    scores = BundleScores(protocol="default", routed=routed, generalist=None, router_accuracy=1.0,
                          confusion=confusion, used_models={"he": 1}, routing=routing)
    path, seconds = demo_report(out, scores, synth_data, worst=2)
    assert path == out / "report.html" and seconds > 0
    page = path.read_text()
    assert 'id="confusion"' in page and "on black" not in page and pngs(page) == 2 + 2
    lowest = sorted(results, key=lambda r: (r.mean_f1, r.id))
    assert worst_ids(page) == [lowest[0].id, lowest[1].id]
    bundle = tmp_path / "bundle"
    assert demo_plot_lines(path, 1.25, bundle)[1] == f"training curves: none in {bundle}"
    for name in ("router", "segmenters/he"):
        (bundle / name).mkdir(parents=True)
        (bundle / name / "curves.png").write_bytes(b"png")
    lines = demo_plot_lines(path, 1.25, bundle)
    assert lines[0] == f"report: {path} (written in 1.2 s)"
    assert lines[2:] == [f"  {bundle / 'router' / 'curves.png'}", f"  {bundle / 'segmenters' / 'he' / 'curves.png'}"]


def test_with_files_keeps_the_scores(folders):
    gt_dir, pred_dir, _ = folders
    report = evaluate_folders(pred_dir, gt_dir)
    assert set(report.gt_files) == {"a", "b", "c"} and report.pred_files["a"] == pred_dir / "a.tif"
    again = with_files(report, {}, {})
    assert again.overall is report.overall and again.gt_files == {}
