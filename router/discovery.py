"""Modality discovery for images without modality labels: features -> k-means -> a proposal.

A person reviews the proposal before it becomes ``modalities.csv``:

1. :func:`image_features` describes each image by its colour (RGB, HSV and Lab
   statistics), intensity distribution (percentiles, skewness, dark / bright fractions)
   and texture (gradient magnitude, local binary patterns); nothing depends on the
   image size.
2. :func:`cluster_features` standardises them and runs k-means (``k`` given, or the
   ``k`` in 2..8 with the best silhouette score).
3. :func:`discover_modalities` writes ``modalities.proposed.csv`` (``id,modality``,
   names ``fluorescence-like`` / ``brightfield-like`` / ``he-like`` when a simple rule
   recognises the cluster, else ``cluster_<i>``), a contact sheet PNG (one row per
   cluster, images nearest the cluster centre first) and, when the folder already has
   ``modalities.csv``, the adjusted Rand index between clusters and those labels.

NumPy, scikit-learn and scikit-image only: this module must not import torch.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from triageseg.datasets.atomic import atomic_path, write_text_atomic
from triageseg.datasets.errors import DataError

PROPOSED_CSV = "modalities.proposed.csv"
PROPOSED_SHEET = "modalities.proposed.png"
GUESSES = ("fluorescence-like", "brightfield-like", "he-like")

_PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
FEATURE_NAMES: tuple[str, ...] = (
    *(f"rgb_mean_{c}" for c in "rgb"),
    *(f"rgb_std_{c}" for c in "rgb"),
    *(f"corr_{a}{b}" for a, b in ("rg", "rb", "gb")),
    *(f"gray_p{p}" for p in _PERCENTILES),
    "gray_skew",
    "dark_fraction",
    "bright_fraction",
    "sat_mean",
    "sat_std",
    "sat_background",
    "val_mean",
    "hue_cos",
    "hue_sin",
    "lab_l_mean",
    "lab_l_std",
    "lab_a_mean",
    "lab_a_std",
    "lab_b_mean",
    "lab_b_std",
    "grad_mean",
    "grad_std",
    "grad_p90",
    *(f"lbp_{i}" for i in range(10)),
)


@dataclass(frozen=True)
class DiscoveryResult:
    """What :func:`discover_modalities` found and wrote."""

    ids: tuple[str, ...]  # image ids, in the order of ``clusters``
    clusters: np.ndarray  # int cluster index per image
    names: tuple[str, ...]  # proposed modality name per cluster index
    k: int  # number of clusters
    silhouette: dict[int, float]  # silhouette score per k tried (one entry when k was given)
    ari: float | None  # adjusted Rand index vs the known modalities.csv (None without one)
    known: tuple[str | None, ...]  # known modality per image (None when unlabelled)
    features: np.ndarray  # N x len(FEATURE_NAMES) raw features
    csv_path: Path | None  # proposed id,modality file written
    sheet_path: Path | None  # contact sheet written

    def sizes(self) -> dict[str, int]:
        """Number of images per proposed name."""
        return {name: int((self.clusters == i).sum()) for i, name in enumerate(self.names)}

    def crosstab(self) -> dict[str, dict[str, int]]:
        """``{proposed name: {known modality: count}}`` over the images with a known modality."""
        out: dict[str, dict[str, int]] = {name: {} for name in self.names}
        for c, m in zip(self.clusters, self.known):
            if m is not None:
                row = out[self.names[c]]
                row[m] = row.get(m, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "k": self.k,
            "names": list(self.names),
            "sizes": self.sizes(),
            "silhouette": {str(k): v for k, v in self.silhouette.items()},
            "ari": self.ari,
            "crosstab": self.crosstab(),
            "csv": None if self.csv_path is None else str(self.csv_path),
            "sheet": None if self.sheet_path is None else str(self.sheet_path),
        }


# --------------------------------------------------------------------------- features


def _shrink(image: np.ndarray, max_side: int) -> np.ndarray:
    from skimage.transform import downscale_local_mean

    factor = int(np.ceil(max(image.shape[:2]) / max_side))
    if factor <= 1:
        return image
    return downscale_local_mean(image, (factor, factor, 1)).astype(np.float32)


def image_features(image: np.ndarray, *, max_side: int = 256) -> np.ndarray:
    """Colour, intensity and texture features of one image (``len(FEATURE_NAMES)`` floats).

    Args:
        image: float H x W x 3 in [0, 1] (``datasets.io.read_image`` output).
        max_side: the image is block-averaged to at most this side first, so the
            features (texture included) describe a comparable scale and stay fast.

    Returns:
        float64 vector, in the order of :data:`FEATURE_NAMES`.
    """
    from skimage.color import rgb2hsv, rgb2lab
    from skimage.feature import local_binary_pattern
    from skimage.filters import sobel

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"expected a float H x W x 3 image in [0, 1], got shape {image.shape} dtype {image.dtype}")
    x = np.clip(_shrink(image.astype(np.float32, copy=False), max_side), 0, 1)
    flat = x.reshape(-1, 3).astype(np.float64)
    gray = flat @ np.array([0.2125, 0.7154, 0.0721])
    mean, std = flat.mean(0), flat.std(0)

    def corr(a: int, b: int) -> float:
        # Grey images (channels identical) have correlation 1; a flat channel counts as 1.
        if std[a] < 1e-6 or std[b] < 1e-6:
            return 1.0
        return float(np.corrcoef(flat[:, a], flat[:, b])[0, 1])

    g_mean, g_std = gray.mean(), gray.std()
    skew = float(((gray - g_mean) ** 3).mean() / g_std**3) if g_std > 1e-6 else 0.0
    hsv = rgb2hsv(x).reshape(-1, 3)
    sat, val = hsv[:, 1], hsv[:, 2]
    # Background = the half of the pixels nearest the median grey level.
    background = np.abs(gray - np.median(gray)) <= np.quantile(np.abs(gray - np.median(gray)), 0.5)
    angle = 2 * np.pi * hsv[:, 0]
    w = sat / sat.sum() if sat.sum() > 1e-6 else np.full_like(sat, 1 / len(sat))
    lab = rgb2lab(x).reshape(-1, 3)
    gray2d = gray.reshape(x.shape[:2])
    grad = sobel(gray2d).ravel()
    lbp = local_binary_pattern(np.round(gray2d * 255).astype(np.uint8), P=8, R=1, method="uniform")
    lbp_hist = np.bincount(lbp.astype(np.int64).ravel(), minlength=10)[:10] / lbp.size
    feats = [
        *mean,
        *std,
        corr(0, 1),
        corr(0, 2),
        corr(1, 2),
        *np.percentile(gray, _PERCENTILES),
        skew,
        float((gray < 0.25).mean()),
        float((gray > 0.75).mean()),
        float(sat.mean()),
        float(sat.std()),
        float(np.median(sat[background])),
        float(val.mean()),
        float((w * np.cos(angle)).sum()),
        float((w * np.sin(angle)).sum()),
        float(lab[:, 0].mean() / 100),
        float(lab[:, 0].std() / 100),
        float(lab[:, 1].mean() / 100),
        float(lab[:, 1].std() / 100),
        float(lab[:, 2].mean() / 100),
        float(lab[:, 2].std() / 100),
        float(grad.mean()),
        float(grad.std()),
        float(np.percentile(grad, 90)),
        *lbp_hist,
    ]
    out = np.asarray(feats, dtype=np.float64)
    if out.shape != (len(FEATURE_NAMES),):  # pragma: no cover - guards the two lists drifting apart
        raise RuntimeError(f"feature vector has {out.shape[0]} values for {len(FEATURE_NAMES)} names")
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


# --------------------------------------------------------------------------- clustering


def cluster_features(
    features: np.ndarray, *, k: int | None = None, k_max: int = 8, seed: int = 0
) -> tuple[np.ndarray, int, dict[int, float], np.ndarray]:
    """Standardise features and cluster them with k-means.

    Args:
        features: N x F array.
        k: number of clusters; None picks k in ``2..min(k_max, N - 1)`` with the best
            silhouette score.
        k_max: largest k tried when ``k`` is None.
        seed: k-means initialisation seed.

    Returns:
        ``(labels N, k, {k: silhouette}, distance of each image to its cluster centre)``.
        Cluster indices are ordered by decreasing size (0 = largest).

    Raises:
        ValueError: fewer images than clusters, or ``k < 1``.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score
    from sklearn.preprocessing import StandardScaler

    features = np.asarray(features, dtype=np.float64)
    n = features.shape[0]
    if features.ndim != 2 or n == 0:
        raise ValueError(f"expected an N x F feature array with N >= 1, got shape {features.shape}")
    if k is not None and not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of images ({n}), got {k}")
    z = StandardScaler().fit_transform(features)

    def fit(kk: int):
        return KMeans(n_clusters=kk, n_init=10, random_state=seed).fit(z)

    scores: dict[int, float] = {}
    if k is None:
        if n < 3:
            raise ValueError(f"choosing k needs at least 3 images, got {n}; pass k")
        best = None
        for kk in range(2, min(k_max, n - 1) + 1):
            model = fit(kk)
            if len(set(model.labels_)) < 2:
                continue
            scores[kk] = float(silhouette_score(z, model.labels_))
            if best is None or scores[kk] > scores[best[0]]:
                best = (kk, model)
        if best is None:
            raise ValueError("all images have the same features; nothing to cluster")
        k, model = best
    else:
        model = fit(k)
        if 2 <= k < n and len(set(model.labels_)) >= 2:
            scores[k] = float(silhouette_score(z, model.labels_))
    raw = model.labels_
    order = np.argsort(-np.bincount(raw, minlength=k), kind="stable")
    remap = np.empty(k, np.int64)
    remap[order] = np.arange(k)
    labels = remap[raw]
    dist = np.linalg.norm(z - model.cluster_centers_[raw], axis=1)
    return labels, int(k), scores, dist


