"""The block path's journal never makes a rerun silently wrong or leaves litter (issue 23, items 1, 2 and 10).

- A missing, garbage or truncated probability chunk, or garbage array metadata, in
  ``.<name>.blocks/probs.zarr``: the rerun computes what is damaged and writes the file an
  undamaged run writes, and says so naming the journal.
- An input replaced by another image of the same size with its time stamp put back: the
  journal is discarded (the content fingerprint differs), the new image's labels are written.
- A run killed while writing its outputs leaves temporaries; the next run removes those of
  its own outputs, nothing else, and never while another live run holds the image's lock.

The block path is driven as in ``test_blocks.py``: images that are drawings of the 3-class
targets of known disks, and a fake probability stream (their class map, one-hot).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from test_blocks import class_image, draw_labels, interrupt_after, one_hot, pointwise, run_blocks

from triageseg.datasets.errors import DataError
from triageseg.pipeline.blockwise.large import BlockOptions
from triageseg.pipeline.blockwise.probstore import ProbabilityStore

TESTS = Path(__file__).resolve().parent
OPTIONS = BlockOptions(block_size=256, margin=48, threshold_mp=0)


def same_label_file(a: Path, b: Path) -> bool:
    """Pixels of every page and the OME-XML equal; the routing record equal but for where and how long."""
    from triageseg.datasets.tiffrecord import read_record

    with tifffile.TiffFile(a) as ta, tifffile.TiffFile(b) as tb:
        if len(ta.pages) != len(tb.pages) or ta.ome_metadata != tb.ome_metadata:
            return False
        if not all(np.array_equal(pa.asarray(), pb.asarray()) for pa, pb in zip(ta.pages, tb.pages, strict=True)):
            return False
    ra, rb = (read_record(p) or {} for p in (a, b))
    volatile = {"file", "output", "seconds"}  # the input's path and the time differ between the two runs

    def kept(record: dict) -> dict:
        return {key: {k: v for k, v in row.items() if k not in volatile} if isinstance(row, dict) else row
                for key, row in record.items()}

    return kept(ra) == kept(rb) and bool(ra)


def chunk(folder: Path, row: int) -> Path:
    """The probability chunk file of chunk row ``row`` (768 x 768 images: one chunk column)."""
    return folder / "probs.zarr" / "c" / "0" / str(row) / "0"


# --------------------------------------------------------------------------- item 1: damaged probability chunks

DAMAGE = {
    "missing chunk": (2, lambda p: p.unlink()),
    "garbage chunk": (0, lambda p: p.write_bytes(np.random.default_rng(0).bytes(p.stat().st_size))),
    "truncated chunk": (1, lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),
    "garbage zarr.json": (None, lambda p: p.write_text('{"shape": [3, 7')),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_probability_journal_is_repaired_and_gives_the_undamaged_file(tmp_path, monkeypatch, caplog, damage):
    image = class_image(draw_labels(seed=5))
    clean = tmp_path / "clean"
    clean.mkdir()
    run_blocks(clean, image, name="img", geojson=clean / "img.geojson")

    with monkeypatch.context() as m:  # stopped after 4 of 9 blocks: all probability rows recorded
        interrupt_after(m)
        with pytest.raises(KeyboardInterrupt):
            run_blocks(tmp_path, image, name="img", geojson=tmp_path / "img.geojson")
    folder = tmp_path / ".img.blocks"
    row, spoil = DAMAGE[damage]
    spoil(chunk(folder, row) if row is not None else folder / "probs.zarr" / "zarr.json")

    bands = []
    with caplog.at_level(logging.WARNING):
        summary, _ = run_blocks(tmp_path, image, name="img", geojson=tmp_path / "img.geojson",
                                stream=pointwise(one_hot, log=bands))
    assert (tmp_path / "img.tif").read_bytes() == (clean / "img.tif").read_bytes()
    assert (tmp_path / "img.geojson").read_bytes() == (clean / "img.geojson").read_bytes()
    # only the damaged chunk row was computed again (the stream started there), and the message names the journal
    assert summary["rows"] == (0 if row is None else 256)
    assert [b[0] for b in bands[:1]] == ([] if row is None else [256 * row])
    assert str(folder / "probs.zarr") in caplog.text
    assert ("zarr.json" if row is None else f"c/0/{row}/0") in caplog.text


@pytest.mark.parametrize("damage", ["garbage block", "garbage state"])
def test_a_damaged_block_or_state_file_costs_time_not_a_failure(tmp_path, monkeypatch, caplog, damage):
    """A finished block's file spoiled: decoded again; the probabilities' state file spoiled: all rows again."""
    image = class_image(draw_labels(seed=7))
    clean = tmp_path / "clean"
    clean.mkdir()
    run_blocks(clean, image, name="img")
    with monkeypatch.context() as m:
        interrupt_after(m)
        with pytest.raises(KeyboardInterrupt):
            run_blocks(tmp_path, image, name="img")
    folder = tmp_path / ".img.blocks"
    spoilt = folder / ("block_00002.npz" if damage == "garbage block" else "probs.zarr.json")
    spoilt.write_bytes(b"\x28\xb5\x2f\xfd garbage")
    with caplog.at_level(logging.WARNING):
        summary, _ = run_blocks(tmp_path, image, name="img")
    assert (tmp_path / "img.tif").read_bytes() == (clean / "img.tif").read_bytes()
    assert summary["rows"] == (0 if damage == "garbage block" else 768)
    assert str(spoilt if damage == "garbage block" else folder / "probs.zarr") in caplog.text


def test_damaged_chunks_found_while_computing_probabilities_are_filled_in_too(tmp_path, monkeypatch):
    """Interrupted in the probabilities (rows 0:512 recorded), chunk row 0 deleted: rows 0:256 and 512:768 computed."""
    image = class_image(draw_labels(seed=6))
    clean = tmp_path / "clean"
    clean.mkdir()
    run_blocks(clean, image, name="img")
    bands = []

    def interrupted(rows):
        if len(bands) == 7:
            raise KeyboardInterrupt
        return one_hot(rows)

    with pytest.raises(KeyboardInterrupt):
        run_blocks(tmp_path, image, name="img", stream=pointwise(interrupted, log=bands))
    chunk(tmp_path / ".img.blocks", 0).unlink()
    bands.clear()
    summary, _ = run_blocks(tmp_path, image, name="img", stream=pointwise(one_hot, log=bands))
    assert summary["rows"] == 512 and bands[0][0] == 0 and 512 in [b[0] for b in bands]
    assert (tmp_path / "img.tif").read_bytes() == (clean / "img.tif").read_bytes()


def test_a_chunk_damaged_after_the_store_was_opened_is_an_error_naming_the_journal(tmp_path):
    store = ProbabilityStore(tmp_path / ".x.blocks" / "probs.zarr", (300, 1100))
    store.write_rows(0, np.full((3, 256, 1100), 0.25, np.float32))
    path = tmp_path / ".x.blocks" / "probs.zarr" / "c" / "0" / "0" / "1"
    path.write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"\.x\.blocks/probs\.zarr: damaged probability chunk"):
        store.read((0, 256, 0, 1100))
    # reopened (a rerun), the chunk row is no longer counted as finished
    assert ProbabilityStore(tmp_path / ".x.blocks" / "probs.zarr", (300, 1100)).missing() == [(0, 300)]


# --------------------------------------------------------------------------- item 2: a replaced input


@pytest.fixture
def fake_pipe(tiny_bundle, monkeypatch):
    """A real Pipeline (routing, journal, outputs) whose probabilities are the one-hot class map of the image."""
    from triageseg.pipeline import Pipeline

    monkeypatch.setattr(Pipeline, "probability_stream",
                        lambda self, used, scale=None, name="<array>": pointwise(one_hot))
    return Pipeline.from_bundle(tiny_bundle, device="cpu")


def test_an_input_replaced_by_a_same_size_image_is_not_resumed_from_the_old_journal(tmp_path, fake_pipe,
                                                                                    monkeypatch, caplog):
    src, other = tmp_path / "slide.tif", tmp_path / "b" / "slide.tif"
    other.parent.mkdir()
    tifffile.imwrite(src, class_image(draw_labels(seed=1)))  # uncompressed: equal shapes, equal sizes
    tifffile.imwrite(other, class_image(draw_labels(seed=2)))
    assert src.stat().st_size == other.stat().st_size
    fake_pipe.segment_files([other], tmp_path / "clean", blocks=OPTIONS)

    with monkeypatch.context() as m:
        interrupt_after(m)
        with pytest.raises(KeyboardInterrupt):
            fake_pipe.segment_files([src], tmp_path / "out", blocks=OPTIONS)
    stat = src.stat()
    shutil.copyfile(other, src)
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the same path, size and time stamp
    with caplog.at_level(logging.WARNING):
        report = fake_pipe.segment_files([src], tmp_path / "out", blocks=OPTIONS)
    assert len(report.written) == 1
    assert same_label_file(tmp_path / "out" / "slide.tif", tmp_path / "clean" / "slide.tif")
    assert "content changed" in caplog.text and str(tmp_path / "out" / ".slide.blocks") in caplog.text


def test_content_fingerprint_reads_a_bounded_sample_and_sees_a_changed_sample(tmp_path, monkeypatch):
    from triageseg.pipeline.blockwise import journal

    big = tmp_path / "big.raw"
    with open(big, "wb") as fh:  # 1 GiB, sparse
        fh.truncate(1 << 30)
    reads = []
    real_open = open

    def counting_open(path, mode="r", *args, **kwargs):
        fh = real_open(path, mode, *args, **kwargs)
        read = fh.read
        fh.read = lambda n=-1: reads.append(len(data := read(n))) or data
        return fh

    monkeypatch.setattr(journal, "open", counting_open, raising=False)
    before = journal.content_fingerprint(big)
    assert 0 < sum(reads) <= 2 << 20
    with open(big, "r+b") as fh:  # one byte in the middle of the 128th sampled range
        fh.seek(journal.HEAD_BYTES + ((1 << 30) - 2 * journal.HEAD_BYTES - journal.SAMPLE_BYTES) * 127 // 255 + 100)
        fh.write(b"\x01")
    assert journal.content_fingerprint(big) != before
    small = tmp_path / "small.raw"
    small.write_bytes(b"a" * 1000)
    first = journal.content_fingerprint(small)
    small.write_bytes(b"a" * 999 + b"b")
    assert journal.content_fingerprint(small) != first


# --------------------------------------------------------------------------- item 10: stale temporaries

KILL_WHILE_WRITING = """
import os, signal, sys
sys.path.insert(0, sys.argv[4])
from test_blocks import one_hot, pointwise
from triageseg.datasets import pyramid
from triageseg.pipeline import Pipeline
from triageseg.pipeline.blockwise.large import BlockOptions

