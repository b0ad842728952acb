"""datasets.synth: deterministic, valid labels, distinct modalities, stratified splits."""

from __future__ import annotations

import csv
import hashlib

import numpy as np
import pytest
from scipy import ndimage

from triageseg.datasets.errors import DataError
from triageseg.datasets.io import read_image_raw, read_labels
from triageseg.datasets.layout import Dataset
from triageseg.datasets.synth import MODALITIES, _allocate, _split_counts, make_dataset, synth_sample


def _touching_ids(labels):
    ids = set()
    for a, b in ((labels[:, 1:], labels[:, :-1]), (labels[1:, :], labels[:-1, :])):
        t = (a != b) & (a > 0) & (b > 0)
        ids |= set(a[t].tolist()) | set(b[t].tolist())
    return ids


def test_modalities():
    assert MODALITIES == ("fluorescence", "brightfield", "he", "ihc")


@pytest.mark.parametrize("modality", MODALITIES)
def test_sample_labels_are_valid_instances(modality):
    touching = 0
    for seed in range(3):
        image, labels = synth_sample(modality, size=128, rng=np.random.default_rng(seed))
        assert image.shape == (128, 128, 3) and image.dtype == np.uint8
        assert labels.shape == (128, 128) and labels.dtype == np.uint32
        n = int(labels.max())
        assert n >= 1
        assert np.array_equal(np.unique(labels), np.arange(n + 1))  # consecutive 1..N
        for i, sl in enumerate(ndimage.find_objects(labels), start=1):
            assert ndimage.label(labels[sl] == i)[1] == 1, f"nucleus {i} is not one 4-connected piece"
        assert np.bincount(labels.ravel())[1:].min() >= 12
        touching += len(_touching_ids(labels))
    assert touching >= 4  # touching nuclei exist, so the boundary class matters


def test_sample_is_deterministic_for_a_seed():
    a = synth_sample("he", size=64, rng=np.random.default_rng(5))
    b = synth_sample("he", size=64, rng=np.random.default_rng(5))
    c = synth_sample("he", size=64, rng=np.random.default_rng(6))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_modalities_look_different():
    stats = {}
    for m in MODALITIES:
        fg_bg = []
        for seed in range(4):
            image, labels = synth_sample(m, size=128, rng=np.random.default_rng(seed))
            gray = image.astype(float).mean(axis=2)
            fg_bg.append((gray[labels > 0].mean(), gray[labels == 0].mean(), image[labels == 0].mean(axis=0)))
        stats[m] = fg_bg
    for fg, bg, _ in stats["fluorescence"]:
        assert fg > bg + 20 and bg < 80  # bright nuclei on a dark background
    for fg, bg, _ in stats["brightfield"]:
        assert fg + 20 < bg and bg > 150  # dark nuclei on a light background
    for fg, bg, colour in stats["he"]:
        assert fg + 20 < bg
        # pink/purple/lilac: green absorbed most (by eosin, and by hematoxylin in the cytoplasm of cellular
        # fields); the TCIA image's tissue between nuclei has R-G 55, B-G 43, paler samples less
        assert colour[1] + 20 < colour[0] and colour[1] + 20 < colour[2]
    # nuclei are denser and smaller in H&E than in brightfield on average
    counts = {
        m: np.mean([synth_sample(m, size=128, rng=np.random.default_rng(s))[1].max() for s in range(4)])
        for m in ("brightfield", "he")
    }
    assert counts["he"] > 1.5 * counts["brightfield"]


def test_unknown_modality_lists_valid_ones():
    with pytest.raises(ValueError, match="valid modalities: fluorescence, brightfield, he, ihc"):
        synth_sample("phase", rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="valid modalities"):
        make_dataset("unused", n=2, modalities=("he", "xray"))


def test_allocation_and_split_counts():
    assert _allocate(100, np.array([0.6, 0.2, 0.2])).tolist() == [60, 20, 20]
    assert _allocate(24, np.array([0.6, 0.2, 0.2])).tolist() == [14, 5, 5]
    assert _allocate(3, np.array([0.9, 0.05, 0.05])).tolist() == [1, 1, 1]
    assert _allocate(2, np.array([0.6, 0.2, 0.2])).sum() == 2
    assert _split_counts(5, (0.7, 0.15, 0.15)) == (3, 1, 1)
    assert _split_counts(3, (0.7, 0.15, 0.15)) == (1, 1, 1)
    assert _split_counts(2, (0.7, 0.15, 0.15)) == (1, 1, 0)
    assert _split_counts(1, (0.7, 0.15, 0.15)) == (1, 0, 0)
    assert _split_counts(20, (0.7, 0.15, 0.15)) == (14, 3, 3)


