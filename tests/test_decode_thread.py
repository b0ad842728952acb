"""The batch path's decode thread (pipeline.local.batch): the watershed of one image overlaps the next image's network.

Same labels, rows and order as decoding in line; the thread really overlaps (shown by an
event, not by timing); the thread plan never asks for more busy threads than cores.
"""

from __future__ import annotations

import csv
import os
import shutil
import threading

import numpy as np
import pytest

pytest.importorskip("torch")

from triageseg.datasets.io import read_labels  # noqa: E402
from triageseg.pipeline.local import batch  # noqa: E402
from triageseg.segmenters import threads  # noqa: E402


@pytest.fixture
def images(synth_data, tmp_path):
    """Six images of the synthetic set (three modalities), copied so outputs never sit beside the originals."""
    folder = tmp_path / "in"
    folder.mkdir()
    for p in sorted((synth_data / "images").iterdir())[:6]:
        shutil.copy(p, folder / p.name)
    return sorted(folder.iterdir())


def _rows(out):
    with open(out / "routing.csv", newline="") as fh:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(fh)]


def test_decode_thread_gives_the_in_line_labels_rows_and_order(tiny_bundle, images, tmp_path, monkeypatch):
    from triageseg.pipeline import Pipeline

    pipe = Pipeline(tiny_bundle, device="cpu")
    names = []
    overlapped = pipe.segment_files(images, tmp_path / "thread", overlays=True, rois=True,
                                    progress=lambda p: names.append(p.name))
    monkeypatch.setattr(batch, "DECODE_THREAD", False)
    in_line = pipe.segment_files(images, tmp_path / "in_line", overlays=True, rois=True)
    assert names == [p.name for p in images]  # progress in input order
    assert [r["file"] for r in overlapped.rows] == [r["file"] for r in in_line.rows]
    assert [(r["objects"], r["quality"]) for r in overlapped.rows] == [(r["objects"], r["quality"])
                                                                        for r in in_line.rows]
    assert _rows(tmp_path / "thread") == _rows(tmp_path / "in_line")
    for p in images:
        a, b = read_labels(tmp_path / "thread" / f"{p.stem}.tif"), read_labels(tmp_path / "in_line" / f"{p.stem}.tif")
        assert np.array_equal(a, b), p.name
        assert (tmp_path / "thread" / "overlays" / f"{p.stem}.png").read_bytes() == \
            (tmp_path / "in_line" / "overlays" / f"{p.stem}.png").read_bytes()


def test_decode_of_one_image_overlaps_the_next_network(tiny_bundle, images, tmp_path, monkeypatch):
    """The first image's decode waits until the second image's network has started: only a thread lets it."""
    from triageseg.pipeline import Pipeline

    pipe = Pipeline(tiny_bundle, device="cpu")
    second_network = threading.Event()
    calls = []
    real_probabilities, real_decode = pipe.probabilities, batch._decode_and_write

    def probabilities(*args, **kwargs):
        calls.append("net")
        if len([c for c in calls if c == "net"]) == 2:
            second_network.set()
        return real_probabilities(*args, **kwargs)

    seen = {}

    def decode(*args, **kwargs):
        if "first" not in seen:
            seen["first"] = second_network.wait(timeout=60)  # in line, this would wait in vain
            seen["thread"] = threading.current_thread().name
            seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) if hasattr(os, "getpriority") \
                else None
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(pipe, "probabilities", probabilities)
    monkeypatch.setattr(batch, "_decode_and_write", decode)
    report = pipe.segment_files(images[:3], tmp_path / "out")
    assert len(report.written) == 3
    assert seen["first"] is True and seen["thread"].startswith("decode")
    if seen["nice"] is not None and os.path.exists("/proc/self/task"):
        assert seen["nice"] > os.getpriority(os.PRIO_PROCESS, threading.get_native_id())  # yields to the network


def test_a_failure_after_a_decoding_image_keeps_the_order(tiny_bundle, images, tmp_path):
    from triageseg.pipeline import Pipeline

    broken = tmp_path / "in" / "b_broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    files = [images[0], broken, images[1]]
    names = []
    report = Pipeline(tiny_bundle, device="cpu").segment_files(files, tmp_path / "out", on_error="skip",
                                                              progress=lambda p: names.append(p.name))
    assert names == [p.name for p in files]
    assert [p.name for p, _ in report.failures] == ["b_broken.png"] and len(report.written) == 2


def test_thread_plan_counts_the_decode_thread(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.network_threads(0, cores=2, decode_thread=True) == 2  # 2 cores: the thread yields instead
    assert threads.network_threads(0, cores=3, decode_thread=True) == 3
    assert threads.network_threads(0, cores=4, decode_thread=True) == 3  # from 4 cores: a core of its own
    assert threads.network_threads(0, cores=64, decode_thread=True) == 63
    assert threads.network_threads(2, cores=8, decode_thread=True) == 6  # workers: no decode thread then
    assert threads.network_threads(0, cores=1, decode_thread=True) == 1


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="per-thread nice values are Linux's")
def test_decode_thread_init_lowers_only_its_own_thread():
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = {}

    def body():
        threads.decode_thread_init()
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen["nice"] == min(19, before + threads.DECODE_NICE)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before  # the caller is untouched