Pipeline.probability_stream = lambda self, used, scale=None, name="<array>": pointwise(one_hot)
real = pyramid.write_pyramid

def dying(path, shape, dtype, read_rows, **kwargs):
    def rows(y0, y1):
        if y0 > 0:  # the first strip is in the temporary file by now
            os.kill(os.getpid(), signal.SIGKILL)
        return read_rows(y0, y1)
    return real(path, shape, dtype, rows, **kwargs)

pyramid.write_pyramid = dying
pipe = Pipeline.from_bundle(sys.argv[1], device="cpu")
pipe.segment_files([sys.argv[2]], sys.argv[3], blocks=BlockOptions(block_size=256, margin=48, threshold_mp=0))
"""


def _temp(folder: Path, prefix: str, suffix: str, age: float) -> Path:
    """A file named as atomic_path names its temporaries, last modified ``age`` seconds ago (negative: ahead)."""
    fd, path = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
    os.close(fd)
    os.utime(path, (time.time() - age, time.time() - age))
    return Path(path)


def test_the_next_run_removes_a_killed_runs_temporaries_and_nothing_else(tmp_path, fake_pipe, tiny_bundle, caplog):
    src, out = tmp_path / "slide.tif", tmp_path / "out"
    tifffile.imwrite(src, class_image(draw_labels(seed=3)))
    fake_pipe.segment_files([src], tmp_path / "clean", blocks=OPTIONS)
    script = tmp_path / "kill.py"
    script.write_text(KILL_WHILE_WRITING)
    proc = subprocess.run([sys.executable, str(script), str(tiny_bundle), str(src), str(out), str(TESTS)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr
    left = [p for p in out.iterdir() if p.name.startswith(".slide.") and (".part." in p.name or ".levels." in p.name)]
    assert sorted("dir" if p.is_dir() else p.suffix for p in left) == [".tif", "dir"]  # .part.tif, .levels.XXXX/
    stale_geojson = _temp(out, ".slide.", ".part.geojson", 3600)  # as a run killed in its GeoJSON leaves it
    keep = [_temp(out, ".other.", ".part.tif", 3600),  # another output's
            _temp(out, ".slide.b.", ".part.tif", 3600),  # the temporary of output slide.b.tif
            _temp(out, ".slide.", ".part.tif", -3600),  # modified after this run started: a live writer's
            _temp(out, "slide.", ".part.tif", 3600), _temp(out, ".slide.", ".part.csv", 3600)]

    with caplog.at_level(logging.INFO, logger="triageseg.pipeline.blockwise.journal"):
        report = fake_pipe.segment_files([src], out, blocks=OPTIONS)
    assert len(report.written) == 1
    assert same_label_file(out / "slide.tif", tmp_path / "clean" / "slide.tif")
    assert not any(p.exists() for p in [*left, stale_geojson])
    assert all(p.exists() for p in keep)
    assert "removed 3 temporary file(s)" in caplog.text
    assert not (out / ".slide.lock").exists() and not (out / ".slide.blocks").exists()


def test_a_run_on_an_image_another_live_run_holds_is_refused_and_touches_nothing(tmp_path, fake_pipe):
    from triageseg.pipeline.blockwise.journal import claim_outputs

    src, out = tmp_path / "slide.tif", tmp_path / "out"
    tifffile.imwrite(src, class_image(draw_labels(seed=4)))
    with claim_outputs(out, "slide"):  # a run segmenting slide into out (flock: another open file conflicts)
        theirs = _temp(out, ".slide.", ".part.tif", 3600)
        report = fake_pipe.segment_files([src], out, blocks=OPTIONS, on_error="skip")
        assert theirs.exists() and not (out / "slide.tif").exists() and not (out / ".slide.blocks").exists()
        [(path, message)] = report.failures
        assert path == src and ".slide.lock" in message and f"pid {os.getpid()}" in message
        with pytest.raises(DataError, match="another run"):
            fake_pipe.segment_files([src], out, blocks=OPTIONS)
    assert not (out / ".slide.lock").exists()
    assert len(fake_pipe.segment_files([src], out, blocks=OPTIONS).written) == 1
    assert not theirs.exists()  # once the holder is gone, its leftovers are stale