def test_synth_data_fixture_layout(synth_data):
    ds = Dataset(synth_data)
    ds.check()
    assert len(ds) == 24 and ds.modalities == ["brightfield", "fluorescence", "he"]
    assert {m: sum(v.values()) for m, v in ds.counts().items()} == {"fluorescence": 14, "brightfield": 5, "he": 5}
    for m in ("fluorescence", "brightfield", "he"):
        splits = {s.split for s in ds.select(modality=m)}
        assert splits == {"train", "val", "test"}
    s = ds.samples[0]
    assert s.id == "brightfield_0000" and s.image_path.name == "brightfield_0000.png"
    assert s.label_path.name == "brightfield_0000.tif"
    assert read_image_raw(s.image_path).dtype == np.uint8 and read_image_raw(s.image_path).shape == (96, 96, 3)
    assert read_labels(s.label_path).max() > 0
    rows = list(csv.reader((synth_data / "modalities.csv").open()))
    assert rows[0] == ["id", "modality"] and len(rows) == 25
    assert list(csv.reader((synth_data / "splits.csv").open()))[0] == ["id", "split"]


def _tree_hash(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_make_dataset_deterministic_and_images_independent_of_n(tmp_path):
    a = make_dataset(tmp_path / "a", n=6, size=48, seed=3)
    b = make_dataset(tmp_path / "b", n=6, size=48, seed=3)
    assert _tree_hash(a) == _tree_hash(b)
    c = make_dataset(
        tmp_path / "c", n=9, size=48, seed=3, modalities=("he", "fluorescence"), weights={"he": 1, "fluorescence": 2}
    )
    assert (c / "images" / "he_0000.png").read_bytes() == (a / "images" / "he_0000.png").read_bytes()
    assert sorted(Dataset(c).counts()) == ["fluorescence", "he"]
    assert sum(Dataset(c).counts()["he"].values()) == 3


def test_make_dataset_refuses_existing_dataset_unless_overwrite(tmp_path):
    make_dataset(tmp_path / "d", n=3, size=32, seed=0)
    with pytest.raises(DataError, match="already holds a dataset"):
        make_dataset(tmp_path / "d", n=3, size=32, seed=1)
    make_dataset(tmp_path / "d", n=2, size=32, seed=1, modalities=("he",), overwrite=True)
    assert len(Dataset(tmp_path / "d")) == 2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n": 0}, "n must be"),
        ({"splits": (0.5, 0.5, 0.5)}, "splits must be"),
        ({"weights": [1.0]}, "one value per modality"),
        ({"weights": {"phase": 1.0}}, "not generated"),
        ({"size": 8}, "at least 16"),
    ],
)
def test_make_dataset_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_dataset(tmp_path / "x", **{"n": 3, **kwargs})


def _run_cli(*args):
    from click.testing import CliRunner

    import triageseg.cli.data_cmds  # noqa: F401  (registers the data commands)
    from triageseg.cli.groups import cli

    return CliRunner().invoke(cli, list(args))


def test_cli_synth_summary_and_errors(tmp_path):
    import triageseg.cli.data_cmds as data_cmds

    assert data_cmds._MODALITIES == MODALITIES
    out = tmp_path / "d"
    result = _run_cli(
        "data",
        "synth",
        "--out",
        str(out),
        "--n",
        "7",
        "--size",
        "40",
        "--modalities",
        "he,brightfield",
        "--weights",
        "2,1",
        "--seed",
        "4",
    )
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"7 images in {out}: brightfield 2 (train 1 val 1), he 5 (train 3 val 1 test 1) [")
    assert Dataset(out).modalities == ["brightfield", "he"]
    again = _run_cli("data", "synth", "--out", str(out), "--n", "2", "--size", "40")
    assert again.exit_code == 1 and "already holds a dataset" in again.output
    bad = _run_cli("data", "synth", "--out", str(tmp_path / "e"), "--modalities", "he,phase")
    assert bad.exit_code == 2 and "valid: fluorescence, brightfield, he" in bad.output
    assert _run_cli("data", "synth", "--help").exit_code == 0


