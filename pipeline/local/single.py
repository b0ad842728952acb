"""One in-memory image through the routed pipeline: router -> specialist -> watershed -> labels.

Each step is callable on its own (arrays -> probabilities -> labels), so a user can swap
one: :meth:`Pipeline.route` triages, :meth:`Pipeline.probabilities` runs a segmenter,
:func:`triageseg.postprocess.watershed.watershed` decodes. Folders of files go through
:mod:`triageseg.pipeline.local.batch` (:meth:`Pipeline.segment_files`).

Example:
    >>> from triageseg import load_pipeline                 # doctest: +SKIP
    >>> pipe = load_pipeline("bundle/")                       # doctest: +SKIP
    >>> result = pipe.segment(image)                          # doctest: +SKIP
    >>> result.labels.max(), result.modality, result.used_model   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from triageseg import bundle as _bundle
from triageseg.datasets.errors import BundleError, DataError
from triageseg.pipeline.local.decision import (  # noqa: F401 - re-exported: the pipeline's public types
    PROB_DTYPES,
    Decision,
    OODOffWarning,
    Result,
    round_probabilities,
)
from triageseg.pipeline.local.sizes import SizeDecisions
from triageseg.postprocess.quality import QualityModel, load_quality, predict_quality
from triageseg.postprocess.watershed import WatershedParams, watershed
from triageseg.router.policy import UNKNOWN_POLICIES  # noqa: F401 - what `segment --unknown` accepts


class Pipeline(SizeDecisions):
    """A loaded bundle: the router, the specialists (loaded on first use) and their watershed parameters.

    ``backend`` (``auto|torch|onnx|openvino``) and ``precision`` (``auto|fp32|bf16``; ``auto``:
    bf16 where it was measured within 0.002 mean F1 of fp32 and the CPU has it natively) say how
    the specialists run (:mod:`triageseg.segmenters.backends`); one that cannot run here falls
    back to torch / fp32 with one :class:`~triageseg.segmenters.backends.BackendNote`.
    ``prob_dtype`` (:data:`PROB_DTYPES`) rounds the class probabilities before every decode,
    in memory and block-wise alike (float16: the block path's store in 2-3x less scratch;
    benchmarks/RESULTS.md states what the rounding changes).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        device: str = "auto",
        tile_size: int | None = None,
        overlap: int | None = None,
        batch_size: int | None = None,
        tta: bool = False,
        unknown: str = "generalist",
        backend: str = "auto",
        precision: str = "auto",
        diameter: float | None = None,
        use_pixel_size: bool = True,
        size_probe: bool = False,
        size_method: str = "mask",
        prob_dtype: str = "float32",
    ):
        from triageseg.devices import device_name
        from triageseg.router.size import METHODS, check_diameter
        from triageseg.segmenters.backends import resolve

        _check_sizes(tile_size=tile_size, overlap=overlap, batch_size=1 if batch_size is None else batch_size)
        self.diameter = None if diameter is None else check_diameter(diameter)  # --diameter: forces the size
        self.use_pixel_size = bool(use_pixel_size)
        self.size_probe = bool(size_probe)  # the segmenter checks the estimate on one crop (pipeline.local.sizing)
        if size_method not in METHODS:
            raise ValueError(f"size_method must be one of {', '.join(METHODS)}, got {size_method!r}")
        self.size_method = size_method  # router.size.estimate_diameter's method
        if unknown not in UNKNOWN_POLICIES:
            raise ValueError(f"unknown must be one of {', '.join(UNKNOWN_POLICIES)}, got {unknown!r}")
        self.unknown = unknown
        if prob_dtype not in PROB_DTYPES:
            raise ValueError(f"prob_dtype must be one of {', '.join(PROB_DTYPES)}, got {prob_dtype!r}")
        self.prob_dtype = prob_dtype
        self.path = Path(path)
        self.manifest = _bundle.read_manifest(self.path)
        # "cpu", "cuda:1", ...: without importing torch where that is the CPU (devices.device_name); the
        # torch.device (self.device) is made when an eager network or a GPU needs it
        self.device_name = device_name(device)
        self._device = None
        # the segmenters' inference backend (segmenters.backends), resolved once: a fallback is noted here
        self.backend, self.precision = backend, precision
        self.choice = resolve(backend, precision, self.device_name)
        self.tile_size = tile_size
        self.overlap = overlap
        # tiles per pass as asked; None: by the device and the tile size (default_batch_size), so that a Ray
        # actor on a GPU chooses for its own device
        self.batch_size = batch_size
        self.tta = tta
        self.available: list[str] = list(self.manifest.get("segmenters", []))
        if not self.available:
            raise BundleError(self.path / _bundle.MANIFEST, "the bundle holds no segmenter")
        for name in self.available:
            if not (_bundle.segmenter_dir(self.path, name) / _bundle.WEIGHTS).is_file():
                raise BundleError(_bundle.segmenter_dir(self.path, name) / _bundle.WEIGHTS, "missing weights file")
        fallback = self.manifest.get("fallback", {})
        self.confidence_threshold = float(fallback.get("confidence_threshold", 0.6))
        self.has_generalist = _bundle.GENERALIST in self.available
        self._router = None
        self._ood = None  # the router's OOD statistics, loaded with the router (None: no unknown-modality check)
        self._segmenters: dict[str, tuple] = {}
        self._quality: dict[str, QualityModel | None] = {}
        self._size_configs: dict[str, tuple] = {}
        self._size_signals: dict[str, str] = {}  # segmenter -> its SegmenterConfig.size_signal
        self._lock = threading.Lock()

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, **kwargs) -> Pipeline:
        """Open the bundle at ``path`` (see :class:`Pipeline` for the keyword options)."""
        return cls(path, **kwargs)

    @property
    def device(self):
        """The torch.device the networks run on (importing torch: served exports use :attr:`device_name`)."""
        if self._device is None:
            from triageseg.devices import resolve_device

            self._device = resolve_device(self.device_name)
        return self._device

    # ----------------------------------------------------------------- models
    @property
    def specialists(self) -> list[str]:
        """Modalities that have a specialist in this bundle."""
        return [m for m in self.available if m != _bundle.GENERALIST]

    def _load_router(self):
        if self._router is None:
            from triageseg.router.model import load_router

            if not self.manifest.get("has_router"):
                raise BundleError(_bundle.router_dir(self.path),
                                  "the bundle has no router; pass a modality to skip routing")
            from triageseg.pipeline.local.router_backend import load_served_router, prepare_router

            run_dir = _bundle.router_dir(self.path)
            # on the specialists' backend, fp32 always (pipeline.local.router_backend); from the export cache
            # without building the ViT when it holds these weights (segmenters.served)
            served = load_served_router(run_dir, choice=self.choice, device=self.device_name)
            if served is None:
                model, config = load_router(run_dir, device=self.device)
                served = (prepare_router(model, run_dir, choice=self.choice), config)
            self._ood = self._load_ood(*served)
            self._router = served
        return self._router

    def load_router(self) -> list[str]:
        """Load the router now (otherwise it loads on first use) and return notes for the user.

        The notes say what is off: a router without OOD statistics has no unknown-modality
        check (it is also warned once, :class:`OODOffWarning`). A bundle without a router gives no notes.
        """
        if not self.manifest.get("has_router"):
            return []
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always", OODOffWarning)
            self._load_router()
        return [str(w.message) for w in seen if issubclass(w.category, OODOffWarning)]

    def _load_ood(self, model, config):
        """The router's OOD statistics, with bundle.json's ``ood.threshold`` when set (it wins); None if absent.

        Statistics that do not fit ``model`` (other classes, other feature width) are a BundleError.
        """
        from triageseg.router.ood import check_fits_router, load_ood, router_feature_dim

        ood = load_ood(_bundle.router_dir(self.path))
        if ood is not None:
            check_fits_router(ood, _bundle.router_dir(self.path), class_names=config.class_names,
                              feature_dim=router_feature_dim(model, config.class_names))
        if ood is None:
            warnings.warn(f"{_bundle.router_dir(self.path)}: no OOD statistics (a router trained before them); "
                          "the unknown-modality check is off. Retrain the router to turn it on.", OODOffWarning,
                          stacklevel=3)
            return None
        threshold = (self.manifest.get("ood") or {}).get("threshold")
        return ood if threshold is None else dataclasses.replace(ood, threshold=float(threshold))

    @property
    def ood_threshold(self) -> float | None:
        """The calibrated OOD threshold (None: no OOD statistics, or the router not loaded yet)."""
        return None if self._ood is None else self._ood.threshold

    def segmenter(self, name: str):
        """The (model, config, watershed params) of segmenter ``name``, loaded once."""
        if name not in self.available:
            raise DataError(
                self.path, f"no segmenter {name!r} in this bundle; it has: {', '.join(self.available)}"
            )
        with self._lock:
            if name not in self._segmenters:
                from triageseg.segmenters.backends import prepare_network
                from triageseg.segmenters.model import load_segmenter, load_served_segmenter

                run_dir = _bundle.segmenter_dir(self.path, name)
                loaded = load_served_segmenter(run_dir, choice=self.choice, device=self.device_name)
                if loaded is None:
                    model, config, params = load_segmenter(run_dir, device=self.device)
                    loaded = (prepare_network(model, run_dir, choice=self.choice, device=self.device), config, params)
                self._segmenters[name] = loaded
        return self._segmenters[name]

    def quality_model(self, name: str) -> QualityModel | None:
        """The quality model of segmenter ``name`` (its ``quality.json``), loaded once; None when it has none.

        Raises:
            BundleError: a ``quality.json`` that is not valid (naming it).
        """
        if name not in self.available:
            raise DataError(self.path, f"no segmenter {name!r} in this bundle; it has: {', '.join(self.available)}")
        with self._lock:
            if name not in self._quality:
                self._quality[name] = load_quality(_bundle.segmenter_dir(self.path, name))
        return self._quality[name]

    @property
    def without_quality(self) -> list[str]:
        """Segmenters used so far that have no quality model (their images get no ``quality``)."""
        return sorted(name for name, model in self._quality.items() if model is None)

    def quality(self, probs: np.ndarray, labels: np.ndarray, used_model: str, *,
                confidence: float | None = None, ood_score: float | None = None) -> float | None:
        """Predicted mean F1 of ``labels`` decoded from ``probs`` by ``used_model`` (None without a quality model)."""
        return predict_quality(self.quality_model(used_model), probs, labels, router_confidence=confidence,
                               ood_score=ood_score)

    # ------------------------------------------------------------------ steps
    def route(self, images: Sequence[np.ndarray]):
        """Triage images: one router prediction (modality, confidence, probs) each."""
        from triageseg.router.model import classify

        model, config = self._load_router()
        return classify(model, config, list(images), device=self.device_name, ood=self._ood)

    def choose(self, prediction) -> tuple[str, str]:
        """Which segmenter runs for a router prediction, and why (:func:`triageseg.router.policy.decide`).

        An OOD score above the threshold is an ``unknown modality``, handled as ``self.unknown``
        says (the generalist, ``""`` = skipped, or :class:`~triageseg.router.policy.UnknownModality`).
        """
        from triageseg.router.policy import decide

        return decide(
            prediction, threshold=self.confidence_threshold, available=self.available,
            has_generalist=self.has_generalist, ood_threshold=self.ood_threshold, unknown=self.unknown,
        )

    def check_modality(self, modality: str) -> None:
        """Refuse a forced modality that has no segmenter in this bundle, listing those it has."""
        if modality not in self.available:
            raise DataError(
                self.path,
                f"unknown modality {modality!r}; this bundle has segmenters for: {', '.join(self.available)}",
            )

    def probabilities(self, image: np.ndarray, used_model: str, scale: float | None = None) -> np.ndarray:
        """3xHxW class probabilities of segmenter ``used_model`` for a normalised HxWx3 image.

        ``scale`` is the size decision's resize factor (``Decision.scale``); None runs the
        segmenter at its own fixed scale.
        """
        from triageseg.segmenters.predict import predict

        model, config, _ = self.segmenter(used_model)
        tile_size = self.tile_size or config.tile_size
        overlap = config.overlap if self.overlap is None else self.overlap
        if self.overlap is None and overlap >= tile_size // 2:
            overlap = tile_size // 4  # the model's overlap does not fit the smaller tile asked for
        probs = predict(
            model,
            image,
            tile_size=tile_size,
            overlap=overlap,
            batch_size=self.batch_for(tile_size),
            tta=self.tta,
            device=self.device_name,
            scale=config.scale if scale is None else scale,
        )
        return round_probabilities(probs, self.prob_dtype)

    def batch_for(self, tile_size: int) -> int:
        """Tiles per forward pass for tiles of ``tile_size``: ``batch_size``, else :func:`default_batch_size`."""
        return self.batch_size if self.batch_size is not None else default_batch_size(self.device_name, tile_size)

    def probability_stream(self, used_model: str, *, scale: float | None = None, name: str = "<array>"):
        """:meth:`probabilities` band by band, for the block path (``segmenters.predict.stream_probabilities``).

        Returns:
            ``stream(read_rows, shape, start=0)`` yielding ``(y0, y1, probs)``, bit for bit
            the rows :meth:`probabilities` gives for the whole image at the same ``scale``
            (the network runs at that scale; bands are resized on the way in and out).
        """
        import functools

        from triageseg.segmenters.predict import stream_probabilities_scaled

        model = self.segmenter(used_model)[0]
        tile_size, overlap, fixed = self.tiling(used_model)
        if self.overlap is None and overlap >= tile_size // 2:
            overlap = tile_size // 4  # as probabilities()
        stream = functools.partial(stream_probabilities_scaled, model, scale=fixed if scale is None else scale,
                                   tile_size=tile_size, overlap=overlap, batch_size=self.batch_for(tile_size),
                                   tta=self.tta, device=self.device_name)
        if self.prob_dtype == "float32":
            return stream
        dtype = self.prob_dtype

        def rounded(read_rows, shape, start=0):  # the rows probabilities() gives, rounded the same way
            rows = stream(read_rows, shape, start=start)
            try:
                for y0, y1, probs in rows:
                    yield y0, y1, round_probabilities(probs, dtype)
            finally:
                if hasattr(rows, "close"):
                    rows.close()

        return rounded

    def params(self, used_model: str, scale: float | None = None) -> WatershedParams:
        """Watershed parameters of segmenter ``used_model`` for probabilities made at ``scale``.

        The parameters were tuned on the network's grid (the segmenter's own scale); the
        probabilities come back to the native grid, so the area thresholds follow
        ``(own scale / scale)^2``. None: the segmenter's own scale (the tuned values).
        """
        params = self.segmenter(used_model)[2]
        fixed = self.size_config(used_model)[2]
        if scale is None or scale == fixed:
            return params
        area = (fixed / float(scale)) ** 2
        return dataclasses.replace(params, min_size=int(round(params.min_size * area)),
                                   min_marker_size=max(1, int(round(params.min_marker_size * area))))

    def segment(self, image: np.ndarray, *, modality: str | None = None, pixel_size=None) -> Result:
        """Segment one normalised float32 HxWx3 image (see :func:`triageseg.datasets.io.read_image`).

        Args:
            image: HxWx3 float32 in [0, 1].
            modality: force this specialist and skip the router.
            pixel_size: microns per pixel (the file's metadata), for the size decision.
        """
        d = self.decide(image, modality, pixel_size=pixel_size)
        size = (d.diameter, d.scale, d.size_source)
        if d.skipped:
            return Result(np.zeros(image.shape[:2], np.uint32), d.modality, d.confidence, d.used_model, d.decision,
                          d.ood_score, None, *size)
        probs = self.probabilities(image, d.used_model, d.scale)
        labels = watershed(probs, self.params(d.used_model, d.scale))
        quality = self.quality(probs, labels, d.used_model, confidence=d.confidence, ood_score=d.ood_score)
        return Result(labels, d.modality, d.confidence, d.used_model, d.decision, d.ood_score, quality, *size)

    def decide(self, image: np.ndarray, modality: str | None = None, *, pixel_size=None) -> Decision:
        """The :class:`Decision` for one image; ``modality`` forces a specialist (the OOD score is still recorded).

        The size (``diameter``, ``scale``, ``size_source``) is decided for the chosen segmenter
        (:meth:`size`): the given diameter, the pixel size, or the estimate from ``image``.
        """
        from triageseg.pipeline.local import early_size

        route, early = lambda: self.route([image])[0], None
        if early_size.worth_it(self, modality, pixel_size):  # the size measured while the router runs
            route, early = early_size.route_and_estimate(self, image)
        return self._decision(modality, route, lambda used, mod: self.image_size(
            image, used, pixel_size=pixel_size, modality=mod, early=early))

    def route_overview(self, overview: np.ndarray, shape: tuple[int, int], read_crop):
        """Triage an image too large to hold from a downsampled ``overview`` and crops read on demand.

        See :func:`triageseg.router.model.overview_views`; ``read_crop(top, left, height, width)``
        returns a normalised region of the full-size image of ``shape``.
        """
        from triageseg.router.model import classify_views, overview_views

        model, config = self._load_router()
        views = overview_views(overview, shape, read_crop, config)
        return classify_views(model, config, [views], device=self.device_name, ood=self._ood)[0]

    def decide_overview(
        self, overview: np.ndarray, shape: tuple[int, int], read_crop, modality: str | None = None, *,
        pixel_size=None,
    ) -> Decision:
        """:meth:`decide` for an image known by an overview and a crop reader (:meth:`route_overview`).

        The size is estimated once per image, from native-resolution crops or the overview
        (:func:`triageseg.router.size.estimate_overview`).
        """
        from triageseg.router.size import estimate_overview

        return self._decision(modality, lambda: self.route_overview(overview, shape, read_crop),
                              lambda used, mod: self.size(
                                  lambda: estimate_overview(overview, shape, read_crop, method=self.size_method,
                                                            signal=self.size_signal(used, mod)),
                                  used, pixel_size, probe=(shape, read_crop)))

    def _decision(self, modality: str | None, predict, size=None) -> Decision:
        measured_as = modality  # the modality whose signal the size is measured on (size_signals.signal_for)
        if modality is not None:
            # The user's choice: no unknown verdict, but the score is recorded when the router has one.
            self.check_modality(modality)
            # A forced generalist names no modality, yet it was calibrated on each training image's own signal
            # (the haematoxylin of H&E and IHC): the router says which signal this image is measured on.
            generalist = modality == _bundle.GENERALIST and size is not None and bool(self.manifest.get("has_router"))
            scores = self._scores_when_forced()
            pred = predict() if generalist or scores else None
            score = pred.ood_score if scores else None
            measured_as = pred.modality if generalist else modality
            d = Decision(modality, None, modality, "forced", score)
        else:
            pred = predict()
            used, decision = self.choose(pred)
            d = Decision(pred.modality, float(pred.confidence), used, decision, pred.ood_score)
            measured_as = d.modality
        if size is None or d.skipped:
            return d
        s = size(d.used_model, measured_as)
        return d._replace(diameter=s.diameter, scale=s.scale, size_source=s.source)

    def _scores_when_forced(self) -> bool:
        """Whether a forced image is routed anyway, for its OOD score: the bundle has a router with statistics."""
        from triageseg.router.ood import OOD_JSON

        if not self.manifest.get("has_router") or not (_bundle.router_dir(self.path) / OOD_JSON).is_file():
            return False
        self._load_router()
        return self._ood is not None

    def tiling(self, used_model: str) -> tuple[int, int, float]:
        """(tile size, overlap, scale) that :meth:`probabilities` uses for segmenter ``used_model``."""
        config = self.segmenter(used_model)[1]
        return (self.tile_size or config.tile_size, config.overlap if self.overlap is None else self.overlap,
                float(config.scale))

    # ----------------------------------------------------------------- files
    def segment_files(self, inputs, out_dir, **options):
        """Segment image files into ``out_dir`` (see :func:`triageseg.pipeline.local.batch.segment_files`)."""
        from triageseg.pipeline.local.batch import segment_files

        return segment_files(self, inputs, out_dir, **options)


