"""datasets.io: every image flavour in, float32 HxWx3 in [0, 1] out; labels round-trip."""

from __future__ import annotations

import hashlib

import imagecodecs
import numpy as np
import pytest
import tifffile

from triageseg.datasets.errors import DataError
from triageseg.datasets.io import (
    IMAGE_SUFFIXES,
    image_id,
    normalize_image,
    read_image,
    read_image_raw,
    read_labels,
    read_pixel_size,
    write_labels,
)


def _ramp(shape, dtype, top):
    n = int(np.prod(shape))
    return (np.arange(n, dtype=np.float64).reshape(shape) * (top / (n - 1))).astype(dtype)


def _png(path, array):
    path.write_bytes(imagecodecs.png_encode(array))
    return path


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_suffixes_and_ids():
    assert IMAGE_SUFFIXES == (".png", ".tif", ".tiff", ".jpg", ".jpeg")
    assert image_id("a/b/fluorescence_0007.png") == "fluorescence_0007"
    assert image_id("x.v2.TIFF") == "x.v2"
    assert image_id("plain") == "plain"


@pytest.mark.parametrize("dtype,top", [(np.uint8, 255), (np.uint16, 65535), (np.float32, 3.5)])
def test_gray_tiff_any_dtype_gives_float_rgb_in_unit_range(tmp_path, dtype, top):
    raw = _ramp((20, 30), dtype, top)
    path = tmp_path / "g.tif"
    tifffile.imwrite(path, raw)
    before = _sha(path)
    image = read_image(path)
    assert image.shape == (20, 30, 3) and image.dtype == np.float32
    assert image.min() == 0.0 and image.max() == 1.0
    np.testing.assert_array_equal(image[..., 0], image[..., 2])
    assert _sha(path) == before  # input never modified


def test_percentiles_clip_outliers_and_are_configurable():
    raw = np.zeros((10, 100), np.uint16)
    raw[:, :50] = 100
    raw[:, 50:] = 200
    raw[0, 0] = 60000  # one hot pixel (0.1 %)
    image = normalize_image(raw)
    assert image[5, 10, 0] == 0.0 and image[5, 60, 0] == 1.0  # hot pixel did not squash the range
    full = normalize_image(raw, percentiles=(0.0, 100.0))
    assert full[0, 0, 0] == 1.0 and full[5, 60, 0] == pytest.approx((200 - 100) / (60000 - 100), abs=1e-6)
    none = normalize_image(raw, percentiles=None)
    assert none[5, 60, 0] == pytest.approx(200 / 65535)
    with pytest.raises(ValueError, match="percentiles"):
        normalize_image(raw, percentiles=(50, 10))


def test_constant_and_nearly_constant_images_do_not_divide_by_zero():
    const = normalize_image(np.full((8, 8), 7, np.uint8))
    assert np.all(const == 0.0) and np.isfinite(const).all()
    sparse = np.zeros((100, 100), np.uint8)
    sparse[0, 0] = 255  # percentiles coincide: min/max is used instead
    out = normalize_image(sparse)
    assert out[0, 0, 0] == 1.0 and out[50, 50, 0] == 0.0


def test_rgb_png_keeps_colour_with_joint_normalisation(tmp_path):
    raw = np.zeros((16, 16, 3), np.uint8)
    raw[..., 0] = 200  # red background
    raw[4:8, 4:8] = (50, 0, 150)
    image = read_image(_png(tmp_path / "c.png", raw))
    assert image.shape == (16, 16, 3)
    # joint scaling: red stays the brightest channel in the background, blue stays > red in the blob
    assert image[0, 0, 0] == 1.0 and image[0, 0, 1] == 0.0
    assert image[5, 5, 2] > image[5, 5, 0] > 0.0


