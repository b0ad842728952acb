"""A bioimage.io package -> a specialist of a bundle.

Two kinds are accepted (anything else is refused with a message listing them):

- **triageseg's own** packages (``config.triageseg.kind == triageseg-segmenter``): the
  state dict is read with ``torch.load(weights_only=True)`` (no code runs, no architecture
  file is imported: our own builder is used) and saved as a native run folder, safetensors
  and all; the same weights give the same labels.
- **foreign segmentation models** whose one output is ``batch, channel, y, x`` with 2
  channels (foreground, boundary probabilities: the zoo's DSB UNet2D nuclei models) or 3
  (our classes): their TorchScript weights join the bundle as a ``triageseg-bioimageio``
  entry (:mod:`.zoo_segmenter`), only with ``trust=True``, because TorchScript is code.
  A state-dict-only foreign package would need its Python architecture run: refused.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from triageseg import bundle as _bundle
from triageseg.datasets.errors import DataError
from triageseg.export import common, zoo_segmenter

RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")
SUPPORTED = ("a triageseg specialist package (3 classes, state dict); or a segmentation model with one output "
             "'batch, channel, y, x' of 2 channels (foreground, boundary probabilities) or 3 channels (background, "
             "interior, boundary probabilities), with TorchScript weights (--trust)")


@dataclass(frozen=True)
class ImportResult:
    """What an import added."""

    run_dir: Path  # the new run folder in the bundle
    kind: str  # "triageseg" (native safetensors) or "zoo-torchscript"
    mapping: str  # "three_class" or "foreground_boundary"
    tuned_score: float | None  # validation mean F1 with the tuned watershed (None without data)


def _check_zip(pkg: Path) -> None:
    if not pkg.is_file():
        raise DataError(pkg, "package file not found")
    if not zipfile.is_zipfile(pkg):
        raise DataError(pkg, "not a zip file: a bioimage.io package is a .zip holding rdf.yaml or bioimageio.yaml")
    with zipfile.ZipFile(pkg) as zf:
        names = set(zf.namelist())
    if not names & set(RDF_NAMES):
        raise DataError(pkg, f"missing rdf: no {' or '.join(RDF_NAMES)} at the package root (holds "
                             f"{', '.join(sorted(names)[:6])}{'...' if len(names) > 6 else ''})")


def read_package(pkg: str | os.PathLike):
    """Validate the package with bioimageio.spec (offline) and return its 0.5 model description.

    Raises:
        DataError: not a zip, no rdf, invalid description (the spec's first errors), not a model.
    """
    from bioimageio.spec import load_description
    from bioimageio.spec.common import InvalidDescr

    pkg = Path(pkg)
    _check_zip(pkg)
    try:
        with common.offline():
            descr = load_description(str(pkg), perform_io_checks=True, format_version="latest")
    except common.NetworkUsed as err:
        raise DataError(pkg, f"the package names remote files; download them first ({err})") from None
    if isinstance(descr, InvalidDescr):
        errors = [f"{'.'.join(map(str, e.loc))}: {e.msg}" for d in descr.validation_summary.details
                  for e in d.errors][:3]
        raise DataError(pkg, "invalid bioimage.io description: " + ("; ".join(errors) or "see bioimageio validate"))
    if getattr(descr, "type", None) != "model":
        raise DataError(pkg, f"a bioimage.io {getattr(descr, 'type', '?')!r}, not a model")
    return descr


def _axis_kinds(tensor) -> list[str]:
    return [a.type if a.type in ("batch", "channel") else str(a.id) for a in tensor.axes]


def _io_spec(pkg: Path, descr) -> dict[str, Any]:
    """How to feed the package and read its output; refuses what we cannot map to our classes."""
    if len(descr.inputs) != 1 or len(descr.outputs) != 1:
        raise DataError(pkg, f"{len(descr.inputs)} inputs and {len(descr.outputs)} outputs; supported: {SUPPORTED}")
    inp, out = descr.inputs[0], descr.outputs[0]
    in_axes, out_axes = _axis_kinds(inp), _axis_kinds(out)
    if [a for a in out_axes if a != "batch"] != ["channel", "y", "x"]:
        raise DataError(pkg, f"output {out.id!r} has axes {out_axes}, not batch, channel, y, x: a "
                             f"{'classification' if 'y' not in out_axes else 'different'} output. Supported: {SUPPORTED}")
    if [a for a in in_axes if a != "batch"] != ["channel", "y", "x"]:
        raise DataError(pkg, f"input {inp.id!r} has axes {in_axes}; supported: 2D inputs batch, channel, y, x")
    channel = next(a for a in out.axes if a.type == "channel")
    n_out = len(channel.channel_names)
    if n_out not in (2, 3):
        raise DataError(pkg, f"output {out.id!r} has {n_out} channels ({list(map(str, channel.channel_names))}); "
                             f"supported: {SUPPORTED}")
    n_in = len(next(a for a in inp.axes if a.type == "channel").channel_names)
    if n_in not in (1, 3):
        raise DataError(pkg, f"input {inp.id!r} has {n_in} channels; supported: 1 (gray) or 3 (RGB)")
    pre = [p.model_dump(mode="json") for p in inp.preprocessing]
    post = [p.model_dump(mode="json") for p in out.postprocessing]
    for where, ops, allowed in (("preprocessing", pre, zoo_segmenter.PRE_OPS),
                                ("postprocessing", post, zoo_segmenter.POST_OPS)):
        bad = [o["id"] for o in ops if o["id"] not in allowed]
        if bad:
            raise DataError(pkg, f"{where} op(s) {bad} not supported; supported: {', '.join(allowed)}")
    rng = getattr(out.data, "range", (None, None))
    probabilistic = (rng is not None and rng[0] is not None and rng[1] is not None and rng[0] >= 0 and rng[1] <= 1) \
        or any(o["id"] in ("sigmoid", "softmax") for o in post)
    if not probabilistic:
        raise DataError(pkg, f"output {out.id!r} is not declared as probabilities (data range {rng}, no sigmoid/"
                             f"softmax postprocessing); supported: {SUPPORTED}")
    tile = _tile_size(pkg, inp)
    return {"in_channels": n_in, "preprocessing": pre, "postprocessing": post, "tile_size": tile,
            "mapping": "three_class" if n_out == 3 else "foreground_boundary",
            "channel_names": [str(c) for c in channel.channel_names]}


def _tile_size(pkg: Path, inp) -> int:
    """A tile side (multiple of 32, about 256) that the package's y and x sizes allow."""
    sizes = [a.size for a in inp.axes if str(a.id) in ("y", "x")]
    for tile in (256, 288, 320, 384, 448, 512, 224, 192, 160, 128, 96, 64):
        if all((s == tile) if isinstance(s, int) else
               (tile >= s.min and (tile - s.min) % s.step == 0) if hasattr(s, "step") else True for s in sizes):
            return tile
    raise DataError(pkg, f"input sizes {sizes} allow no square tile that is a multiple of 32 (64..512)")


def _open_in_zip(pkg: Path, source) -> bytes:
    name = Path(str(getattr(source, "path", source))).name
    with zipfile.ZipFile(pkg) as zf:
        return zf.read(name)


def import_package(
    pkg: str | os.PathLike,
    bundle_dir: str | os.PathLike,
    name: str,
    *,
    trust: bool = False,
    data: str | os.PathLike | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> ImportResult:
    """Add the model of a bioimage.io package to a bundle as the specialist ``name``.

    Args:
        pkg: the package (.zip).
        bundle_dir: an existing bundle (its bundle.json is updated; nothing else is changed).
        name: run folder name, usually a modality the router knows (or ``_generalist``).
        trust: allow a foreign package's TorchScript (code) into the bundle.
        data: a dataset (DESIGN layout): tune the watershed on its ``val`` images (of modality
            ``name`` when it has any, else all).
        overwrite: replace an existing specialist ``name``.
        log: progress messages.

    Raises:
        DataError: the package is corrupt or foreign in an unsupported way (naming the problem),
            a foreign package without ``trust``, ``name`` exists without ``overwrite``.
    """
    pkg, bundle_dir = Path(pkg), Path(bundle_dir)
    manifest = _bundle.read_manifest(bundle_dir)
    if not _bundle.is_run_name(name):
        raise DataError(name, "model name must be a plain folder name (no path separators, '.', '..')")
    run_dir = _bundle.segmenter_dir(bundle_dir, name)
    if run_dir.exists() and not overwrite:
        raise DataError(run_dir, "this bundle already has a specialist of that name; pass overwrite=True "
                                 "(CLI: --overwrite) to replace it")
    descr = read_package(pkg)
    io = _io_spec(pkg, descr)
    ours = (descr.config.model_extra or {}).get("triageseg", {}) if descr.config is not None else {}
    sd = descr.weights.pytorch_state_dict
    ts = descr.weights.torchscript
    stage = run_dir.with_name(f".{name}.importing")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        if isinstance(ours, dict) and ours.get("kind") == "triageseg-segmenter" and sd is not None:
            model, config, params = _from_own(pkg, sd, ours, name)
            kind = "triageseg"
        else:
            if ts is None:
                formats = [f for f, e in descr.weights if e is not None]
                raise DataError(pkg, f"weights {formats}: a foreign package joins a bundle through its TorchScript "
                                     "weights; a state dict would need the package's Python architecture run, "
                                     "and pickled weights are never loaded")
            if not trust:
                raise DataError(pkg, "foreign package: its TorchScript weights are code that would run whenever the "
                                     "bundle segments; pass trust=True (CLI: --trust) if you trust its source")
            model, config, params = _from_zoo(pkg, ts, io, name, stage)
            kind = "zoo-torchscript"
        score = None
        if data is not None:
            params, score = _tune(model, config, data, name, log)
        _save(stage, kind, model, config, params, io, pkg, descr)
        if run_dir.exists():
            shutil.rmtree(run_dir)
        os.replace(stage, run_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    router_classes = manifest.get("modalities", [])
    if name != _bundle.GENERALIST and name not in router_classes:
        log(f"note: the router does not know {name!r}; images reach it only after the router is retrained "
            "with that modality (or with --modality on segment)")
    _bundle.update_manifest(bundle_dir, provenance={f"import:{name}": _bundle.provenance(
        package=str(pkg), package_name=descr.name, kind=kind)})
    return ImportResult(run_dir, kind, io["mapping"], score)


def _from_own(pkg: Path, sd, ours: dict, name: str):
    """A triageseg package back to our Unet: state dict read with weights_only, our builder, no package code."""
    import io

    import torch

    from triageseg.postprocess.watershed import WatershedParams
    from triageseg.segmenters.model import SegmenterConfig, create_segmenter

    try:
        state = torch.load(io.BytesIO(_open_in_zip(pkg, sd.source)), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure: not a plain state dict
        raise DataError(pkg, f"pytorch_state_dict weights are not a plain state dict loadable with "
                             f"weights_only=True (pickle-only weights are refused): {err}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(pkg, "pytorch_state_dict weights hold non-tensor objects: refused")
    try:
        config = SegmenterConfig.from_dict({**ours["segmenter"], "modality": ours["segmenter"].get("modality")})
        params = WatershedParams.from_dict(ours.get("postprocess", {}))
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(pkg, f"config.triageseg is not a triageseg segmenter config ({err})") from None
    model = create_segmenter(config)
    inner = {k.removeprefix("net."): v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(inner, strict=True)
    except RuntimeError as err:
        raise DataError(pkg, f"weights do not match the config in the package ({str(err)[:300]})") from None
    return model.eval(), config, params


def _from_zoo(pkg: Path, ts, io: dict, name: str, stage: Path):
    import torch

    from triageseg.postprocess.watershed import WatershedParams
    from triageseg.segmenters.model import SegmenterConfig

    path = stage / zoo_segmenter.TORCHSCRIPT
    path.write_bytes(_open_in_zip(pkg, ts.source))
    try:
        inner = torch.jit.load(str(path), map_location="cpu")
    except Exception as err:  # noqa: BLE001
        raise DataError(pkg, f"torchscript weights cannot be loaded ({err})") from None
    config = SegmenterConfig(encoder=f"bioimageio:{name}", tile_size=io["tile_size"],
                             overlap=min(32, io["tile_size"] // 4), modality=name)
    return zoo_segmenter.build_wrapper(inner, io).eval(), config, WatershedParams()


def _tune(model, config, data, name: str, log):
    """Tune the watershed on the dataset's val images (of modality ``name`` if it has some)."""
    from triageseg.datasets.layout import Dataset
    from triageseg.postprocess.watershed import tune_watershed
    from triageseg.segmenters.predict import predict

    ds = Dataset(data)
    samples = ds.select(split="val", modality=name) or ds.select(split="val")
    samples = [s for s in samples if s.label_path is not None][:16]
    if not samples:
        raise DataError(Path(data), "no labelled val images to tune the watershed on")
    probs, gts = [], []
    for s in samples:
        image, labels = ds.load(s)
        probs.append(predict(model, image, tile_size=config.tile_size, overlap=config.overlap, amp=False))
        gts.append(labels)
    params, score = tune_watershed(probs, gts)
    log(f"watershed tuned on {len(samples)} val images of {data}: mean F1 {score:.4f} ({params.to_dict()})")
    return params, score


def _save(stage: Path, kind: str, model, config, params, io: dict, pkg: Path, descr) -> None:
    from triageseg.segmenters.model import POSTPROCESS, save_segmenter

    source = {"package": str(pkg), "name": descr.name, "sha256": zoo_segmenter.sha256_of(pkg)}
    if kind == "triageseg":
        save_segmenter(stage, model, config, params=params, provenance=_bundle.provenance(imported_from=source))
        return
    params.to_json(stage / POSTPROCESS)
    from triageseg.datasets.atomic import write_json_atomic

    write_json_atomic(stage / _bundle.CONFIG, {
        "kind": zoo_segmenter.KIND, "segmenter": config.to_dict(), "io": io,
        "trusted_sha256": zoo_segmenter.sha256_of(stage / zoo_segmenter.TORCHSCRIPT),
        "provenance": _bundle.provenance(imported_from=source)})
