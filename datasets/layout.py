"""The on-disk dataset layout that ``data synth`` and ``data import`` write and ``train`` reads.

::

    root/
      images/<id>.<png|tif|tiff|jpg|jpeg>
      labels/<id>.tif            instance labels (0 = background); .tiff / .png also read
      modalities.csv             id,modality   (optional: modality None when absent)
      splits.csv                 id,split      train / val / test (optional)

Example:
    >>> ds = Dataset("data/synth")                       # doctest: +SKIP
    >>> ds.check()                                       # doctest: +SKIP
    >>> for sample in ds.select(split="train", modality="he"):   # doctest: +SKIP
    ...     image, labels = ds.load(sample)
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from triageseg.datasets.errors import DataError
from triageseg.datasets.io import IMAGE_SUFFIXES, image_id, read_image, read_image_raw, read_labels

SPLITS = ("train", "val", "test")
LABEL_SUFFIXES = (".tif", ".tiff", ".png")
MODALITIES_CSV = "modalities.csv"
SPLITS_CSV = "splits.csv"


@dataclass(frozen=True)
class Sample:
    """One image of a dataset and what is known about it."""

    id: str  # file name without extension, unique in the dataset
    image_path: Path  # images/<id>.<ext>
    label_path: Path | None  # labels/<id>.tif, None when the image has no labels
    modality: str | None  # from modalities.csv, None when not listed
    split: str | None  # train / val / test from splits.csv, None when not listed


def read_index_csv(path: str | os.PathLike, column: str) -> dict[str, str]:
    """An ``id,<column>`` CSV (``modalities.csv``, ``splits.csv``) as a dict, as spreadsheets write it.

    A UTF-8 byte-order mark (Excel's "CSV UTF-8"), CRLF line ends and spaces around
    names and values are accepted.

    Raises:
        DataError: unreadable file, no ``id`` / ``column`` header (shown as it is in the
            file), an empty value, or an id listed twice with different values.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(path, f"cannot read: {getattr(err, 'strerror', None) or err}") from None
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.strip() for f in (reader.fieldnames or [])]
    if "id" not in fields or column not in fields:
        header = text.splitlines()[0] if text.strip() else ""
        raise DataError(path, f"expected a header 'id,{column}', found {header!r}" if header else
                        f"expected a header 'id,{column}', found nothing")
    out: dict[str, str] = {}
    for line, row in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        sample_id, value = row.get("id", ""), row.get(column, "")
        if not sample_id:
            continue
        if not value:
            raise DataError(path, f"line {line}: empty {column} for id {sample_id!r}")
        if sample_id in out and out[sample_id] != value:
            raise DataError(path, f"line {line}: id {sample_id!r} listed twice with different {column}s")
        out[sample_id] = value
    return out


def list_files(folder: Path, suffixes: Sequence[str], what: str) -> dict[str, Path]:
    """Files of ``folder`` with one of ``suffixes``, keyed by id; two files with one id are a DataError."""
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in suffixes:
            continue
        key = image_id(path)
        if key in found:
            raise DataError(path, f"two files with id {key!r}: {found[key].name} and {path.name} "
                                  f"({what} files share the id {key!r})")
        found[key] = path
    return found


