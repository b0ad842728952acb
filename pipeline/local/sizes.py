"""The size decision of :class:`~triageseg.pipeline.local.single.Pipeline` (size triage, ``router/size.py``).

Which nucleus diameter a segmenter was trained at, which signal its images are measured
on, and the decision for one image: the given diameter, the pixel size from the file, or
the estimate (checked by the segmenter on one crop with ``size_probe``). A mixin of the
pipeline: it reads the bundle's segmenter configs and the pipeline's size options.
"""

from __future__ import annotations

import numpy as np

from triageseg import bundle as _bundle


class SizeDecisions:
    """The pipeline's size methods. Needs ``path``, ``available``, ``diameter``, ``use_pixel_size``,
    ``size_probe``, ``size_method`` and the caches ``_size_configs`` / ``_size_signals``."""

    def size_config(self, name: str) -> tuple[float | None, float | None, float, float]:
        """(diameter, diameter_um, scale, size_calibration) of segmenter ``name``, from its config.json."""
        if name not in self._size_configs:
            from triageseg.segmenters.model import SegmenterConfig

            cfg = SegmenterConfig.from_json(_bundle.segmenter_dir(self.path, name) / _bundle.CONFIG)
            self._size_configs[name] = (cfg.diameter, cfg.diameter_um, float(cfg.scale), cfg.size_calibration)
        return self._size_configs[name]

    def size_signal(self, name: str, modality: str | None) -> str:
        """What an image of ``modality`` going to segmenter ``name`` is measured on (``router.size.signal_for``).

        The signal its ``size_calibration`` was measured with: a segmenter trained before the
        per-modality signal (``size_signal`` "auto") keeps ``auto`` for every image.
        """
        from triageseg.router.size import signal_for

        if name not in self._size_signals:
            from triageseg.segmenters.model import SegmenterConfig

            cfg = SegmenterConfig.from_json(_bundle.segmenter_dir(self.path, name) / _bundle.CONFIG)
            self._size_signals[name] = cfg.size_signal
        return signal_for(modality, self._size_signals[name])

    def size_notes(self) -> list[str]:
        """One line when the bundle's segmenters were trained before size triage (it is off for them)."""
        old = [name for name in self.available if self.size_config(name)[0] is None]
        if not old:
            return []
        return [f"{self.path}: size triage off for {', '.join(old)} (trained before it: no nucleus diameter in its "
                "config); images run at the segmenter's own scale. Retrain to turn it on."]

    def size(self, estimate, used_model: str, pixel_size=None, probe=None, given: float | None = None):
        """The :class:`~triageseg.router.size.SizeDecision` for an image going to ``used_model``.

        ``estimate`` is ``() -> SizeEstimate``, called only when the size is neither given
        (``diameter``) nor known from ``pixel_size`` (microns per pixel, a number or (y, x)).
        ``probe`` is ``(shape, read_crop)`` of the image: the segmenter checks the estimate on
        one crop (:func:`triageseg.pipeline.local.sizing.probe_diameter`) when ``size_probe`` is on.
        ``given`` overrides the pipeline's ``diameter`` for this image (the web page, napari).
        """
        import functools

        from triageseg.pipeline.local.sizing import probe_diameter
        from triageseg.router.size import decide_size

        d, d_um, fixed, calibration = self.size_config(used_model)
        if pixel_size is not None and not np.isscalar(pixel_size):
            pixel_size = float(np.mean([float(v) for v in pixel_size]))
        return decide_size(estimate, train_diameter=d, train_diameter_um=d_um, fixed_scale=fixed,
                           given=self.diameter if given is None else given, pixel_size=pixel_size,
                           use_pixel_size=self.use_pixel_size,
                           calibration=calibration,
                           refine=None if probe is None or not self.size_probe else functools.partial(
                               _probe, probe_diameter, self, used_model, probe))

    def image_size(self, image: np.ndarray, used_model: str, *, pixel_size=None, given: float | None = None,
                   modality: str | None = None, early: dict | None = None):
        """The size decision of an in-memory image of ``modality`` going to ``used_model`` (:meth:`size`).

        ``early``: estimates already taken, by signal (``pipeline.local.early_size``).
        """
        from triageseg.router.size import estimate_image

        def crop(top: int, left: int, height: int, width: int) -> np.ndarray:
            return image[top : top + height, left : left + width]

        signal = self.size_signal(used_model, modality)
        known = (early or {}).get(signal)
        return self.size((lambda: known) if known is not None else
                         (lambda: estimate_image(image, method=self.size_method, signal=signal)), used_model,
                         pixel_size, probe=(image.shape[:2], crop), given=given)


def _probe(probe_diameter, pipe, used_model: str, where, diameter: float) -> float:
    shape, read_crop = where
    return probe_diameter(pipe, used_model, diameter, shape, read_crop)
