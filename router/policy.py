"""The fallback policy: which segmenter runs for a routed image, and why (torch-free).

:func:`decide` is the one place the verdict is made (``unknown modality``, low confidence,
no specialist); :meth:`triageseg.pipeline.local.single.Pipeline.choose` calls it for every face
(``segment``, ``route``, the Ray and block paths, serve, napari).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from triageseg.bundle import GENERALIST
from triageseg.datasets.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from triageseg.router.model import Prediction

UNKNOWN_POLICIES = ("generalist", "skip", "fail")
UNKNOWN_DECISION = "unknown modality"  # how every unknown-modality decision string starts
SKIPPED = ""  # the used_model of an image skipped as unknown modality (no segmenter runs)


class UnknownModality(DataError):
    """An image unlike every trained modality under ``--unknown fail`` (the batch names the file)."""


def decide(
    prediction: Prediction,
    *,
    threshold: float,
    available: Sequence[str],
    has_generalist: bool,
    ood_threshold: float | None = None,
    unknown: str = "generalist",
) -> tuple[str, str]:
    """Which segmenter to run for a routed image, and a one-line reason.

    First the OOD check: with an ``ood_threshold`` and a prediction whose ``ood_score`` is above
    it, the image is of an ``unknown modality``, whatever the confidence, and ``unknown`` says
    what happens: ``"generalist"`` runs the generalist (the top-1 specialist when the bundle has
    none), ``"skip"`` runs nothing (``used_model`` is ``""``), ``"fail"`` raises
    :class:`UnknownModality` with the score.

    Otherwise policy ``generalist_else_top1`` (bundle.json's ``fallback``):

    - confidence >= threshold and a specialist exists for the top-1 modality -> that specialist;
    - confidence < threshold -> the generalist if the bundle has one, else the top-1 specialist;
    - no specialist for the top-1 modality -> the generalist, else an error.

    Args:
        prediction: the router's answer.
        threshold: confidence threshold (bundle.json ``fallback.confidence_threshold``).
        available: modalities with a specialist in the bundle (``_generalist`` is ignored).
        has_generalist: whether the bundle holds ``segmenters/_generalist``.
        ood_threshold: the router's calibrated OOD threshold (None: no OOD check).
        unknown: one of :data:`UNKNOWN_POLICIES`.

    Returns:
        ``(used_model, reason)``; ``used_model`` is a modality name, ``"_generalist"``, or ``""`` (skipped).

    Raises:
        ValueError: neither a specialist for the top-1 modality nor a generalist.
        UnknownModality: an unknown modality under ``unknown="fail"``.
    """
    if unknown not in UNKNOWN_POLICIES:
        raise ValueError(f"unknown must be one of {', '.join(UNKNOWN_POLICIES)}, got {unknown!r}")
    specialists = [m for m in available if m != GENERALIST]
    top, conf = prediction.modality, float(prediction.confidence)
    has_top = top in specialists
    score = prediction.ood_score
    if ood_threshold is not None and score is not None and score > ood_threshold:
        why = f"{UNKNOWN_DECISION} (OOD score {score:.3g} > {ood_threshold:.3g}; top-1 {top}, confidence {conf:.2f})"
        if unknown == "fail":
            raise UnknownModality(None, f"{why}: refused (--unknown fail)")
        if unknown == "skip":
            return SKIPPED, f"{why}: skipped"
        if has_generalist:
            return GENERALIST, f"{why}: generalist"
        if has_top:
            return top, f"{why}, no generalist: top-1 specialist"
    elif conf < threshold:
        if has_generalist:
            return GENERALIST, f"low confidence {conf:.2f} < {threshold:.2f} for {top}: generalist"
        if has_top:
            return top, f"low confidence {conf:.2f} < {threshold:.2f} for {top}, no generalist: top-1 specialist"
    elif has_top:
        return top, f"routed to {top} (confidence {conf:.2f})"
    elif has_generalist:
        return GENERALIST, f"no specialist for {top} (confidence {conf:.2f}): generalist"
    raise ValueError(
        f"router chose {top!r} (confidence {conf:.2f}) but the bundle has no specialist for it "
        f"(specialists: {specialists or 'none'}) and no generalist"
    )


__all__ = ["SKIPPED", "UNKNOWN_DECISION", "UNKNOWN_POLICIES", "UnknownModality", "decide"]
