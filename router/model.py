"""The router: a timm ViT that looks at a thumbnail of the whole image and names its modality.

Layers, each callable on its own:

``make_thumbnail`` (NumPy: image -> padded square thumbnail in [0, 1])
-> ``image_views`` (the thumbnail, plus crops at a fixed pixel scale for large images;
   ``overview_views`` builds the same from a downsampled overview and lazily read crops)
-> ``classify`` / ``classify_views`` (normalise, ViT, temperature-scaled softmax, views combined)
-> ``decide`` (prediction + what the bundle holds -> which segmenter to run, and why).

Why crops for large images: the synthetic and typical training images are a few
hundred pixels wide, so their thumbnails show nuclei a few pixels across. A
4000 x 4000 slide shrunk to the same thumbnail shows nuclei smaller than a pixel,
which the router never saw. Crops of ``crop_scale * image_size`` input pixels keep
roughly the training scale; their votes are combined with the whole-image view.

torch and timm are imported inside the functions that need them, so the
configuration, ``make_thumbnail`` and ``decide`` can be used without loading torch
(modality discovery reuses ``make_thumbnail``; it must stay torch-free).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from triageseg.bundle import CONFIG, WEIGHTS, load_into, read_json, save_weights
from triageseg.datasets.atomic import write_json_atomic
from triageseg.datasets.errors import BundleError, DataError
from triageseg.devices import resolve_device

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from triageseg.router.ood import OODModel

DEFAULT_MODEL = "vit_tiny_patch16_224"
# 112 px (7 x 7 patches of 16 px) rather than the 224 px the name says: on a 2-core CPU a
# training step at 224 costs ~10x more, and 112 already separates the modalities
# (measured: test accuracy 1.0 on the synthetic data after ~45 s of training).
DEFAULT_IMAGE_SIZE = 112


@dataclass(frozen=True)
class RouterConfig:
    """Everything needed to rebuild the router and feed it; saved as ``router/config.json``."""

    class_names: tuple[str, ...] = ()  # modality names, in the order of the classifier outputs
    model_name: str = DEFAULT_MODEL  # timm ViT architecture (pretrained=False; see create_router)
    image_size: int = DEFAULT_IMAGE_SIZE  # thumbnail side in pixels (ViT img_size, multiple of the patch)
    temperature: float = 1.0  # softmax temperature fitted on the validation split (>1 softens)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel thumbnail mean (training set)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)  # per-channel thumbnail std (training set)
    large_factor: float = 4.0  # images with a side > large_factor * image_size also get crops
    crop_scale: float = 2.0  # crop side = crop_scale * image_size input pixels (training-like scale)
    n_crops: int = 5  # crops per large image: 4 at the quarter points + the centre (1 = centre only)
    confidence_threshold: float = 0.6  # default fallback threshold (bundle.json's value wins)

    def __post_init__(self) -> None:
        if isinstance(self.class_names, str):
            raise ValueError(f"class_names must be a sequence of names, got the string {self.class_names!r}")
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class_names has duplicates: {list(self.class_names)}")
        if int(self.image_size) < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean/std must be 3 values with std > 0, got mean={self.mean} std={self.std}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.confidence_threshold <= 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1], got {self.confidence_threshold}")
        if self.n_crops not in (0, 1, 5):
            raise ValueError(f"n_crops must be 0, 1 or 5, got {self.n_crops}")
        if self.crop_scale <= 0 or self.large_factor <= 0:
            raise ValueError(f"crop_scale and large_factor must be > 0, got {self.crop_scale}, {self.large_factor}")

    def replace(self, **changes: Any) -> RouterConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RouterConfig:
        """Build from a dict; unknown keys are refused (they mean a newer or foreign file)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown RouterConfig fields {unknown} (known: {sorted(names)})")
        return cls(**d)

    def to_json(self, path: str | os.PathLike) -> None:
        """Write as JSON, atomically."""
        write_json_atomic(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> RouterConfig:
        """Read from JSON; a missing, corrupt or incompatible file raises BundleError naming it."""
        obj = read_json(path)
        try:
            return cls.from_dict(obj)
        except (TypeError, ValueError) as err:
            raise BundleError(path, f"not a valid router config ({err})") from None


class Prediction(NamedTuple):
    """The router's answer for one image (unpacks as ``modality, confidence, probs, ood_score``)."""

    modality: str  # top-1 class name
    confidence: float  # its probability after temperature scaling
    probs: dict[str, float]  # probability per class name
    ood_score: float | None = None  # how unlike every trained modality (router/ood.py); None without statistics


# --------------------------------------------------------------------------- model factory


def _valid_vit_names() -> list[str]:
    import timm

    return timm.list_models("vit*")


def _file_num_classes(path: Path, classifier: str) -> int | None:
    """Number of classes of the classifier head stored in a weights file, or None if absent."""
    key = f"{classifier}.weight"
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return int(f.get_slice(key).get_shape()[0]) if key in f.keys() else None
    from timm.models import load_state_dict

    state = load_state_dict(str(path))
    return int(state[key].shape[0]) if key in state else None


def create_router(config: RouterConfig, *, weights: str | os.PathLike | None = None) -> torch.nn.Module:
    """Build the timm ViT classifier described by ``config``.

    Args:
        config: the router configuration (``model_name``, ``image_size``, ``class_names``).
        weights: optional local weights file (``.safetensors`` or a timm-readable checkpoint)
            to initialise from. It is loaded through timm's own path
            (``pretrained=True, pretrained_cfg_overlay=dict(file=...)``), so position
            embeddings are resampled to ``image_size``; a classifier head with a different
            number of classes is dropped and re-initialised. No hub is contacted.

    Returns:
        A ``torch.nn.Module`` mapping ``N x 3 x S x S`` to ``N x len(class_names)`` logits.

    Raises:
        ValueError: unknown model name (the message lists valid ViT names), or no classes.
        DataError: the weights file is missing or unreadable.
    """
    import timm

    if not config.class_names:
        raise ValueError("RouterConfig.class_names is empty: the router needs at least one modality")
    base = config.model_name.split(".", 1)[0]
    valid = _valid_vit_names()
    if base not in valid:
        prefixes = ("vit_tiny_patch16", "vit_small_patch16", "vit_base_patch16")
        examples = [n for p in prefixes for n in valid if n.startswith(p)][:10]
        raise ValueError(
            f"unknown router model {config.model_name!r}; it must be a timm ViT, e.g. {', '.join(examples)} "
            f"({len(valid)} names in timm.list_models('vit*'))"
        )
    num_classes = len(config.class_names)
    kwargs: dict[str, Any] = {"num_classes": num_classes, "img_size": int(config.image_size)}
    try:
        model = timm.create_model(config.model_name, pretrained=False, **kwargs)
    except (TypeError, ValueError, RuntimeError, AssertionError) as err:
        raise ValueError(f"cannot build {config.model_name!r} at image_size={config.image_size}: {err}") from None
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", (1, 1))
    if config.image_size % patch[0] or config.image_size % patch[-1]:
        raise ValueError(
            f"image_size {config.image_size} is not a multiple of the {config.model_name} patch size "
            f"{patch[0]} (border pixels would be dropped); try {config.image_size // patch[0] * patch[0] or patch[0]}"
        )
    if weights is None:
        return model

    path = Path(weights)
    if not path.is_file():
        raise DataError(path, "router weights file not found")
    classifier = "head"
    try:
        file_classes = _file_num_classes(path, classifier)
    except Exception as err:  # noqa: BLE001 - any reader failure means an unusable file
        raise DataError(path, f"cannot read router weights ({type(err).__name__}: {err})") from None
    overlay = {
        "file": str(path),
        # Only the local file: no url / hub id to fall back on.
        "url": "",
        "hf_hub_id": None,
        "source": "",
        "custom_load": False,
        # timm drops the head when num_classes differs from the checkpoint's; tell it the
        # file's count so a matching head is kept and a different one is re-initialised.
        "num_classes": file_classes if file_classes is not None else 0,
        "classifier": classifier,
    }
    try:
        return timm.create_model(config.model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except Exception as err:  # noqa: BLE001 - timm raises many types for a bad checkpoint
        raise DataError(path, f"cannot load router weights into {config.model_name} ({type(err).__name__}: {err})") from None


# --------------------------------------------------------------------------- thumbnails


def _check_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name}: expected an H x W x 3 image, got shape {image.shape}")
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(
            f"{name}: expected a float image in [0, 1], got dtype {image.dtype} "
            "(use triageseg.datasets.io.normalize_image first)"
        )
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{name}: empty image of shape {image.shape}")
    return image


def background_colour(image: np.ndarray) -> np.ndarray:
    """Per-channel median of the image (on a subsample of at most ~256k pixels).

    Nuclei cover a minority of most microscopy images, so the median is the background
    colour: dark for fluorescence, light for brightfield, pale pink for H&E. Padding
    with it adds no edges and no colour the modality would not have.
    """
    step = max(1, int(math.sqrt(image.shape[0] * image.shape[1] / 262144)))
    return np.median(image[::step, ::step].reshape(-1, 3), axis=0).astype(np.float32)


def _block_mean(img: np.ndarray, factor: int) -> np.ndarray:
    """Mean of each ``factor x factor`` block of an H x W x C float32 image (H, W multiples of factor).

    The same sums in the same order as ``skimage.transform.downscale_local_mean``, as strided
    slices (about 6x faster: no reduction over non-contiguous block axes).
    """
    acc = None
    for i in range(factor):
        for j in range(factor):
            part = img[i::factor, j::factor]
            acc = part.astype(np.float32, copy=True) if acc is None else np.add(acc, part, out=acc)
    acc /= factor * factor
    return acc


def make_thumbnail(image: np.ndarray, size: int, *, fill: np.ndarray | None = None) -> np.ndarray:
    """A ``size x size x 3`` float32 thumbnail of the whole image, aspect ratio kept.

    The image is shrunk so its longer side is ``size`` (block mean first for large
    integer factors, then an anti-aliased resize), or enlarged likewise when smaller,
    and centred on a square canvas filled with ``fill`` (default: the image's
    per-channel median, see :func:`background_colour`).

    Args:
        image: float H x W x 3 in [0, 1] (``datasets.io.read_image`` output).
        size: side of the thumbnail in pixels.
        fill: padding colour (3 values), or a callable giving it (called only when the
            thumbnail needs padding); default the background colour.

    Returns:
        float32 array ``size x size x 3`` clipped to [0, 1] (not yet mean/std normalised).
    """
    from skimage.transform import resize

    image = _check_image(image)
    size = int(size)
    if size < 1:
        raise ValueError(f"thumbnail size must be >= 1, got {size}")
    h, w = image.shape[:2]
    scale = size / max(h, w)
    factor = int(1 / scale) if scale < 1 else 1
    img = image.astype(np.float32, copy=False)
    if factor >= 2:
        # Cheap exact box filter for the integer part of the shrink (a 4000 px image
        # would otherwise be Gaussian-filtered at full resolution).
        hh, ww = (h // factor) * factor, (w // factor) * factor
        if hh == 0 or ww == 0:  # a thin strip: keep at least one block
            hh, ww = max(hh, factor), max(ww, factor)
            img = np.pad(img, ((0, max(0, hh - h)), (0, max(0, ww - w)), (0, 0)), mode="edge")
        img = _block_mean(img[:hh, :ww], factor)
    th = max(1, min(size, round(h * scale)))
    tw = max(1, min(size, round(w * scale)))
    if img.shape[:2] != (th, tw):
        img = resize(img, (th, tw, 3), order=1, anti_aliasing=img.shape[0] > th or img.shape[1] > tw,
                     preserve_range=True).astype(np.float32)
    out = np.empty((size, size, 3), np.float32)
    if (th, tw) != (size, size):  # the background colour costs a median of the image: only when padding
        if fill is None:
            colour = background_colour(image)
        else:
            colour = np.asarray(fill() if callable(fill) else fill, np.float32).reshape(3)
        out[:] = colour
    top, left = (size - th) // 2, (size - tw) // 2
    out[top : top + th, left : left + tw] = img
    return np.clip(out, 0.0, 1.0, out=out)


def crop_boxes(shape: tuple[int, int], config: RouterConfig) -> list[tuple[int, int, int, int]]:
    """Crop boxes ``(top, left, height, width)`` classified besides the thumbnail.

    Empty unless the longer side exceeds ``config.large_factor * config.image_size``.
    Crops are ``crop_scale * image_size`` input pixels square (clamped to the image),
    centred at the image centre and at the four quarter points.
    """
    h, w = int(shape[0]), int(shape[1])
    if config.n_crops == 0 or max(h, w) <= config.large_factor * config.image_size:
        return []
    side = max(1, round(config.crop_scale * config.image_size))
    ch, cw = min(side, h), min(side, w)
    centres = [(0.5, 0.5)]
    if config.n_crops == 5:
        centres += [(0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75)]
    boxes = []
    for fy, fx in centres:
        top = min(max(0, round(fy * h - ch / 2)), h - ch)
        left = min(max(0, round(fx * w - cw / 2)), w - cw)
        boxes.append((top, left, ch, cw))
    return boxes


def image_views(image: np.ndarray, config: RouterConfig) -> np.ndarray:
    """All thumbnails the router looks at for one image: ``V x S x S x 3`` float32.

    View 0 is the whole image; large images add one view per :func:`crop_boxes` box,
    padded with the whole image's background colour.
    """
    image = _check_image(image)
    return overview_views(image, image.shape[:2], lambda t, l, h, w: image[t : t + h, l : l + w], config)


def overview_views(overview: np.ndarray, shape: tuple[int, int], read_crop, config: RouterConfig) -> np.ndarray:
    """The views of :func:`image_views` for an image too large to hold: ``V x S x S x 3``.

    The whole-image view and the background colour come from ``overview`` (the image, or
    a downsampled copy of it); the crops of :func:`crop_boxes` for the full ``shape`` are
    read at full resolution with ``read_crop(top, left, height, width)`` (a normalised
    float ``height x width x 3`` region), so only the crops are ever read.
    """
    overview = _check_image(overview, name="overview")
    colour = functools.cache(lambda: background_colour(overview))  # a square image's views need no padding
    views = [make_thumbnail(overview, config.image_size, fill=colour)]
    for top, left, ch, cw in crop_boxes(shape, config):
        crop = _check_image(read_crop(top, left, ch, cw), name="crop")
        views.append(make_thumbnail(crop, config.image_size, fill=colour))
    return np.stack(views)


def to_tensor(thumbs: np.ndarray, config: RouterConfig) -> torch.Tensor:
    """``N x S x S x 3`` thumbnails in [0, 1] -> normalised ``N x 3 x S x S`` float tensor."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(thumbs, dtype=np.float32)).permute(0, 3, 1, 2)
    return normalise(x, config)


def to_array(thumbs: np.ndarray, config: RouterConfig) -> np.ndarray:
    """:func:`to_tensor` in numpy (the same float32 operations, so the same values): ``N x 3 x S x S``, C-contiguous."""
    x = np.ascontiguousarray(thumbs, dtype=np.float32).transpose(0, 3, 1, 2)
    mean = np.asarray(config.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(config.std, dtype=np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((x - mean) / std)


def normalise(x: torch.Tensor, config: RouterConfig) -> torch.Tensor:
    """Apply the config's per-channel mean/std to an ``N x 3 x S x S`` tensor in [0, 1]."""
    import torch

    mean = torch.tensor(config.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(config.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# --------------------------------------------------------------------------- save / load


def save_router(run_dir: str | os.PathLike, model: torch.nn.Module, config: RouterConfig) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``run_dir`` (atomically each)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_weights(
        run_dir / WEIGHTS,
        model.state_dict(),
        metadata={"kind": "triageseg-router", "model_name": config.model_name},
    )
    config.to_json(run_dir / CONFIG)
    return run_dir


def load_router(run_dir: str | os.PathLike, *, device: str | torch.device | None = "cpu") -> tuple[torch.nn.Module, RouterConfig]:
    """Load a router run folder: ``(model in eval mode on device, config)``.

    Raises:
        BundleError: missing/corrupt ``config.json`` or ``model.safetensors`` (named), or
            weights that do not match the config.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BundleError(run_dir, "router folder does not exist")
    config = RouterConfig.from_json(run_dir / CONFIG)
    try:
        model = create_router(config)
    except ValueError as err:
        raise BundleError(run_dir / CONFIG, str(err)) from None
    load_into(model, run_dir / WEIGHTS)
    return model.to(resolve_device(device)).eval(), config


# --------------------------------------------------------------------------- inference


def _softmax_np(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def combine_views(log_probs: np.ndarray) -> np.ndarray:
    """Combine ``V x C`` per-view log-probabilities into one probability vector.

    The mean of the log-probabilities (a normalised geometric mean of the probabilities):
    one confident view cannot outvote several views that agree.
    """
    mean = log_probs.mean(axis=0)
    p = np.exp(mean - mean.max())
    return p / p.sum()


def classify(
    model: torch.nn.Module,
    config: RouterConfig,
    images: Sequence[np.ndarray],
    *,
    device: str | torch.device | None = None,
    batch_size: int = 32,
    ood: OODModel | None = None,
) -> list[Prediction]:
    """Name the modality of each image.

    Args:
        model: router from :func:`create_router` / :func:`load_router`.
        config: its configuration (thumbnail size, normalisation, temperature, classes).
        images: float H x W x 3 images in [0, 1], any sizes.
        device: where to run (default: the model's device).
        batch_size: thumbnails per forward pass.
        ood: the router's OOD statistics (:func:`triageseg.router.ood.load_ood`): also score
            how unlike every trained modality each image is.

    Returns:
        One :class:`Prediction` per image: top-1 modality, its temperature-scaled
        probability, all class probabilities, and the OOD score (None without ``ood``).
    """
    views = [image_views(_check_image(image, name=f"images[{i}]"), config) for i, image in enumerate(images)]
    return classify_views(model, config, views, device=device, batch_size=batch_size, ood=ood)


def classify_views(
    model: torch.nn.Module,
    config: RouterConfig,
    views: Sequence[np.ndarray],
    *,
    device: str | torch.device | None = None,
    batch_size: int = 32,
    ood: OODModel | None = None,
) -> list[Prediction]:
    """Name the modality of each image from its views (``V x S x S x 3``, :func:`image_views` /
    :func:`overview_views`), combining the votes of its views (:func:`combine_views`).

    With ``ood`` (:func:`triageseg.router.ood.load_ood`), each prediction also carries the
    image's OOD score: the median of its views' scores (:func:`~triageseg.router.ood.combine_view_scores`).
    """
    from triageseg.router.ood import ViewSet, combine_view_scores

    if not views:
        return []
    owner_arr = np.asarray([i for i, v in enumerate(views) for _ in range(len(v))])
    thumbs = np.concatenate(views)
    logit_arr, features = router_outputs(model, config, thumbs, device=device, batch_size=batch_size)
    log_probs = np.log(np.clip(_softmax_np(logit_arr, config.temperature), 1e-12, None))
    scores = ood.view_scores(ViewSet(logit_arr, features, thumbs)) if ood is not None else None
    out = []
    for i in range(len(views)):
        mine = owner_arr == i
        p = combine_views(log_probs[mine])
        k = int(np.argmax(p))
        out.append(
            Prediction(
                modality=config.class_names[k],
                confidence=float(p[k]),
                probs={c: float(v) for c, v in zip(config.class_names, p)},
                ood_score=None if scores is None else combine_view_scores(scores[mine]),
            )
        )
    return out


def router_outputs(
    model: torch.nn.Module,
    config: RouterConfig,
    thumbs: np.ndarray,
    *,
    device: str | torch.device | None = None,
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``N x C`` and pooled features ``N x D`` (the ViT's pre-logits) of ``N x S x S x 3`` thumbnails.

    One forward pass gives both: ``forward_features`` -> ``forward_head(pre_logits=True)``
    -> ``head``, which is what ``model(x)`` computes in eval mode. A model without timm's
    ``forward_head`` (a stand-in classifier) gives its logits as the features.
    """
    # an exported router (pipeline.local.router_backend, segmenters.served): both outputs from one pass of
    # another runtime, on numpy arrays: no torch
    numpy_run = getattr(model, "numpy_logits_and_features", None)
    if numpy_run is not None:
        logits, feats = [], []
        for start in range(0, len(thumbs), batch_size):
            out, pooled = numpy_run(to_array(thumbs[start : start + batch_size], config))
            logits.append(np.asarray(out, dtype=np.float32))
            feats.append(np.asarray(pooled, dtype=np.float32))
        if not logits:
            return np.zeros((0, len(config.class_names)), np.float32), np.zeros((0, 0), np.float32)
        return np.concatenate(logits), np.concatenate(feats)
    import torch

    timm_vit = all(hasattr(model, a) for a in ("forward_features", "forward_head", "head"))
    if device is None:
        device = next(model.parameters()).device
    device = resolve_device(device)
    was_training = model.training
    if was_training:  # eval() / train() walk every module: only when the mode changes
        model.eval()
    logits, feats = [], []
    try:
        with torch.inference_mode():
            for start in range(0, len(thumbs), batch_size):
                x = to_tensor(thumbs[start : start + batch_size], config).to(device)
                if timm_vit:
                    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
                    out = model.head(pooled)
                else:  # any other classifier: its logits stand in for the features
                    pooled = out = model(x)
                logits.append(out.float().cpu().numpy())
                feats.append(pooled.float().cpu().numpy())
    finally:
        if was_training:
            model.train()
    if not logits:
        return np.zeros((0, len(config.class_names)), np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate(logits), np.concatenate(feats)


__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_MODEL",
    "Prediction",
    "RouterConfig",
    "background_colour",
    "classify",
    "classify_views",
    "combine_views",
    "create_router",
    "crop_boxes",
    "image_views",
    "load_router",
    "make_thumbnail",
    "normalise",
    "overview_views",
    "resolve_device",
    "router_outputs",
    "save_router",
    "to_tensor",
]
