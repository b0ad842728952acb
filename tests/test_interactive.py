"""What both interactive faces share: the routing decision, measurements, overlay layers, the
server's queue and temp folder, and the plugin's guard against a second LLVM."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from triageseg.datasets.errors import DataError
from triageseg.pipeline.local.outputs import OUTLINE_COLOUR, label_rgba
from triageseg.postprocess.measure import TABLE_COLUMNS, measure_nuclei


def _drawn() -> np.ndarray:
    labels = np.zeros((8, 10), np.uint16)
    labels[1:3, 1:4] = 2  # 6 px, rows 1-2, cols 1-3
    labels[5:8, 6:8] = 9  # 6 px, rows 5-7, cols 6-7
    labels[0, 9] = 4  # 1 px
    return labels


def test_measure_nuclei_exact_on_drawn_labels():
    labels = _drawn()
    intensity = np.arange(80, dtype=np.uint16).reshape(8, 10)
    table = measure_nuclei(labels, intensity, pixel_size=(0.5, 0.25))
    assert table.ids.tolist() == [2, 4, 9] and table.count == 3
    assert table.area_px.tolist() == [6, 1, 6]
    assert table.area_um2.tolist() == [0.75, 0.125, 0.75]
    assert table.mean_intensity.tolist() == [intensity[1:3, 1:4].mean(), 9.0, intensity[5:8, 6:8].mean()]
    assert table.centroid_y.tolist() == [1.5, 0.0, 6.0] and table.centroid_x.tolist() == [2.0, 9.0, 6.5]
    assert table.to_csv().splitlines() == [
        ",".join(TABLE_COLUMNS),
        "2,6,0.75,17,1.50,2.00",
        "4,1,0.125,9,0.00,9.00",
        "9,6,0.75,66.5,6.00,6.50",
    ]
    assert table.rows()[1] == {"id": 4, "area_px": 1, "area_um2": 0.125, "mean_intensity": 9.0,
                               "centroid_y": 0.0, "centroid_x": 9.0}


def test_measure_nuclei_colour_empty_and_errors():
    labels = _drawn()
    rgb = np.zeros((8, 10, 3), np.uint8)
    rgb[..., 0], rgb[..., 2] = 30, 90  # channel mean 40
    table = measure_nuclei(labels, rgb)
    assert table.mean_intensity.tolist() == [40.0, 40.0, 40.0] and table.area_um2 is None
    assert table.rows()[0]["area_um2"] is None and table.to_csv().splitlines()[1] == "2,6,,40,1.50,2.00"
    empty = measure_nuclei(np.zeros((4, 4), np.uint32), np.ones((4, 4)))
    assert empty.count == 0 and empty.rows() == [] and empty.to_csv() == ",".join(TABLE_COLUMNS) + "\n"
    with pytest.raises(ValueError, match=r"intensity of shape \(8, 9\) does not match labels of shape \(8, 10\)"):
        measure_nuclei(labels, np.zeros((8, 9)))
    with pytest.raises(ValueError, match="2-D integer array"):
        measure_nuclei(labels.astype(np.float32), np.zeros((8, 10)))
    with pytest.raises(ValueError, match="non-negative"):
        measure_nuclei(-labels.astype(np.int32), np.zeros((8, 10)))
    with pytest.raises(ValueError, match="pixel_size must be a positive"):
        measure_nuclei(labels, np.zeros((8, 10)), pixel_size=0)


def test_label_rgba_outlines_and_filled():
    from skimage.segmentation import find_boundaries

    labels = _drawn()
    outlines = label_rgba(labels)
    edges = find_boundaries(labels, mode="inner")
    assert np.array_equal(outlines[..., 3] == 255, edges) and not outlines[~edges].any()
    assert (outlines[edges][:, :3] == OUTLINE_COLOUR).all()
    filled = label_rgba(labels, style="filled")
    assert np.array_equal(filled[..., 3] == 255, labels > 0) and not filled[labels == 0].any()
    colours = {int(v): tuple(filled[labels == v][0]) for v in (2, 4, 9)}
    assert len(set(colours.values())) == 3
    for v, colour in colours.items():
        assert (filled[labels == v] == colour).all()
    # a nucleus keeps its colour whatever else is in the image
    alone = np.where(labels == 9, 9, 0).astype(np.uint16)
    assert tuple(label_rgba(alone, style="filled")[6, 6]) == colours[9]
    with pytest.raises(ValueError, match="unknown overlay style 'dots'"):
        label_rgba(labels, style="dots")


def test_route_image_keeps_every_probability(constant_bundle):
    from triageseg.pipeline import Pipeline
    from triageseg.pipeline.local.interactive import route_image, segment_image

    pipe = Pipeline.from_bundle(constant_bundle, device="cpu")
    image = np.random.default_rng(0).random((40, 36, 3)).astype(np.float32)
    pred = pipe.route([image])[0]
    routed = route_image(pipe, image)
    assert routed.probabilities == pytest.approx(pred.probs)
    assert (routed.modality, routed.used_model, routed.forced) == (pred.modality, "_generalist", False)
    assert routed.decision == pipe.choose(pred)[1]
    forced = route_image(pipe, image, modality="he")
    assert (forced.modality, forced.confidence, forced.used_model, forced.forced) == ("he", None, "he", True)
    assert forced.decision == f"forced; the router's top-1 was {pred.modality} ({pred.confidence:.2f})"
    assert forced.probabilities == pytest.approx(pred.probs)
    assert forced.to_dict()["probabilities"] == forced.probabilities
    assert np.array_equal(segment_image(pipe, image, "he"), np.zeros((40, 36), np.uint32))
    assert np.array_equal(segment_image(pipe, image, "_generalist"), np.ones((40, 36), np.uint32))
    with pytest.raises(DataError, match="unknown modality 'phase'"):
        route_image(pipe, image, modality="phase")


def test_safe_filename_and_workspace(tmp_path):
    from triageseg.serve.jobs import Workspace, safe_filename

    assert safe_filename("..\\..\\x\\a b.png") == "a_b.png"
    assert safe_filename("/etc/.hidden") == "hidden" and safe_filename("") == "upload"
    ws = Workspace(tmp_path, keep=2)
    tokens = []
    for stem in ("a", "b", "c"):
        token, folder = ws.new_upload()
        (folder / "x.png").write_bytes(b"x")
        ws.result_dir(token).mkdir(parents=True)
        (ws.result_dir(token) / "labels.tif").write_bytes(b"t")
        ws.discard_upload(token)
        assert not folder.exists()
        ws.keep_result(token, stem)
        tokens.append(token)
    assert ws.lookup(tokens[0], "labels.tif") is None and not ws.result_dir(tokens[0]).exists()  # evicted
    assert ws.lookup(tokens[2], "labels.tif") == (ws.result_dir(tokens[2]) / "labels.tif", "c_labels.tif")
    assert ws.lookup(tokens[2], "../labels.tif") is None and ws.lookup("../x", "labels.tif") is None
    ws.close()
    assert list(tmp_path.iterdir()) == []


def test_device_queue_runs_one_job_at_a_time_in_order():
    from triageseg.serve.jobs import DeviceQueue

    queue = DeviceQueue()
    spans, threads = [], set()
    gate = threading.Event()

    def job(i):
        gate.wait(10)
        start = time.perf_counter()
        time.sleep(0.02)
        threads.add(threading.get_ident())
        spans.append((i, start, time.perf_counter()))
        return i

    futures = [queue.submit(job, i) for i in range(4)]
    assert queue.pending == 4
    gate.set()
    assert [f.result(10) for f in futures] == [0, 1, 2, 3]
    queue.close()
    assert [i for i, _, _ in spans] == [0, 1, 2, 3] and len(threads) == 1
    assert all(prev[2] <= nxt[1] for prev, nxt in zip(spans, spans[1:], strict=False))
    assert queue.pending == 0


def test_llvm_guard_reads_the_process_maps():
    from triageseg.napari_plugin.llvm_guard import llvm_loaded

    mesa = "7f0a-7f0b r-xp 00000000 08:01 123 /usr/lib/x86_64-linux-gnu/libLLVM-15.so.1\n"
    plain = "7f0a-7f0b r-xp 00000000 08:01 123 /usr/lib/x86_64-linux-gnu/libGL.so.1\n"
    assert llvm_loaded(plain + mesa) and not llvm_loaded(plain)


def test_layer_pixels_takes_2d_gray_rgb_and_the_full_resolution_of_a_pyramid():
    from triageseg.napari_plugin.steps import layer_pixels

    gray = np.arange(12, dtype=np.uint16).reshape(3, 4)
    assert np.array_equal(layer_pixels(gray, rgb=False, name="g"), gray)
    assert layer_pixels(np.zeros((3, 4, 3), np.uint8), rgb=True, name="c").shape == (3, 4, 3)
    pyramid = [np.ones((8, 8), np.float32), np.ones((4, 4), np.float32)]
    assert layer_pixels(pyramid, rgb=False, name="p", multiscale=True).shape == (8, 8)
    with pytest.raises(DataError, match=r"^z: the layer holds a 3-D image of shape \(2, 3, 4\)"):
        layer_pixels(np.zeros((2, 3, 4)), rgb=False, name="z")
    with pytest.raises(DataError, match="a 2-D image of shape"):
        layer_pixels(np.zeros((3, 4, 5)), rgb=True, name="five")
