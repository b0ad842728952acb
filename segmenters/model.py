"""The specialist model: a 3-class smp ``Unet`` built from a small frozen config.

A run folder is the unit that is saved and loaded::

    segmenters/<modality>/
      config.json         SegmenterConfig (+ training config, provenance, results)
      model.safetensors   weights
      postprocess.json    watershed parameters tuned for these weights

Example:
    >>> cfg = SegmenterConfig(decoder_channels=(64, 32, 16, 16, 8))   # doctest: +SKIP
    >>> model = create_segmenter(cfg)                                  # doctest: +SKIP
    >>> save_segmenter("bundle/segmenters/he", model, cfg, params=None)  # doctest: +SKIP
    >>> model, cfg, params = load_segmenter("bundle/segmenters/he")    # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from triageseg import bundle
from triageseg.datasets.atomic import write_json_atomic
from triageseg.datasets.errors import BundleError, DataError
from triageseg.segmenters.scale import check_scale

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from triageseg.postprocess.watershed import WatershedParams

POSTPROCESS = "postprocess.json"
HISTORY_CSV = "history.csv"
HISTORY_JSON = "history.json"
# Keys of config.json that are metadata written beside the model config, not config fields.
METADATA_KEYS = ("kind", "train", "provenance", "results")
KIND = "triageseg-segmenter"
DEFAULT_DECODER_CHANNELS = (256, 128, 64, 32, 16)
# Largest inference tile (segmenters.predict.tile_grid shrinks it to fit). 768 rather than 512: a 2048-px
# side then runs three tiles of 736 px instead of five of 480, 1.16x the image's pixels instead of 1.37x
# (network on a 2048 x 2048 image, ONNX Runtime, 2 cores: 10.5 s against 13.0 s, medians of 3 interleaved,
# loaded machine); images up to 768 px run as one tile (up to 960 px, predict.SINGLE_TILE_SLACK). Mean
# |difference| of the probabilities 0.003.
DEFAULT_TILE_SIZE = 768
# Overlap between neighbouring tiles (pixels at the network's scale). 32 px instead of 64: 12 tiled synthetic
# images of 1280 x 1280 (four modalities, nuclei 10-18 px, run at the size decision's scale 1.2-2.4) scored
# mean F1 0.4135 with 32, 0.4132 with 64 and 0.4139 with 128, F1@0.5 0.6976 / 0.6974 / 0.6975, while the
# network computes about 10 % fewer pixels (a 3133-px side: 1.15x its pixels instead of 1.26x; 794 px: 1.10x
# instead of 1.27x). benchmarks/RESULTS.md, 2026-12-07. Bundles keep the overlap they were saved with.
DEFAULT_OVERLAP = 32


@dataclass(frozen=True)
class SegmenterConfig:
    """Everything needed to rebuild a specialist and feed it images.

    Saved as ``config.json`` beside the weights; the exact config is what is loaded back.
    """

    encoder: str = "efficientnet-b3"  # smp encoder name (or "tu-<timm model>"); weights never from a hub
    in_channels: int = 3  # input channels (images are HxWx3 after datasets.io.read_image)
    classes: int = 3  # background / nucleus interior / boundary (postprocess.targets)
    decoder_channels: tuple[int, ...] = DEFAULT_DECODER_CHANNELS  # Unet decoder widths, one per encoder stage
    tile_size: int = DEFAULT_TILE_SIZE  # largest inference tile side in pixels (multiple of 32)
    overlap: int = DEFAULT_OVERLAP  # overlap between neighbouring inference tiles, pixels
    normalisation: str = "percentile"  # input normalisation, as datasets.io.read_image does it
    percentiles: tuple[float, float] = (1.0, 99.8)  # low/high percentiles of that normalisation
    modality: str | None = None  # modality this specialist serves; None for the generalist
    boundary_width: int = 2  # boundary width of the training targets (postprocess.targets)
    boundary_mode: str = "touching"  # boundary mode of the training targets (postprocess.targets)
    encoder_init: str | None = None  # local file the encoder was initialised from (None = scratch)
    scale: float = 1.0  # images are resized by this factor before the network (segmenters.scale)
    diameter: float | None = None  # median nucleus diameter (px) the network was trained at; None: no size triage
    diameter_um: float | None = None  # the same in microns, when the training images had a pixel size
    size_calibration: float = 1.0  # label diameter / router.size estimate, median over the training images
    # what that estimate measured (router.size.SIZE_SIGNAL_MODES): "modality-pyramid" (each modality's signal,
    # router.size.signal_for), "modality" (the same before the haematoxylin's pyramid descent) or "auto" (the
    # grey/best channel for every image: bundles trained before the per-modality signal)
    size_signal: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "decoder_channels", tuple(int(c) for c in self.decoder_channels))
        object.__setattr__(self, "percentiles", tuple(float(p) for p in self.percentiles))
        if self.in_channels < 1 or self.classes < 2:
            raise ValueError(f"in_channels must be >= 1 and classes >= 2, got {self.in_channels}, {self.classes}")
        if len(self.decoder_channels) != 5 or min(self.decoder_channels) < 1:
            raise ValueError(f"decoder_channels must be 5 positive widths, got {self.decoder_channels}")
        if self.tile_size < 32 or self.tile_size % 32:
            raise ValueError(f"tile_size must be a positive multiple of 32, got {self.tile_size}")
        if not 0 <= self.overlap < self.tile_size // 2:
            raise ValueError(f"overlap must be in [0, tile_size/2), got {self.overlap} for tile {self.tile_size}")
        if self.normalisation != "percentile":
            raise ValueError(f"unknown normalisation {self.normalisation!r}; valid: 'percentile'")
        if len(self.percentiles) != 2 or not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ValueError(f"percentiles must be (low, high) with 0 <= low < high <= 100, got {self.percentiles}")
        object.__setattr__(self, "scale", check_scale(self.scale))
        if not (0.1 <= float(self.size_calibration) <= 10.0):
            raise ValueError(f"size_calibration must be in [0.1, 10], got {self.size_calibration!r}")
        object.__setattr__(self, "size_calibration", float(self.size_calibration))
        from triageseg.router.size import SIZE_SIGNAL_MODES  # NumPy only

        if self.size_signal not in SIZE_SIGNAL_MODES:
            raise ValueError(f"size_signal must be one of {', '.join(SIZE_SIGNAL_MODES)}, got {self.size_signal!r}")
        for name in ("diameter", "diameter_um"):
            value = getattr(self, name)
            if value is not None:
                value = float(value)
                if not (value > 0 and value < 1e4):
                    raise ValueError(f"{name} must be a positive number of pixels (microns), got {value!r}")
                object.__setattr__(self, name, value)
        if self.encoder_init is not None and str(self.encoder_init).lower() == "imagenet":
            raise ValueError("encoder_init must be a local file path, never 'imagenet' (no hub downloads)")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of the fields."""
        d = dataclasses.asdict(self)
        d["decoder_channels"] = list(self.decoder_channels)
        d["percentiles"] = list(self.percentiles)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str | os.PathLike | None = None) -> SegmenterConfig:
        """Build from a dict; unknown keys are refused, naming them and ``source``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - set(METADATA_KEYS))
        if unknown:
            raise BundleError(source, f"unknown segmenter config keys {unknown}; valid: {sorted(names)}")
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except (TypeError, ValueError) as err:
            raise BundleError(source, f"invalid segmenter config ({err})") from None

    def to_json(self, path: str | os.PathLike, **metadata: Any) -> None:
        """Write ``config.json`` atomically; ``metadata`` (train, provenance, results) goes beside the fields."""
        bad = sorted(set(metadata) - set(METADATA_KEYS))
        if bad:
            raise ValueError(f"unknown metadata keys {bad}; valid: {list(METADATA_KEYS)}")
        write_json_atomic(path, {"kind": KIND, **self.to_dict(), **metadata})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> SegmenterConfig:
        """Read ``config.json``; a missing/corrupt file or bad field raises :class:`BundleError` naming it."""
        d = bundle.read_json(path)
        kind = d.get("kind", KIND)
        if kind != KIND:
            raise BundleError(path, f"not a segmenter config (kind {kind!r}, expected {KIND!r})")
        return cls.from_dict(d, source=path)


def valid_encoders() -> list[str]:
    """Names accepted by :func:`create_segmenter` (plus any ``tu-<timm model>``)."""
    import segmentation_models_pytorch as smp

    return list(smp.encoders.get_encoder_names())


def _check_encoder(name: str) -> None:
    if name.startswith("tu-"):
        import timm

        if not timm.list_models(name[3:]) and name[3:].split(".")[0] not in timm.list_models():
            raise ValueError(f"unknown timm encoder {name!r}: timm has no model {name[3:]!r}")
        return
    names = valid_encoders()
    if name not in names:
        raise ValueError(
            f"unknown encoder {name!r}; valid: {', '.join(names)} (or 'tu-<timm model name>')"
        )


def create_segmenter(config: SegmenterConfig) -> torch.nn.Module:
    """Build the Unet described by ``config`` with randomly initialised weights.

    Never downloads anything: ``encoder_weights=None`` always; a local encoder
    initialisation is applied by :func:`load_encoder_weights`.

    Raises:
        ValueError: unknown encoder name (the message lists the valid ones).
    """
    import segmentation_models_pytorch as smp

    _check_encoder(config.encoder)
    return smp.Unet(
        encoder_name=config.encoder,
        encoder_weights=None,
        in_channels=config.in_channels,
        classes=config.classes,
        decoder_channels=config.decoder_channels,
    )


def _read_state_dict(path: Path) -> dict[str, Any]:
    """Tensors of a safetensors file or of a torch state dict (loaded with ``weights_only``)."""
    import torch

    if not path.is_file():
        raise DataError(path, "encoder weights file not found")
    with open(path, "rb") as fh:
        head = fh.read(16)
    if path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
        try:
            return bundle.load_weights(path)
        except BundleError as err:
            raise DataError(path, f"unreadable encoder weights: {err.problem}") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds; all mean "not a usable file"
        raise DataError(
            path, f"not a safetensors file nor a torch state dict loadable with weights_only=True ({err})"
        ) from None
    # Unwrap the usual checkpoint containers.
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DataError(path, "holds no tensors (expected a state dict of the encoder)")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_encoder_weights(model: torch.nn.Module, path: str | os.PathLike) -> dict[str, int]:
    """Initialise ``model.encoder`` from a local file (safetensors or torch state dict).

    The file may hold the encoder's own keys, keys prefixed ``encoder.`` / ``model.`` /
    ``module.``, or (for ``tu-`` encoders) a full timm classifier checkpoint whose head is
    ignored. Every encoder tensor must be found with the right shape.

    Returns:
        ``{"loaded": n, "ignored": m}`` tensor counts.

    Raises:
        DataError: missing/unreadable file, or tensors that do not fit the encoder.
    """
    path = Path(path)
    state = _read_state_dict(path)
    targets = [model.encoder]
    if hasattr(model.encoder, "model"):  # timm universal encoder wraps the timm model
        targets.append(model.encoder.model)
    prefixes = ("", "encoder.", "model.", "module.", "encoder.model.", "module.encoder.")
    best: tuple[int, Any, str] = (-1, targets[0], "")
    for target in targets:
        expected = target.state_dict()
        for prefix in prefixes:
            hits = sum(1 for k in expected if prefix + k in state)
            if hits > best[0]:
                best = (hits, target, prefix)
    hits, target, prefix = best
    expected = target.state_dict()
    if hits == 0:
        raise DataError(
            path,
            f"no tensor names match the encoder {type(model.encoder).__name__} "
            f"(file has e.g. {next(iter(state))!r}, encoder expects e.g. {next(iter(expected))!r})",
        )
    missing = [k for k in expected if prefix + k not in state]
    bad_shape = [
        f"{k}: file {tuple(state[prefix + k].shape)} vs encoder {tuple(v.shape)}"
        for k, v in expected.items()
        if prefix + k in state and tuple(state[prefix + k].shape) != tuple(v.shape)
    ]
    if missing or bad_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} encoder tensors missing (e.g. {missing[0]})")
        if bad_shape:
            parts.append(f"{len(bad_shape)} shape mismatches (e.g. {bad_shape[0]})")
        raise DataError(path, "encoder weights do not fit this encoder: " + "; ".join(parts))
    target.load_state_dict({k: state[prefix + k] for k in expected}, strict=True)
    return {"loaded": len(expected), "ignored": len(state) - len(expected)}


def save_segmenter(
    run_dir: str | os.PathLike,
    model: torch.nn.Module,
    config: SegmenterConfig,
    *,
    params: WatershedParams | None,
    **metadata: Any,
) -> Path:
    """Write a run folder: ``config.json``, ``model.safetensors``, ``postprocess.json``.

    Args:
        run_dir: folder to write (created if needed).
        model: the Unet (any device, any memory format).
        config: the config that builds ``model``.
        params: watershed parameters tuned for ``model``; ``None`` writes the defaults.
        **metadata: ``train``, ``provenance``, ``results`` dicts stored in ``config.json``.

    Returns:
        ``run_dir`` as a Path.
    """
    from triageseg.postprocess.watershed import WatershedParams

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = {"format": KIND, "encoder": config.encoder, "modality": str(config.modality)}
    bundle.save_weights(run_dir / bundle.WEIGHTS, model.state_dict(), metadata=meta)
    (params if params is not None else WatershedParams()).to_json(run_dir / POSTPROCESS)
    config.to_json(run_dir / bundle.CONFIG, **metadata)
    return run_dir


def _read_run(run_dir: Path) -> tuple[SegmenterConfig, WatershedParams]:
    """The config and watershed parameters of a run folder (BundleError naming a missing or bad file)."""
    from triageseg.postprocess.watershed import WatershedParams

    config = SegmenterConfig.from_json(run_dir / bundle.CONFIG)
    pp_path = run_dir / POSTPROCESS
    bundle.read_json(pp_path)  # missing / corrupt JSON -> BundleError naming it
    try:
        params = WatershedParams.from_json(pp_path)
    except BundleError:
        raise
    except (ValueError, TypeError, KeyError, OSError) as err:
        raise BundleError(pp_path, f"invalid watershed parameters ({err})") from None
    return config, params


def load_served_segmenter(run_dir: str | os.PathLike, *, choice, device="cpu") -> tuple | None:
    """``(network, config, watershed params)`` served from the export cache without the eager Unet; None if not.

    See :mod:`triageseg.segmenters.served`: None (no valid cached export of exactly these
    files, the torch backend, a GPU, an imported bioimage.io model) means the caller loads
    with :func:`load_segmenter` and :func:`~triageseg.segmenters.backends.prepare_network`.
    """
    from triageseg.export.zoo_segmenter import is_zoo_run
    from triageseg.segmenters import served

    run_dir = Path(run_dir)
    if not run_dir.is_dir() or is_zoo_run(run_dir):
        return None
    config, params = _read_run(run_dir)
    got = served.cached_runner(run_dir, choice, device, kind="segmenter")
    if got is None:
        return None
    run, _meta = got
    return served.ServedNet(run, choice.backend, config.in_channels), config, params


def load_segmenter(
    run_dir: str | os.PathLike, *, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, SegmenterConfig, WatershedParams]:
    """Load a run folder written by :func:`save_segmenter`; the model is in eval mode on ``device``.

    ``device`` is ``auto|cpu|cuda|cuda:N|mps`` or a torch.device; on CUDA the model is
    put in channels_last memory format (``predict`` handles both).

    Raises:
        BundleError: a missing, corrupt or truncated file, or weights that do not match
            the config beside them (the message names the file).
    """
    from triageseg.segmenters.predict import resolve_device

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BundleError(run_dir, "segmenter run folder does not exist")
    from triageseg.export.zoo_segmenter import is_zoo_run, load_zoo_segmenter

    if is_zoo_run(run_dir):  # an imported bioimage.io model (TorchScript the user trusted at import)
        return load_zoo_segmenter(run_dir, device=device)
    config, params = _read_run(run_dir)
    try:
        model = create_segmenter(config)
    except ValueError as err:
        raise BundleError(run_dir / bundle.CONFIG, str(err)) from None
    bundle.load_into(model, run_dir / bundle.WEIGHTS)
    model.eval()
    dev = resolve_device(device)
    if dev.type == "cuda":  # channels_last convolutions are faster on tensor cores
        import torch

        return model.to(dev, memory_format=torch.channels_last), config, params
    return model.to(dev), config, params
