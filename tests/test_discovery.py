"""Modality discovery: features, k-means with silhouette, proposal CSV, contact sheet, CLI."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys

import numpy as np
import pytest

from triageseg.datasets.errors import DataError
from triageseg.router.discovery import (
    FEATURE_NAMES,
    cluster_features,
    contact_sheet,
    discover_modalities,
    guess_names,
    image_features,
)

IDX = {name: i for i, name in enumerate(FEATURE_NAMES)}


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """120 synthetic images of 256 px, seed 0: fluorescence, brightfield and H&E (72 / 24 / 24).

    Large enough for the clustering to be a property of the features, not of the draw. Measured:
    on the suite's 24-image, 96-px set (five brightfield and five H&E images), k-means at k=3 gave
    ARI 0.43-1.0 over seeds 0-4, with the generator before the H&E flow as with it (seed 0 was 1.0
    before, 0.43 after); on 120 images of 256 px 0.99-1.0 over seeds 0-4.
    """
    from triageseg.datasets.synth import make_dataset

    return make_dataset(tmp_path_factory.mktemp("discovery") / "data", n=120, size=256, seed=0,
                        modalities=("fluorescence", "brightfield", "he"), weights=(0.6, 0.2, 0.2))


def test_features_describe_colour_intensity_and_texture():
    rng = np.random.default_rng(0)
    dark = np.clip(rng.normal(0.05, 0.02, (80, 80, 1)), 0, 1).repeat(3, axis=2).astype(np.float32)
    bright = (1 - dark).astype(np.float32)
    pink = np.empty((80, 80, 3), np.float32)
    pink[:] = (0.9, 0.5, 0.85)
    fd, fb, fp = image_features(dark), image_features(bright), image_features(pink)
    assert fd.shape == (len(FEATURE_NAMES),) and np.isfinite(fd).all()
    assert fd[IDX["gray_p50"]] < 0.1 < 0.9 < fb[IDX["gray_p50"]]
    assert fd[IDX["dark_fraction"]] == 1.0 and fb[IDX["bright_fraction"]] == 1.0
    assert fd[IDX["corr_rg"]] == pytest.approx(1.0)  # grey: identical channels
    assert fp[IDX["sat_background"]] > 0.4 and fd[IDX["sat_background"]] == 0.0
    assert fp[IDX["grad_mean"]] == pytest.approx(0.0, abs=1e-9) and fd[IDX["grad_mean"]] > 0.01  # flat vs noisy
    assert fd[IDX["lbp_0"] : IDX["lbp_9"] + 1].sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"shape \(8, 8\)"):
        image_features(np.zeros((8, 8), np.float32))


def test_features_do_not_depend_much_on_image_size():
    rng = np.random.default_rng(1)
    small = rng.random((64, 64, 3)).astype(np.float32) * 0.3
    big = small.repeat(8, axis=0).repeat(8, axis=1)  # 512 px: block-averaged back to 256 -> 2x blocks
    f_small, f_big = image_features(small), image_features(big)
    for name in ("rgb_mean_r", "gray_p50", "sat_mean", "lab_l_mean"):
        assert f_big[IDX[name]] == pytest.approx(f_small[IDX[name]], abs=0.02), name


def test_cluster_features_picks_k_by_silhouette():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0] * 5, [10.0] * 5, [-10.0, 10, -10, 10, -10]])
    sizes = [20, 12, 8]
    feats = np.concatenate([c + rng.normal(0, 0.5, (n, 5)) for c, n in zip(centres, sizes)])
    truth = np.repeat([0, 1, 2], sizes)
    labels, k, scores, dist = cluster_features(feats)
    assert k == 3 and max(scores, key=scores.get) == 3 and set(scores) == set(range(2, 9))
    np.testing.assert_array_equal(labels, truth)  # ordered by decreasing size
    assert dist.shape == (40,) and (dist >= 0).all()
    labels2, k2, scores2, _ = cluster_features(feats, k=2)
    assert k2 == 2 and set(scores2) == {2} and len(set(labels2)) == 2
    with pytest.raises(ValueError, match="between 1 and the number of images"):
        cluster_features(feats[:3], k=4)


def test_guess_names_are_unique():
    feats = np.zeros((4, len(FEATURE_NAMES)))
    feats[:, IDX["gray_p50"]] = 0.1  # all dark -> all fluorescence-like
    assert guess_names(feats, np.array([0, 0, 1, 1])) == ["fluorescence-like_0", "fluorescence-like_1"]
    feats[2:, IDX["gray_p50"]] = 0.4  # neither dark nor light, not pink: no guess
    assert guess_names(feats, np.array([0, 0, 1, 1])) == ["fluorescence-like", "cluster_1"]


def test_discovery_recovers_synthetic_modalities(collection, tmp_path):
    out, sheet = tmp_path / "proposal.csv", tmp_path / "sheet.png"
    result = discover_modalities(collection, k=3, out=out, sheet=sheet)
    assert result.ari is not None and result.ari >= 0.95
    assert sorted(result.names) == ["brightfield-like", "fluorescence-like", "he-like"]
    crosstab = result.crosstab()
    assert crosstab["fluorescence-like"].get("fluorescence", 0) >= 70
    rows = list(csv.DictReader(out.open()))
    assert [r["id"] for r in rows] == sorted(result.ids) and len(rows) == 120
    assert {r["modality"] for r in rows} == set(result.names)
    import imageio.v3 as iio

    png = iio.imread(sheet)
    n_cols = min(8, max(result.sizes().values()))
    assert png.shape == (3 * 96 + 4 * 4, n_cols * 96 + (n_cols + 1) * 4, 3) and png.dtype == np.uint8
    # k chosen automatically. Measured: the silhouette picks 3 on this collection (ARI 0.987: one
    # brightfield image with the H&E). On the suite's 24-image set it picked 2 with issue 19's renderers,
    # joining the two stained modalities; either is a fair reading of the features.
    auto = discover_modalities(collection, write=False)
    assert auto.k in (2, 3) and auto.csv_path is None
    if auto.k == 2:  # the two stained modalities together, fluorescence apart
        assert auto.crosstab()["fluorescence-like"].get("fluorescence", 0) >= 70
    else:
        assert auto.ari >= 0.95


def test_discovery_never_replaces_modalities_csv_unasked(synth_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    before = (data / "modalities.csv").read_text()
    with pytest.raises(DataError, match=r"modalities\.csv: exists"):
        discover_modalities(data, k=3, out=data / "modalities.csv")
    assert (data / "modalities.csv").read_text() == before
    result = discover_modalities(data, k=3)  # default: a proposal beside it
    assert result.csv_path == data / "modalities.proposed.csv" and result.sheet_path == data / "modalities.proposed.png"
    assert (data / "modalities.csv").read_text() == before
    discover_modalities(data, k=3, out=data / "modalities.csv", overwrite=True, names="cluster")
    assert (data / "modalities.csv").read_text().splitlines()[1].split(",")[1].startswith("cluster_")


def test_discovery_on_a_plain_folder(synth_data, tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    for p in sorted((synth_data / "images").iterdir())[:6]:
        shutil.copy(p, folder / p.name)
    result = discover_modalities(folder, k=2, sheet=tmp_path / "s.png")
    assert result.ari is None and len(result.ids) == 6 and (folder / "modalities.proposed.csv").is_file()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        discover_modalities(tmp_path / "empty")


def test_contact_sheet_layout(tmp_path):
    import imageio.v3 as iio

    rows = [[np.zeros((10, 20, 3), np.float32)], [np.ones((5, 5, 3), np.float32)] * 3]
    path = contact_sheet(rows, tmp_path / "c.png", tile=16, gap=2)
    png = iio.imread(path)
    assert png.shape == (2 * 16 + 3 * 2, 3 * 16 + 4 * 2, 3)
    assert png[2 + 8, 2 + 8].tolist() == [0, 0, 0]  # first tile: black image
    assert png[2 + 16 + 2 + 8, 2 + 8].tolist() == [255, 255, 255]
    with pytest.raises(ValueError, match="at least one image"):
        contact_sheet([], tmp_path / "d.png")


def test_discovery_module_does_not_import_torch():
    code = (
        "import sys, numpy as np\n"
        "from triageseg.router import discovery\n"
        "discovery.image_features(np.zeros((16, 16, 3), np.float32))\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cluster_cli(synth_data, collection, tmp_path):
    import re

    from click.testing import CliRunner

    import triageseg.cli.cluster_cmd  # noqa: F401  (registers the command)
    from triageseg.cli.groups import cli

    out, sheet = tmp_path / "p.csv", tmp_path / "p.png"
    result = CliRunner().invoke(cli, ["data", "cluster", str(collection), "--k", "3", "--out", str(out),
                                      "--sheet", str(sheet)])
    assert result.exit_code == 0, result.output
    ari = re.search(r"adjusted Rand index vs modalities.csv: ([0-9.]+)", result.output)
    assert ari and float(ari.group(1)) >= 0.95, result.output
    assert "120 images -> 3 clusters" in result.output and out.is_file() and sheet.is_file()
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    refused = CliRunner().invoke(cli, ["data", "cluster", str(data), "--out", str(data / "modalities.csv")])
    assert refused.exit_code == 1 and "exists" in refused.output
    too_many = CliRunner().invoke(cli, ["data", "cluster", str(data), "--k", "99"])
    assert too_many.exit_code == 1 and "k must be between 1 and the number of images (24)" in too_many.output
