"""Nucleus styles: the size, shape and spread of each modality's nuclei, and the modality names."""

from __future__ import annotations

from dataclasses import dataclass

MODALITIES = ("fluorescence", "brightfield", "he", "ihc")
# Largest image side: drawing one image takes ~80 bytes per pixel (~5 GB at 8192 x 8192).
MIN_SIZE, MAX_SIZE = 16, 8192
# Like the 2018 Data Science Bowl: fluorescence is the large majority (IHC is not in the
# DSB; it gets the share of a stained modality taken from the others).
DEFAULT_WEIGHTS = {"fluorescence": 0.55, "brightfield": 0.15, "he": 0.15, "ihc": 0.15}
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class NucleusStyle:
    """How the nuclei of one modality are sized, shaped and spread (pixels at 1x)."""

    radius: tuple[float, float]  # range of the mean semi-axis of a nucleus
    aspect: tuple[float, float]  # range of long/short semi-axis ratio
    roughness: float  # amplitude of the boundary perturbation (0 = perfect ellipse)
    coverage: tuple[float, float]  # range of the image fraction covered by nuclei
    clustered: tuple[float, float]  # range of the fraction of nuclei placed around cluster centres
    cluster_spread: float  # spread of a cluster in nucleus radii
    max_overlap: float  # largest fraction of a candidate that may fall on earlier nuclei
    # Range of the fraction of nuclei lying along the image's flow (tissue streams, palisades in
    # glands): their long axis follows a smooth orientation field; the others point anywhere.
    aligned: tuple[float, float] = (0.0, 0.0)


STYLES = {
    # Up to 2.2: cultured nuclei are often elongated. Through the realism check's classical
    # segmentation (benchmarks/realism.py, ``elongation``) the real DSB 2018 and U2OS images give
    # a 90th-percentile long/short axis of 1.95 and 2.01; 16 synthetic samples 1.71 with up to 1.7, 1.88 now.
    "fluorescence": NucleusStyle(
        radius=(5.0, 13.0),
        aspect=(1.0, 2.2),
        roughness=0.06,
        coverage=(0.06, 0.35),
        clustered=(0.1, 0.7),
        cluster_spread=1.6,
        max_overlap=0.25,
    ),
    "brightfield": NucleusStyle(
        radius=(7.0, 15.0),
        aspect=(1.0, 1.8),
        roughness=0.09,
        coverage=(0.08, 0.30),
        clustered=(0.2, 0.7),
        cluster_spread=1.5,
        max_overlap=0.25,
    ),
    "he": NucleusStyle(
        radius=(4.5, 10.0),
        aspect=(1.0, 2.8),
        roughness=0.12,
        coverage=(0.15, 0.5),  # up to dense tumour fields (the TCIA image: ~0.32 of it is nuclei)
        clustered=(0.4, 0.9),
        cluster_spread=1.4,
        max_overlap=0.3,
        aligned=(0.5, 1.0),
    ),
    # IHC sections: crowded, often elongated epithelial nuclei (columnar glands) and
    # scattered stromal ones, a little larger than in the synthetic H&E.
    "ihc": NucleusStyle(
        radius=(4.5, 10.0),
        aspect=(1.0, 2.6),
        roughness=0.1,
        coverage=(0.1, 0.35),
        clustered=(0.3, 0.9),
        cluster_spread=1.5,
        max_overlap=0.25,
        aligned=(0.5, 1.0),
    ),
}


def _check_modality(modality: str) -> None:
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; valid modalities: {', '.join(MODALITIES)}")

