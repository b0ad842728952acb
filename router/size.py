"""Size triage: the median nucleus diameter of an image, in pixels, before any segmenter runs.

A specialist is trained at one nucleus size (its ``SegmenterConfig.diameter``); an image
whose nuclei are 4x larger is resized by 1/4 before the network (:func:`size_scale`), and
its probabilities back to the native grid before the watershed. This module finds the
size; :mod:`triageseg.pipeline.local.single` applies it.

How (``method="mask"``, the default; ``benchmarks/bench_scale.py`` measures it against the
alternatives): the nucleus signal (the grey image, inverted when nuclei are dark on a bright
background) minus its uneven background is thresholded (Otsu); each connected object gets a
diameter (a lone nucleus its equivalent-circle diameter, a clump of touching nuclei the
median of its distance-transform peaks), and the median over the objects, specks under half
the typical size left out, is the diameter. Images whose nuclei are large are measured again
on a copy downsampled so that the nuclei are 16 to 32 px (chromatin texture breaks their
masks at full resolution). The haematoxylin signal (H&E, IHC) goes further (:func:`_descend`):
down the pyramid until its nuclei measure under :data:`DESCENT_SIZE` px, with a hysteresis
threshold (the pale bodies of vesicular nuclei join their granules). Otsu's threshold is
taken on the signal clipped at its 98th percentile when that stands clear of the background
noise (a few saturated nuclei would lift it above the dim majority), and the other polarity is
tried when the threshold selected the background. Each object is one vote: an area-weighted median
(``method="mask-area"``, the first version) lets one large clump or the few largest nuclei
of a sparse image decide (measured: brightfield 0.44 octave low at the median, fluorescence
images of 7 nuclei 0.5 octave high). ``method="log"`` is a scale-space alternative: the
scale-normalised Laplacian of Gaussian ``-sigma^2 LoG`` at sigmas a quarter octave apart (a
disk of diameter ``d`` answers most strongly at ``sigma = d / (2 sqrt 2)``), the median
sigma of the strongest blobs; it is far worse on textured images. The segmenter's
``size_calibration`` (label diameter / estimate on its training images) corrects what a
modality's shapes do to the estimate (:func:`decide_size`).

The diameter is the equivalent-circle diameter ``2 sqrt(area / pi)`` of a nucleus, median
over the nuclei (:func:`median_diameter`), as Cellpose's ``diameter``.

Example:
    >>> est = estimate_diameter(image)            # doctest: +SKIP
    >>> est.diameter, est.blobs                   # doctest: +SKIP
    (23.8, 141)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# The signals live in size_signals (the image measured); imported here, where callers have always found them.
from triageseg.router.size_signals import (  # noqa: F401
    MODALITY_SIGNALS,
    SIGNALS,
    SIZE_SIGNAL_MODE,
    SIZE_SIGNAL_MODES,
    haematoxylin_signal,
    nucleus_signal,
    signal_for,
)

# Diameters the estimator can report (pixels); images outside get the fallback.
MIN_DIAMETER, MAX_DIAMETER = 3.0, 400.0
# Multiplier from 2 sqrt(2) sigma of the strongest blobs to the label diameter (measured, see module docstring).
CALIBRATION = 1.0
# Fewer blobs than this: too little to estimate from (an empty image), the caller falls back.
MIN_BLOBS = 1
CLUMP_PEAKS = True
# Estimators (estimate_diameter's method): the default first.
METHODS = ("mask", "mask-area", "log")
# Objects narrower than this fraction of the area-weighted median are specks, not nuclei (method "mask").
SPECK_FRACTION = 0.5
# Otsu's threshold (method "mask") is taken on the signal clipped at this percentile.
CLIP_PERCENTILE = 98.0
NOISE_CLEARANCE = 2.0
# In-memory images above this many pixels are measured from crops (estimate_image), with an overview of
# at most OVERVIEW_SIDE pixels a side when their nuclei are too large for a crop.
LARGE_IMAGE_PIXELS = 1_500_000
OVERVIEW_SIDE = 1024
# The haematoxylin signal (H&E, IHC) is measured down a pyramid (_descend): on 2x-downsampled copies
# until its nuclei measure under DESCENT_SIZE pixels, the diameter read where the estimate crosses it. Its
# threshold has hysteresis: pixels above background + HYSTERESIS x (Otsu - background) that touch an object
# above Otsu's threshold belong to it. Measured on the synthetic zoom series (benchmarks/RESULTS.md).
DESCENT_SIZE = 8.0
HYSTERESIS = 0.5
# A crop (estimate_overview) must hold this many nuclei across for its estimate to stand alone. In fewer,
# the crop's border cuts a large share of them (measured: crops of 512 px put nuclei of 93-126 px at 50-85 px,
# up to 0.9 octave short, on the zoom series at zoom 6), and with the descent the background (a Gaussian
# of an eighth of the crop) is no wider than a nucleus and takes the nuclei with it. Above it the overview
# decides, where it resolves the nuclei.
CROP_NUCLEI = 12
# Size sources recorded in routing.csv.
SIZE_SOURCES = ("estimated", "given", "metadata", "fallback", "off")
@dataclass(frozen=True)
class SizeEstimate:
    """An image's estimated nucleus size.

    Attributes:
        diameter: median nucleus diameter in pixels; None when the image is (nearly) empty.
        blobs: how many blobs the estimate rests on.
    """

    diameter: float | None
    blobs: int


def median_diameter(labels: np.ndarray) -> float | None:
    """Median equivalent-circle diameter ``2 sqrt(area / pi)`` of the objects of a label image (None: no object)."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    area = np.bincount(labels.ravel().astype(np.int64))[1:]
    area = area[area > 0]
    if area.size == 0:
        return None
    return float(2.0 * np.sqrt(np.median(area) / np.pi))


