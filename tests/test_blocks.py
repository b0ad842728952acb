"""Huge images block-wise: grid, lazy reading, block path == whole image, streaming output, resume, errors.

Most tests feed the block path a *fake probability stream*: either the image is a drawing
of the 3-class targets of known labels (background 0, boundary 128, interior 255) and the
probabilities are that class map one-hot, or the image's three channels *are* a realistic
probability map; every expectation is exact. One set of tests goes through a real (tiny,
untrained) Pipeline and the CLI.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from scipy import ndimage as ndi
from skimage.draw import disk

from triageseg.datasets.errors import DataError
from triageseg.datasets.io import normalize_image, read_labels, read_pixel_size
from triageseg.pipeline.blockwise.blocks import NormStats, plan_blocks, scan_image
from triageseg.pipeline.blockwise.large import Journal, segment_blocks
from triageseg.postprocess.targets import make_targets
from triageseg.postprocess.watershed import WatershedParams, watershed

PARAMS = WatershedParams(min_size=1, min_marker_size=1)
# block cores at multiples of 256; these centres sit on core corners and edges
ACROSS = [(256, 256), (256, 512), (512, 256), (512, 512), (256, 100), (100, 512), (512, 700), (700, 256),
          (256, 380), (380, 512), (20, 20)]


def draw_labels(size: int = 768, seed: int = 0, n_random: int = 70, extra=(), across=ACROSS) -> np.ndarray:
    """Disks of radius 18 on block corners and edges, ``extra`` (centre, radius) disks, random separate disks."""
    gt = np.zeros((size, size), np.uint32)
    rng = np.random.default_rng(seed)
    wanted = [(c, 18) for c in across] + list(extra)
    fixed = len(wanted)
    wanted += [(tuple(rng.integers(8, size - 8, 2)), int(rng.integers(5, 15))) for _ in range(n_random)]
    k = 0
    for i, (centre, radius) in enumerate(wanted):
        rr, cc = disk(centre, radius + (3 if i >= fixed else 0), shape=gt.shape)
        if i >= fixed and gt[rr, cc].any():
            continue  # random disks keep 3 px away from the others
        k += 1
        rr, cc = disk(centre, radius, shape=gt.shape)
        gt[rr, cc] = k
    return gt


def class_image(labels: np.ndarray) -> np.ndarray:
    """The image the fake source reads: its classes drawn as gray levels."""
    return np.choose(make_targets(labels), [0, 255, 128]).astype(np.uint8)


def one_hot(image: np.ndarray) -> np.ndarray:
    """Fake probabilities: the class map drawn in a normalised image, one-hot."""
    level = np.rint(image[..., 0] * 2).astype(int)  # 0 background, 1 boundary (128), 2 interior (255)
    cls = np.choose(level, [0, 2, 1])
    return np.stack([cls == c for c in range(3)]).astype(np.float32)


def pointwise(fn, band: int = 100, log: list | None = None):
    """A probability stream from a per-pixel function of the normalised rows, in bands of ``band`` rows."""

    def stream(read_rows, shape, start=0):
        for y0 in range(start, shape[0], band):
            y1 = min(shape[0], y0 + band)
            if log is not None:
                log.append((y0, y1))
            yield y0, y1, fn(read_rows(y0, y1))

    return stream


def interrupt_after(monkeypatch, blocks: int = 4) -> list:
    """Make the block path stop (KeyboardInterrupt) after decoding ``blocks`` blocks.

    Returns the list that counts the decoded blocks (one item each); padding it past ``blocks``
    lets the next run go on.
    """
    from triageseg.pipeline.blockwise import large

    real, decoded = large.decode_block, []

    def decode(*args, **kwargs):
        if len(decoded) == blocks:
            raise KeyboardInterrupt
        decoded.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(large, "decode_block", decode)
    return decoded


def channels(image: np.ndarray) -> np.ndarray:
    """Fake probabilities: the image's three channels are the probability map."""
    return np.ascontiguousarray(image.transpose(2, 0, 1))


