"""Importers for public nuclei datasets into the DESIGN layout.

Each importer reads its source folder (never modifying it), builds the dataset in a
hidden staging folder beside ``dst`` and renames it onto ``dst`` only when complete,
so an interrupted import leaves nothing half-written. Images are copied byte for byte
(``read_image`` reads them as they are); labels are written with ``write_labels``.
An ``import.json`` beside the index records the source and every decision taken.

Supported:

* ``dsb2018``: Kaggle 2018 Data Science Bowl ``stage1_train`` (BBBC038):
  ``<id>/images/<id>.png`` (RGBA) and ``<id>/masks/*.png`` (one binary mask per
  nucleus). Overlapping masks: a contested pixel goes to the **smaller** mask (it
  would otherwise vanish inside the larger one); equal areas go to the mask whose
  file name sorts first. Instance ids follow the sorted mask file names. The
  optional ``classes.csv`` (``filename,foreground,background``) gives the
  modality through ``DSB_MODALITY_MAP``; an image that is not listed, or a colour
  pair that is not in the map, gets the modality ``unknown`` (never guessed:
  run ``triageseg data cluster`` to propose modalities). stage1_train has no
  official validation split, so a deterministic stratified 80/20 train/val split
  is drawn (seed 0 by default).
* ``bbbc039``: ``images/*.tif`` (16-bit), ``masks/*.png`` and
  ``metadata/training.txt|validation.txt|test.txt``. BBBC039 masks are RGB PNGs
  that colour-code nuclei (non-touching nuclei share the value 1, touching ones get
  2, 3, ...), so instances are the 8-connected regions of equal colour; a plain
  integer label PNG decodes to the same instances. Modality ``fluorescence``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from triageseg.datasets.atomic import current_umask
from triageseg.datasets.errors import DataError

# (foreground, background) colours of DSB 2018 classes.csv -> modality.
DSB_MODALITY_MAP: dict[tuple[str, str], str] = {
    ("white", "black"): "fluorescence",
    ("black", "white"): "brightfield",
    ("purple", "purple"): "he",
    ("purple", "white"): "he",
    ("purple", "yellow"): "brightfield",
}
UNKNOWN = "unknown"
FORMATS = ("dsb2018", "bbbc039")
_BBBC039_SPLITS = {"training.txt": "train", "validation.txt": "val", "test.txt": "test"}


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _staging(dst: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield an empty folder beside ``dst``; on success it replaces ``dst``."""
    if dst.exists() and not dst.is_dir():
        raise DataError(dst, "destination exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise DataError(dst, "destination folder is not empty; choose a new folder or overwrite")
    dst.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.importing-"))
    try:
        yield stage
        # mkdtemp makes the folder private (0700): the dataset gets the usual umask permissions.
        os.chmod(stage, 0o777 & ~current_umask())
        if dst.is_dir():
            shutil.rmtree(dst)
        os.replace(stage, dst)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def _same_or_inside(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents or a in b.parents


def _check_src_dst(src: Path, dst: Path) -> None:
    if not src.is_dir():
        raise DataError(src, "source folder not found" if not src.exists() else "source is not a folder")
    if _same_or_inside(src, dst):
        raise DataError(dst, f"destination must be outside the source {src} (the source is never modified)")


def _copy_file(src: Path, dst: Path) -> None:
    from triageseg.datasets.atomic import atomic_path

    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _read_mask_array(path: Path) -> np.ndarray:
    from triageseg.datasets.io import read_image_raw

    array = read_image_raw(path)
    if array.ndim == 3 and array.shape[2] in (2, 4):  # gray+alpha / RGBA: alpha is not a label
        array = array[..., :-1]
    if not np.issubdtype(array.dtype, np.integer) and array.dtype != bool:
        raise DataError(path, f"mask must have an integer dtype, got {array.dtype}")
    return array


def decode_colour_labels(mask: np.ndarray, *, name: str = "<mask>") -> np.ndarray:
    """Instance labels from a colour-coded mask: each 8-connected region of one colour.

    Works for BBBC039's RGB masks (the value repeats between nuclei that do not
    touch) and for plain integer label images alike.

    Args:
        mask: HxW or HxWxC integer array, 0 (all channels) = background.
        name: what to call the mask in errors.

    Returns:
        uint32 HxW labels numbered 1..N in raster order of first appearance.
    """
    from skimage.measure import label

    mask = np.asarray(mask)
    if mask.ndim == 3:
        if mask.shape[2] == 1:
            mask = mask[..., 0]
        else:
            if np.iinfo(mask.dtype).bits > 16 or mask.shape[2] > 4:
                raise DataError(name, f"cannot decode a {mask.shape[2]}-channel {mask.dtype} colour mask")
            key = np.zeros(mask.shape[:2], np.uint64)
            for c in range(mask.shape[2]):  # pack channels into one integer colour key
                key = (key << np.uint64(16)) | mask[..., c].astype(np.uint64)
            mask = key
    if mask.ndim != 2:
        raise DataError(name, f"mask must be 2-D or colour, got shape {tuple(mask.shape)}")
    if mask.dtype.kind == "i" and mask.min() < 0:
        raise DataError(name, f"mask has negative values ({mask.min()})")
    return label(mask, background=0, connectivity=2).astype(np.uint32)


def merge_binary_masks(masks: list[np.ndarray]) -> tuple[np.ndarray, int]:
    """One label image from per-nucleus binary masks, resolving overlaps.

    Label ``i + 1`` is ``masks[i]``. A pixel claimed by several masks goes to the
    smallest of them; among equal areas, to the lowest index.

    Returns:
        (uint32 labels HxW, number of pixels claimed by more than one mask).
    """
    if not masks:
        raise ValueError("no masks to merge")
    shape = masks[0].shape
    labels = np.zeros(shape, np.uint32)
    claims = np.zeros(shape, np.uint16)
    areas = np.array([int(m.sum()) for m in masks])
    # Paint largest first, so smaller masks (then lower indices) overwrite and win.
    order = sorted(range(len(masks)), key=lambda i: (-areas[i], -i))
    for i in order:
        labels[masks[i]] = i + 1
        claims += masks[i]
    return labels, int(np.count_nonzero(claims > 1))


def _stratified_split(
    modality_of: Mapping[str, str], *, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, str]:
    """Deterministic per-modality split; val (then test) get one image once a modality has enough."""
    rng = np.random.default_rng(seed)
    split_of: dict[str, str] = {}
    for modality in sorted(set(modality_of.values())):
        ids = sorted(k for k, v in modality_of.items() if v == modality)
        m = len(ids)
        n_val = max(1, int(round(m * val_fraction))) if val_fraction > 0 and m >= 2 else 0
        n_test = max(1, int(round(m * test_fraction))) if test_fraction > 0 and m >= 3 else 0
        n_val, n_test = min(n_val, m - 1), min(n_test, max(m - 1 - n_val, 0))
        for rank, j in enumerate(rng.permutation(m)):
            split_of[ids[j]] = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
    return split_of


def _read_classes_csv(path: Path) -> dict[str, tuple[str, str]]:
    import csv
    import io

    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as err:
        raise DataError(path, f"cannot read: {err.strerror or err}") from None
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.strip().lower() for f in reader.fieldnames or []]
    if fields[:3] != ["filename", "foreground", "background"]:
        raise DataError(
            path, f"expected a header 'filename,foreground,background', found {','.join(fields) or 'nothing'}"
        )
    out = {}
    for row in reader:
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
        if row.get("filename"):
            from triageseg.datasets.io import image_id

            out[image_id(row["filename"])] = (row["foreground"].lower(), row["background"].lower())
    return out


def _finish(stage: Path, *, modality_of: dict[str, str], split_of: dict[str, str], info: dict) -> None:
    from triageseg.datasets.atomic import write_json_atomic
    from triageseg.datasets.layout import write_index

    write_index(stage, modalities=modality_of, splits=split_of)
    counts: dict[str, dict[str, int]] = {}
    for key, modality in sorted(modality_of.items()):
        row = counts.setdefault(modality, {})
        row[split_of[key]] = row.get(split_of[key], 0) + 1
    write_json_atomic(stage / "import.json", {**info, "n_images": len(modality_of), "counts": counts})


# --------------------------------------------------------------------------- DSB 2018


def import_dsb2018(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    classes_csv: str | os.PathLike | None = None,
    modality_map: Mapping[tuple[str, str], str] | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Import DSB 2018 ``stage1_train`` into the DESIGN layout at ``dst``.

    Args:
        src: the ``stage1_train`` folder (one sub-folder per image id).
        dst: new dataset folder (must be empty or absent unless ``overwrite``).
        classes_csv: ``classes.csv`` with ``filename,foreground,background``; when None,
            ``src/classes.csv`` is used if it exists, else every modality is ``unknown``.
        modality_map: (foreground, background) -> modality, lower-case colour names;
            default ``DSB_MODALITY_MAP``. Pairs not in it give ``unknown``.
        val_fraction: share of each modality that goes to ``val`` (the rest: ``train``).
        seed: seed of the train/val draw.
        overwrite: replace an existing non-empty ``dst``.

    Returns:
        ``dst``.

    Raises:
        DataError: missing folders or files, unreadable or mismatched masks, bad CSV.
    """
    from triageseg.datasets.io import image_id, read_image_raw, write_labels

    src, dst = Path(src), Path(dst)
    _check_src_dst(src, dst)
    mapping = {(a.lower(), b.lower()): v for (a, b), v in (modality_map or DSB_MODALITY_MAP).items()}
    notes: list[str] = []
    if classes_csv is None and (src / "classes.csv").is_file():
        classes_csv = src / "classes.csv"
    classes = _read_classes_csv(Path(classes_csv)) if classes_csv is not None else {}
    if classes_csv is None:
        notes.append("no classes.csv: every modality is 'unknown' (run `triageseg data cluster` to propose modalities)")
    ids = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not ids:
        raise DataError(src, "no image folders (expected <id>/images/<id>.png and <id>/masks/*.png)")
    modality_of: dict[str, str] = {}
    unmapped: dict[tuple[str, str], int] = {}
    overlap_total = 0
    no_masks: list[str] = []
    with _staging(dst, overwrite=overwrite) as stage:
        for key in ids:
            folder = src / key
            image_path = folder / "images" / f"{key}.png"
            if not image_path.is_file():
                candidates = sorted((folder / "images").glob("*.png")) if (folder / "images").is_dir() else []
                if len(candidates) != 1:
                    raise DataError(image_path, "image not found (expected <id>/images/<id>.png)")
                image_path = candidates[0]
            mask_dir = folder / "masks"
            if not mask_dir.is_dir():
                raise DataError(mask_dir, "no masks/ folder (stage1_train has one per image)")
            shape = read_image_raw(image_path).shape[:2]
            masks = []
            for mask_path in sorted(mask_dir.glob("*.png")):
                mask = _read_mask_array(mask_path)
                mask = mask.any(axis=2) if mask.ndim == 3 else mask > 0
                if mask.shape != shape:
                    raise DataError(mask_path, f"mask shape {mask.shape} != image shape {shape}")
                masks.append(mask)
            if masks:
                labels, overlap = merge_binary_masks(masks)
                overlap_total += overlap
            else:
                labels = np.zeros(shape, np.uint32)
                no_masks.append(key)
            _copy_file(image_path, stage / "images" / f"{key}.png")
            write_labels(stage / "labels" / f"{key}.tif", labels)
            pair = classes.get(key) or classes.get(image_id(image_path.name))
            if pair is None:
                modality_of[key] = UNKNOWN
            else:
                modality_of[key] = mapping.get(pair, UNKNOWN)
                if pair not in mapping:
                    unmapped[pair] = unmapped.get(pair, 0) + 1
        if classes_csv is not None:
            missing = sum(1 for k in ids if (classes.get(k) is None))
            if missing:
                notes.append(f"{missing} image(s) not in {Path(classes_csv).name}: modality 'unknown'")
            for (fg, bg), count in sorted(unmapped.items()):
                notes.append(f"{count} image(s) with classes {fg}/{bg} not in the modality map: 'unknown'")
        if overlap_total:
            notes.append(f"{overlap_total} pixel(s) claimed by several masks went to the smaller mask")
        if no_masks:
            shown = ", ".join(no_masks[:10]) + (f" and {len(no_masks) - 10} more" if len(no_masks) > 10 else "")
            notes.append(f"{len(no_masks)} image(s) with an empty masks/ folder imported with no nuclei: {shown}")
        notes.append(
            "stage1_train has no validation split: drew a stratified "
            f"{1 - val_fraction:.0%}/{val_fraction:.0%} train/val split (seed {seed})"
        )
        split_of = _stratified_split(modality_of, val_fraction=val_fraction, test_fraction=0.0, seed=seed)
        _finish(
            stage,
            modality_of=modality_of,
            split_of=split_of,
            info={
                "format": "dsb2018",
                "source": str(src.resolve()),
                "classes_csv": None if classes_csv is None else str(Path(classes_csv).resolve()),
                "modality_map": {f"{a}/{b}": v for (a, b), v in mapping.items()},
                "overlap_rule": "smaller mask wins; equal areas: first mask file in sorted order",
                "overlap_pixels": overlap_total,
                "notes": notes,
            },
        )
    return dst


# --------------------------------------------------------------------------- BBBC039


def _read_list(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def import_bbbc039(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Import BBBC039 (images/, masks/, metadata/) into the DESIGN layout at ``dst``.

    Splits come from ``metadata/training.txt`` (train), ``validation.txt`` (val) and
    ``test.txt`` (test), which list mask or image file names. Without ``metadata/``
    a deterministic 70/15/15 split is drawn (``seed``). Modality: ``fluorescence``.

    Args:
        src: the BBBC039 folder.
        dst: new dataset folder (must be empty or absent unless ``overwrite``).
        seed: seed of the split drawn when there is no metadata.
        overwrite: replace an existing non-empty ``dst``.

    Returns:
        ``dst``.

    Raises:
        DataError: missing folders, an image without mask, a listed name without
            image, a name in two split lists, unreadable or mismatched masks.
    """
    from triageseg.datasets.io import _TIFF_SUFFIXES, image_id, read_image_raw, write_labels

    src, dst = Path(src), Path(dst)
    _check_src_dst(src, dst)
    images_dir, masks_dir, meta_dir = src / "images", src / "masks", src / "metadata"
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise DataError(folder, "folder not found (BBBC039 has images/, masks/, metadata/)")
    images = {
        image_id(p): p
        for p in sorted(images_dir.iterdir())
        if p.is_file() and p.suffix.lower() in _TIFF_SUFFIXES + (".png",) and not p.name.startswith(".")
    }
    if not images:
        raise DataError(images_dir, "no images (.tif)")
    masks = {image_id(p): p for p in sorted(masks_dir.glob("*.png")) if not p.name.startswith(".")}
    notes: list[str] = []
    if meta_dir.is_dir():
        split_of: dict[str, str] = {}
        for list_name, split in _BBBC039_SPLITS.items():
            list_path = meta_dir / list_name
            if not list_path.is_file():
                notes.append(f"metadata/{list_name} missing: no {split} images")
                continue
            for name in _read_list(list_path):
                key = image_id(name)
                if key not in images:
                    raise DataError(list_path, f"lists {name!r} but images/ has no such image")
                if key in split_of and split_of[key] != split:
                    raise DataError(list_path, f"{name!r} is also listed for {split_of[key]}")
                split_of[key] = split
        unlisted = sorted(set(images) - set(split_of))
        if unlisted:
            notes.append(
                f"{len(unlisted)} image(s) in no metadata list were not imported: {', '.join(unlisted[:3])}"
                + (" ..." if len(unlisted) > 3 else "")
            )
        keys = sorted(split_of)
    else:
        keys = sorted(images)
        split_of = _stratified_split(
            {k: "fluorescence" for k in keys}, val_fraction=0.15, test_fraction=0.15, seed=seed
        )
        notes.append(f"no metadata/ folder: drew a 70/15/15 train/val/test split (seed {seed})")
    if not keys:
        raise DataError(meta_dir, "the metadata lists name no images")
    with _staging(dst, overwrite=overwrite) as stage:
        for key in keys:
            if key not in masks:
                raise DataError(masks_dir / f"{key}.png", f"no mask for image {images[key].name}")
            shape = read_image_raw(images[key]).shape[:2]
            labels = decode_colour_labels(_read_mask_array(masks[key]), name=str(masks[key]))
            if labels.shape != shape:
                raise DataError(masks[key], f"mask shape {labels.shape} != image shape {shape}")
            _copy_file(images[key], stage / "images" / f"{key}{images[key].suffix.lower()}")
            write_labels(stage / "labels" / f"{key}.tif", labels)
        modality_of = {k: "fluorescence" for k in keys}
        _finish(
            stage,
            modality_of=modality_of,
            split_of={k: split_of[k] for k in keys},
            info={
                "format": "bbbc039",
                "source": str(src.resolve()),
                "mask_decoding": "8-connected regions of equal colour (BBBC039 colour-codes touching nuclei)",
                "notes": notes,
            },
        )
    return dst