def guess_names(features: np.ndarray, labels: np.ndarray, *, k: int | None = None) -> list[str]:
    """A hint of what each cluster looks like, from its median features.

    Dark background (median grey < 0.3) -> ``fluorescence-like``; saturated pink/purple
    background -> ``he-like``; light background -> ``brightfield-like``; otherwise
    ``cluster_<i>``. Repeated guesses get ``_<i>`` appended so names stay unique.
    """
    idx = {name: i for i, name in enumerate(FEATURE_NAMES)}
    k = int(labels.max()) + 1 if k is None else k
    names = []
    for c in range(k):
        f = np.median(features[labels == c], axis=0)
        hue = np.degrees(np.arctan2(f[idx["hue_sin"]], f[idx["hue_cos"]])) % 360
        if f[idx["gray_p50"]] < 0.3:
            names.append("fluorescence-like")
        elif f[idx["sat_background"]] > 0.15 and (hue >= 260 or hue <= 20):
            names.append("he-like")
        elif f[idx["gray_p50"]] > 0.5:
            names.append("brightfield-like")
        else:
            names.append(f"cluster_{c}")
    for name in set(names):
        if names.count(name) > 1:
            names = [f"{n}_{i}" if n == name else n for i, n in enumerate(names)]
    return names


# --------------------------------------------------------------------------- outputs