def realistic_map(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """A network-like 3xHxW map of ``labels``: smoothed one-hot logits, smooth noise, softmax."""
    rng = np.random.default_rng(seed)
    logits = 6.0 * ndi.gaussian_filter(np.eye(3, dtype=np.float32)[make_targets(labels)].transpose(2, 0, 1),
                                       (0, 1.2, 1.2))
    logits += 1.5 * ndi.gaussian_filter(rng.normal(0.0, 1.0, logits.shape).astype(np.float32), (0, 2.0, 2.0))
    probs = np.exp(logits - logits.max(axis=0, keepdims=True))
    return (probs / probs.sum(axis=0, keepdims=True)).astype(np.float32)


def dense_clusters(size: int = 768, seed: int = 0, n: int = 700) -> np.ndarray:
    """Touching disks (radius 6-16) in clusters centred on block corners and edges, over random ones."""
    rng = np.random.default_rng(seed)
    gt = np.zeros((size, size), np.uint32)
    centres = np.array([(256, 256), (256, 512), (512, 512), (512, 380), (140, 256), (700, 512)], float)
    for k in range(1, n + 1):
        if rng.random() < 0.8:
            centre = centres[rng.integers(len(centres))] + rng.normal(0, 30, 2)
        else:
            centre = rng.uniform(0, size, 2)
        rr, cc = disk(tuple(centre), int(rng.integers(6, 17)), shape=gt.shape)
        free = gt[rr, cc] == 0
        if free.size and free.mean() > 0.6:  # keep each disk mostly visible: touching, overlapping a little
            gt[rr[free], cc[free]] = k
    return gt


def same_up_to_numbering(expected: np.ndarray, got: np.ndarray) -> bool:
    """Label for label the same images, ids renumbered (a bijection between the ids)."""
    pairs = _pairs(expected, got)
    if not ((pairs[0] > 0) == (pairs[1] > 0)).all():
        return False
    fg = pairs[:, pairs[0] > 0]
    return len(np.unique(fg[0])) == len(np.unique(fg[1])) == fg.shape[1]


def _pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The distinct (a, b) id pairs of two label images, 2 x n."""
    scale = np.int64(b.max()) + 1
    keys = np.unique(a.ravel().astype(np.int64) * scale + b.ravel())
    return np.stack([keys // scale, keys % scale])


def assert_same_objects(expected: np.ndarray, got: np.ndarray) -> None:
    """The same partition into objects (ids may differ): each object whole and once."""
    pairs = _pairs(expected, got)
    fg = pairs[:, (pairs[0] > 0) | (pairs[1] > 0)]
    assert (fg > 0).all(), "an object pixel is background in the other image"
    assert len(np.unique(fg[0])) == len(np.unique(fg[1])) == fg.shape[1], "an object is split or merged"


def run_blocks(tmp_path, image, *, stream=None, name="x", params=PARAMS, norm=None, **kwargs):
    grid = plan_blocks(image.shape, block_size=256, margin=48)
    norm = scan_image(image)[0] if norm is None else norm
    journal = Journal(tmp_path / f".{name}.blocks", {"test": name})
    summary = segment_blocks(image, tmp_path / f"{name}.tif", stream=stream or pointwise(one_hot), params=params,
                             grid=grid, norm=norm, journal=journal, **kwargs)
    return summary, journal


# --------------------------------------------------------------------------- grid


def test_plan_blocks_cores_tile_the_image_and_outer_regions_add_the_margin():
    grid = plan_blocks((768, 768), block_size=256, margin=48)
    assert len(grid) == 9
    assert grid.rows == ((0, 256, 0, 304), (256, 512, 208, 560), (512, 768, 464, 768))
    cover = np.zeros((768, 768), int)
    for b in grid.blocks:
        cover[b.core[0] : b.core[1], b.core[2] : b.core[3]] += 1
    assert (cover == 1).all()
    assert grid.blocks[4].cut == (True, True, True, True) and grid.blocks[0].cut == (False, True, False, True)
    assert [b.index for b in grid.neighbours(grid.blocks[0])] == [1, 3, 4]
    # aligned to 512 px tiles with 448 px stride, every outer region but the last is 512 + k * 448
    aligned = plan_blocks((4000, 4000), block_size=2048, margin=64, align=(512, 448))
    assert aligned.rows == ((0, 2240, 0, 2304), (2240, 4000, 2176, 4000))
    assert plan_blocks((300, 200), block_size=256, margin=48).rows == ((0, 300, 0, 300),)
    with pytest.raises(ValueError, match="margin"):
        plan_blocks((768, 768), block_size=64, margin=40)


def test_cli_block_defaults_match_the_library():
    from triageseg.cli import segment_cmds
    from triageseg.pipeline.blockwise import blocks, large

    assert segment_cmds.DEFAULT_BLOCK_SIZE == blocks.DEFAULT_BLOCK_SIZE
    assert segment_cmds.DEFAULT_MARGIN == blocks.DEFAULT_MARGIN
    assert segment_cmds.DEFAULT_THRESHOLD_MP == large.DEFAULT_THRESHOLD_MP


# --------------------------------------------------------------------------- block path == whole image


def test_nuclei_across_block_corners_and_edges_come_out_whole_and_once(tmp_path):
    gt = draw_labels()
    summary, journal = run_blocks(tmp_path, class_image(gt), geojson=tmp_path / "x.geojson", modality="fluorescence")
    out = read_labels(tmp_path / "x.tif")
    assert_same_objects(gt, out)
    n = int(gt.max())
    assert summary["objects"] == n and summary["computed"] == 9 and summary["rows"] == 768
    image = class_image(gt)
    assert same_up_to_numbering(watershed(one_hot(scan_image(image)[0].apply(image)), PARAMS), out)
    assert np.array_equal(np.unique(out), np.arange(n + 1))  # ids unique and consecutive
    features = json.loads((tmp_path / "x.geojson").read_text())["features"]
    assert [f["properties"]["label"] for f in features] == list(range(1, n + 1))
    areas = np.bincount(out.ravel(), minlength=n + 1)
    assert [f["properties"]["area_px"] for f in features] == areas[1:].tolist()
    assert {f["properties"]["modality"] for f in features} == {"fluorescence"}
    assert not journal.folder.exists()  # removed on success
    with tifffile.TiffFile(tmp_path / "x.tif") as tif:
        assert tif.pages[0].is_tiled


def test_touching_nuclei_across_an_edge_and_a_corner_come_out_once(tmp_path):
    from triageseg.postprocess.metrics import match_image

    trio = [((250, 140), 12), ((250, 162), 12), ((262, 151), 12)]  # touching across a core edge (row 256)
    corner = [((501, 501), 11), ((501, 523), 11), ((523, 501), 11), ((523, 523), 11)]  # around a core corner
    gt = draw_labels(seed=3, extra=trio + corner, across=[c for c in ACROSS if c != (512, 512)])
    run_blocks(tmp_path, class_image(gt))
    out = read_labels(tmp_path / "x.tif")
    n = int(gt.max())
    result = match_image(gt, out)
    assert (result.n_true, result.n_pred, int(result.tp[0])) == (n, n, n)  # each matched once at IoU 0.5
    for k in range(1, n + 1):  # nothing cut: every object is one piece
        from scipy import ndimage as ndi

        assert ndi.label(out == k)[1] == 1


@pytest.mark.parametrize("params", [PARAMS, WatershedParams(), WatershedParams(min_score=0.996)],
                         ids=["min_size_1", "defaults", "min_score"])
def test_block_path_equals_the_whole_image_label_for_label(tmp_path, params):
    """Dense touching clusters across core edges and corners, a realistic map: the whole image's labels, renumbered."""
    gt = dense_clusters()
    probs = realistic_map(gt)
    image = probs.transpose(1, 2, 0)
    summary, _ = run_blocks(tmp_path, image, stream=pointwise(channels, band=77), params=params,
                            norm=NormStats(0.0, 1.0))
    out = read_labels(tmp_path / "x.tif")
    whole = watershed(probs, params)
    assert int(whole.max()) > (200 if params.min_score else 300) and summary["objects"] == int(whole.max())
    if params.min_score:  # a quarter of this map's objects peak below 0.996 and are dropped, in blocks too
        assert int(whole.max()) < int(watershed(probs, params.replace(min_score=0.0)).max()) - 50
    assert same_up_to_numbering(whole, out)
    assert np.array_equal(np.unique(out), np.arange(summary["objects"] + 1))  # unique and consecutive
    # the clusters are larger than the margin: some components were decoded in grown windows
    assert summary["grown"] > 0
    # and the old stitching's failure, two objects where the whole image has one, cannot happen
    grid = plan_blocks(gt.shape, block_size=256, margin=48)
    edges = sorted({b.core[1] for b in grid.blocks if b.core[1] < 768})
    across = np.unique(np.concatenate([whole[y - 1 : y + 1].ravel() for y in edges]))
    assert across.size > 20  # many objects do cross a core boundary


def test_a_component_larger_than_the_margin_is_decoded_whole(tmp_path):
    """A chain of touching nuclei 700 px long through three block rows and columns, a 150 px nucleus on a corner."""
    gt = np.zeros((768, 768), np.uint32)
    k = 0
    for t in np.arange(40, 730, 10):  # a diagonal chain: one foreground component, 69 nuclei
        k += 1
        rr, cc = disk((t, t + 10 * np.sin(t / 40)), 9, shape=gt.shape)
        gt[rr, cc] = np.where(gt[rr, cc] == 0, k, gt[rr, cc])
    rr, cc = disk((512, 256), 75, shape=gt.shape)
    gt[rr, cc] = 0
    gt[rr, cc] = k + 1
    probs = realistic_map(gt, seed=4)
    summary, _ = run_blocks(tmp_path, probs.transpose(1, 2, 0), stream=pointwise(channels), params=PARAMS,
                            norm=NormStats(0.0, 1.0))
    out = read_labels(tmp_path / "x.tif")
    whole = watershed(probs, PARAMS)
    assert same_up_to_numbering(whole, out) and summary["grown"] >= 2
    fg, n = ndi.label(whole > 0, structure=np.ones((3, 3)))
    assert np.bincount(fg.ravel())[1:].max() > 100 * 100  # the chain really is one component past any margin
    assert all(ndi.label(out == i, structure=np.ones((3, 3)))[1] == 1 for i in np.unique(out)[1:])  # nothing cut
    assert summary["oversized"] == 0
    # a window may grow only so far (memory): past the limit the component is decoded in the limited window, counted
    from triageseg.pipeline.blockwise.blocks import decode_block

    grid = plan_blocks(gt.shape, block_size=256, margin=48)
    result = decode_block(lambda b: probs[:, b[0] : b[1], b[2] : b[3]], grid.blocks[4], params=PARAMS, margin=48,
                          limit=1)
    assert result.oversized >= 1 and result.n > 0


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("stage", ["probabilities", "blocks"])
def test_resume_after_an_interruption_gives_the_same_file(tmp_path, monkeypatch, stage):
    from triageseg.pipeline.blockwise import large

    image = class_image(draw_labels(seed=5))
    clean = tmp_path / "clean"
    clean.mkdir()
    run_blocks(clean, image, name="img", geojson=clean / "img.geojson")

    bands, decoded, real_decode = [], [], large.decode_block

    def decode(*args, **kwargs):
        if stage == "blocks" and len(decoded) == 4:
            raise KeyboardInterrupt
        decoded.append(1)
        return real_decode(*args, **kwargs)

    def interrupted(rows):
        if stage == "probabilities" and len(bands) == 7:  # in the 7th band
            raise KeyboardInterrupt
        return one_hot(rows)

    monkeypatch.setattr(large, "decode_block", decode)
    with pytest.raises(KeyboardInterrupt):
        run_blocks(tmp_path, image, stream=pointwise(interrupted, log=bands), name="img",
                   geojson=tmp_path / "img.geojson")
    assert not (tmp_path / "img.tif").exists() and not (tmp_path / "img.geojson").exists()
    folder = tmp_path / ".img.blocks"
    done = json.loads((folder / "probs.zarr.json").read_text())["rows"]
    blocks = sorted(p.name for p in folder.glob("block_*.npz"))
    if stage == "probabilities":  # 6 bands of 100 rows: the whole chunk rows (256 each) among them are kept
        assert done == 512 and blocks == []
    else:
        assert done == 768 and blocks == [f"block_{i:05d}.npz" for i in range(4)]

    bands.clear()
    decoded.clear()
    stage = "done"
    summary, _ = run_blocks(tmp_path, image, stream=pointwise(interrupted, log=bands), name="img",
                            geojson=tmp_path / "img.geojson")
    assert [b[0] for b in bands[:1]] == ([done] if done < 768 else [])  # from the first unfinished row
    assert summary["rows"] == 768 - done
    assert len(decoded) == summary["computed"] == (9 if done == 512 else 5)
    assert (tmp_path / "img.tif").read_bytes() == (clean / "img.tif").read_bytes()
    assert (tmp_path / "img.geojson").read_bytes() == (clean / "img.geojson").read_bytes()
    assert not folder.exists()


def test_probability_stream_is_bit_for_bit_the_whole_image_prediction():
    """The block path's probabilities: the in-memory tiles, batches and blending, resumable at any row."""
    import torch

    from triageseg.segmenters.predict import predict, stream_probabilities

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 3, 5, padding=2))
    image = np.random.default_rng(0).random((300, 517, 3)).astype(np.float32)
    whole = predict(model, image, tile_size=128, overlap=32, batch_size=3)
    for start in (0, 1, 150, 299):
        reads = []

        def read_rows(y0, y1):
            reads.append((y0, y1))
            return image[y0:y1]

        got = list(stream_probabilities(model, read_rows, image.shape[:2], tile_size=128, overlap=32, batch_size=3,
                                        start=start))
        assert [g[0] for g in got[1:]] == [g[1] for g in got[:-1]] and (got[0][0], got[-1][1]) == (start, 300)
        assert np.array_equal(np.concatenate([g[2] for g in got], axis=1), whole[:, start:])
        assert max(y1 - y0 for y0, y1 in reads) <= 128 + 96  # one band of tile rows at a time
        assert all(b[0] >= a[1] for a, b in zip(reads, reads[1:]))  # each row read once