def test_rgba_png_drops_alpha_and_16bit_png(tmp_path):
    raw = np.zeros((8, 8, 4), np.uint8)
    raw[..., 1] = _ramp((8, 8), np.uint8, 255)
    raw[..., 3] = 255
    image = read_image(_png(tmp_path / "a.png", raw))
    assert image.shape == (8, 8, 3) and image[..., 1].max() == 1.0 and image[..., 0].max() == 0.0
    deep = _ramp((8, 8), np.uint16, 65535)
    assert read_image_raw(_png(tmp_path / "d.png", deep)).dtype == np.uint16
    assert read_image(tmp_path / "d.png").max() == 1.0


def test_jpeg(tmp_path):
    raw = np.repeat(_ramp((32, 32), np.uint8, 255)[..., None], 3, axis=2)
    path = tmp_path / "j.jpg"
    path.write_bytes(imagecodecs.jpeg8_encode(raw, level=95))
    image = read_image(path)
    assert image.shape == (32, 32, 3) and image.max() == 1.0 and image.min() == 0.0


def test_multichannel_tiff_needs_a_channel_choice(tmp_path):
    raw = np.stack([np.full((8, 8), 10, np.uint16), _ramp((8, 8), np.uint16, 1000)])
    path = tmp_path / "two.tif"
    tifffile.imwrite(path, raw, metadata={"axes": "CYX"})
    with pytest.raises(DataError, match="2 channels") as info:
        read_image(path)
    assert str(path) in str(info.value)
    one = read_image(path, channel=1)
    assert one.max() == 1.0 and np.array_equal(one[..., 0], one[..., 1])
    pair = read_image(path, channel=(1, 0))
    assert pair[..., 2].max() == 0.0 and pair[..., 0].max() == 1.0
    with pytest.raises(DataError, match="out of range"):
        read_image(path, channel=2)
    five = tmp_path / "five.tif"
    tifffile.imwrite(five, np.zeros((5, 8, 8), np.uint16) + np.arange(5)[:, None, None], metadata={"axes": "CYX"})
    with pytest.raises(DataError, match="5 channels"):
        read_image(five)
    assert read_image(five, channel=(0, 2, 4)).shape == (8, 8, 3)


@pytest.mark.parametrize("axes,shape", [("ZYX", (6, 8, 8)), ("TYX", (3, 8, 8)), ("TZYX", (2, 3, 8, 8))])
def test_stacks_and_time_series_are_refused_naming_axes(tmp_path, axes, shape):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros(shape, np.uint16), imagej=True, metadata={"axes": axes})
    with pytest.raises(DataError, match=f"axes '{axes}'") as info:
        read_image(path)
    assert "stack or time series" in str(info.value) and str(path) in str(info.value)


def test_singleton_axes_are_squeezed(tmp_path):
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, _ramp((1, 1, 8, 9), np.uint16, 500), imagej=True, metadata={"axes": "TZYX"})
    assert read_image(path).shape == (8, 9, 3)


def test_bad_files_raise_data_error_naming_the_file(tmp_path):
    good = tmp_path / "good.png"
    _png(good, _ramp((64, 64), np.uint8, 255))
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes(good.read_bytes()[:40])
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(b"not a tiff at all")
    for path in (truncated, empty, garbage, tmp_path / "missing.png", tmp_path / "x.bmp"):
        if path.suffix == ".bmp":
            path.write_bytes(b"BM")
        with pytest.raises(DataError) as info:
            read_image(path)
        assert str(path) in str(info.value)


def test_nan_empty_and_wrong_dtype_arrays():
    with pytest.raises(DataError, match="NaN"):
        normalize_image(np.array([[0.0, np.nan]], np.float32), name="n.tif")
    with pytest.raises(DataError, match="infinite"):
        normalize_image(np.array([[0.0, np.inf]]))
    with pytest.raises(DataError, match="empty"):
        normalize_image(np.zeros((0, 5), np.uint8))
    with pytest.raises(DataError, match="dtype complex"):
        normalize_image(np.zeros((4, 4), np.complex64))
    with pytest.raises(DataError, match="n.tif: image contains NaN"):
        normalize_image(np.full((2, 2), np.nan), name="n.tif")


