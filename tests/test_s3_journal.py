"""A block journal on object storage (issue 21): the probability store and finished blocks under ``s3://``.

Against moto's S3 server on 127.0.0.1 (``s3_server`` in conftest.py), never a real network:
- the store's rows land as objects in the bucket, read back equal, and a reopened store
  resumes from them; a chunk overwritten, truncated or deleted on the store is found by
  its checksum (the store's ETag) and computed again;
- the journal's manifest, key and block files work there as in a folder;
- the block path with its journal on S3 writes the very label file the local journal does,
  and leaves nothing in the bucket.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_blocks import class_image, draw_labels, interrupt_after, one_hot, pointwise

from triageseg.datasets.errors import DataError
from triageseg.pipeline.blockwise.blocks import plan_blocks, scan_image
from triageseg.pipeline.blockwise.journal import Journal, journal_location
from triageseg.pipeline.blockwise.large import segment_blocks
from triageseg.pipeline.blockwise.probstore import ProbabilityStore
from triageseg.postprocess.watershed import WatershedParams

PARAMS = WatershedParams()


def _keys(fs, prefix: str) -> list[str]:
    fs.invalidate_cache()
    return sorted(p.split("/", 1)[1] for p in fs.find(prefix.removeprefix("s3://")))


def test_probability_store_on_s3_lands_in_the_bucket_and_resumes(s3_server, s3_bucket, caplog):
    fs = s3_server["fs"]
    folder = f"{s3_bucket}/run/.x.blocks/probs.zarr"
    rows = np.random.default_rng(0).random((3, 300, 1100)).astype(np.float32)
    store = ProbabilityStore(folder, (300, 1100))
    assert store.remote and store.missing() == [(0, 300)]
    store.write_rows(0, rows[:, :256])
    keys = _keys(fs, s3_bucket)
    assert {"run/.x.blocks/probs.zarr/c/0/0/0", "run/.x.blocks/probs.zarr/c/0/0/1",
            "run/.x.blocks/probs.zarr/zarr.json", "run/.x.blocks/probs.zarr.json"} <= set(keys)
    assert not any("/c/0/1/" in k for k in keys)  # row 1 not written yet
    # reopened (another node, a rerun): the first chunk row is finished, its bytes as written
    again = ProbabilityStore(folder, (300, 1100))
    assert again.missing() == [(256, 300)]
    np.testing.assert_array_equal(again.read((0, 256, 0, 1100)), rows[:, :256])
    again.write_rows(256, rows[:, 256:])
    assert again.complete
    np.testing.assert_array_equal(ProbabilityStore(folder, (300, 1100)).read((0, 300, 0, 1100)), rows)

    # a chunk overwritten with other (valid) bytes, one truncated, one deleted: each row computed again
    chunk = folder.removeprefix("s3://") + "/c/0/{}/{}"
    fs.pipe_file(chunk.format(0, 1), fs.cat_file(chunk.format(1, 1)))
    with caplog.at_level("WARNING"):
        assert ProbabilityStore(folder, (300, 1100)).missing() == [(0, 256)]
    assert "probs.zarr: probability chunk(s) missing or damaged" in caplog.text and "c/0/0/1" in caplog.text
    store = ProbabilityStore(folder, (300, 1100))
    store.write_rows(0, rows[:, :256])
    fs.pipe_file(chunk.format(1, 0), fs.cat_file(chunk.format(1, 0))[:-7])
    fs.rm_file(chunk.format(0, 0))
    assert ProbabilityStore(folder, (300, 1100)).missing() == [(0, 300)]


def test_a_damaged_chunk_on_s3_read_after_opening_is_an_error_naming_the_store(s3_server, s3_bucket):
    folder = f"{s3_bucket}/.y.blocks/probs.zarr"
    store = ProbabilityStore(folder, (256, 1024))
    store.write_rows(0, np.full((3, 256, 1024), 0.25, np.float32))
    s3_server["fs"].pipe_file(folder.removeprefix("s3://") + "/c/0/0/0", b"garbage")
    with pytest.raises(DataError, match=r"\.y\.blocks/probs\.zarr: damaged probability chunk"):
        store.read((0, 256, 0, 1024))


def test_journal_on_s3_keeps_blocks_and_discards_another_key(s3_server, s3_bucket, caplog):
    from triageseg.pipeline.blockwise.blocks import BlockResult

    folder = f"{s3_bucket}/scratch/.img.blocks"
    journal = Journal(folder, {"input": "a.tif"})
    assert journal.remote and journal.state is None and journal.done() == set()
    journal.set_state({"used_model": "generalist"})
    result = BlockResult(3, (0, 2, 0, 2), np.array([[1, 0], [0, 1]], np.uint32), np.array([0], np.int64),
                         np.array([2], np.int64))
    journal.save(result)
    again = Journal(folder, {"input": "a.tif"})
    assert again.state == {"used_model": "generalist"} and again.done() == {3}
    np.testing.assert_array_equal(again.load(3).labels, result.labels)
    s3_server["fs"].pipe_file(folder.removeprefix("s3://") + "/block_00003.npz", b"not a block")
    with pytest.raises(DataError, match="block_00003.npz: damaged block journal entry"):
        again.load(3)
    assert again.done() == set()  # the damaged entry removed: the block is decoded again
    journal.save(result)
    with caplog.at_level("WARNING"):
        other = Journal(folder, {"input": "b.tif"})
    assert "input changed" in caplog.text and other.state is None and other.done() == set()
    other.remove()
    assert _keys(s3_server["fs"], s3_bucket) == []


def test_journal_location_under_a_scratch_uri_is_per_output_folder(tmp_path):
    here = journal_location(tmp_path / "out", "slide", "s3://bucket/prefix/")
    there = journal_location(tmp_path / "other" / "out", "slide", "s3://bucket/prefix")
    assert here.startswith("s3://bucket/prefix/out-") and here.endswith("/.slide.blocks") and here != there
    assert journal_location(tmp_path / "out", "slide", "s3://bucket/prefix") == here
    assert journal_location(tmp_path / "out", "slide") == tmp_path / "out" / ".slide.blocks"


def test_block_path_with_its_journal_on_s3_writes_the_local_label_file(s3_server, s3_bucket, tmp_path):
    image = class_image(draw_labels(512, seed=4))
    grid = plan_blocks(image.shape, block_size=256, margin=48)
    norm = scan_image(image)[0]
    outputs = {}
    for where, folder in (("local", tmp_path / "local" / ".img.blocks"), ("s3", f"{s3_bucket}/j/.img.blocks")):
        (tmp_path / where).mkdir()
        out = tmp_path / where / "img.tif"
        summary = segment_blocks(image, out, stream=pointwise(one_hot), params=PARAMS, grid=grid, norm=norm,
                                 journal=Journal(folder, {"test": "img"}))
        outputs[where] = (out.read_bytes(), summary)
        if where == "s3":  # the journal's objects went to the bucket, and are removed with the journal
            assert _keys(s3_server["fs"], s3_bucket) == []
            assert sorted(p.name for p in (tmp_path / "s3").iterdir()) == ["img.tif"]  # no temporary cores left
    assert outputs["s3"][1]["objects"] > 0 and outputs["s3"][1]["rows"] == 512
    assert outputs["s3"][0] == outputs["local"][0]


def test_block_path_resumes_from_a_journal_on_s3(s3_server, s3_bucket, tmp_path, monkeypatch):
    image = class_image(draw_labels(512, seed=5))
    grid = plan_blocks(image.shape, block_size=256, margin=48)
    norm = scan_image(image)[0]
    folder = f"{s3_bucket}/j/.img.blocks"
    interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        segment_blocks(image, tmp_path / "img.tif", stream=pointwise(one_hot), params=PARAMS, grid=grid, norm=norm,
                       journal=Journal(folder, {"test": "img"}))
    assert Journal(folder, {"test": "img"}).done() == {0, 1}
    monkeypatch.undo()
    summary = segment_blocks(image, tmp_path / "img.tif", stream=pointwise(one_hot), params=PARAMS, grid=grid,
                             norm=norm, journal=Journal(folder, {"test": "img"}))
    assert summary["rows"] == 0 and summary["computed"] == len(grid) - 2


def test_scratch_without_ray_is_a_usage_error(tmp_path):
    from click.testing import CliRunner

    from triageseg.cli.main import cli

    (tmp_path / "bundle").mkdir()
    (tmp_path / "a.png").write_bytes(b"")
    result = CliRunner().invoke(cli, ["segment", str(tmp_path / "a.png"), "--bundle", str(tmp_path / "bundle"),
                                      "--out", str(tmp_path / "out"), "--scratch", "s3://bucket/prefix"])
    assert result.exit_code == 2 and "--scratch is for runs on Ray" in result.output, result.output


def test_scratch_reaches_the_cluster_options_and_cores_folders_are_temporaries(tmp_path):
    from triageseg.cli.segment_cmds import _cluster_options
    from triageseg.pipeline.blockwise.journal import temporaries

    options = _cluster_options("auto", 0, True, "127.0.0.1:1", "1", 1.0, 0.0, "s3://bucket/prefix")
    assert options.scratch == "s3://bucket/prefix"
    # a finish task killed while rendering leaves .<name>.cores.XXXXXXXX beside the labels: the next run removes it
    (tmp_path / ".img.cores.ab12cd_9").mkdir()
    (tmp_path / ".img.b.cores.ab12cd_9").mkdir()  # another image's
    assert [p.name for p in temporaries(tmp_path, "img")] == [".img.cores.ab12cd_9"]
