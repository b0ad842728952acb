"""A specialist (or the generalist) -> a bioimage.io model package, built with bioimageio.spec.

The package holds ``pytorch_state_dict`` weights (architecture: :mod:`.architecture`,
copied in) and TorchScript weights converted from them; input ``batch, channel, y, x``
with y and x any multiple of 32 (the encoder's stride); preprocessing the zoo's
``scale_range`` (joint over channel, y, x, per image) + ``clip`` to [0, 1], which is our
percentile normalisation up to the zoo's epsilon; output the 3-class softmax. The
watershed stays outside the package (measured: see ``benchmarks/bench_bioimageio.py``);
its parameters travel as ``postprocess.json`` and in the README.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from triageseg import bundle as _bundle
from triageseg.datasets.errors import BundleError
from triageseg.export import common
from triageseg.export.readme import segmenter_readme

CLASS_NAMES = ("background", "interior", "boundary")
STRIDE = 32  # the Unet's five 2x downsamplings: input sides must be multiples of this
INPUT_ID, OUTPUT_ID = "raw", "probabilities"
ARCH_CALLABLE = "triageseg_unet"


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote."""

    path: Path  # the package (.zip)
    size_bytes: int  # its size on disk
    weights_dtype: str  # "float32" or "float16" (storage of both weight files)
    seconds: float  # wall time of the export (load, convert, test tensors, save)


def _state_dict(model, float16: bool) -> dict:
    """The Unet's tensors under the ``net.`` prefix of :class:`~.architecture.SoftmaxUnet`; floats to fp16 if asked."""
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        out["net." + k] = v.half() if float16 and v.is_floating_point() else v.clone()
    return out


def fp16_storage(net):
    """A copy of ``net`` whose parameters are stored in fp16 and used in fp32 (traceable).

    Each parameter becomes an fp16 tensor behind a parametrization that upcasts it, so the
    TorchScript file keeps the fp16 tensors (about half the file) and records their upcast:
    it computes exactly what the fp32 network with fp16-rounded weights computes, the state
    dict's result. Buffers (BatchNorm statistics) stay fp32: they are small.
    """
    import copy

    import torch
    from torch.nn.utils import parametrize

    class Upcast(torch.nn.Module):
        def forward(self, x):
            return x.float()

    net = copy.deepcopy(net)
    for module in list(net.modules()):
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_floating_point():
                setattr(module, name, torch.nn.Parameter(p.detach().half(), requires_grad=False))
                parametrize.register_parametrization(module, name, Upcast(), unsafe=True)
    return net


def _torchscript(net, float16: bool, example, path: Path) -> None:
    import torch

    module = fp16_storage(net) if float16 else net
    with torch.no_grad():
        traced = torch.jit.trace(module.eval(), example, check_trace=False)
    torch.jit.save(traced, str(path))


def export_segmenter(
    bundle_dir: str | os.PathLike,
    name: str,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    float16: bool = False,
    test_size: int = 256,
) -> ExportResult:
    """Write the specialist ``name`` (a modality, or ``_generalist``) of a bundle as a bioimage.io package.

    Args:
        bundle_dir: the model bundle.
        name: run folder under ``segmenters/``.
        out: the package file (``.zip``).
        overwrite: replace an existing ``out``.
        float16: store both weight files in fp16 (half the size; the network still computes
            in fp32, so outputs move by the rounding of the weights only).
        test_size: side of the synthetic test image (a multiple of 32).

    Raises:
        DataError: ``out`` exists (without ``overwrite``) or is not a .zip; a missing or
            corrupt run folder (BundleError naming the file); a test size not a multiple of 32.
    """
    import torch

    from triageseg.export.architecture import triageseg_unet
    from triageseg.postprocess.watershed import watershed
    from triageseg.segmenters.model import load_segmenter

    t0 = time.perf_counter()
    out = common.check_out_path(out, overwrite=overwrite)
    if test_size % STRIDE or test_size < 64:
        raise ValueError(f"test_size must be a multiple of {STRIDE} and >= 64, got {test_size}")
    run_dir = _bundle.segmenter_dir(bundle_dir, name)
    if not _bundle.is_run_name(name) or not run_dir.is_dir():
        raise BundleError(run_dir, f"no segmenter {name!r} in this bundle")
    model, config, params = load_segmenter(run_dir, device="cpu")
    kwargs = {"encoder": config.encoder, "decoder_channels": list(config.decoder_channels),
              "in_channels": config.in_channels, "classes": config.classes}
    net = triageseg_unet(**kwargs).eval()
    state = _state_dict(model, float16)
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)

    raw, _, drawn = common.synthetic_image(config.modality, size=test_size)
    raw_t = np.ascontiguousarray(raw.transpose(2, 0, 1)[None].astype(np.float32))
    x = common.zoo_normalise(raw_t, config.percentiles)
    with torch.no_grad():
        probs = net(torch.from_numpy(x)).numpy()
    labels = watershed(probs[0], params)

    with common.staging(out) as work:
        files = {
            "arch": Path(__file__).with_name("architecture.py"),
            "weights": work / "weights.pt",
            "torchscript": work / "weights_torchscript.pt",
            "input": work / "test_input.npy",
            "output": work / "test_output.npy",
            "cover": work / "cover.png",
            "readme": work / "README.md",
            "postprocess": work / "postprocess.json",
            "config": work / "triageseg_config.json",
            "env": work / "environment.yaml",
        }
        torch.save(state, files["weights"])
        _torchscript(net, float16, torch.from_numpy(x), files["torchscript"])
        np.save(files["input"], raw_t)
        np.save(files["output"], probs.astype(np.float32))
        common.write_cover(files["cover"], x[0].transpose(1, 2, 0), labels)
        params.to_json(files["postprocess"])
        files["config"].write_text(json.dumps({"segmenter": config.to_dict(), "run": name}, indent=2))
        files["env"].write_text(_environment())
        files["readme"].write_text(segmenter_readme(name=name, config=config, params=params, drawn=drawn,
                                                    n_objects=int(labels.max()), float16=float16))
        descr = _describe(name, config, params, kwargs, files, float16)
        common.save_package(descr, out)
    return ExportResult(out, out.stat().st_size, "float16" if float16 else "float32", time.perf_counter() - t0)


