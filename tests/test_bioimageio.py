"""bioimage.io export and import, checked by the zoo's own tools (bioimageio.spec, bioimageio.core), offline."""

from __future__ import annotations

import shutil
import zipfile

import numpy as np
import pytest

pytest.importorskip("bioimageio.core")


@pytest.fixture(scope="module")
def he_package(tiny_bundle, tmp_path_factory):
    from triageseg.export.specialist import export_segmenter

    return export_segmenter(tiny_bundle, "he", tmp_path_factory.mktemp("pkg") / "he.zip", test_size=128).path


@pytest.fixture(scope="module")
def router_package(tiny_bundle, tmp_path_factory):
    from triageseg.export.router import export_router

    return export_router(tiny_bundle, tmp_path_factory.mktemp("pkg") / "router.zip").path


def _foreign_package(root, *, torchscript: bool = True, pickled_state: bool = False):
    """A zoo-style package not made by triageseg: 1 gray input -> sigmoid foreground / boundary maps."""
    import torch
    from bioimageio.spec import save_bioimageio_package
    from bioimageio.spec.model.v0_5 import (
        ArchitectureFromFileDescr, Author, AxisId, BatchAxis, ChannelAxis, CiteEntry, Doi, FileDescr, Identifier,
        InputTensorDescr, IntervalOrRatioDataDescr, LicenseId, ModelDescr, OutputTensorDescr, ParameterizedSize,
        PytorchStateDictWeightsDescr, SizeReference, SpaceInputAxis, SpaceOutputAxis, TensorId,
        TorchscriptWeightsDescr, Version, WeightsDescr, ZeroMeanUnitVarianceDescr, ZeroMeanUnitVarianceKwargs,
    )

    from triageseg.export.common import offline

    root.mkdir(parents=True, exist_ok=True)
    arch = root / "arch.py"
    arch.write_text("import torch\n\nclass Net(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                    "        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)\n\n    def forward(self, x):\n"
                    "        return torch.sigmoid(self.conv(x))\n")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.Sigmoid())
    with torch.no_grad():  # foreground where bright, boundary where the gradient is strong: some objects
        net[0].weight.zero_()
        net[0].weight[0, 0, 1, 1] = 4.0
        net[0].weight[1, 0] = torch.tensor([[0.0, -1, 0], [-1, 4, -1], [0, -1, 0]])
        net[0].bias.copy_(torch.tensor([-1.0, -2.0]))
    x = np.random.default_rng(0).random((1, 1, 64, 64)).astype(np.float32) * 255
    xn = (x - x.mean()) / (x.std() + 1e-6)
    with torch.no_grad():
        y = net(torch.from_numpy(xn)).numpy()
    np.save(root / "in.npy", x)
    np.save(root / "out.npy", y)
    weights = {}
    tv = Version(torch.__version__.split("+")[0])
    if torchscript:
        torch.jit.save(torch.jit.trace(net, torch.from_numpy(xn)), str(root / "ts.pt"))
        weights["torchscript"] = TorchscriptWeightsDescr(source=root / "ts.pt", pytorch_version=tv)
    else:
        if pickled_state:
            torch.save(net, root / "sd.pt")  # a whole pickled module, not a state dict
        else:
            torch.save({"conv." + k.split(".", 1)[1]: v for k, v in net.state_dict().items()}, root / "sd.pt")
        weights["pytorch_state_dict"] = PytorchStateDictWeightsDescr(
            source=root / "sd.pt", pytorch_version=tv,
            architecture=ArchitectureFromFileDescr(source=arch, callable=Identifier("Net")))
    size = ParameterizedSize(min=32, step=16)
    descr = ModelDescr(
        name="foreign fg boundary", description="a zoo-style nuclei model", authors=[Author(name="someone")],
        cite=[CiteEntry(text="x", doi=Doi("10.1038/s41592-019-0612-7"))], license=LicenseId("MIT"),
        inputs=[InputTensorDescr(
            id=TensorId("input"), axes=[BatchAxis(), ChannelAxis(channel_names=[Identifier("gray")]),
                                        SpaceInputAxis(id=AxisId("y"), size=size),
                                        SpaceInputAxis(id=AxisId("x"), size=size)],
            test_tensor=FileDescr(source=root / "in.npy"), data=IntervalOrRatioDataDescr(type="float32"),
            preprocessing=[ZeroMeanUnitVarianceDescr(kwargs=ZeroMeanUnitVarianceKwargs(
                axes=[AxisId("channel"), AxisId("y"), AxisId("x")]))])],
        outputs=[OutputTensorDescr(
            id=TensorId("output"), axes=[BatchAxis(), ChannelAxis(channel_names=[Identifier("foreground"),
                                                                                 Identifier("boundaries")]),
                                         SpaceOutputAxis(id=AxisId("y"), size=SizeReference(
                                             tensor_id=TensorId("input"), axis_id=AxisId("y"))),
                                         SpaceOutputAxis(id=AxisId("x"), size=SizeReference(
                                             tensor_id=TensorId("input"), axis_id=AxisId("x")))],
            test_tensor=FileDescr(source=root / "out.npy"), data=IntervalOrRatioDataDescr(range=(0.0, 1.0)))],
        weights=WeightsDescr(**weights),
    )
    out = root / "foreign.zip"
    with offline():
        save_bioimageio_package(descr, output_path=out)
    return out