# Tiles per forward pass when none is asked for. A GPU wants batches. On a CPU a batch of large tiles runs no
# faster per tile than one tile (ONNX Runtime, 2 cores: 0.28 s per 736 x 768 tile alone, 0.31 s in fours) and
# its activations stay in the process's memory (1.85 GiB in fours, 0.59 GiB alone), while small tiles gain
# (128 px: 1.6x, 256 px: 1.25x in fours): a CPU batch holds at most CPU_BATCH_PIXELS, up to GPU_BATCH_SIZE tiles.
GPU_BATCH_SIZE = 4
CPU_BATCH_PIXELS = 768 * 768


def default_batch_size(device, tile_size: int | None = None) -> int:
    """:data:`GPU_BATCH_SIZE` on a CUDA device; on a CPU as many tiles of ``tile_size`` as fill
    :data:`CPU_BATCH_PIXELS` (1 to :data:`GPU_BATCH_SIZE`; 1 for an unknown tile size)."""
    if getattr(device, "type", str(device)).startswith("cuda"):
        return GPU_BATCH_SIZE
    if not tile_size:
        return 1
    return max(1, min(GPU_BATCH_SIZE, CPU_BATCH_PIXELS // (int(tile_size) ** 2)))


def _check_sizes(*, tile_size: int | None, overlap: int | None, batch_size: int) -> None:
    """Refuse bad sizes up front, not as a failure of every image."""

    def is_int(value) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    if tile_size is not None and (not is_int(tile_size) or tile_size < 32 or tile_size % 32):
        raise ValueError(f"tile_size must be a positive multiple of 32 (or None for the model's), got {tile_size!r}")
    if overlap is not None and (not is_int(overlap) or overlap < 0):
        raise ValueError(f"overlap must be a non-negative integer (or None for the model's), got {overlap!r}")
    if tile_size is not None and overlap is not None and overlap >= tile_size // 2:
        raise ValueError(f"overlap must be less than half the tile size, got {overlap} for tile {tile_size}")
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def load_pipeline(path: str | os.PathLike, **kwargs) -> Pipeline:
    """Open a bundle as a :class:`Pipeline` (keyword options as for the class)."""
    return Pipeline.from_bundle(path, **kwargs)