def test_a_journal_with_other_settings_is_discarded(tmp_path):
    journal = Journal(tmp_path / ".j", {"input": "a", "block_size": 256})
    journal.set_state({"used_model": "he"})
    (journal.folder / "block_00000.npz").write_bytes(b"x")
    assert Journal(tmp_path / ".j", {"input": "a", "block_size": 256}).state == {"used_model": "he"}
    fresh = Journal(tmp_path / ".j", {"input": "a", "block_size": 512})
    assert fresh.state is None and fresh.done() == set()


# --------------------------------------------------------------------------- lazy input


def test_lazy_image_reads_regions_levels_and_pixel_size(tmp_path):
    from triageseg.datasets.lazy import LazyImage, image_size

    rng = np.random.default_rng(0)
    rgb = (rng.random((600, 700, 3)) * 255).astype(np.uint8)
    path = tmp_path / "pyr.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(rgb, tile=(128, 128), subifds=1, compression="zlib", photometric="rgb",
                 metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25})
        tw.write(rgb[::2, ::2], tile=(128, 128), subfiletype=1, compression="zlib", photometric="rgb")
    with LazyImage(path) as image:
        assert image.shape == (600, 700, 3) and image.tiled and image.levels == [(600, 700), (300, 350)]
        assert np.array_equal(image[100:357, 33:500], rgb[100:357, 33:500])
        assert image.pixel_size == (0.25, 0.25)
    with LazyImage(path, level=1) as image:
        assert np.array_equal(image[0:300, 0:350], rgb[::2, ::2]) and image.pixel_size == (0.5, 0.5)
    assert image_size(path) == (600, 700) and image_size(path, level=1) == (300, 350)
    with pytest.raises(DataError, match=r"level 2 requested; the file has level\(s\) 0..1"):
        LazyImage(path, level=2)
    gray = tmp_path / "contiguous.tif"  # uncompressed strips: memory-mapped
    tifffile.imwrite(gray, rgb[..., 0].astype(">u2"), byteorder=">")
    with LazyImage(gray) as image:
        assert isinstance(image._array, np.memmap)
        assert np.array_equal(image[5:9, 600:700], rgb[5:9, 600:700, 0])


