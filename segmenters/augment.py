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
    "ihc": AugmentPreset(hue=8.0, saturation=20.0, brightness=0.15, contrast=0.15),
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
        steps += appearance_steps(modality, strength=k)  # stain, shot noise, JPEG (image only)
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


# --- Appearance augmentation: what the synthetic generator cannot cover ---------------
#
# Real slides differ from each other in stain batch, scanner, exposure and compression
# far more than a generator's parameter ranges can promise. These transforms act on the
# image only (labels untouched) and are kept apart from the geometric ones above, so a
# preset can take or leave them as one group.

# Stain matrix of skimage.color.rgb2hed (Ruifrok & Johnston 2001): rows H, E, DAB in RGB OD.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], np.float32)
_RGB_FROM_HED /= np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED).astype(np.float32)


@dataclass(frozen=True)
class AppearancePreset:
    """Appearance augmentation magnitudes at strength 1 (scaled by ``strength``)."""

    hed_scale: float = 0.0  # each stain's amount multiplied by U(1 - x, 1 + x) (0 disables HED jitter)
    hed_shift: float = 0.0  # and shifted by U(-x, x) in OD (base 10)
    hed_p: float = 0.5  # probability of the HED jitter
    jpeg_quality: tuple[int, int] = (50, 95)  # ImageCompression quality range
    jpeg_p: float = 0.0  # probability of a JPEG round trip (0 disables it)
    poisson_p: float = 0.0  # probability of shot noise at a random photon count (fluorescence)


APPEARANCE: dict[str, AppearancePreset] = {
    "fluorescence": AppearancePreset(poisson_p=0.3),
    "brightfield": AppearancePreset(hed_scale=0.2, hed_shift=0.03, jpeg_p=0.2),
    "he": AppearancePreset(hed_scale=0.3, hed_shift=0.05, jpeg_p=0.4),
    "ihc": AppearancePreset(hed_scale=0.3, hed_shift=0.05, jpeg_p=0.4),
    "default": AppearancePreset(hed_scale=0.15, hed_shift=0.02, jpeg_p=0.2, poisson_p=0.1),
}


def hed_jitter(image: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Re-stain an RGB image in [0, 1]: each HED stain amount times ``scale`` plus ``shift``.

    The image is unmixed into hematoxylin, eosin and DAB optical densities (the
    ``skimage.color.rgb2hed`` model), each is scaled and shifted, and the mix is turned
    back into RGB (Tellez et al. 2018's HED jitter). Light where no stain was (OD 0)
    stays light when ``shift`` is 0.

    Args:
        image: float32 HxWx3 in [0, 1].
        scale: 3 factors (H, E, DAB).
        shift: 3 OD offsets (H, E, DAB), base 10.

    Returns:
        float32 HxWx3 in [0, 1].
    """
    od = -np.log10(np.clip(image, 1e-3, 1.0)).reshape(-1, 3) @ _HED_FROM_RGB
    od = od * np.asarray(scale, np.float32) + np.asarray(shift, np.float32)
    # Stain amounts may be slightly negative after unmixing (noise, off-model colours):
    # keep them, so scale 1 and shift 0 give the image back; clip the mixed OD only.
    rgb = np.power(10.0, -np.clip(od @ _RGB_FROM_HED, 0.0, None)).astype(np.float32)
    return np.clip(rgb, 0.0, 1.0).reshape(image.shape)


def _transform_classes():
    """The custom transforms, defined lazily so importing this module stays albumentations-free."""
    import albumentations as A

    class HEDJitter(A.ImageOnlyTransform):
        """Random :func:`hed_jitter`: stain amounts scaled by U(1 - scale, 1 + scale), shifted by U(-shift, shift)."""

        def __init__(self, scale: float = 0.2, shift: float = 0.03, p: float = 0.5):
            super().__init__(p=p)
            self.scale = float(scale)
            self.shift = float(shift)

        def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
            r = self.random_generator
            return {
                "factors": r.uniform(1.0 - self.scale, 1.0 + self.scale, 3).astype(np.float32),
                "offsets": r.uniform(-self.shift, self.shift, 3).astype(np.float32),
            }

        def apply(self, img: np.ndarray, factors: np.ndarray, offsets: np.ndarray, **params: Any) -> np.ndarray:
            return hed_jitter(img, factors, offsets)

        def get_transform_init_args_names(self) -> tuple[str, ...]:
            return ("scale", "shift")

    class ShotNoise(A.ImageOnlyTransform):
        """Poisson noise at a random photon count per unit intensity (log-uniform in ``photons``)."""

        def __init__(self, photons: tuple[float, float] = (20.0, 500.0), p: float = 0.3):
            super().__init__(p=p)
            self.photons = (float(photons[0]), float(photons[1]))

        def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
            r = self.random_generator
            return {"photons": float(np.exp(r.uniform(*np.log(self.photons)))), "seed": int(r.integers(2**31 - 1))}

        def apply(self, img: np.ndarray, photons: float, seed: int, **params: Any) -> np.ndarray:
            noisy = np.random.default_rng(seed).poisson(np.clip(img, 0.0, 1.0) * photons) / photons
            return np.clip(noisy, 0.0, 1.0).astype(np.float32)

        def get_transform_init_args_names(self) -> tuple[str, ...]:
            return ("photons",)

    return HEDJitter, ShotNoise


def appearance_preset_for(modality: str | None) -> AppearancePreset:
    """The appearance preset of ``modality``; ``None`` (generalist) and unknown names get ``"default"``."""
    return APPEARANCE.get(modality or "default", APPEARANCE["default"])


def appearance_steps(modality: str | None, *, strength: float = 1.0) -> list[Any]:
    """Image-only albumentations steps: HED stain jitter, shot noise and JPEG, per modality.

    Gamma, blur and Gaussian noise are in :func:`build_augmentation`'s own steps; these
    are the ones a stained slide or a photon-starved camera adds on top.

    Args:
        modality: selects the preset (see :data:`APPEARANCE`); ``None`` for the generalist.
        strength: multiplies every magnitude and probability; 0 gives no steps.

    Returns:
        a list of transforms to append to a ``Compose`` (empty at strength 0).
    """
    import albumentations as A

    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    k = float(strength)
    if k == 0:
        return []
    p = appearance_preset_for(modality)
    prob = min(1.0, k)
    hed_cls, shot_cls = _transform_classes()
    steps: list[Any] = []
    if p.hed_scale > 0:
        steps.append(hed_cls(scale=min(0.9, p.hed_scale * k), shift=p.hed_shift * k, p=p.hed_p * prob))
    if p.poisson_p > 0:
        steps.append(shot_cls(p=p.poisson_p * prob))
    if p.jpeg_p > 0:
        lo, hi = p.jpeg_quality
        steps.append(A.ImageCompression(quality_range=(int(max(1, hi - (hi - lo) * k)), hi), p=p.jpeg_p * prob))
    return steps
