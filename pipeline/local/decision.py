"""What the routed pipeline decides and gives for one image (:class:`Decision`, :class:`Result`).

Plain data, shared by the in-memory path (:mod:`triageseg.pipeline.local.single`), the
batch and block paths and the Ray stages; and how class probabilities are rounded before
a decode (``segment --prob-dtype``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

# What the class probabilities are rounded to before decoding (`segment --prob-dtype`): float32
# is the network's output as it is; float16 lets the block path keep them in 2-3x less
# scratch (pipeline/blockwise/probstore.py) while in-memory and block-wise labels still agree.
PROB_DTYPES = ("float32", "float16")


def round_probabilities(probs: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """``probs`` (float32) as a store of ``dtype`` keeps them: unchanged for float32, rounded to float16 else."""
    if dtype == "float32":
        return probs
    return probs.astype(np.dtype(dtype)).astype(np.float32)


class OODOffWarning(UserWarning):
    """The bundle's router has no OOD statistics: no image is called an unknown modality."""


class Decision(NamedTuple):
    """What :meth:`Pipeline.decide` settles for one image before any segmenter runs."""

    modality: str  # the router's top-1 modality (or the forced one)
    confidence: float | None  # the router's calibrated confidence (None when forced)
    used_model: str  # the segmenter to run: a modality, ``_generalist``, or ``""`` (unknown modality, skipped)
    decision: str  # why, in words ("routed to he (confidence 0.97)", "unknown modality (...)", "forced", ...)
    ood_score: float | None = None  # how unlike every trained modality (None without OOD statistics)
    diameter: float | None = None  # median nucleus diameter on the native grid (px); None: not known
    scale: float | None = None  # resize factor before the network (None: the segmenter's own scale)
    size_source: str = ""  # estimated / given / metadata / fallback / off (router.size.SizeDecision)

    @property
    def skipped(self) -> bool:
        """Whether no segmenter runs (an unknown modality under ``--unknown skip``)."""
        return self.used_model == ""

    @property
    def unknown(self) -> bool:
        """Whether the router called the image an unknown modality."""
        return self.decision.startswith("unknown modality")



@dataclass(frozen=True)
class Result:
    """What segmenting one image gives.

    Attributes:
        labels: HxW uint32 instance labels, 0 = background.
        modality: the router's top-1 modality (or the forced one).
        confidence: the router's calibrated confidence in ``modality`` (None when forced).
        used_model: the segmenter that ran (a modality name or ``_generalist``).
        decision: why that segmenter ran ("routed", "forced", "low confidence -> generalist", ...).
        ood_score: how unlike every trained modality the image is (None without OOD statistics).
        quality: predicted mean F1 of this segmentation (:mod:`triageseg.postprocess.quality`), no
            ground truth needed; None when the segmenter has no quality model (older bundles).
        diameter, scale, size_source: the size decision (:class:`triageseg.router.size.SizeDecision`).
    """

    labels: np.ndarray
    modality: str
    confidence: float | None
    used_model: str
    decision: str
    ood_score: float | None = None
    quality: float | None = None
    diameter: float | None = None
    scale: float | None = None
    size_source: str = ""