def test_truncated_or_non_tiled_giant_tiff_is_a_clear_error(tmp_path, tiny_bundle, monkeypatch):
    from triageseg.datasets import lazy
    from triageseg.pipeline import Pipeline
    from triageseg.pipeline.blockwise.large import BlockOptions

    rng = np.random.default_rng(0)
    data = (rng.random((1000, 1000)) * 60000).astype(np.uint16)
    tiled = tmp_path / "tiled.tif"
    tifffile.imwrite(tiled, data, tile=(256, 256), compression="zlib")
    cut = tmp_path / "cut.tif"
    cut.write_bytes(tiled.read_bytes()[: tiled.stat().st_size // 2])
    strips = tmp_path / "strips.tif"
    tifffile.imwrite(strips, data, compression="zlib", rowsperstrip=1000)
    monkeypatch.setattr(lazy, "MAX_CHUNK_BYTES", 1 << 20)  # a 2 MB strip stands for a 768 MB one

    pipe = Pipeline.from_bundle(tiny_bundle, device="cpu")
    report = pipe.segment_files([cut, strips], tmp_path / "out", on_error="skip", blocks=BlockOptions(threshold_mp=0))
    problems = dict(report.failures)
    assert "truncated TIFF" in problems[cut] and "tiles/strips missing" in problems[cut]
    assert "not tiled" in problems[strips] and "tiled TIFF" in problems[strips]
    with pytest.raises(DataError, match="strips.tif: not tiled"):
        pipe.segment_files([strips], tmp_path / "out", blocks=BlockOptions(threshold_mp=0))


def test_global_normalisation_equals_the_in_memory_reader():
    rng = np.random.default_rng(1)
    image = (rng.gamma(2.0, 900.0, (2500, 2100, 3))).astype(np.uint16)  # > 4M values: strided subsample
    norm, overview = scan_image(image, window=512)
    whole = normalize_image(image)
    assert np.array_equal(norm.apply(image), whole)
    assert overview.dtype == np.float32 and np.array_equal(overview, whole[::2, ::2])  # the subsample
    small = image[:300, :200, 0]
    assert np.array_equal(scan_image(small)[0].apply(small), normalize_image(small))
    with pytest.raises(DataError, match="NaN"):
        scan_image(np.full((40, 40), np.nan, np.float32), name="nan.tif")


def test_overview_views_are_image_views_when_the_overview_is_the_image():
    from triageseg.router.model import RouterConfig, image_views, overview_views

    rng = np.random.default_rng(2)
    image = rng.random((700, 650, 3)).astype(np.float32)
    config = RouterConfig(class_names=("a", "b"), image_size=32)
    crop = lambda t, l, h, w: image[t : t + h, l : l + w]
    views = overview_views(image, image.shape[:2], crop, config)
    assert views.shape == (6, 32, 32, 3)
    assert np.array_equal(views, image_views(image, config))


def test_use_blocks_reads_sizes_from_headers(tmp_path):
    import imagecodecs

    from triageseg.pipeline.blockwise.large import BlockOptions, use_blocks

    imagecodecs.imwrite(tmp_path / "a.png", np.zeros((300, 500, 3), np.uint8))
    imagecodecs.imwrite(tmp_path / "b.jpg", np.zeros((310, 400), np.uint8))
    tifffile.imwrite(tmp_path / "c.tif", np.zeros((200, 250), np.uint16))
    for name, pixels in (("a.png", 150_000), ("b.jpg", 124_000), ("c.tif", 50_000)):
        assert use_blocks(tmp_path / name, BlockOptions(threshold_mp=(pixels - 1) / 1e6))
        assert not use_blocks(tmp_path / name, BlockOptions(threshold_mp=pixels / 1e6))
    assert use_blocks(tmp_path / "c.tif", BlockOptions(level=1))


# --------------------------------------------------------------------------- output


def test_pyramid_writer_streams_levels_and_is_deterministic(tmp_path):
    from triageseg.datasets.pyramid import write_pyramid

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 70000, (2100, 1500)).astype(np.uint32)
    calls = []

    def read_rows(y0, y1):
        calls.append((y0, y1))
        return labels[y0:y1]

    for name in ("a.tif", "b.tif"):
        write_pyramid(tmp_path / name, labels.shape, np.uint32, read_rows, tile=256, pixel_size=0.5)
    assert (tmp_path / "a.tif").read_bytes() == (tmp_path / "b.tif").read_bytes()
    assert calls[:9] == [(y, min(2100, y + 256)) for y in range(0, 2100, 256)] and len(calls) == 18  # level 0 only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif", "b.tif"]  # no scratch left
    with tifffile.TiffFile(tmp_path / "a.tif") as tif:
        series = tif.series[0]
        assert [lvl.shape for lvl in series.levels] == [(2100, 1500), (1050, 750), (525, 375)]
        assert np.array_equal(series.levels[0].asarray(), labels)
        assert np.array_equal(series.levels[1].asarray(), labels[::2, ::2])
        assert np.array_equal(series.levels[2].asarray(), labels[::4, ::4])
        assert tif.pages[0].is_tiled
    assert read_pixel_size(tmp_path / "a.tif") == pytest.approx((0.5, 0.5))


def test_geojson_polygon_follows_the_pixel_edges():
    from triageseg.pipeline.blockwise.geojson import mask_polygon

    yy, xx = np.mgrid[:21, :21]
    mask = (yy - 10) ** 2 + (xx - 10) ** 2 <= 100
    ring = np.asarray(mask_polygon(mask, 100, 200))
    assert (ring[0] == ring[-1]).all()
    x, y = ring[:, 0], ring[:, 1]
    area = 0.5 * abs(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))
    assert abs(area - mask.sum()) < 0.05 * mask.sum()
    assert (x.min(), x.max(), y.min(), y.max()) == pytest.approx((200 + 1 / 6, 221 - 1 / 6, 100 + 1 / 6, 121 - 1 / 6),
                                                                 abs=1e-3)