@pytest.fixture(scope="module")
def foreign_package(tmp_path_factory):
    return _foreign_package(tmp_path_factory.mktemp("foreign"))


def _copy_bundle(bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    return dst


# ----------------------------------------------------------------------------------------- export


def test_specialist_package_is_valid_for_bioimageio_spec(he_package):
    from triageseg.export.common import validate_package

    ok, summary = validate_package(he_package)
    assert ok, summary
    with zipfile.ZipFile(he_package) as zf:
        names = set(zf.namelist())
    assert {"rdf.yaml", "weights.pt", "weights_torchscript.pt", "architecture.py", "postprocess.json",
            "README.md", "cover.png", "test_input.npy", "test_output.npy"} <= names


@pytest.mark.parametrize("weight_format", ["pytorch_state_dict", "torchscript"])
def test_specialist_package_passes_bioimageio_core_test(he_package, weight_format):
    from triageseg.export.common import core_test

    ok, summary = core_test(he_package, weight_format)
    assert ok, summary[-3000:]


def test_package_describes_our_model(he_package, tiny_bundle):
    from bioimageio.spec import load_model_description

    from triageseg.export.common import offline

    with offline():
        descr = load_model_description(str(he_package))
    out = descr.outputs[0]
    assert [str(c) for c in out.axes[1].channel_names] == ["background", "interior", "boundary"]
    assert [p.id for p in descr.inputs[0].preprocessing if p.id != "ensure_dtype"] == ["scale_range", "clip"]
    assert descr.inputs[0].axes[2].size.step == 32
    assert descr.weights.torchscript.parent == "pytorch_state_dict"
    assert {"nuclei", "instance-segmentation", "he"} <= set(descr.tags)
    assert descr.config.model_extra["triageseg"]["postprocess"]["min_size"] == 10
    expected = np.load(_member(he_package, "test_output.npy"))
    assert np.allclose(expected.sum(axis=1), 1.0, atol=1e-5)  # softmax inside the model


def _member(pkg, name):
    import io

    with zipfile.ZipFile(pkg) as zf:
        return io.BytesIO(zf.read(name))


def test_export_over_existing_file_is_refused_without_overwrite(tiny_bundle, tmp_path):
    from click.testing import CliRunner

    from triageseg.cli.main import cli
    from triageseg.datasets.errors import DataError
    from triageseg.export.specialist import export_segmenter

    out = tmp_path / "he.zip"
    out.write_bytes(b"keep me")
    with pytest.raises(DataError, match="already exists.*overwrite"):
        export_segmenter(tiny_bundle, "he", out)
    result = CliRunner().invoke(cli, ["export", "bioimageio", str(tiny_bundle), "--model", "he", "--out", str(out)])
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert out.read_bytes() == b"keep me"


def test_router_package_valid_and_passes_core_test(router_package):
    from triageseg.export.common import core_test, validate_package

    ok, summary = validate_package(router_package)
    assert ok, summary
    for wf in ("pytorch_state_dict", "torchscript"):
        ok, summary = core_test(router_package, wf)
        assert ok, summary[-3000:]


# ----------------------------------------------------------------------------------------- import


def test_exported_specialist_imported_back_gives_identical_labels(he_package, tiny_bundle, tmp_path):
    from triageseg.datasets.io import normalize_image
    from triageseg.export.common import synthetic_image
    from triageseg.export.importer import import_package
    from triageseg.postprocess.watershed import watershed
    from triageseg.segmenters.model import load_segmenter
    from triageseg.segmenters.predict import predict

    bundle = _copy_bundle(tiny_bundle, tmp_path)
    result = import_package(he_package, bundle, "he", overwrite=True, log=lambda m: None)
    assert result.kind == "triageseg" and (result.run_dir / "model.safetensors").is_file()
    image = normalize_image(synthetic_image("he", size=160, seed=3)[0])
    outs = []
    for b in (tiny_bundle, bundle):
        model, cfg, params = load_segmenter(b / "segmenters" / "he")
        probs = predict(model, image, tile_size=cfg.tile_size, overlap=cfg.overlap)
        outs.append((probs, watershed(probs, params)))
    assert np.array_equal(outs[0][0], outs[1][0])
    assert np.array_equal(outs[0][1], outs[1][1])


def test_import_refuses_existing_name_without_overwrite(he_package, tiny_bundle, tmp_path):
    from triageseg.datasets.errors import DataError
    from triageseg.export.importer import import_package

    bundle = _copy_bundle(tiny_bundle, tmp_path)
    with pytest.raises(DataError, match="already has a specialist"):
        import_package(he_package, bundle, "he", log=lambda m: None)


def test_foreign_package_needs_trust_then_runs_as_a_specialist(foreign_package, tiny_bundle, tmp_path, synth_data):
    from triageseg.datasets.errors import BundleError, DataError
    from triageseg.export.importer import import_package
    from triageseg.segmenters.model import load_segmenter
    from triageseg.segmenters.predict import predict

    bundle = _copy_bundle(tiny_bundle, tmp_path)
    with pytest.raises(DataError, match="TorchScript.*code.*trust"):
        import_package(foreign_package, bundle, "zoo", log=lambda m: None)
    assert not (bundle / "segmenters" / "zoo").exists()
    result = import_package(foreign_package, bundle, "zoo", trust=True, data=synth_data, log=lambda m: None)
    assert result.kind == "zoo-torchscript" and result.mapping == "foreground_boundary"
    assert result.tuned_score is not None
    from triageseg import bundle as B

    assert "zoo" in B.read_manifest(bundle)["segmenters"]
    model, cfg, params = load_segmenter(bundle / "segmenters" / "zoo")
    image = np.random.default_rng(0).random((70, 90, 3)).astype(np.float32)
    probs = predict(model, image, tile_size=cfg.tile_size, overlap=cfg.overlap)
    assert probs.shape == (3, 70, 90) and np.allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    # The trusted file is the one that runs: a replaced TorchScript is refused.
    ts = bundle / "segmenters" / "zoo" / "model.torchscript.pt"
    ts.write_bytes(ts.read_bytes() + b"\0")
    with pytest.raises(BundleError, match="sha256 differs"):
        load_segmenter(bundle / "segmenters" / "zoo")


def test_foreign_mapping_of_foreground_boundary():
    import torch

    from triageseg.export.zoo_segmenter import to_three_classes

    y = torch.tensor([0.0, 1.0, 1.0, 0.5]).view(1, 1, 2, 2)
    b = torch.tensor([0.0, 0.0, 1.0, 0.5]).view(1, 1, 2, 2)
    p = to_three_classes(torch.cat([y, b], dim=1), "foreground_boundary")[0].reshape(3, 4)
    assert torch.allclose(p, torch.tensor([[1.0, 0.0, 0.0, 0.5], [0.0, 1.0, 0.0, 0.25], [0.0, 0.0, 1.0, 0.25]]))


def test_missing_rdf_is_refused(tmp_path, tiny_bundle):
    from triageseg.datasets.errors import DataError
    from triageseg.export.importer import import_package

    pkg = tmp_path / "nordf.zip"
    with zipfile.ZipFile(pkg, "w") as zf:
        zf.writestr("weights.pt", b"x")
    with pytest.raises(DataError, match="missing rdf"):
        import_package(pkg, tiny_bundle, "x", log=lambda m: None)
    (tmp_path / "notzip.zip").write_bytes(b"hello")
    with pytest.raises(DataError, match="not a zip"):
        import_package(tmp_path / "notzip.zip", tiny_bundle, "x", log=lambda m: None)


def test_wrong_output_axes_are_refused_listing_what_is_supported(router_package, tiny_bundle):
    from triageseg.datasets.errors import DataError
    from triageseg.export.importer import import_package

    with pytest.raises(DataError, match=r"axes \['batch', 'channel'\].*classification.*Supported: .*foreground"):
        import_package(router_package, tiny_bundle, "x", log=lambda m: None)


def test_pickle_only_weights_are_refused(tmp_path, tiny_bundle):
    from triageseg.datasets.errors import DataError
    from triageseg.export.importer import import_package

    pkg = _foreign_package(tmp_path / "p", torchscript=False, pickled_state=True)
    with pytest.raises(DataError, match="pickled weights are never loaded"):
        import_package(pkg, tiny_bundle, "x", trust=True, log=lambda m: None)


def test_corrupt_package_is_refused_naming_the_problem(he_package, tiny_bundle, tmp_path):
    from triageseg.datasets.errors import DataError
    from triageseg.export.importer import import_package

    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(he_package) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            dst.writestr(item, data[:-100] if item.filename == "weights.pt" else data)
    with pytest.raises(DataError, match="(?i)invalid bioimage.io description.*sha256 mismatch.*weights.pt"):
        import_package(bad, tiny_bundle, "he2", log=lambda m: None)


@pytest.mark.slow
def test_float16_package_passes_and_is_half_the_size(tiny_bundle, he_package, tmp_path):
    from triageseg.export.common import core_test, validate_package
    from triageseg.export.specialist import export_segmenter

    r = export_segmenter(tiny_bundle, "he", tmp_path / "he16.zip", float16=True, test_size=128)
    assert r.size_bytes < 0.6 * he_package.stat().st_size
    assert validate_package(r.path)[0]
    for wf in ("pytorch_state_dict", "torchscript"):
        ok, summary = core_test(r.path, wf)
        assert ok, summary[-3000:]


def test_cli_import_foreign_asks_for_trust_then_adds_it(foreign_package, tiny_bundle, tmp_path):
    from click.testing import CliRunner

    from triageseg.cli.main import cli

    bundle = _copy_bundle(tiny_bundle, tmp_path)
    args = ["import", "bioimageio", str(foreign_package), "--bundle", str(bundle), "--as", "fluorescence",
            "--overwrite"]
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code == 1 and "--trust" in refused.output
    assert (bundle / "segmenters" / "fluorescence" / "model.safetensors").is_file()  # untouched
    added = CliRunner().invoke(cli, [*args, "--trust"])
    assert added.exit_code == 0, added.output
    assert "zoo-torchscript" in added.output and "foreground_boundary" in added.output
    assert not (bundle / "segmenters" / "fluorescence" / "model.safetensors").exists()