def contact_sheet(
    rows: Sequence[Sequence[np.ndarray]], path: str | os.PathLike, *, tile: int = 96, gap: int = 4
) -> Path:
    """Write a PNG grid: one row per cluster, one ``tile`` px thumbnail per image.

    Args:
        rows: per row, float H x W x 3 images in [0, 1] (rows may differ in length).
        path: PNG to write (atomically).
        tile: thumbnail side (aspect kept by padding, see ``router.model.make_thumbnail``).
        gap: white gutter between tiles and rows, in pixels.
    """
    import imageio.v3 as iio

    from triageseg.router.model import make_thumbnail

    n_cols = max((len(r) for r in rows), default=0)
    if not rows or n_cols == 0:
        raise ValueError("contact sheet needs at least one image")
    h = len(rows) * tile + (len(rows) + 1) * gap
    w = n_cols * tile + (n_cols + 1) * gap
    sheet = np.ones((h, w, 3), np.float32)
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            y, x = gap + r * (tile + gap), gap + c * (tile + gap)
            sheet[y : y + tile, x : x + tile] = make_thumbnail(image, tile)
    path = Path(path)
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, np.round(sheet * 255).astype(np.uint8), extension=".png")
    return path


def _list_images(root: Path) -> tuple[list[str], list[Path], list[str | None]]:
    """Ids, image paths and known modalities: a dataset folder, or a plain folder of images."""
    from triageseg.datasets.io import IMAGE_SUFFIXES, image_id

    if (root / "images").is_dir():
        from triageseg.datasets.layout import Dataset

        ds = Dataset(root)
        return [s.id for s in ds.samples], [s.image_path for s in ds.samples], [s.modality for s in ds.samples]
    if not root.is_dir():
        raise DataError(root, "not a folder")
    paths = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(root, f"no images ({', '.join(IMAGE_SUFFIXES)}) and no images/ folder")
    ids = [image_id(p) for p in paths]
    known: dict[str, str] = {}
    csv_path = root / "modalities.csv"
    if csv_path.is_file():
        from triageseg.datasets.layout import read_index_csv

        known = read_index_csv(csv_path, "modality")
    return ids, paths, [known.get(i) for i in ids]