def _environment() -> str:
    import segmentation_models_pytorch as smp
    import torch

    torch_version = torch.__version__.split("+")[0]
    return ("name: triageseg-unet\nchannels:\n  - conda-forge\n  - pytorch\ndependencies:\n"
            f"  - pytorch>={torch_version}\n  - pip\n  - pip:\n"
            f"    - segmentation-models-pytorch>={smp.__version__}\n")


def _describe(name, config, params, kwargs, files, float16):
    """The model description, built with bioimageio.spec's Python API (format 0.5)."""
    import torch
    from bioimageio.spec.model.v0_5 import (
        ArchitectureFromFileDescr, Author, AxisId, BatchAxis, ChannelAxis, CiteEntry, ClipDescr, ClipKwargs,
        Config, Doi, FileDescr, Identifier, InputTensorDescr, IntervalOrRatioDataDescr,
        LicenseId, ModelDescr, OutputTensorDescr, ParameterizedSize, PytorchStateDictWeightsDescr,
        ScaleRangeDescr, ScaleRangeKwargs, SizeReference, SpaceInputAxis, SpaceOutputAxis, TensorId,
        TorchscriptWeightsDescr, Version, WeightsDescr,
    )

    modality = config.modality or "all modalities (generalist)"
    size = ParameterizedSize(min=STRIDE * 2, step=STRIDE)
    inp = InputTensorDescr(
        id=TensorId(INPUT_ID),
        description="raw image, 3 channels (RGB, or a gray channel repeated 3 times); any intensity range",
        axes=[BatchAxis(), ChannelAxis(channel_names=[Identifier(c) for c in ("red", "green", "blue")]),
              SpaceInputAxis(id=AxisId("y"), size=size), SpaceInputAxis(id=AxisId("x"), size=size)],
        test_tensor=FileDescr(source=files["input"]),
        data=IntervalOrRatioDataDescr(type="float32"),
        preprocessing=[
            ScaleRangeDescr(kwargs=ScaleRangeKwargs(axes=[AxisId("channel"), AxisId("y"), AxisId("x")],
                                                    min_percentile=config.percentiles[0],
                                                    max_percentile=config.percentiles[1])),
            ClipDescr(kwargs=ClipKwargs(min=0.0, max=1.0)),
        ],
    )
    outp = OutputTensorDescr(
        id=TensorId(OUTPUT_ID),
        description="softmax probabilities of background, nucleus interior, nucleus boundary",
        axes=[BatchAxis(), ChannelAxis(channel_names=[Identifier(c) for c in CLASS_NAMES]),
              SpaceOutputAxis(id=AxisId("y"), size=SizeReference(tensor_id=TensorId(INPUT_ID), axis_id=AxisId("y"))),
              SpaceOutputAxis(id=AxisId("x"), size=SizeReference(tensor_id=TensorId(INPUT_ID), axis_id=AxisId("x")))],
        test_tensor=FileDescr(source=files["output"]),
        data=IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
    )
    torch_version = Version(torch.__version__.split("+")[0])
    storage = "fp16 storage, fp32 compute" if float16 else "fp32"
    weights = WeightsDescr(
        pytorch_state_dict=PytorchStateDictWeightsDescr(
            source=files["weights"],
            architecture=ArchitectureFromFileDescr(source=files["arch"], callable=Identifier(ARCH_CALLABLE),
                                                   kwargs=kwargs),
            pytorch_version=torch_version,
            dependencies=FileDescr(source=files["env"]),
            comment=f"triageseg run folder segmenters/{name} ({storage})",
        ),
        torchscript=TorchscriptWeightsDescr(
            source=files["torchscript"], pytorch_version=torch_version, parent="pytorch_state_dict",
            comment=f"traced from the state dict with torch.jit.trace ({storage})",
        ),
    )
    triageseg_cfg = {"kind": "triageseg-segmenter", "run": name, "segmenter": config.to_dict(),
                     "postprocess": params.to_dict(), "weights_dtype": "float16" if float16 else "float32"}
    return ModelDescr(
        name=f"triageseg {name} nuclei Unet",
        description=(f"3-class (background / interior / boundary) nucleus segmentation for {modality}; "
                     "instances by the watershed given in the README and postprocess.json"),
        authors=[Author(name=common.AUTHOR)],
        cite=[CiteEntry(text=text, doi=Doi(doi)) for text, doi in common.CITATIONS],
        license=LicenseId(common.LICENSE),
        tags=["nuclei", "instance-segmentation", "semantic-segmentation", "unet", "2d", "pytorch", "triageseg",
              *( [config.modality] if config.modality else ["generalist"] )],
        documentation=FileDescr(source=files["readme"]),
        covers=[FileDescr(source=files["cover"])],
        attachments=[FileDescr(source=files["postprocess"]), FileDescr(source=files["config"])],
        inputs=[inp],
        outputs=[outp],
        weights=weights,
        config=Config(**{"triageseg": triageseg_cfg}),
    )