# --------------------------------------------------------------------------- through the pipeline


def _mosaic(tmp_path):
    from triageseg.datasets.synth import synth_sample

    rng = np.random.default_rng(0)
    tiles = [synth_sample("fluorescence", size=192, rng=rng)[0] for _ in range(6)]
    image = np.block([[tiles[0], tiles[1], tiles[2]], [tiles[3], tiles[4], tiles[5]]]) if tiles[0].ndim == 2 else \
        np.concatenate([np.concatenate(tiles[:3], axis=1), np.concatenate(tiles[3:], axis=1)], axis=0)
    path = tmp_path / "mosaic.tif"
    tifffile.imwrite(path, image, tile=(128, 128), compression="zlib", resolution=(1 / 0.4, 1 / 0.4),
                     resolutionunit="MICROMETER", photometric="rgb" if image.ndim == 3 else "minisblack")
    return path


def test_segment_files_goes_block_wise_and_resumes_to_the_same_file(tmp_path, tiny_bundle, monkeypatch):
    from triageseg.pipeline import Pipeline
    from triageseg.pipeline.blockwise.large import BlockOptions

    path = _mosaic(tmp_path)
    options = BlockOptions(block_size=192, margin=32, threshold_mp=0.1, geojson=True)
    pipe = Pipeline.from_bundle(tiny_bundle, device="cpu", batch_size=2)
    report = pipe.segment_files([path], tmp_path / "clean", blocks=options)
    assert len(report.written) == 1
    row = next(csv.DictReader((tmp_path / "clean" / "routing.csv").open()))
    assert row["mode"] == "blocks" and row["used_model"] in pipe.available
    labels = read_labels(tmp_path / "clean" / "mosaic.tif")
    assert labels.shape == (384, 576)
    assert np.array_equal(np.unique(labels[labels > 0]), np.arange(1, int(row["objects"]) + 1))
    assert read_pixel_size(tmp_path / "clean" / "mosaic.tif") == pytest.approx((0.4, 0.4))
    features = json.loads((tmp_path / "clean" / "mosaic.geojson").read_text())["features"]
    assert len(features) == int(row["objects"])

    # the same image in memory: the same labels, up to the numbering
    report = pipe.segment_files([path], tmp_path / "whole", blocks=BlockOptions(threshold_mp=float("inf")))
    assert next(csv.DictReader((tmp_path / "whole" / "routing.csv").open()))["mode"] != "blocks"
    assert same_up_to_numbering(read_labels(tmp_path / "whole" / "mosaic.tif"), labels)

    decoded = interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        pipe.segment_files([path], tmp_path / "resumed", blocks=options)
    assert not (tmp_path / "resumed" / "mosaic.tif").exists()
    decoded[:] = [0] * 10
    pipe.segment_files([path], tmp_path / "resumed", blocks=options)
    assert len(decoded) == 10 + 6 - 2  # 6 blocks, 2 done before the interruption
    assert (tmp_path / "resumed" / "mosaic.tif").read_bytes() == (tmp_path / "clean" / "mosaic.tif").read_bytes()
    assert not (tmp_path / "resumed" / ".mosaic.blocks").exists()


def test_segment_cli_block_options(tmp_path, tiny_bundle):
    from triageseg.cli.main import cli

    path = _mosaic(tmp_path)
    base = ["segment", str(path), "--bundle", str(tiny_bundle), "--out", str(tmp_path / "out"), "--quiet"]
    res = CliRunner().invoke(cli, [*base, "--blocks-above", "0", "--block-size", "256", "--geojson"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "mosaic.geojson").is_file()
    assert json.loads((tmp_path / "out" / "segment_config.json").read_text())["block_size"] == 256
    res = CliRunner().invoke(cli, [*base, "--block-size", "256", "--block-margin", "200"])
    assert res.exit_code == 2 and "margin" in res.output
    res = CliRunner().invoke(cli, [*base, "--level", "-1"])
    assert res.exit_code == 2