def _csv_text(ids: Sequence[str], modalities: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "modality"])
    for i, m in sorted(zip(ids, modalities)):
        writer.writerow([i, m])
    return buf.getvalue()


def discover_modalities(
    root: str | os.PathLike,
    *,
    k: int | None = None,
    out: str | os.PathLike | None = None,
    sheet: str | os.PathLike | None = None,
    per_cluster: int = 8,
    names: str = "guess",
    seed: int = 0,
    overwrite: bool = False,
    write: bool = True,
    progress: bool = False,
) -> DiscoveryResult:
    """Cluster a folder's images by appearance and propose a ``modalities.csv``.

    Args:
        root: a dataset folder (``images/`` ...) or a plain folder of images.
        k: number of modalities; None chooses it by silhouette score (2..8).
        out: proposal CSV to write (default ``root/modalities.proposed.csv``).
        sheet: contact sheet PNG (default ``root/modalities.proposed.png``).
        per_cluster: images per contact-sheet row (nearest the cluster centre first).
        names: ``"guess"`` (``fluorescence-like`` ... when recognised) or ``"cluster"``
            (``cluster_0`` ... in decreasing cluster size).
        seed: k-means seed.
        overwrite: allow ``out`` to replace an existing ``modalities.csv``.
        write: False computes everything but writes nothing.
        progress: show a progress bar while reading images.

    Returns:
        A :class:`DiscoveryResult`; ``ari`` compares clusters with the known labels
        when the folder has a ``modalities.csv`` (images without a label are left out).

    Raises:
        DataError: no images; ``out`` would replace a ``modalities.csv`` without ``overwrite``.
    """
    from sklearn.metrics import adjusted_rand_score
    from tqdm.auto import tqdm

    from triageseg.datasets.io import read_image

    if names not in ("guess", "cluster"):
        raise ValueError(f"names must be 'guess' or 'cluster', got {names!r}")
    root = Path(root)
    out_path = Path(out) if out is not None else root / PROPOSED_CSV
    sheet_path = Path(sheet) if sheet is not None else root / PROPOSED_SHEET
    if write and out_path.name == "modalities.csv" and out_path.exists() and not overwrite:
        raise DataError(out_path, "exists (the labels a person made); pass overwrite=True (--overwrite) to replace it, "
                        f"or write the proposal elsewhere (default {PROPOSED_CSV})")
    ids, paths, known = _list_images(root)
    feats = np.stack([image_features(read_image(p)) for p in tqdm(paths, desc="features", disable=None if progress else True)])
    labels, k, scores, dist = cluster_features(feats, k=k, seed=seed)
    cluster_names = guess_names(feats, labels, k=k) if names == "guess" else [f"cluster_{i}" for i in range(k)]
    have = [i for i, m in enumerate(known) if m is not None]
    ari = float(adjusted_rand_score([known[i] for i in have], labels[have])) if len(have) >= 2 else None

    csv_written = sheet_written = None
    if write:
        write_text_atomic(out_path, _csv_text(ids, [cluster_names[c] for c in labels]))
        csv_written = out_path
        rows = []
        for c in range(k):
            members = np.flatnonzero(labels == c)
            members = members[np.argsort(dist[members], kind="stable")][:per_cluster]
            rows.append([read_image(paths[i]) for i in members])
        sheet_written = contact_sheet(rows, sheet_path)
    return DiscoveryResult(
        ids=tuple(ids),
        clusters=labels,
        names=tuple(cluster_names),
        k=k,
        silhouette=scores,
        ari=ari,
        known=tuple(known),
        features=feats,
        csv_path=csv_written,
        sheet_path=sheet_written,
    )


__all__ = [
    "FEATURE_NAMES",
    "GUESSES",
    "PROPOSED_CSV",
    "PROPOSED_SHEET",
    "DiscoveryResult",
    "cluster_features",
    "contact_sheet",
    "discover_modalities",
    "guess_names",
    "image_features",
]
