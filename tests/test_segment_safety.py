"""`segment` never harms its inputs and never trusts an output it cannot verify.

Inputs are protected from being overwritten or shadowed by outputs, options are checked
before anything is loaded, a resumed run verifies what it skips and refuses other
settings, every label file keeps its routing.csv row through interrupts, and SIGTERM
stops the worker processes.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from triageseg.datasets.errors import DataError
from triageseg.datasets.io import read_labels


def _cli():
    from triageseg.cli.main import cli

    return cli


def _tiffs(folder: Path, n: int, shape=(64, 64), seed=0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img{i:02d}.tif"
        tifffile.imwrite(path, (rng.random(shape) * 4000).astype(np.uint16))
        paths.append(path)
    return paths


def _rows(out: Path) -> list[dict]:
    with (out / "routing.csv").open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------ 1: inputs are never overwritten


@pytest.mark.parametrize("extra", [[], ["--overwrite"]])
def test_out_equal_to_the_input_folder_is_refused(tiny_bundle, tmp_path, extra):
    folder = tmp_path / "d"
    _tiffs(folder, 2)
    before = _snapshot(folder)
    res = CliRunner().invoke(_cli(), ["segment", str(folder), "--bundle", str(tiny_bundle), "--out", str(folder),
                                      "--quiet", *extra])
    assert res.exit_code == 2, res.output
    assert "--out" in res.output and "input" in res.output and "Traceback" not in res.output
    assert _snapshot(folder) == before  # nothing replaced, nothing added


def test_out_inside_a_folder_read_recursively_is_refused(tiny_bundle, tmp_path):
    folder = tmp_path / "d"
    _tiffs(folder / "plate1", 1)
    out = folder / "out"
    res = CliRunner().invoke(_cli(), ["segment", str(folder), "--recursive", "--bundle", str(tiny_bundle), "--out",
                                      str(out), "--quiet"])
    assert res.exit_code == 2, res.output
    assert "--recursive" in res.output and str(folder) in res.output
    assert not out.exists()
    res = CliRunner().invoke(_cli(), ["segment", str(folder / "**" / "*.tif"), "--recursive", "--bundle",
                                      str(tiny_bundle), "--out", str(out), "--quiet"])
    assert res.exit_code == 2 and "--recursive" in res.output  # a glob reads from its fixed folder
    assert not out.exists()


def test_segment_files_refuses_to_overwrite_or_shadow_an_input(tiny_bundle, tmp_path):
    import imagecodecs

    from triageseg.pipeline import Pipeline
    from triageseg.pipeline.local.batch import OutputConflict

    folder = tmp_path / "d"
    (tiff,) = _tiffs(folder, 1)
    png = folder / "cells.png"
    imagecodecs.imwrite(png, np.full((40, 40), 90, np.uint8))
    before = _snapshot(folder)
    pipe = Pipeline.from_bundle(tiny_bundle, device="cpu")
    with pytest.raises(OutputConflict, match="img00.tif.*would overwrite the input"):
        pipe.segment_files([tiff], folder)
    with pytest.raises(OutputConflict, match="cells.png.*same name"):
        pipe.segment_files([png], folder)
    assert issubclass(OutputConflict, DataError)
    assert _snapshot(folder) == before


# --------------------------------------------------------------- 8: options checked before loading


@pytest.mark.parametrize(
    "option,value",
    [("--tile-size", "0"), ("--tile-size", "7"), ("--tile-size", "-5"), ("--tile-size", "100"),
     ("--batch-size", "0"), ("--workers", "-1"), ("--channel", "-1"), ("--page", "-1")],
)
def test_bad_segment_options_are_usage_errors(tiny_bundle, tmp_path, option, value):
    folder = tmp_path / "d"
    _tiffs(folder, 1)
    out = tmp_path / "out"
    res = CliRunner().invoke(_cli(), ["segment", str(folder), "--bundle", str(tiny_bundle), "--out", str(out),
                                      "--quiet", "--on-error", "skip", option, value])
    assert res.exit_code == 2, res.output
    assert option in res.output and "failed" not in res.output
    assert not out.exists()  # refused before any file was read or written


def test_pipeline_refuses_bad_tile_and_batch_sizes(tiny_bundle):
    from triageseg.pipeline import Pipeline

    for kwargs in ({"tile_size": 0}, {"tile_size": 7}, {"tile_size": -64}, {"batch_size": 0}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            Pipeline.from_bundle(tiny_bundle, device="cpu", **kwargs)


def test_tiles_per_pass_by_device_and_tile_size(tiny_bundle):
    import torch

    from triageseg.pipeline import Pipeline
    from triageseg.pipeline.local.single import default_batch_size

    pipe = Pipeline.from_bundle(tiny_bundle, device="cpu")
    assert pipe.batch_size is None and pipe.batch_for(768) == 1 and pipe.batch_for(64) == 4  # a Ray actor chooses too
    assert Pipeline.from_bundle(tiny_bundle, device="cpu", batch_size=3).batch_for(768) == 3
    cpu = torch.device("cpu")
    assert [default_batch_size(cpu, t) for t in (768, 736, 512, 384, 256, 64)] == [1, 1, 2, 4, 4, 4]
    assert default_batch_size(cpu) == 1
    assert default_batch_size(torch.device("cuda", 0), 768) == 4 and default_batch_size("cuda") == 4


# ------------------------------------------------------------ 6: resume verifies what it skips


def test_resume_redoes_empty_truncated_and_misshapen_outputs(tiny_bundle, tmp_path):
    from triageseg.datasets.io import write_labels
    from triageseg.pipeline import Pipeline

    files = _tiffs(tmp_path / "d", 4, shape=(70, 60))
    out = tmp_path / "out"
    pipe = Pipeline.from_bundle(tiny_bundle, device="cpu")
    first = pipe.segment_files(files, out, modality="he")
    assert len(first.written) == 4
    (out / "img00.tif").write_bytes(b"")
    data = (out / "img01.tif").read_bytes()
    (out / "img01.tif").write_bytes(data[: len(data) // 2])
    write_labels(out / "img02.tif", np.ones((10, 10), np.uint16))
    good = (out / "img03.tif").read_bytes()

    again = pipe.segment_files(files, out, modality="he")
    assert sorted(p.name for p in again.written) == ["img00.tif", "img01.tif", "img02.tif"]
    assert [p.name for p in again.skipped] == ["img03.tif"]
    assert sorted(p.name for p, _ in again.incomplete) == ["img00.tif", "img01.tif", "img02.tif"]
    for name in ("img00.tif", "img01.tif", "img02.tif"):
        assert read_labels(out / name).shape == (70, 60)
    assert (out / "img03.tif").read_bytes() == good
    assert sorted(r["output"] for r in _rows(out)) == [f"img0{i}.tif" for i in range(4)]


def test_resume_with_other_settings_is_refused_unless_overwrite(tiny_bundle, tmp_path):
    folder = tmp_path / "d"
    _tiffs(folder, 2)
    out = tmp_path / "out"
    runner = CliRunner()
    base = ["segment", str(folder), "--bundle", str(tiny_bundle), "--out", str(out), "--quiet"]
    assert runner.invoke(_cli(), base).exit_code == 0
    recorded = (out / "segment_config.json").read_text()
    labels = _snapshot(out)

    res = runner.invoke(_cli(), [*base, "--tile-size", "64", "--modality", "he"])
    assert res.exit_code == 2, res.output
    assert "tile_size" in res.output and "modality" in res.output and "--overwrite" in res.output
    assert (out / "segment_config.json").read_text() == recorded
    assert _snapshot(out) == labels

    res = runner.invoke(_cli(), [*base, "--tile-size", "64", "--modality", "he", "--overwrite"])
    assert res.exit_code == 0, res.output
    assert "segmented 2 image(s)" in res.output
    config = json.loads((out / "segment_config.json").read_text())
    assert (config["tile_size"], config["modality"]) == (64, "he")
    assert {r["used_model"] for r in _rows(out)} == {"he"}
    # the same settings again: a plain resume
    res = runner.invoke(_cli(), [*base, "--tile-size", "64", "--modality", "he"])
    assert res.exit_code == 0 and "skipped 2" in res.output


# --------------------------------------------------- 4: routing rows survive interrupts; SIGTERM


def test_interrupted_worker_run_keeps_a_row_for_every_label_file(tiny_bundle, tmp_path):
    from triageseg.pipeline import Pipeline

    files = _tiffs(tmp_path / "d", 10)
    out = tmp_path / "out"
    pipe = Pipeline.from_bundle(tiny_bundle, device="cpu")

    def stop(_path):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipe.segment_files(files, out, modality="he", workers=2, progress=stop)
    written = sorted(p.name for p in out.glob("*.tif"))
    assert len(written) >= 2  # jobs already in the workers finished after the interrupt
    assert sorted(r["output"] for r in _rows(out)) == written
    again = pipe.segment_files(files, out, modality="he", workers=0)
    assert len(again.skipped) == len(written)
    rows = _rows(out)
    assert sorted(r["output"] for r in rows) == [p.with_suffix(".tif").name for p in files]
    for row in rows:
        labels = read_labels(out / row["output"])
        assert int(row["objects"]) == len(np.unique(labels[labels > 0]))


def test_rows_of_labels_written_just_before_a_kill_are_recovered(tiny_bundle, tmp_path, monkeypatch):
    """A kill between writing a label file and its routing.csv row: the journal gives the row back."""
    from triageseg.pipeline import Pipeline
    from triageseg.pipeline.local import batch

    files = _tiffs(tmp_path / "d", 3)
    out = tmp_path / "out"
    pipe = Pipeline.from_bundle(tiny_bundle, device="cpu")
    real = batch._write_routing
    calls = []

    def dies_on_second(path, rows):
        calls.append(1)
        if len(calls) == 2:
            raise SystemExit("killed")  # the process ends here: no cleanup code of ours runs after
        real(path, rows)

    monkeypatch.setattr(batch, "_write_routing", dies_on_second)
    with pytest.raises(SystemExit):
        pipe.segment_files(files, out, modality="he")
    monkeypatch.setattr(batch, "_write_routing", real)
    assert sorted(p.name for p in out.glob("*.tif")) == ["img00.tif", "img01.tif"]
    assert [r["output"] for r in _rows(out)] == ["img00.tif"]

    again = pipe.segment_files(files, out, modality="he")
    assert [p.name for p in again.written] == ["img02.tif"]
    rows = {r["output"]: r for r in _rows(out)}
    assert sorted(rows) == ["img00.tif", "img01.tif", "img02.tif"]
    recovered = rows["img01.tif"]
    assert (recovered["modality"], recovered["used_model"], recovered["decision"]) == ("he", "he", "forced")
    labels = read_labels(out / "img01.tif")
    assert int(recovered["objects"]) == len(np.unique(labels[labels > 0]))


def _children(pid: int) -> set[int]:
    """PIDs of all live descendants of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's bookkeeping is left


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find child processes")
def test_sigterm_stops_workers_and_the_resource_tracker(tiny_bundle, tmp_path):
    files = _tiffs(tmp_path / "d", 40)
    out = tmp_path / "out"
    script = Path(sys.executable).with_name("triageseg")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "triageseg"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*command, "segment", str(tmp_path / "d"), "--bundle", str(tiny_bundle), "--out",
                             str(out), "--workers", "2", "--modality", "he", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    children: set[int] = set()
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            children |= _children(proc.pid)
            if len(children) >= 3 and len(list(out.glob("*.tif"))) >= 2:  # 2 workers + the resource tracker
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be signalled"
        assert len(children) >= 3
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode != 0
        assert "interrupted" in stderr.decode()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_alive(p) for p in children):
            time.sleep(0.2)
        assert [p for p in children if _alive(p)] == []
        written = sorted(p.name for p in out.glob("*.tif"))
        assert 2 <= len(written) < len(files)
        from triageseg.datasets.tiffrecord import read_record

        rows = {r["output"] for r in _rows(out)}
        assert rows <= set(written)
        # A worker may finish a file between the signal and the shutdown: its row is then carried in
        # the label file itself, and the next run puts it back into routing.csv.
        assert all(read_record(out / name) is not None for name in set(written) - rows)
    finally:
        for pid in children:  # only what this test started
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------ 10: failures.csv


def test_skipped_failures_are_written_to_failures_csv(tiny_bundle, tmp_path):
    folder = tmp_path / "d"
    _tiffs(folder, 1)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    out = tmp_path / "out"
    runner = CliRunner()
    res = runner.invoke(_cli(), ["segment", str(folder), "--bundle", str(tiny_bundle), "--out", str(out),
                                 "--on-error", "skip", "--quiet"])
    assert res.exit_code == 1
    with (out / "failures.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [Path(r["file"]).name for r in rows] == ["broken.png"]
    assert "PNG" in rows[0]["problem"]
    assert "failures.csv" in res.output
    (folder / "broken.png").unlink()
    res = runner.invoke(_cli(), ["segment", str(folder), "--bundle", str(tiny_bundle), "--out", str(out),
                                 "--on-error", "skip", "--quiet"])
    assert res.exit_code == 0
    assert not (out / "failures.csv").exists()  # it describes the latest run
