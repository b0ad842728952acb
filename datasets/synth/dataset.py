"""A synthetic dataset on disk in the DESIGN layout (images, labels, modalities.csv, splits.csv)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from triageseg.datasets.errors import DataError
from triageseg.datasets.synth.sample import _check_size, synth_sample
from triageseg.datasets.synth.styles import DEFAULT_WEIGHTS, MODALITIES, SPLITS, STYLES, _check_modality

def _allocate(n: int, weights: np.ndarray) -> np.ndarray:
    """Integer counts summing to n, proportional to weights, at least 1 each when n allows."""
    exact = weights / weights.sum() * n
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")  # largest remainders first
    counts[order[: n - counts.sum()]] += 1
    if n >= len(counts):
        while (counts == 0).any():  # every requested modality gets at least one image
            counts[np.argmax(counts)] -= 1
            counts[np.argmin(counts)] += 1
    return counts


def _split_counts(m: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """(train, val, test) for m images: val and test get at least one each when m >= 3."""
    _, f_val, f_test = fractions
    if m <= 1:
        return m, 0, 0
    if m == 2:
        return 1, 1, 0
    n_val = max(1, int(round(m * f_val))) if f_val > 0 else 0
    n_test = max(1, int(round(m * f_test))) if f_test > 0 else 0
    while n_val + n_test > m - 1:  # keep at least one training image
        if n_test >= n_val and n_test > 0:
            n_test -= 1
        else:
            n_val -= 1
    return m - n_val - n_test, n_val, n_test


def _parse_weights(weights, modalities: Sequence[str]) -> np.ndarray:
    if weights is None:
        return np.array([DEFAULT_WEIGHTS.get(m, 0.2) for m in modalities], float)
    if isinstance(weights, dict):
        extra = sorted(set(weights) - set(modalities))
        if extra:
            raise ValueError(
                f"weights for modalities not generated: {', '.join(extra)}; generated: {', '.join(modalities)}"
            )
        w = np.array([float(weights.get(m, 0.0)) for m in modalities], float)
    else:
        w = np.asarray(weights, float)
        if w.shape != (len(modalities),):
            raise ValueError(f"weights must have one value per modality ({len(modalities)}), got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {w.tolist()}")
    return w


def make_dataset(
    out: str | os.PathLike,
    *,
    n: int = 100,
    size: int = 256,
    modalities: Sequence[str] = MODALITIES,
    seed: int = 0,
    weights: dict[str, float] | Sequence[float] | None = None,
    splits: tuple[float, float, float] = (0.7, 0.15, 0.15),
    overwrite: bool = False,
    diameter_range: tuple[float, float] | None = None,
) -> Path:
    """Write a synthetic dataset in the DESIGN layout and return its folder.

    Writes ``images/<id>.png`` (uint8 RGB), ``labels/<id>.tif``, ``modalities.csv``,
    ``splits.csv`` and ``synth.json`` (the parameters). Ids are ``<modality>_<nnnn>``
    numbered per modality. Image ``i`` of a modality is drawn from its own generator
    seeded by ``(seed, modality, i)``, so it does not depend on ``n`` or the weights.
    Splits are stratified by modality; each modality gets at least one val and one
    test image when it has 3 or more images.

    Args:
        out: output folder (created; must not already hold images unless ``overwrite``).
        n: number of images.
        size: image side in pixels.
        modalities: which of ``MODALITIES`` to generate.
        seed: random seed.
        weights: modality proportions (dict or one value per modality); default is
            DSB-like imbalance, fluorescence 0.55, brightfield, he and ihc 0.15 each.
        splits: (train, val, test) fractions.
        overwrite: replace the images, labels and index of an existing dataset in ``out``.
        diameter_range: (min, max) median nucleus diameter in pixels, drawn log-uniform per
            image (from the image's own generator) so sizes vary as across objectives;
            None (default): each modality's own sizes, the datasets of earlier versions.

    Raises:
        ValueError: unknown modality (listing the valid ones), bad n, size, weights or splits.
        DataError: ``out`` already holds a dataset and ``overwrite`` is False.
    """
    from triageseg.datasets.atomic import atomic_path, write_json_atomic
    from triageseg.datasets.io import write_labels
    from triageseg.datasets.layout import write_index

    modalities = tuple(modalities)
    if not modalities:
        raise ValueError(f"no modality given; valid modalities: {', '.join(MODALITIES)}")
    for m in modalities:
        _check_modality(m)
    if len(set(modalities)) != len(modalities):
        raise ValueError(f"modalities repeated: {', '.join(modalities)}")
    if int(n) < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    _check_size(size)  # before any folder is made
    if diameter_range is not None:
        lo, hi = (float(v) for v in diameter_range)
        if not (2.0 <= lo <= hi <= 1000.0):
            raise ValueError(f"diameter_range must be MIN,MAX with 2 <= MIN <= MAX <= 1000 pixels, "
                             f"got {diameter_range}")
    fractions = tuple(float(f) for f in splits)
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"splits must be three non-negative fractions (train, val, test) summing to 1, got {splits!r}")
    w = _parse_weights(weights, modalities)
    out = Path(out)
    images_dir, labels_dir = out / "images", out / "labels"
    existing = [p for d in (images_dir, labels_dir) if d.is_dir() for p in d.iterdir()]
    if existing and not overwrite:
        raise DataError(
            out,
            f"already holds a dataset ({len(existing)} files in images/ and labels/); "
            "choose an empty folder or pass overwrite=True (CLI: --overwrite)",
        )
    for p in existing:
        if p.is_file():
            p.unlink()
    images_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)

    import imagecodecs

    counts = _allocate(int(n), w)
    mod_index = {m: MODALITIES.index(m) for m in modalities}
    split_rng = np.random.default_rng([int(seed), 1_000_003])
    modality_of: dict[str, str] = {}
    split_of: dict[str, str] = {}
    for m, count in zip(modalities, counts, strict=True):
        ids = [f"{m}_{i:04d}" for i in range(count)]
        for i, sample_id in enumerate(ids):
            rng = np.random.default_rng([int(seed), mod_index[m], i])
            diameter = None
            if diameter_range is not None:
                diameter = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
            image, labels = synth_sample(m, size=size, rng=rng, diameter=diameter)
            with atomic_path(images_dir / f"{sample_id}.png") as tmp:
                tmp.write_bytes(imagecodecs.png_encode(image, level=3))
            write_labels(labels_dir / f"{sample_id}.tif", labels)
            modality_of[sample_id] = m
        n_train, n_val, _ = _split_counts(count, fractions)  # type: ignore[arg-type]
        order = split_rng.permutation(count)
        for rank, j in enumerate(order):
            split_of[ids[j]] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    write_index(out, modalities=modality_of, splits=split_of)
    write_json_atomic(
        out / "synth.json",
        {
            "generator": "triageseg.datasets.synth",
            "n": int(n),
            "size": int(size),
            "modalities": list(modalities),
            "seed": int(seed),
            "weights": dict(zip(modalities, (w / w.sum()).round(6).tolist(), strict=True)),
            "counts": dict(zip(modalities, counts.tolist(), strict=True)),
            "splits": dict(zip(SPLITS, fractions, strict=True)),
            **({} if diameter_range is None else {"diameter_range": [lo, hi]}),
        },
    )
    return out


def describe_styles() -> dict:
    """The per-modality nucleus styles as plain dicts (for docs and provenance)."""
    return {m: dataclasses.asdict(s) for m, s in STYLES.items()}