def test_labels_round_trip_uint16_and_uint32_with_pixel_size(tmp_path):
    small = np.zeros((10, 12), np.int64)
    small[2:5, 3:7] = 1
    small[6:9, 1:4] = 65535
    path = write_labels(tmp_path / "sub" / "small.tif", small, pixel_size=0.65)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].dtype == np.uint16 and tif.is_imagej
        assert tif.pages[0].compression == 8  # zlib / deflate
    back = read_labels(path)
    assert back.dtype == np.uint32 and np.array_equal(back, small)
    assert read_pixel_size(path) == pytest.approx((0.65, 0.65))

    big = small.copy()
    big[0, 0] = 70000
    path32 = write_labels(tmp_path / "big.tif", big, pixel_size=(0.5, 0.25))
    with tifffile.TiffFile(path32) as tif:
        assert tif.pages[0].dtype == np.uint32 and tif.pages[0].compression == 8
    assert np.array_equal(read_labels(path32), big)
    assert read_pixel_size(path32) == pytest.approx((0.5, 0.25))
    assert read_pixel_size(write_labels(tmp_path / "nopx.tif", small)) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.tif", "nopx.tif", "sub"]  # no temp files left


def test_read_labels_accepts_png_and_any_integer_dtype(tmp_path):
    lab = np.array([[0, 1], [2, 3]], np.uint8)
    assert np.array_equal(read_labels(_png(tmp_path / "l.png", lab)), lab)
    tifffile.imwrite(tmp_path / "i32.tif", lab.astype(np.int32))
    assert read_labels(tmp_path / "i32.tif").dtype == np.uint32


def test_read_labels_refuses_float_and_negative(tmp_path):
    tifffile.imwrite(tmp_path / "f.tif", np.ones((4, 4), np.float32))
    with pytest.raises(DataError, match="f.tif: labels must have an integer dtype, got float32"):
        read_labels(tmp_path / "f.tif")
    tifffile.imwrite(tmp_path / "neg.tif", np.array([[0, -2]], np.int16))
    with pytest.raises(DataError, match="non-negative, found -2"):
        read_labels(tmp_path / "neg.tif")
    with pytest.raises(DataError, match="labels must be a 2-D image"):
        write_labels(tmp_path / "x.tif", np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(DataError, match="integer dtype"):
        write_labels(tmp_path / "x.tif", np.zeros((3, 3), np.float64))
    assert not (tmp_path / "x.tif").exists()


def test_corrupt_png_error_is_one_line_naming_the_file(tmp_path):
    """A bad PNG gives one short line (the PNG decoder's complaint), not every codec's."""
    from triageseg.datasets.io import read_image

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DataError) as info:
        read_image(bad)
    message = str(info.value)
    assert message.startswith(f"{bad}: cannot decode PNG image") and "\n" not in message


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("cut.png", None, "truncated PNG"),
        ("fake.png", b"GIF89a" + b"\0" * 40, "not a PNG file"),
        ("cut.jpg", None, "truncated JPEG"),
        ("fake.jpg", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "not a JPEG file"),
    ],
)
def test_broken_png_jpeg_say_what_is_wrong(tmp_path, name, data, expected):
    import imagecodecs

    if data is None:  # a real file cut in half, as an interrupted copy leaves it
        image = _ramp((64, 64), np.uint8, 255)
        full = imagecodecs.png_encode(image) if name.endswith(".png") else imagecodecs.jpeg8_encode(image)
        data = bytes(full[: len(full) // 2])
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DataError) as info:
        read_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}: cannot decode") and expected in message and "\n" not in message


def test_a_jpeg_with_bytes_after_its_end_marker_still_reads(tmp_path):
    import imagecodecs

    path = tmp_path / "padded.jpg"
    path.write_bytes(bytes(imagecodecs.jpeg8_encode(_ramp((32, 32), np.uint8, 255))) + b"\0" * 16)
    assert read_image(path).shape == (32, 32, 3)
