"""Multi-page TIFFs: pages without axis metadata are never guessed; ``page`` / ``channel`` choose."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from triageseg.datasets.errors import DataError
from triageseg.datasets.io import normalize_image, read_image, read_image_raw, read_labels


def _pages(path, n, shape=(8, 9)):
    """``n`` gray pages without axis metadata; page k holds the value 10 * (k + 1) on a ramp."""
    ramp = np.arange(np.prod(shape), dtype=np.uint16).reshape(shape)
    for k in range(n):
        tifffile.imwrite(path, ramp + 1000 * (k + 1), append=True, metadata=None, photometric="minisblack")
    return ramp


@pytest.mark.parametrize("n", [2, 3, 4])
def test_two_to_four_pages_without_axes_are_refused_naming_pages_and_options(tmp_path, n):
    path = tmp_path / f"p{n}.tif"
    _pages(path, n)
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].axes[0] in "IQ" and tif.series[0].shape[0] == n
    for read in (read_image, read_image_raw):
        with pytest.raises(DataError) as info:
            read(path)
        message = str(info.value)
        assert str(path) in message and f"{n} pages" in message and f"0-{n - 1}" in message
        assert "--page" in message and "--channel" in message


def test_a_shaped_tiff_without_axes_is_ambiguous_too(tmp_path):
    path = tmp_path / "shaped.tif"
    tifffile.imwrite(path, np.zeros((3, 8, 8), np.uint16), photometric="minisblack")
    with pytest.raises(DataError, match="3 pages"):
        read_image(path)


def test_page_picks_one_plane_and_channel_reads_pages_as_channels(tmp_path):
    path = tmp_path / "p4.tif"
    ramp = _pages(path, 4)
    for k in range(4):
        raw = read_image_raw(path, page=k)
        assert raw.shape == (8, 9)
        np.testing.assert_array_equal(raw, ramp + 1000 * (k + 1))
        np.testing.assert_array_equal(read_image(path, page=k), normalize_image(ramp + 1000 * (k + 1)))
    # the 4th page is a channel to choose, not an alpha to drop
    np.testing.assert_array_equal(read_image(path, channel=3), normalize_image(ramp + 4000))
    assert read_image_raw(path, pages_as_channels=True).shape == (8, 9, 4)
    with pytest.raises(DataError, match="page 4 out of range.*4 pages"):
        read_image(path, page=4)


def test_page_selects_a_plane_of_a_stack_and_is_refused_elsewhere(tmp_path):
    stack = tmp_path / "z.tif"
    data = np.arange(6 * 5 * 4, dtype=np.uint16).reshape(6, 5, 4)
    tifffile.imwrite(stack, data, imagej=True, metadata={"axes": "ZYX"})
    with pytest.raises(DataError, match="3-D stack"):
        read_image(stack)
    np.testing.assert_array_equal(read_image_raw(stack, page=5), data[5])
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.ones((5, 4), np.uint16))
    assert read_image_raw(plain, page=0).shape == (5, 4)  # the only plane
    with pytest.raises(DataError, match="page 1.*one plane"):
        read_image_raw(plain, page=1)
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((5, 4, 3), np.uint8), photometric="rgb")
    assert read_image(rgb).shape == (5, 4, 3)  # colour samples are not pages


def test_multi_page_labels_are_refused(tmp_path):
    path = tmp_path / "lab.tif"
    _pages(path, 2)
    with pytest.raises(DataError, match="2 pages"):
        read_labels(path)


def test_segment_and_route_take_page(tiny_bundle, tmp_path):
    from triageseg.cli.main import cli

    folder = tmp_path / "d"
    folder.mkdir()
    _pages(folder / "three.tif", 3, shape=(48, 40))
    out = tmp_path / "out"
    runner = CliRunner()
    res = runner.invoke(cli, ["segment", str(folder), "--bundle", str(tiny_bundle), "--out", str(out), "--quiet"])
    assert res.exit_code == 1 and "3 pages" in res.output and "--page" in res.output
    res = runner.invoke(cli, ["segment", str(folder), "--bundle", str(tiny_bundle), "--out", str(out), "--quiet",
                              "--page", "2"])
    assert res.exit_code == 0, res.output
    assert read_labels(out / "three.tif").shape == (48, 40)
    res = runner.invoke(cli, ["route", str(folder / "three.tif"), "--bundle", str(tiny_bundle), "--page", "1"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["route", str(folder / "three.tif"), "--bundle", str(tiny_bundle)])
    assert res.exit_code == 1 and "3 pages" in res.output