@pytest.mark.parametrize("modality", ["fluorescence", "he"])
def test_a_sample_shrunk_by_two_keeps_its_labels_on_the_nuclei(modality):
    """The same layout drawn at zoom 1 (side 2S) and zoom 0.5 (side S): the labels' centroids agree to 0.05 px."""
    from triageseg.datasets.synth.styles import STYLES

    r_lo, r_hi = STYLES[modality].radius
    typical = 2.0 * np.sqrt(r_lo * r_hi)
    _, big = synth_sample(modality, size=256, rng=np.random.default_rng(4), diameter=typical)
    image, small = synth_sample(modality, size=128, rng=np.random.default_rng(4), diameter=typical / 2)
    assert image.shape == (128, 128, 3) and small.max() >= 10
    assert np.array_equal(np.unique(small), np.arange(small.max() + 1))
    for i, sl in enumerate(ndimage.find_objects(small), start=1):
        assert ndimage.label(small[sl] == i)[1] == 1
    # ids were renumbered after shrinking: pair each small nucleus with the big one under its centre
    got = np.array(ndimage.center_of_mass(small > 0, small, np.arange(1, small.max() + 1)))
    pairs = []
    for cy, cx in got:
        k = big[int(round(2 * cy + 0.5)), int(round(2 * cx + 0.5))]
        if k:
            want = (np.array(ndimage.center_of_mass(big == k)) + 0.5) / 2 - 0.5
            pairs.append(np.array([cy, cx]) - want)
    assert len(pairs) >= 10
    assert np.abs(np.mean(pairs, axis=0)).max() < 0.05  # nearest neighbour: -0.25 in rows and columns


def test_tissue_nuclei_follow_a_flow_and_cultured_ones_do_not():
    """H&E and IHC nuclei lie along a smooth flow (real sections: neighbours agree); fluorescence nuclei point anywhere."""
    import dataclasses

    from triageseg.datasets.synth.layout import _place_nuclei, alignment
    from triageseg.datasets.synth.styles import STYLES

    def mean_alignment(style, seeds=range(6)):
        return np.mean([alignment(_place_nuclei(np.random.default_rng(s), 320, style)[0]) for s in seeds])

    he = STYLES["he"]
    assert STYLES["fluorescence"].aligned == STYLES["brightfield"].aligned == (0.0, 0.0)
    assert 0.0 < STYLES["he"].aligned[0] <= STYLES["he"].aligned[1] <= 1.0 and STYLES["ihc"].aligned == he.aligned
    flowing = mean_alignment(dataclasses.replace(he, aligned=(1.0, 1.0)))
    anywhere = mean_alignment(dataclasses.replace(he, aligned=(0.0, 0.0)))
    assert flowing > 0.45 and abs(anywhere) < 0.12, (flowing, anywhere)
    assert mean_alignment(STYLES["fluorescence"]) < 0.12
    assert alignment(np.zeros((32, 32), np.uint32)) == 0.0
    a, b = (_place_nuclei(np.random.default_rng(3), 128, he)[0] for _ in range(2))
    assert np.array_equal(a, b)  # deterministic under a seed


def test_fluorescence_nuclei_are_as_elongated_as_the_style_says():
    """Cultured nuclei: long over short axis from 1 up to the style's 2.2 (and the boundary's roughness)."""
    from skimage.measure import regionprops

    from triageseg.datasets.synth.styles import STYLES

    lo, hi = STYLES["fluorescence"].aspect
    assert (lo, hi) == (1.0, 2.2)
    ratios = np.array([p.axis_major_length / p.axis_minor_length
                       for s in range(8)
                       for p in regionprops(synth_sample("fluorescence", size=192, rng=np.random.default_rng(s))[1])
                       if p.area >= 60 and p.bbox[0] > 0 and p.bbox[1] > 0 and p.bbox[2] < 192 and p.bbox[3] < 192])
    assert len(ratios) > 100
    assert ratios.min() >= 1.0 and ratios.max() < 1.35 * hi
    assert 0.85 * hi < np.percentile(ratios, 90) < 1.05 * hi  # uniform in [1, 2.2]: 90th percentile ~2.1
    assert np.mean(ratios > 1.7) > 0.3  # the old range stopped at 1.7
