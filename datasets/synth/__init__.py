"""Synthetic nuclei images in three imaging modalities, with exact instance labels.

Each sample is drawn in two steps:

1. **Layout** (``_place_nuclei``): ellipses with perturbed boundaries (a few random
   Fourier harmonics on the radius) are dropped at random or around cluster centres.
   Candidates may overlap their neighbours a little; a contested pixel goes to the
   nucleus whose centre is relatively closer (smaller normalised radius), which gives
   touching nuclei with a natural shared boundary and never an overlap. Each nucleus
   keeps its largest 4-connected piece, and is dropped when that is too small.
2. **Rendering** (``_render_*``): physics-flavoured and vectorised per image.
   Fluorescence is emitted light (dark background, heterogeneous intensities,
   chromatin texture, uneven illumination, blur, Poisson and Gaussian noise).
   Brightfield and H&E are absorbed light (Beer-Lambert with stain vectors,
   Ruifrok & Johnston 2001 for hematoxylin/eosin, the model behind
   ``skimage.color.hed2rgb``): dark nuclei on a light background, or purple
   nuclei in pink eosin tissue with fibres and empty spaces.

Every random draw comes from the ``numpy.random.Generator`` passed in, so a seed
gives the same dataset bit for bit.

Example:
    >>> rng = np.random.default_rng(0)
    >>> image, labels = synth_sample("he", size=128, rng=rng)
    >>> image.shape, image.dtype, labels.dtype
    ((128, 128, 3), dtype('uint8'), dtype('uint32'))
"""

# Re-exports: the names callers imported from the single module this package replaced.
# ruff: noqa: F401
from triageseg.datasets.synth.dataset import _allocate, _parse_weights, _split_counts, describe_styles, make_dataset
from triageseg.datasets.synth.layout import _keep_connected, _place_nuclei
from triageseg.datasets.synth.sample import _RENDERERS, _check_size, synth_sample
from triageseg.datasets.synth.styles import (
    DEFAULT_WEIGHTS,
    MAX_SIZE,
    MIN_SIZE,
    MODALITIES,
    SPLITS,
    STYLES,
    NucleusStyle,
    _check_modality,
)
from triageseg.datasets.synth.textures import (
    _DAB,
    _EOSIN,
    _HEMATOXYLIN,
    _absorbance_to_rgb,
    _cell_bodies,
    _illumination,
    _jitter_stain,
    _profile,
    _smooth_noise,
    _to_uint8,
)

__all__ = ["MODALITIES", "STYLES", "NucleusStyle", "describe_styles", "make_dataset", "synth_sample"]
