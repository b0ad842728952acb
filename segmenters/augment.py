"""Training augmentation (albumentations 2.0.8) with per-modality presets.

Geometric transforms move the *instance labels* with nearest-neighbour interpolation
(labels travel as an exact float32 mask), and the 3-class targets are computed from the
augmented crop afterwards, so boundaries keep their set width whatever the scale or
elastic warp did. Each sample is augmented with its own seed, so a crop is a pure
function of ``(image, labels, seed)``: training is reproducible across worker counts
and across an interrupted-and-resumed run.

Example:
    >>> tf = build_augmentation("he", crop_size=128, strength=1.0)       # doctest: +SKIP
    >>> img, lab = augment_sample(tf, image, labels, seed=7)              # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# Instance ids travel through cv2 as float32: exact for ids below 2**24.
MAX_EXACT_LABEL = 2**24


@dataclass(frozen=True)
class AugmentPreset:
    """Augmentation magnitudes at strength 1 (each scaled by the ``strength`` factor)."""

    scale: float = 0.5  # Affine zoom range in octaves: (2^-scale, 2^scale); covers size triage's residual error
    rotate: float = 15.0  # Affine extra rotation range in degrees (D4 already gives the right angles)
    affine_p: float = 0.5  # probability of the Affine transform
    elastic_alpha: float = 40.0  # ElasticTransform displacement scale (about 2 px at sigma 7)
    elastic_sigma: float = 7.0  # ElasticTransform smoothing of the displacement field
    elastic_p: float = 0.25  # probability of the elastic warp
    brightness: float = 0.2  # RandomBrightnessContrast brightness limit
    contrast: float = 0.2  # RandomBrightnessContrast contrast limit
    gamma: float = 0.25  # RandomGamma range: (1 - gamma, 1 + gamma)
    hue: float = 0.0  # HueSaturationValue hue shift limit (0 disables the transform)
    saturation: float = 0.0  # HueSaturationValue saturation shift limit
    blur_sigma: float = 1.0  # GaussianBlur maximum sigma in pixels
    blur_p: float = 0.2  # probability of the blur
    noise_std: float = 0.04  # GaussNoise maximum standard deviation (image range is [0, 1])
    noise_p: float = 0.3  # probability of the noise


# Stained modalities get colour jitter; fluorescence (a dark background with bright
# nuclei, grey after normalisation) does not, its colour carries no information.
PRESETS: dict[str, AugmentPreset] = {
    "fluorescence": AugmentPreset(),
    "brightfield": AugmentPreset(hue=8.0, saturation=15.0),
    "he": AugmentPreset(hue=12.0, saturation=25.0, brightness=0.15, contrast=0.15),
    # A model trained on every modality (the generalist) or on a modality without a
    # preset of its own: mild colour jitter, which grey images ignore.
    "default": AugmentPreset(hue=8.0, saturation=15.0),
}


def preset_for(modality: str | None) -> AugmentPreset:
    """The preset of ``modality``; ``None`` (generalist) and unknown names get ``"default"``."""
    return PRESETS.get(modality or "default", PRESETS["default"])


def build_augmentation(modality: str | None, *, crop_size: int, strength: float = 1.0) -> Any:
    """The training pipeline for one modality: pad + random crop, then augmentations.

    Args:
        modality: selects the preset (see :data:`PRESETS`); ``None`` for the generalist.
        crop_size: side of the square training crops; smaller images are reflect-padded.
        strength: multiplies every magnitude and probability; 0 = crops only.

    Returns:
        an ``albumentations.Compose`` taking ``image`` (float32 HxWx3) and ``mask``
        (instance labels as float32).
    """
    import albumentations as A
    import cv2

    if crop_size < 1:
        raise ValueError(f"crop_size must be positive, got {crop_size}")
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    p = preset_for(modality)
    k = float(strength)
    reflect = cv2.BORDER_REFLECT_101
    steps: list[Any] = [
        A.PadIfNeeded(min_height=crop_size, min_width=crop_size, border_mode=reflect, position="random"),
        A.RandomCrop(height=crop_size, width=crop_size),
    ]
    if k > 0:
        prob = min(1.0, k)
        steps += [
            A.D4(p=1.0),
            A.Affine(
                scale=(2.0 ** (-p.scale * k), 2.0 ** (p.scale * k)),
                rotate=(-p.rotate * k, p.rotate * k),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                border_mode=reflect,
                p=p.affine_p * prob,
            ),
            A.ElasticTransform(
                alpha=p.elastic_alpha * k,
                sigma=p.elastic_sigma,
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                border_mode=reflect,
                p=p.elastic_p * prob,
            ),
            A.RandomBrightnessContrast(
                brightness_limit=p.brightness * k, contrast_limit=p.contrast * k, p=0.5 * prob
            ),
            A.RandomGamma(gamma_limit=(100 * max(0.1, 1 - p.gamma * k), 100 * (1 + p.gamma * k)), p=0.3 * prob),
        ]
        if p.hue > 0 or p.saturation > 0:
            steps.append(
                A.HueSaturationValue(
                    hue_shift_limit=p.hue * k, sat_shift_limit=p.saturation * k, val_shift_limit=0, p=0.5 * prob
                )
            )
        steps += [
            A.GaussianBlur(sigma_limit=(0.1, max(0.1, p.blur_sigma * k)), p=p.blur_p * prob),
            A.GaussNoise(std_range=(0.0, min(1.0, p.noise_std * k)), p=p.noise_p * prob),
        ]
    return A.Compose(steps)


def augment_sample(
    transform: Any, image: np.ndarray, labels: np.ndarray, *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``transform`` to an image and its instance labels with a fixed seed.

    Args:
        transform: from :func:`build_augmentation`.
        image: float32 HxWx3 in [0, 1].
        labels: integer instance labels HxW (0 = background).
        seed: the sample's seed; the same seed gives the same crop and augmentation.

    Returns:
        ``(image float32 crop x crop x 3 in [0, 1], labels uint32 crop x crop)``.
    """
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape} and labels {labels.shape} differ in size")
    if labels.size and int(labels.max()) >= MAX_EXACT_LABEL:
        raise ValueError(f"instance ids must be < {MAX_EXACT_LABEL} for augmentation, got max {int(labels.max())}")
    transform.set_random_seed(int(seed))
    out = transform(image=np.ascontiguousarray(image, dtype=np.float32), mask=labels.astype(np.float32))
    img = np.clip(out["image"], 0.0, 1.0).astype(np.float32, copy=False)
    lab = np.rint(out["mask"]).astype(np.uint32)
    return img, lab
