"""What the dock widget runs, without Qt: a layer's pixels in, routing and labels out, step by step.

:func:`analyse_steps` is a generator: it yields a :class:`Step` before each stage, so the
widget's thread worker can move a progress bar, and returns the :class:`Analysis` at the end.
The stages are the pipeline's own calls (:mod:`triageseg.pipeline.local.interactive`).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from triageseg.datasets.errors import DataError
from triageseg.datasets.io import normalize_image
from triageseg.pipeline.local.interactive import Routing, route_image
from triageseg.postprocess.watershed import watershed


@dataclass(frozen=True)
class Step:
    """Progress of a job: ``done`` of ``total`` stages finished, ``text`` says what runs next."""

    done: int
    total: int
    text: str


@dataclass(frozen=True)
class Analysis:
    """The outcome of a Route or Segment job on one image layer."""

    layer_name: str
    routing: Routing
    labels: np.ndarray | None  # None for a Route job
    bundle: str

    @property
    def count(self) -> int | None:
        """Number of nuclei (the watershed numbers them 1..n); None for a Route job."""
        return None if self.labels is None else int(self.labels.max(initial=0))

    def metadata(self) -> dict:
        """What the Labels layer records about how it was made."""
        r = self.routing
        return {
            "modality": r.modality,
            "confidence": r.confidence,
            "probabilities": dict(r.probabilities),
            "used_model": r.used_model,
            "decision": r.decision,
            "forced": r.forced,
            "ood_score": r.ood_score,
            "diameter": r.diameter,
            "scale": r.scale,
            "size_source": r.size_source,
            "bundle": self.bundle,
            "source_layer": self.layer_name,
            "count": self.count,
        }


@dataclass(frozen=True)
class Failure:
    """A job that stopped on bad input (unreadable pixels, unknown modality, a tile size the model refuses)."""

    layer_name: str
    message: str


def layer_pixels(data, *, rgb: bool, name: str, multiscale: bool = False) -> np.ndarray:
    """The 2-D pixels of an image layer: HxW gray or HxWx3/4 colour, any integer or float dtype.

    Args:
        data: the layer's data (for a multiscale layer, its levels; the full resolution is used).
        rgb: whether the layer's last axis is colour.
        name: the layer's name, for messages.
        multiscale: whether ``data`` holds pyramid levels.

    Raises:
        DataError: a stack (more than 2 spatial dimensions) or a channel count that is not colour.
    """
    array = np.asarray(data[0] if multiscale else data)
    spatial = array.ndim - (1 if rgb else 0)
    if spatial != 2 or (rgb and array.shape[-1] not in (3, 4)):
        raise DataError(name, f"the layer holds a {spatial}-D image of shape {array.shape}; "
                              "select a 2-D gray or RGB image layer (for a stack, one plane as its own layer)")
    return array


def load_pipeline(bundle: str | Path, tile_size: int | None, cache: dict):
    """The bundle's :class:`~triageseg.pipeline.local.single.Pipeline`, loaded once per folder and kept in ``cache``."""
    from triageseg.pipeline import Pipeline

    key = str(Path(bundle).resolve())
    pipe = cache.get(key)
    if pipe is None:
        pipe = Pipeline.from_bundle(key)
        cache.clear()  # one bundle in memory at a time
        cache[key] = pipe
    pipe.tile_size = tile_size  # None: each model's own
    return pipe


def analyse_steps(
    bundle: str | Path,
    pixels: np.ndarray,
    *,
    layer_name: str,
    segment: bool,
    modality: str | None = None,
    tile_size: int | None = None,
    cache: dict | None = None,
    diameter: float | None = None,
) -> Generator[Step, None, Analysis | Failure]:
    """Route (and with ``segment``, segment) one layer's pixels with the bundle at ``bundle``.

    Args:
        bundle: the model bundle folder.
        pixels: from :func:`layer_pixels`.
        layer_name: the image layer's name (for messages and the result).
        segment: also run the segmenter and the watershed (else only route).
        modality: force this segmenter instead of the router's choice.
        tile_size: segmenter tile side (None: each model's own).
        cache: keeps the loaded pipeline between jobs.
        diameter: the median nucleus diameter in pixels (None: estimated, ``router.size``).

    Yields:
        A :class:`Step` before each stage.

    Returns:
        The :class:`Analysis`, or a :class:`Failure` for bad input (a bug still raises).
    """
    total = 4 if segment else 2
    try:
        yield Step(0, total, "loading the models")
        pipe = load_pipeline(bundle, tile_size, {} if cache is None else cache)
        image = normalize_image(pixels, name=layer_name)
        yield Step(1, total, "routing")
        if diameter is not None:
            from triageseg.router.size import check_diameter

            diameter = check_diameter(diameter)
        routing = route_image(pipe, image, modality=modality, diameter=diameter)
        labels = None
        if segment:
            yield Step(2, total, f"segmenting with {routing.used_model}")
            probs = pipe.probabilities(image, routing.used_model, routing.scale)
            yield Step(3, total, "separating nuclei (watershed)")
            labels = watershed(probs, pipe.params(routing.used_model, routing.scale))
    except ValueError as err:  # DataError included: the user can fix these, so no traceback
        return Failure(layer_name, str(err))
    return Analysis(layer_name, routing, labels, str(pipe.path))
