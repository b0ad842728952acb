"""The router (modality classifier) -> a bioimage.io classification package.

Input: the router's thumbnail (``1 x 3 x S x S`` in [0, 1], made by
``router.model.make_thumbnail`` from the percentile-normalised image); preprocessing: the
zoo's ``fixed_zero_mean_unit_variance`` per channel with the router's mean/std (exact);
output: class probabilities ``batch x channel`` (softmax of logits / temperature, inside
the network), channel names = the modalities. Crops of large images (the router's extra
views) are not part of the package: the README says so.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from triageseg import bundle as _bundle
from triageseg.export import common
from triageseg.export.readme import router_readme
from triageseg.export.specialist import ExportResult

ARCH_CALLABLE = "triageseg_router"


def _identifier(name: str) -> str:
    """A channel name the spec accepts (an identifier); class names that are not stay recorded in config."""
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return out if out and not out[0].isdigit() and not out.startswith("_") else f"m_{out.lstrip('_')}"


def export_router(bundle_dir: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                  float16: bool = False) -> ExportResult:
    """Write a bundle's router as a bioimage.io classification package.

    Raises:
        DataError: ``out`` exists (without ``overwrite``) or is not a .zip; BundleError for a
            missing or corrupt router folder (naming the file).
    """
    import torch

    from triageseg.export.architecture import triageseg_router
    from triageseg.export.specialist import fp16_storage
    from triageseg.router.model import background_colour, load_router, make_thumbnail

    t0 = time.perf_counter()
    out = common.check_out_path(out, overwrite=overwrite)
    model, config = load_router(_bundle.router_dir(bundle_dir), device="cpu")
    kwargs = {"model_name": config.model_name, "num_classes": len(config.class_names),
              "image_size": int(config.image_size), "temperature": float(config.temperature)}
    net = triageseg_router(**kwargs).eval()
    state = {"net." + k: (v.detach().half() if float16 and v.is_floating_point() else v.detach().clone())
             for k, v in model.state_dict().items()}
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)

    raw, _, drawn = common.synthetic_image(config.class_names[0], size=256)
    from triageseg.datasets.io import normalize_image

    img = normalize_image(raw)
    thumb = make_thumbnail(img, config.image_size, fill=background_colour(img))
    x = np.ascontiguousarray(thumb.transpose(2, 0, 1)[None].astype(np.float32))
    mean = np.asarray(config.mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(config.std, np.float32).reshape(1, 3, 1, 1)
    with torch.no_grad():
        probs = net(torch.from_numpy((x - mean) / std)).numpy()

    with common.staging(out) as work:
        files = {"arch": Path(__file__).with_name("architecture.py"), "weights": work / "weights.pt",
                 "torchscript": work / "weights_torchscript.pt", "input": work / "test_input.npy",
                 "output": work / "test_output.npy", "cover": work / "cover.png", "readme": work / "README.md"}
        torch.save(state, files["weights"])
        module = fp16_storage(net) if float16 else net
        with torch.no_grad():
            torch.jit.save(torch.jit.trace(module.eval(), torch.from_numpy((x - mean) / std), check_trace=False),
                           str(files["torchscript"]))
        np.save(files["input"], x)
        np.save(files["output"], probs.astype(np.float32))
        _cover(files["cover"], thumb)
        note = ("Images much larger than the thumbnail: triageseg also classifies up to 5 crops and "
                "combines the views' log-probabilities (mean); this package classifies one view.")
        files["readme"].write_text(router_readme(config=config, n_views_note=note))
        descr = _describe(config, kwargs, files, float16, drawn)
        common.save_package(descr, out)
    return ExportResult(out, out.stat().st_size, "float16" if float16 else "float32", time.perf_counter() - t0)


def _cover(path: Path, thumb: np.ndarray) -> None:
    import imageio.v3 as iio

    rgb = (np.clip(thumb, 0, 1) * 255).astype(np.uint8)
    iio.imwrite(path, np.concatenate([rgb, rgb[:, ::-1]], axis=1))


def _describe(config, kwargs, files, float16, drawn):
    import torch
    from bioimageio.spec.model.v0_5 import (
        ArchitectureFromFileDescr, Author, AxisId, BatchAxis, ChannelAxis, CiteEntry, Config, Doi, FileDescr,
        FixedZeroMeanUnitVarianceAlongAxisKwargs, FixedZeroMeanUnitVarianceDescr, Identifier, InputTensorDescr,
        IntervalOrRatioDataDescr, LicenseId, ModelDescr, OutputTensorDescr, PytorchStateDictWeightsDescr,
        SpaceInputAxis, TensorId, TorchscriptWeightsDescr, Version, WeightsDescr,
    )

    s = int(config.image_size)
    names = [_identifier(c) for c in config.class_names]
    inp = InputTensorDescr(
        id=TensorId("thumbnail"),
        description=f"the whole image as a {s}x{s} RGB thumbnail in [0, 1] (see README)",
        axes=[BatchAxis(), ChannelAxis(channel_names=[Identifier(c) for c in ("red", "green", "blue")]),
              SpaceInputAxis(id=AxisId("y"), size=s), SpaceInputAxis(id=AxisId("x"), size=s)],
        test_tensor=FileDescr(source=files["input"]),
        data=IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
        preprocessing=[FixedZeroMeanUnitVarianceDescr(kwargs=FixedZeroMeanUnitVarianceAlongAxisKwargs(
            mean=list(config.mean), std=list(config.std), axis=AxisId("channel")))],
    )
    outp = OutputTensorDescr(
        id=TensorId("probabilities"),
        description="modality probabilities (softmax of logits / temperature)",
        axes=[BatchAxis(), ChannelAxis(channel_names=[Identifier(n) for n in names])],
        test_tensor=FileDescr(source=files["output"]),
        data=IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
    )
    tv = Version(torch.__version__.split("+")[0])
    weights = WeightsDescr(
        pytorch_state_dict=PytorchStateDictWeightsDescr(
            source=files["weights"], pytorch_version=tv,
            architecture=ArchitectureFromFileDescr(source=files["arch"], callable=Identifier(ARCH_CALLABLE),
                                                   kwargs=kwargs)),
        torchscript=TorchscriptWeightsDescr(source=files["torchscript"], pytorch_version=tv,
                                            parent="pytorch_state_dict"),
    )
    return ModelDescr(
        name="triageseg modality router",
        description=f"classifies a microscopy image's modality ({', '.join(config.class_names)}) to route it "
                    "to a nucleus segmentation specialist",
        authors=[Author(name=common.AUTHOR)],
        cite=[CiteEntry(text="Dosovitskiy et al. 2021, An Image is Worth 16x16 Words (ViT)",
                        doi=Doi("10.48550/arXiv.2010.11929")),
              CiteEntry(text=common.CITATIONS[2][0], doi=Doi(common.CITATIONS[2][1]))],
        license=LicenseId(common.LICENSE),
        tags=["nuclei", "classification", "modality", "triage", "vit", "2d", "pytorch", "triageseg",
              *config.class_names],
        documentation=FileDescr(source=files["readme"]),
        covers=[FileDescr(source=files["cover"])],
        inputs=[inp], outputs=[outp], weights=weights,
        config=Config(**{"triageseg": {"kind": "triageseg-router", "class_names": list(config.class_names),
                                       "router": config.to_dict(), "test_image": drawn,
                                       "weights_dtype": "float16" if float16 else "float32"}}),
    )
