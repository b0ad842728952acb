"""What every export shares: the offline guard, the output file rule, the test image, the cover.

The spec library validates URLs with HTTP requests, so packages carry DOIs, never URLs, and
every call into the zoo's libraries runs under :func:`offline`, which makes any request fail
loudly instead of reaching the network.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from triageseg.datasets.errors import DataError

# Works a triageseg package cites (DOIs: the spec validates a URL by fetching it).
CITATIONS = (
    ("Ronneberger et al. 2015, U-Net: Convolutional Networks for Biomedical Image Segmentation",
     "10.1007/978-3-319-24574-4_28"),
    ("Tan & Le 2019, EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks",
     "10.48550/arXiv.1905.11946"),
    ("Caicedo et al. 2019, Nucleus segmentation across imaging experiments: the 2018 Data Science Bowl",
     "10.1038/s41592-019-0612-7"),
)
AUTHOR = "triageseg contributors"
LICENSE = "MIT"


class NetworkUsed(RuntimeError):
    """The zoo's libraries tried to reach the network while exporting or importing offline."""


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Run bioimageio.spec / core calls with every HTTP request refused.

    The spec validates URLs and resolves remote sources with ``httpx``; nothing we write
    names a URL, so a request here would be a bug (or a foreign package naming remote
    files), and it is refused with :class:`NetworkUsed` rather than attempted.
    """
    import httpx

    def refuse(*args, **kwargs):
        raise NetworkUsed(f"network access refused while working offline: {args[:2]}")

    saved = (httpx.request, httpx.stream, httpx.Client.send, httpx.AsyncClient.send)
    httpx.request, httpx.stream = refuse, refuse
    httpx.Client.send = refuse  # type: ignore[method-assign]
    httpx.AsyncClient.send = refuse  # type: ignore[method-assign]
    try:
        yield
    finally:
        httpx.request, httpx.stream, httpx.Client.send, httpx.AsyncClient.send = saved


def check_out_path(out: str | os.PathLike, *, overwrite: bool) -> Path:
    """The package path: must end in ``.zip``; an existing file is refused unless ``overwrite``."""
    out = Path(out)
    if out.suffix.lower() != ".zip":
        raise DataError(out, "a bioimage.io package is written as a .zip file; name the output *.zip")
    if out.exists() and not overwrite:
        raise DataError(out, "already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if out.is_dir():
        raise DataError(out, "is a folder; name a .zip file")
    return out


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A scratch folder for the package's files, removed afterwards."""
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.stem}.", dir=out.parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def synthetic_image(modality: str | None, *, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """A real synthetic image of ``modality`` (uint8 HxWx3), its labels, and the modality drawn.

    A modality the generator does not know (a generalist, an imported model's name) draws
    fluorescence, the generator's most common modality.
    """
    from triageseg.datasets.synth import MODALITIES, synth_sample

    drawn = modality if modality in MODALITIES else "fluorescence"
    image, labels = synth_sample(drawn, size=size, rng=np.random.default_rng(seed))
    return image, labels, drawn


def zoo_normalise(raw: np.ndarray, percentiles: tuple[float, float], eps: float = 1e-6) -> np.ndarray:
    """What a zoo runner's ``scale_range`` (joint over channel, y, x, per sample) + ``clip`` computes.

    ``raw`` is ``B x C x H x W``; NumPy's linear percentiles, as bioimageio.core uses.
    """
    x = raw.astype(np.float32)
    out = np.empty_like(x)
    for b in range(x.shape[0]):
        lo, hi = np.percentile(x[b], percentiles)
        out[b] = (x[b] - np.float32(lo)) / np.float32(hi - lo + eps)
    return np.clip(out, 0.0, 1.0)


def write_cover(path: Path, image01: np.ndarray, labels: np.ndarray) -> Path:
    """A 2:1 PNG: the image, and the image with the instance outlines in yellow."""
    import imageio.v3 as iio
    from skimage.segmentation import find_boundaries

    rgb = (np.clip(image01, 0, 1) * 255).astype(np.uint8)
    outlined = rgb.copy()
    outlined[find_boundaries(labels, mode="inner")] = (255, 220, 0)
    iio.imwrite(path, np.concatenate([rgb, outlined], axis=1))
    return path


def save_package(descr, out: Path) -> Path:
    """Save ``descr`` as a zip with bioimageio.spec, atomically (temp file + rename)."""
    from bioimageio.spec import save_bioimageio_package

    from triageseg.datasets.atomic import atomic_path

    with atomic_path(out) as tmp, offline():
        tmp.unlink()  # the spec refuses to write over a file
        save_bioimageio_package(descr, output_path=tmp)
    return out


def validate_package(path: str | os.PathLike) -> tuple[bool, str]:
    """Load the package with bioimageio.spec (format validation incl. file hashes), offline.

    Returns:
        (valid, summary text).
    """
    from bioimageio.spec import load_description
    from bioimageio.spec.common import InvalidDescr

    with offline():
        descr = load_description(str(path), perform_io_checks=True)
    summary = descr.validation_summary
    ok = not isinstance(descr, InvalidDescr) and summary.status in ("valid-format", "passed")
    return ok, summary.format()


def core_test(path: str | os.PathLike, weight_format: str | None = None) -> tuple[bool, str]:
    """bioimageio.core's test of the package (runs the test tensors through ``weight_format``), offline."""
    from bioimageio.core import test_model

    with offline():
        summary = test_model(str(path), weight_format=weight_format, devices=["cpu"])
    return summary.status == "passed", summary.format()
