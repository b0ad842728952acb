"""One image as the interactive faces show it: the full routing decision, then labels and a table.

The web page (:mod:`triageseg.serve`) and the napari plugin (:mod:`triageseg.napari_plugin`)
show more of the routing decision than ``routing.csv`` keeps (every class probability,
also when the user forced a modality), in separate steps so a face can report progress
between them. Each step is a :class:`~triageseg.pipeline.local.single.Pipeline` call:
:meth:`~Pipeline.route` and :meth:`~Pipeline.choose` decide, :meth:`~Pipeline.probabilities`
runs the segmenter, the shared watershed decodes; nothing here re-implements them.

Example:
    >>> routing = route_image(pipe, image)                           # doctest: +SKIP
    >>> labels = segment_image(pipe, image, routing.used_model)        # doctest: +SKIP
    >>> table = measure_nuclei(labels, raw, pixel_size=0.65)           # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

import numpy as np

from triageseg.postprocess.watershed import watershed


@dataclass(frozen=True)
class Routing:
    """Which segmenter runs for an image, and why.

    Attributes:
        modality: the router's top-1 modality, or the forced one.
        confidence: the router's calibrated confidence in ``modality``; None when forced.
        probabilities: the router's probability for every class (empty when the bundle
            has no router and the modality was forced).
        used_model: the segmenter that runs (a modality name or ``_generalist``).
        decision: the reason in words ("routed to he (confidence 0.97)", "forced", a fallback).
        forced: whether the user chose the modality.
        ood_score: how unlike every trained modality the image is (None without OOD statistics);
            above the router's threshold the decision starts with "unknown modality".
        diameter, scale, size_source: the size decision (``Pipeline.image_size``): the median
            nucleus diameter (px), the resize factor before the network, and where it came from.
    """

    modality: str
    confidence: float | None
    probabilities: dict[str, float]
    used_model: str
    decision: str
    forced: bool
    ood_score: float | None = None
    diameter: float | None = None
    scale: float | None = None
    size_source: str = ""

    def to_dict(self) -> dict:
        """The decision as a JSON-ready dict."""
        return asdict(self)


def route_image(pipe, image: np.ndarray, *, modality: str | None = None, diameter: float | None = None,
                pixel_size=None) -> Routing:
    """Route one normalised HxWx3 image with ``pipe`` (a :class:`~triageseg.pipeline.local.single.Pipeline`).

    A forced ``modality`` picks that segmenter, as ``Pipeline.decide`` does; the router
    still runs when the bundle has one, so its view of the image is shown beside the
    user's choice.

    Args:
        pipe: the loaded pipeline.
        image: float32 HxWx3 in [0, 1] (:func:`triageseg.datasets.io.normalize_image`).
        modality: force this segmenter (a modality of the bundle or ``_generalist``).
        diameter: the median nucleus diameter in pixels, typed by the user (None: estimated).
        pixel_size: microns per pixel of the file (for the size, when the segmenter knows um).

    Raises:
        DataError: a forced modality the bundle has no segmenter for (listing those it has).
        BundleError: no forced modality and the bundle has no router.
    """
    if modality is not None:
        pipe.check_modality(modality)
        probs: dict[str, float] = {}
        note, score = "", None
        if pipe.manifest.get("has_router"):
            pred = pipe.route([image])[0]
            probs, score = dict(pred.probs), pred.ood_score
            note = f"; the router's top-1 was {pred.modality} ({pred.confidence:.2f})"
        routing = Routing(modality, None, probs, modality, "forced" + note, True, score)
    else:
        pred = pipe.route([image])[0]
        used, decision = pipe.choose(pred)
        routing = Routing(pred.modality, float(pred.confidence), dict(pred.probs), used, decision, False,
                          pred.ood_score)
    if not routing.used_model:
        return routing
    size = pipe.image_size(image, routing.used_model, pixel_size=pixel_size, given=diameter,
                           modality=routing.modality)
    return dataclasses.replace(routing, diameter=size.diameter, scale=size.scale, size_source=size.source)


def segment_image(pipe, image: np.ndarray, used_model: str, scale: float | None = None) -> np.ndarray:
    """HxW uint32 instance labels of segmenter ``used_model`` for one normalised HxWx3 image at ``scale``."""
    return watershed(pipe.probabilities(image, used_model, scale), pipe.params(used_model, scale))

