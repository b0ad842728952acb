"""Collecting corrected images: one image + its corrected labels + its modality into a dataset folder.

``add_to_training_set`` is what napari's "Add to training set" button and a script call;
it writes the usual layout (``images/``, ``labels/``, ``modalities.csv``, ``splits.csv``)
that ``train`` and ``finetune`` read. Each file is written atomically (temporary file +
rename), the image and labels before the CSV rows that name them, so an interrupted add
leaves either the old dataset or the new one, never a CSV row without its files.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from triageseg.datasets.errors import DataError

VAL_EVERY = 5  # every 5th added image goes to the val split unless the caller says otherwise
_NAME_OK = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Added:
    """What :func:`add_to_training_set` wrote."""

    id: str  # the image id (file stem) in the dataset
    split: str  # train / val / test
    modality: str
    n_objects: int  # nuclei in the corrected labels
    image_path: Path
    label_path: Path
    replaced: bool  # an image of that id was there and is replaced (its split is kept)


def check_corrected_labels(labels, image_shape: tuple[int, ...], *, name: str = "labels") -> np.ndarray:
    """Validate corrected instance labels against their image; return them as uint32 HxW.

    Raises:
        DataError: not an array, wrong shape, non-integer values (a float layer holding
            fractions, booleans), negative values or no nucleus at all, each said plainly.
    """
    if labels is None:
        raise DataError(name, "no labels given")
    labels = np.asarray(labels)
    if labels.ndim == 3 and labels.shape[2] == 1:
        labels = labels[..., 0]
    shape = tuple(int(v) for v in image_shape[:2])
    if labels.ndim != 2:
        raise DataError(name, f"labels must be a 2-D image, got shape {tuple(labels.shape)}")
    if tuple(labels.shape) != shape:
        raise DataError(name, f"labels have shape {tuple(labels.shape)} but the image is {shape[0]} x {shape[1]}; "
                              "they must cover the image pixel for pixel")
    if labels.dtype == bool:
        raise DataError(name, "labels are a boolean mask; instance labels need one integer per nucleus "
                              "(0 = background, 1, 2, ... one value per nucleus)")
    if np.issubdtype(labels.dtype, np.floating):
        if not np.isfinite(labels).all() or not np.array_equal(labels, np.round(labels)):
            raise DataError(name, f"labels hold non-integer values (dtype {labels.dtype}); instance labels are "
                                  "whole numbers, one per nucleus")
    elif not np.issubdtype(labels.dtype, np.integer):
        raise DataError(name, f"labels must hold integers, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise DataError(name, f"labels must be non-negative, found {labels.min()}")
    if not labels.any():
        raise DataError(name, "the labels are empty (no nucleus, all 0): paint at least one nucleus before adding")
    if labels.max() > np.iinfo(np.uint32).max:
        raise DataError(name, f"label value {labels.max()} does not fit uint32")
    return labels.astype(np.uint32)


def _check_image(image, name: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)) or image.size == 0:
        raise DataError(name, f"the image must be 2-D gray or RGB(A), got shape {tuple(image.shape)}")
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise DataError(name, f"unsupported image dtype {image.dtype}")
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        raise DataError(name, "the image holds NaN or infinite values")
    return image


def safe_id(name: str) -> str:
    """A file-name-safe image id from a layer or file name (other characters become ``_``)."""
    stem = _NAME_OK.sub("_", str(name).strip()).strip("._")
    if not stem:
        raise DataError(name, "the image name is empty after removing characters unsafe in file names")
    return stem


def add_to_training_set(
    dataset_dir: str | os.PathLike,
    image,
    labels,
    modality: str,
    name: str,
    split: str | None = None,
) -> Added:
    """Save one image, its corrected labels and its modality into a dataset folder.

    Args:
        dataset_dir: the corrections dataset (created when missing).
        image: the image as the user sees it: HxW gray or HxWx3/4, any integer or float dtype
            (8-bit images are saved as PNG, others as TIFF, values unchanged).
        labels: corrected instance labels, HxW integers (0 = background).
        modality: the modality name (an existing one of the bundle, or a new one).
        name: image id (unsafe file-name characters become ``_``). Adding an id again replaces
            its image and labels and keeps its split.
        split: ``train``, ``val`` or ``test``; None: every 5th new image goes to ``val``.

    Returns:
        :class:`Added`.

    Raises:
        DataError: bad labels or image (see :func:`check_corrected_labels`), a bad modality or
            split, or an unreadable existing dataset (naming the file).
    """
    from triageseg.datasets.atomic import atomic_path
    from triageseg.datasets.io import write_labels
    from triageseg.datasets.layout import MODALITIES_CSV, SPLITS, SPLITS_CSV, read_index_csv, write_index

    root = Path(dataset_dir)
    image_id = safe_id(name)
    image = _check_image(image, image_id)
    labels = check_corrected_labels(labels, image.shape, name=f"labels of {image_id}")
    modality = str(modality or "").strip()
    if not modality or any(c in modality for c in ",\n\r\"/\\") or modality.startswith("_"):
        raise DataError(image_id, f"invalid modality name {modality!r} (a plain word: no commas, quotes, slashes, "
                                  "and not starting with '_')")
    if split is not None and split not in SPLITS:
        raise DataError(image_id, f"unknown split {split!r}; valid: {', '.join(SPLITS)}")

    modalities = read_index_csv(root / MODALITIES_CSV, "modality") if (root / MODALITIES_CSV).is_file() else {}
    splits = read_index_csv(root / SPLITS_CSV, "split") if (root / SPLITS_CSV).is_file() else {}
    replaced = image_id in splits or image_id in modalities
    if split is None:
        split = splits.get(image_id) or ("val" if (len(splits) + 1) % VAL_EVERY == 0 else "train")

    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for old in (root / "images").glob(f"{image_id}.*"):  # one file per id: a replaced image may change format
        old.unlink()
    if image.dtype == np.uint8:
        import imagecodecs

        image_path = root / "images" / f"{image_id}.png"
        with atomic_path(image_path) as tmp:
            tmp.write_bytes(imagecodecs.png_encode(np.ascontiguousarray(image)))
    else:
        import tifffile

        image_path = root / "images" / f"{image_id}.tif"
        with atomic_path(image_path) as tmp:
            tifffile.imwrite(tmp, np.ascontiguousarray(image), compression="zlib",
                             photometric="rgb" if image.ndim == 3 else "minisblack")
    label_path = write_labels(root / "labels" / f"{image_id}.tif", labels)
    modalities[image_id] = modality
    splits[image_id] = split
    write_index(root, modalities=modalities, splits=splits)
    n_objects = int(np.unique(labels[labels > 0]).size)
    return Added(image_id, split, modality, n_objects, image_path, label_path, replaced)


def dataset_checksum(root: str | os.PathLike) -> str:
    """sha256 over the dataset's files (relative path + content of images/, labels/ and the CSVs)."""
    root = Path(root)
    digest = hashlib.sha256()
    files = [p for sub in ("images", "labels") if (root / sub).is_dir()
             for p in sorted((root / sub).iterdir()) if p.is_file() and not p.name.startswith(".")]
    files += [root / n for n in ("modalities.csv", "splits.csv") if (root / n).is_file()]
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()