class Dataset:
    """A dataset folder in the DESIGN layout.

    Args:
        root: the folder holding ``images/`` (and ``labels/``, the CSV files).

    Raises:
        DataError: no ``images/`` folder or no images, two files with one id, a
            malformed CSV, an unknown split name, or CSV ids that have no image.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        images_dir = self.root / "images"
        if not images_dir.is_dir():
            raise DataError(
                self.root, "not a dataset: no images/ folder (expected images/, labels/, modalities.csv, splits.csv)"
            )
        images = list_files(images_dir, IMAGE_SUFFIXES, "image")
        if not images:
            raise DataError(images_dir, f"no images ({', '.join(IMAGE_SUFFIXES)})")
        labels = list_files(self.root / "labels", LABEL_SUFFIXES, "label")
        modalities = self._index(MODALITIES_CSV, "modality", images)
        splits = self._index(SPLITS_CSV, "split", images)
        bad = sorted({s for s in splits.values() if s not in SPLITS})
        if bad:
            raise DataError(self.root / SPLITS_CSV, f"unknown split(s) {', '.join(bad)}; valid: {', '.join(SPLITS)}")
        self.samples: list[Sample] = [
            Sample(i, images[i], labels.get(i), modalities.get(i), splits.get(i)) for i in sorted(images)
        ]
        self.modalities: list[str] = sorted({s.modality for s in self.samples if s.modality is not None})

    def _index(self, name: str, column: str, images: Mapping[str, Path]) -> dict[str, str]:
        path = self.root / name
        if not path.is_file():
            return {}
        table = read_index_csv(path, column)
        unknown = sorted(set(table) - set(images))
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise DataError(path, f"{len(unknown)} id(s) without an image in images/: {shown}")
        return table

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return f"Dataset({str(self.root)!r}, {len(self.samples)} samples, modalities={self.modalities})"

    def select(
        self,
        *,
        split: str | Iterable[str] | None = None,
        modality: str | Iterable[str] | None = None,
    ) -> list[Sample]:
        """Samples in the given split(s) and modality(ies); None means any.

        Raises:
            ValueError: an unknown split name (listing the valid ones).
        """
        splits = None if split is None else ({split} if isinstance(split, str) else set(split))
        mods = None if modality is None else ({modality} if isinstance(modality, str) else set(modality))
        if splits is not None and not splits <= set(SPLITS):
            raise ValueError(f"unknown split(s) {', '.join(sorted(splits - set(SPLITS)))}; valid: {', '.join(SPLITS)}")
        return [
            s for s in self.samples if (splits is None or s.split in splits) and (mods is None or s.modality in mods)
        ]

    def counts(self) -> dict[str, dict[str, int]]:
        """Number of samples per modality and split: ``{modality: {split: n}}`` (None -> 'none')."""
        out: dict[str, dict[str, int]] = {}
        for s in self.samples:
            row = out.setdefault(s.modality or "none", {})
            row[s.split or "none"] = row.get(s.split or "none", 0) + 1
        return out

    def check(self, samples: Sequence[Sample] | None = None) -> None:
        """Check that every image has labels of the same height and width.

        Raises:
            DataError: naming the files (up to 10 problems in one message).
        """
        import tifffile

        problems: list[str] = []
        for s in self.samples if samples is None else samples:
            if s.label_path is None:
                problems.append(f"{s.image_path}: no labels (expected labels/{s.id}.tif)")
                continue
            try:
                ishape = read_image_raw(s.image_path).shape[:2]
                if s.label_path.suffix.lower() in (".tif", ".tiff"):
                    with tifffile.TiffFile(s.label_path) as tif:
                        lshape = tuple(
                            n for n, ax in zip(tif.series[0].shape, tif.series[0].axes, strict=True) if ax in "YX"
                        )
                else:
                    lshape = read_labels(s.label_path).shape
            except DataError as err:
                problems.append(str(err))
                continue
            except Exception as err:  # tifffile errors on corrupt label files
                problems.append(f"{s.label_path}: cannot read ({err})")
                continue
            if tuple(ishape) != tuple(lshape):
                problems.append(
                    f"{s.label_path}: labels shape {tuple(lshape)} != image shape {tuple(ishape)} ({s.image_path.name})"
                )
        if problems:
            more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
            raise DataError(self.root, f"{len(problems)} problem(s): " + "; ".join(problems[:10]) + more)

    def load(self, sample: Sample, **read_kwargs) -> tuple[np.ndarray, np.ndarray]:
        """Image (float32 HxWx3 in [0, 1], see ``read_image``) and labels (uint32 HxW).

        Raises:
            DataError: no labels, or labels of another shape than the image.
        """
        if sample.label_path is None:
            raise DataError(sample.image_path, f"no labels (expected labels/{sample.id}.tif)")
        image = read_image(sample.image_path, **read_kwargs)
        labels = read_labels(sample.label_path)
        if image.shape[:2] != labels.shape:
            raise DataError(sample.label_path, f"labels shape {labels.shape} != image shape {image.shape[:2]}")
        return image, labels

    @staticmethod
    def ids_hash(samples: Iterable[Sample]) -> str:
        """sha256 (hex) of the sorted sample ids, one per line: which data a model saw."""
        ids = sorted(s.id for s in samples)
        return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()


def _csv_text(column: str, table: Mapping[str, str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", column])
    for key in sorted(table):
        writer.writerow([key, table[key]])
    return buf.getvalue()


def write_index(
    root: str | os.PathLike,
    *,
    modalities: Mapping[str, str],
    splits: Mapping[str, str],
) -> None:
    """Write ``modalities.csv`` (id,modality) and ``splits.csv`` (id,split), atomically, sorted by id.

    Raises:
        ValueError: an unknown split name or an empty modality.
    """
    from triageseg.datasets.atomic import write_text_atomic

    bad = sorted({v for v in splits.values() if v not in SPLITS})
    if bad:
        raise ValueError(f"unknown split(s) {', '.join(bad)}; valid: {', '.join(SPLITS)}")
    if any(not str(v).strip() for v in modalities.values()):
        raise ValueError("empty modality name in modalities")
    root = Path(root)
    write_text_atomic(root / MODALITIES_CSV, _csv_text("modality", modalities))
    write_text_atomic(root / SPLITS_CSV, _csv_text("split", splits))