def _background(signal: np.ndarray) -> np.ndarray:
    """Uneven illumination: a Gaussian of an eighth of the image side, computed on an 8x smaller copy."""
    from scipy import ndimage as ndi

    small = signal
    for _ in range(3):
        if min(small.shape) >= 32:
            small = _downsample2(small)
    f = signal.shape[0] / small.shape[0]
    blur = ndi.gaussian_filter(small, max(signal.shape) / 8 / f, mode="reflect")
    return _enlarge(blur, signal.shape)


def _enlarge(small: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``small`` (float32) enlarged to ``shape`` by linear interpolation between pixel centres, edges held.

    ``ndimage.zoom(order=1, mode="nearest", grid_mode=True)`` within one float32 unit in the
    last place (it interpolates in float64), through OpenCV: 0.3 ms instead of 4 ms at 512 px.
    """
    import cv2

    if small.dtype != np.float32 or small.ndim != 2 or min(small.shape) < 2:
        from scipy import ndimage as ndi

        return ndi.zoom(small, (shape[0] / small.shape[0], shape[1] / small.shape[1]), order=1,
                        mode="nearest", grid_mode=True)
    return cv2.resize(small, (int(shape[1]), int(shape[0])), interpolation=cv2.INTER_LINEAR)


def _fill_holes(fg: np.ndarray) -> np.ndarray:
    """``ndimage.binary_fill_holes`` (same connectivity, same result) by labelling the background once.

    The background components that touch the border stay background, every other one is a hole:
    one labelling pass instead of a dilation to convergence (8x faster on a 512 px mask).
    """
    from scipy import ndimage as ndi

    lab, n = ndi.label(~fg)
    outside = np.zeros(n + 1, bool)
    for edge in (lab[0], lab[-1], lab[:, 0], lab[:, -1]):
        outside[edge] = True
    outside[0] = False  # label 0: the foreground itself
    return ~outside[lab]


def _distance(fg: np.ndarray) -> np.ndarray:
    """``ndimage.distance_transform_edt(fg)`` bit for bit, 4x faster: OpenCV's exact transform (float32)
    gives each pixel the square root of an integer squared distance, which is recovered and rooted in float64."""
    import cv2

    if fg.all():  # no background: OpenCV has no distance to give (SciPy measures to the image's far side)
        from scipy import ndimage as ndi

        return ndi.distance_transform_edt(fg)
    d = cv2.distanceTransform(fg.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE).astype(np.float64)
    return np.sqrt(np.rint(d * d))


def _max3(a: np.ndarray) -> np.ndarray:
    """``ndimage.maximum_filter(a, size=3)`` (its ``reflect`` border repeats edge pixels, as a border that
    never wins does): OpenCV's 3 x 3 dilation."""
    import cv2

    return cv2.dilate(a, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_REPLICATE)


def _smooth(signal: np.ndarray, sigma: float) -> np.ndarray:
    """``ndimage.gaussian_filter(signal, sigma)`` (its ``reflect`` border, kernel radius ``4 sigma``) within
    2e-7 for a float32 image in [0, 1], through OpenCV: 0.3 ms instead of 2.6 ms at 512 px."""
    import cv2

    if signal.dtype != np.float32 or signal.ndim != 2:
        from scipy import ndimage as ndi

        return ndi.gaussian_filter(signal, sigma)
    k = 2 * int(4.0 * sigma + 0.5) + 1
    return cv2.GaussianBlur(signal, (k, k), sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def _downsample2(img: np.ndarray) -> np.ndarray:
    h, w = (img.shape[0] // 2) * 2, (img.shape[1] // 2) * 2
    v = img[:h, :w]
    return 0.25 * (v[0::2, 0::2] + v[1::2, 0::2] + v[0::2, 1::2] + v[1::2, 1::2])


def estimate_diameter(image: np.ndarray, *, method: str = "mask", signal: str = "auto") -> SizeEstimate:
    """Median nucleus diameter (pixels) of a normalised image (see the module docstring).

    Args:
        image: HxWxC (or HxW) float image in [0, 1] (``datasets.io.read_image``).
        method: one of :data:`METHODS`: ``mask`` (the nuclei's masks, one vote per object; the
            default), ``mask-area`` (the same, area-weighted: the first version) or ``log``
            (scale-space blobs).
        signal: one of :data:`SIGNALS`: what the nuclei are measured on (:func:`signal_for`
            gives a modality's). ``haematoxylin`` falls back to ``auto`` on a grey image.

    Returns:
        A :class:`SizeEstimate`; its diameter is None when fewer than :data:`MIN_BLOBS`
        objects stand out (an empty or flat image).

    Raises:
        ValueError: an image that is not 2-D or 3-D.
    """
    img = np.asarray(image)
    if img.ndim not in (2, 3) or img.shape[0] < 8 or img.shape[1] < 8:
        raise ValueError(f"image must be HxW or HxWxC with sides >= 8, got shape {img.shape}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if signal not in SIGNALS:
        raise ValueError(f"unknown signal {signal!r}; valid: {', '.join(SIGNALS)}")
    which = signal
    signal, dark = nucleus_signal(img)
    lo, hi = np.percentile(signal, [0.5, 99.5])  # one partition for both
    if float(hi - lo) < 0.05:  # empty: whatever the stain
        return SizeEstimate(None, 0)
    hema = haematoxylin_signal(img) if which.startswith("haematoxylin") else None
    signal = signal if hema is None else hema
    if method == "log":
        from triageseg.router.size_log import estimate_log  # the scale-space alternative

        return estimate_log(signal)
    per_object = method == "mask"
    # The pyramid descent (with hysteresis) for the counterstain only: measured, it helps H&E and IHC and
    # costs fluorescence and brightfield accuracy (benchmarks/RESULTS.md), so "auto" is measured as before.
    descent = hema is not None and per_object and which == "haematoxylin"
    hysteresis = HYSTERESIS if descent else 0.0
    first = _estimate_mask(signal, 1.0, per_object=per_object, hysteresis=hysteresis)
    if first is _BACKGROUND and per_object:
        # The threshold found the background: the polarity was wrong (strong uneven illumination puts the
        # median of a brightfield image below its mid-range), so the other one.
        signal = 1.0 - signal
        first = _estimate_mask(signal, 1.0, per_object=per_object, hysteresis=hysteresis)
    if descent:
        return _descend(signal, first)
    if first.diameter is None or first.diameter < 32:
        return first
    # Texture inside large nuclei (chromatin) breaks their masks: again, on a copy downsampled so
    # that the nuclei are 16 to 32 pixels across (faster, and smoothed at their own scale).
    small, factor = signal, 1
    while first.diameter / (factor * 2) >= 16 and min(small.shape) >= 64:
        small, factor = _downsample2(small), factor * 2
    second = _estimate_mask(small, 1.0, per_object=per_object)
    if second.diameter is None:
        return first
    return SizeEstimate(float(np.clip(second.diameter * factor, MIN_DIAMETER, MAX_DIAMETER)), second.blobs)


def _descend(signal: np.ndarray, first: SizeEstimate) -> SizeEstimate:
    """The diameter read where the nuclei measure :data:`DESCENT_SIZE` px, down a pyramid of ``signal``.

    Large textured nuclei (vesicular chromatin, granules, an envelope) break into pieces at
    native resolution, and more so the larger they are: the raw estimate fell 0.5 to 1.6
    octaves short at zoom 6 and 0.1 at zoom 1, which no one calibration corrects. Each 2x
    downsampling smooths the texture at the nuclei's own scale; the estimate, in the level's
    pixels, falls with the level, and the (fractional) level where it crosses DESCENT_SIZE
    (log-linear between the two levels around it) gives the diameter. So every image is read
    with its nuclei at the same size, whatever its zoom, and the segmenter's calibration
    (measured at its training size) holds at every zoom. An image whose nuclei measure under
    DESCENT_SIZE at native resolution keeps its first estimate (no upsampling).
    """
    size, level, small, blobs = first.diameter, 0, signal, first.blobs
    if size is None:
        return first
    if size < DESCENT_SIZE:
        # Small nuclei, or the pieces of large ones (granules): one level down, small nuclei measure under
        # DESCENT_SIZE again, and pieces merge into their nucleus, from where the descent goes on.
        if min(small.shape) < 64:
            return first
        small = _downsample2(small)
        est = _estimate_mask(small, 1.0, hysteresis=HYSTERESIS)
        if est.diameter is None or est.diameter < DESCENT_SIZE:
            return first
        size, level, blobs = est.diameter, 1, est.blobs
    while min(small.shape) >= 64:
        small = _downsample2(small)
        est = _estimate_mask(small, 1.0, hysteresis=HYSTERESIS)
        if est.diameter is None:
            break
        if est.diameter < DESCENT_SIZE:
            frac = math.log2(size / DESCENT_SIZE) / max(math.log2(size / est.diameter), 1e-6)
            return SizeEstimate(float(np.clip(DESCENT_SIZE * 2.0 ** (level + frac), MIN_DIAMETER, MAX_DIAMETER)),
                                blobs)
        size, level, blobs = est.diameter, level + 1, est.blobs
    return SizeEstimate(float(np.clip(size * 2.0**level, MIN_DIAMETER, MAX_DIAMETER)), blobs)


# What _estimate_mask answers when its threshold selected the background (most of the image), not nuclei.
_BACKGROUND = SizeEstimate(None, 0)


def _estimate_mask(signal: np.ndarray, sigma: float, *, per_object: bool = True,
                   hysteresis: float = 0.0) -> SizeEstimate:
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    smooth = _smooth(signal, sigma) - _background(signal)
    sample = smooth[:: max(1, smooth.shape[0] // 512), :: max(1, smooth.shape[1] // 512)]
    thr = threshold_otsu(sample)
    if per_object:
        # A few very bright nuclei (mitoses) pull Otsu's threshold above the dim majority: the top
        # percentiles are clipped first. In a sparse image (nuclei under 2 % of the pixels) the clip
        # cuts into the background and that threshold lands in the noise: it is kept only when it
        # stands clear of the background (more than NOISE_CLEARANCE robust sigmas above the median;
        # measured on the zoom series: 1 and 2 alike, 3 rejects too many good thresholds).
        clipped = threshold_otsu(np.minimum(sample, np.percentile(sample, CLIP_PERCENTILE)))
        med = float(np.median(sample))
        noise = 1.4826 * float(np.median(np.abs(sample - med)))
        if clipped - med > NOISE_CLEARANCE * noise:
            thr = clipped
    fg = smooth > thr
    if fg.mean() > 0.7:  # the threshold found the background, not nuclei
        return _BACKGROUND
    if hysteresis > 0:
        # The pale body of a vesicular nucleus is under Otsu's threshold, its granules and envelope above:
        # the lower threshold joins the pieces into the nucleus they belong to.
        base = float(np.median(sample))
        low, n_low = ndi.label(smooth > base + hysteresis * (thr - base))
        touched = np.zeros(n_low + 1, bool)
        touched[low[fg]] = True
        touched[0] = False
        fg = touched[low]
    fg = _fill_holes(fg)
    lab, n = ndi.label(fg)
    if n < 1:
        return SizeEstimate(None, 0)
    dist = _distance(fg)
    radius = np.zeros(n, np.float64)
    for i, sl in enumerate(ndi.find_objects(lab)):  # per object box: no sort of the whole image
        if sl is not None:
            radius[i] = float(dist[sl][lab[sl] == i + 1].max())
    area = np.bincount(lab.ravel(), minlength=n + 1)[1:].astype(np.float64)
    ok = radius >= 1.5
    if int(ok.sum()) < MIN_BLOBS:
        return SizeEstimate(None, int(ok.sum()))
    radius, area = np.asarray(radius)[ok], area[ok]
    # A component no larger than an ellipse of aspect 2 around its inscribed disk is one nucleus: its
    # equivalent-circle diameter; a larger one is a clump of touching nuclei: its inscribed diameter.
    single = area <= 2.0 * np.pi * radius**2
    diam = np.where(single, 2.0 * np.sqrt(area / np.pi), 2.0 * radius * CALIBRATION)
    if CLUMP_PEAKS and not single.all():
        # A clump: the distance transform peaks at each nucleus it holds (where the necks are narrow);
        # the clump's diameter is the median of its peaks'.
        peaks = (dist == _max3(dist)) & (dist >= 1.5)
        plab, pval = lab[peaks], dist[peaks]
        order = np.lexsort((pval, plab))
        plab, pval = plab[order], pval[order]
        starts = np.searchsorted(plab, np.arange(1, n + 2))
        keep_ids = np.nonzero(ok)[0] + 1
        # Each clump's peaks are a sorted run of pval: its median is the middle one (or two), for all at once.
        clumps = np.nonzero(~single)[0]
        a, b = starts[keep_ids[clumps] - 1], starts[keep_ids[clumps]]
        has = b > a
        clumps, a, cnt = clumps[has], a[has], (b - a)[has]
        diam[clumps] = 2.0 * ((pval[a + (cnt - 1) // 2] + pval[a + cnt // 2]) / 2) * CALIBRATION
    # Area-weighted median: specks of noise weigh little, clumps of nuclei count per pixel.
    order = np.argsort(diam)
    cum = np.cumsum(area[order])
    diameter = float(diam[order][np.searchsorted(cum, 0.5 * cum[-1])])
    if per_object:
        # One vote per object, the specks (narrower than a fraction of the area-weighted median) left out:
        # the labels' median counts nuclei, not pixels, and one clump must not outvote the lone nuclei.
        diameter = float(np.median(diam[diam >= SPECK_FRACTION * diameter]))
    return SizeEstimate(float(np.clip(diameter, MIN_DIAMETER, MAX_DIAMETER)), int(ok.sum()))


# Diameters a user may give (pixels): a nucleus narrower than 2 px or wider than 2000 px is a typo.
GIVEN_RANGE = (2.0, 2000.0)


def check_diameter(value) -> float:
    """A given nucleus diameter (``--diameter``) as a float, refused when not a finite number in :data:`GIVEN_RANGE`."""
    try:
        d = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"diameter must be a number of pixels, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(d) or not GIVEN_RANGE[0] <= d <= GIVEN_RANGE[1]:
        raise ValueError(f"diameter must be a number of pixels in [{GIVEN_RANGE[0]:g}, {GIVEN_RANGE[1]:g}], "
                         f"got {value!r}")
    return d


@dataclass(frozen=True)
class SizeDecision:
    """How big an image's nuclei are and how it is resized for its segmenter (recorded in routing.csv).

    Attributes:
        diameter: median nucleus diameter on the native grid (px); None when unknown (fallback, off).
        scale: the resize factor before the network (the probabilities come back to the native grid).
        source: ``estimated``, ``given`` (``--diameter``), ``metadata`` (pixel size x the
            segmenter's diameter in um), ``fallback`` (no nuclei to estimate from: scale 1)
            or ``off`` (a segmenter trained before size triage: its fixed scale).
    """

    diameter: float | None
    scale: float
    source: str


def decide_size(
    estimate,
    *,
    train_diameter: float | None,
    train_diameter_um: float | None = None,
    fixed_scale: float = 1.0,
    given: float | None = None,
    pixel_size: float | None = None,
    use_pixel_size: bool = True,
    calibration: float = 1.0,
    refine=None,
) -> SizeDecision:
    """The :class:`SizeDecision` for one image: given sizes win, then the pixel size, then the estimate.

    Args:
        estimate: ``() -> SizeEstimate`` (called only when the size is not given).
        train_diameter: the segmenter's ``SegmenterConfig.diameter``; None = size triage off.
        train_diameter_um: its ``diameter_um``.
        fixed_scale: the segmenter's own ``scale`` (used when size triage is off).
        given: the user's diameter (px).
        pixel_size: microns per pixel from the file's metadata.
        use_pixel_size: whether ``pixel_size`` decides when the segmenter knows its diameter in um.
        calibration: the segmenter's ``size_calibration`` (label diameter / estimate on its training images).
        refine: ``diameter -> diameter``, the estimate checked by the segmenter (``pipeline.local.sizing``).
    """
    from triageseg.segmenters.scale import MAX_SCALE, MIN_SCALE

    if train_diameter is None:
        return SizeDecision(None, float(fixed_scale), "off")
    if given is not None:
        d, source = check_diameter(given), "given"
    elif use_pixel_size and pixel_size and train_diameter_um and pixel_size > 0:
        d, source = float(train_diameter_um) / float(pixel_size), "metadata"
    else:
        d, source = estimate().diameter, "estimated"
        if d is None:
            return SizeDecision(None, 1.0, "fallback")
        d *= calibration
        if refine is not None:
            d = refine(d)
    scale = float(np.clip(train_diameter / d, MIN_SCALE, MAX_SCALE))
    return SizeDecision(round(d, 2), round(scale, 4), source)


def estimate_image(image: np.ndarray, *, method: str = "mask", signal: str = "auto") -> SizeEstimate:
    """The estimate of an in-memory image: whole up to :data:`LARGE_IMAGE_PIXELS`, from crops above.

    A large image is measured as the block path measures one too large to hold
    (:func:`estimate_overview`: four native-resolution crops of 512 px, the overview only when
    its nuclei are too large for a crop): a 2048 x 2048 image costs four crops' work instead of
    sixteen (measured, loaded machine: 2.6-4.8 s whole, 0.35-0.42 s from crops, the same
    diameter within 0.2 %).
    """
    img = np.asarray(image)
    if img.ndim < 2 or img.shape[0] * img.shape[1] <= LARGE_IMAGE_PIXELS:
        return estimate_diameter(img, method=method, signal=signal)
    h, w = img.shape[:2]

    def overview() -> np.ndarray:
        from skimage.measure import block_reduce

        f = int(math.ceil(max(h, w) / OVERVIEW_SIDE))
        return block_reduce(img, (f, f) + (1,) * (img.ndim - 2), np.mean)

    return estimate_overview(overview, (h, w), lambda top, left, ch, cw: img[top : top + ch, left : left + cw],
                             method=method, signal=signal)


def estimate_overview(overview, shape: tuple[int, int], read_crop, *, crop: int = 512,
                      method: str = "mask", signal: str = "auto") -> SizeEstimate:
    """The estimate of an image too large to hold: from native-resolution crops, else from the overview.

    Four crops of ``crop`` pixels (centred on the quarter points) are estimated at native
    resolution; their median wins when a crop holds :data:`CROP_NUCLEI` nuclei across.
    Otherwise (large nuclei, or empty crops) the overview's estimate, times its downsampling
    factor, is used where the overview resolves the nuclei (``overview`` may be a function
    that makes it: called only then). ``method`` and ``signal`` are :func:`estimate_diameter`'s.
    """
    h, w = int(shape[0]), int(shape[1])
    c = min(crop, h, w)
    found = []
    for fy in (0.25, 0.75):
        for fx in (0.25, 0.75):
            top, left = int(min(max(0, fy * h - c / 2), h - c)), int(min(max(0, fx * w - c / 2), w - c))
            est = estimate_diameter(read_crop(top, left, c, c), method=method, signal=signal)
            if est.diameter is not None:
                found.append(est)
    if found:
        d = float(np.median([e.diameter for e in found]))
        if d <= c / CROP_NUCLEI:
            return SizeEstimate(d, sum(e.blobs for e in found))
    if callable(overview):
        overview = overview()
    factor = h / overview.shape[0]
    if found and d <= c / 6 and d / factor < 2 * DESCENT_SIZE:
        # Too few nuclei in a crop, but too small in the overview (a whole slide): the crops after all.
        return SizeEstimate(d, sum(e.blobs for e in found))
    if min(overview.shape[:2]) < 8:
        return SizeEstimate(None, 0)
    ov = estimate_diameter(overview, method=method, signal=signal)
    return SizeEstimate(None if ov.diameter is None else ov.diameter * factor, ov.blobs)
