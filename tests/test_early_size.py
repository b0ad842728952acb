"""The size estimate taken while the router runs (pipeline.local.early_size): same decisions, used only when right."""

from __future__ import annotations

import json
import shutil
import threading
import types

import numpy as np
import pytest
from test_size import _disks, _ihc_like


@pytest.fixture(scope="module")
def sized(sized_bundle, tmp_path_factory):
    """``sized_bundle`` (size triage on, 16 px) whose he specialist measures its images on the haematoxylin."""
    from triageseg import bundle as B

    root = tmp_path_factory.mktemp("early") / "bundle"
    shutil.copytree(sized_bundle, root)
    path = B.segmenter_dir(root, "he") / B.CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), "size_signal": "modality-pyramid"}))
    return root


def _routed_to(pipe, monkeypatch, modality: str) -> list[str]:
    """Route every image to ``modality``; returns the names of the threads the router ran on."""
    threads = []

    def route(images):
        threads.append(threading.current_thread().name)
        return [types.SimpleNamespace(modality=modality, confidence=1.0, ood_score=None)]

    monkeypatch.setattr(pipe, "route", route)
    return threads


@pytest.mark.parametrize(("modality", "image", "signal"), [
    ("fluorescence", _disks(8, size=256), "auto"),
    ("he", _ihc_like(8), "haematoxylin"),
])
def test_the_early_estimate_gives_the_decision_measured_after_the_route(sized, monkeypatch, modality, image,
                                                                        signal):
    from triageseg.pipeline import Pipeline
    from triageseg.pipeline.local import early_size
    from triageseg.router import size as S

    monkeypatch.setitem(S.MODALITY_SIGNALS, "he", "haematoxylin")
    pipe = Pipeline.from_bundle(sized, device="cpu")
    threads = _routed_to(pipe, monkeypatch, modality)
    measured = []
    real = S.estimate_image

    def estimate(img, **kw):
        measured.append((threading.current_thread().name, kw["signal"]))
        return real(img, **kw)

    monkeypatch.setattr(S, "estimate_image", estimate)
    monkeypatch.setattr("torch.get_num_threads", lambda: 2)
    assert early_size.worth_it(pipe, None, None)
    early = pipe.decide(image)
    assert threads == ["triageseg-route_0"]  # the router ran beside the estimate, on the worker thread
    assert measured[0] == (threading.current_thread().name, "auto")
    # used when the segmenter measures "auto"; on the haematoxylin, measured again after the route
    assert [m[1] for m in measured] == (["auto"] if signal == "auto" else ["auto", "haematoxylin"])
    monkeypatch.setattr(early_size, "worth_it", lambda *a: False)
    measured.clear()
    after = pipe.decide(image)
    assert [m[1] for m in measured] == [signal] and threads[-1] == threading.current_thread().name
    assert early == after and early.size_source == "estimated"


def test_the_early_estimate_runs_only_where_it_can_gain(sized, tiny_bundle, monkeypatch):
    from triageseg.pipeline import Pipeline
    from triageseg.pipeline.local.early_size import worth_it

    monkeypatch.setattr("torch.get_num_threads", lambda: 2)
    pipe = Pipeline.from_bundle(sized, device="cpu")
    assert worth_it(pipe, None, None)
    assert not worth_it(pipe, "he", None)  # forced: the size waits for no router
    assert not worth_it(pipe, None, 0.5)  # a pixel size may decide instead
    assert worth_it(Pipeline.from_bundle(sized, device="cpu", use_pixel_size=False), None, 0.5)
    assert not worth_it(Pipeline.from_bundle(sized, device="cpu", diameter=12), None, None)  # given
    assert not worth_it(Pipeline.from_bundle(tiny_bundle, device="cpu"), None, None)  # size triage off
    monkeypatch.setattr("torch.get_num_threads", lambda: 1)
    assert not worth_it(pipe, None, None)  # one thread: the two would only take turns


def test_a_bad_image_is_reported_by_the_router_as_before(sized, monkeypatch):
    from triageseg.pipeline import Pipeline
    from triageseg.pipeline.local import early_size

    monkeypatch.setattr("torch.get_num_threads", lambda: 2)
    pipe = Pipeline.from_bundle(sized, device="cpu")
    bad = np.full((64, 64, 3), np.nan, np.float32)
    with pytest.raises(ValueError) as early:
        pipe.decide(bad)
    monkeypatch.setattr(early_size, "worth_it", lambda *a: False)
    with pytest.raises(ValueError) as after:
        pipe.decide(bad)
    assert str(early.value) == str(after.value)
