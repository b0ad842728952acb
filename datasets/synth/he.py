"""H&E histology: hematoxylin nuclei in eosin tissue, coloured in optical-density space.

Colour comes from Beer-Lambert with stain vectors (Ruifrok & Johnston 2001, the vectors
``skimage.color.rgb2hed`` unmixes with), jittered per image (stain batch, scanner) and
per nucleus (the hematoxylin of each nucleus carries a little eosin). What real H&E
shows (measured on the TCIA H&E image stardist ships; never trained on) and is drawn:

- muted colours: pale pink stroma with thin darker fibres, lilac cytoplasm around nuclei;
- dense dark nuclei beside pale vesicular ones (a darker rim and a nucleolus);
- red blood cells (small eosin-dense disks, unlabelled), white lumina and fat;
- tissue folds (tissue lying twice: denser stain along a band);
- scanner blur and JPEG compression.

Cellular (tumour) fields: a share of images (``HE_RANGES["cellular_share"]``) are dense
fields of cells whose cytoplasm fills the space between the nuclei, as in the TCIA image:
measured with ``rgb2hed`` (nuclei by the realism check's classical segmentation, tissue =
non-white pixels over 3 px from a nucleus), its tissue between nuclei is lilac, not pink
(hematoxylin share of the tissue's H+E 0.65 against 0.41 in our earlier samples; median
H 0.025 against 0.018), and it is granular and mottled (std of H in the 1-px band 2.7x,
in the 1-4 px band 1.6x ours, relative to the nucleus contrast). So each nucleus gets a
cell territory (the nearest-nucleus region within a reach), filled with cytoplasm of
its own stain level, granular texture and thin eosin cell borders; all of it labelled
background. Pale vesicular nuclei differ from that cytoplasm by what real ones show: a
crisp, thin chromatin envelope and chromatin granules, not by their mean colour alone.

Stain amounts are in OD (base 10) per unit stain vector; :data:`HE_RANGES` documents them.
"""

from __future__ import annotations

import numpy as np

from triageseg.datasets.synth.textures import (
    _EOSIN,
    _EOSIN_SLIDE,
    _HEMATOXYLIN,
    _HEMATOXYLIN_SLIDE,
    _absorbance_to_rgb,
    _cell_bodies,
    _cells,
    _fold,
    _illumination,
    _jitter_stain,
    _jpeg,
    _profile,
    _smooth_noise,
    _spots,
    _to_uint8,
)

HE_RANGES = {
    "nucleus_hematoxylin": (0.15, 1.2),  # OD of hematoxylin at a nucleus's centre (pale vesicular .. dense)
    "stroma_eosin": (0.04, 0.25),  # mean OD of eosin in stroma
    "jpeg_quality": (60, 95),
    "cellular_share": 0.5,  # fraction of images that are dense cellular (tumour) fields
    "cell_reach": (0.8, 2.0),  # cytoplasm reaches this many nucleus radii past a nucleus (cellular fields)
    "cytoplasm_hematoxylin": (0.06, 0.2),  # mean OD of hematoxylin in cytoplasm (cellular fields), over the haze
    "cytoplasm_eosin": (0.06, 0.22),  # mean OD of eosin in cytoplasm (cellular fields)
    "cytoplasm_granularity": (0.25, 0.6),  # relative std of the cytoplasm's fine (~1 px) texture
    "cytoplasm_mottle": (0.2, 0.5),  # relative std of its coarser (~3 px) texture and of cell-to-cell levels
    "cell_border_eosin": (0.0, 0.12),  # OD of eosin on the cell borders (membranes)
    "envelope_width": (0.08, 0.15),  # chromatin envelope of vesicular nuclei, in nucleus radii
}


def _nuclei_od(rng: np.random.Generator, labels: np.ndarray, nrad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hematoxylin OD of the nuclei and the per-nucleus eosin mix (both HxW float32)."""
    n = int(labels.max())
    lo, hi = HE_RANGES["nucleus_hematoxylin"]
    dense = rng.uniform(0.45, 0.9) * rng.lognormal(0.0, 0.2, n + 1)
    vesicular = rng.random(n + 1) < rng.uniform(0.1, 0.7)
    dens = np.clip(np.where(vesicular, dense * rng.uniform(0.3, 0.55), dense), lo, hi).astype(np.float32)
    dens[0] = 0.0
    inside = labels > 0
    chromatin = 1.0 + rng.uniform(0.15, 0.4) * _smooth_noise(rng, labels.shape, rng.uniform(0.7, 1.3))
    # Vesicular nuclei: chromatin along a thin, crisp envelope, granules and a nucleolus (what tells
    # them from lilac cytoplasm of the same mean colour); dense ones nearly flat.
    width = rng.uniform(*HE_RANGES["envelope_width"])
    rim = np.exp(-(((1.0 - np.clip(nrad, 0.0, 1.0)) / width) ** 2))
    nucleoli = _spots(rng, inside & (nrad < 0.5), density=0.01, sigma=1.0)
    granules = _spots(rng, inside & (nrad < 0.85), density=rng.uniform(0.02, 0.06), sigma=0.6)
    ves = vesicular[labels]
    shape = np.where(
        ves, 0.5 + 1.1 * rim + 0.4 * granules + 1.2 * nucleoli, _profile(nrad, labels, rng.uniform(0.7, 0.95), 0.4)
    )
    hema = dens[labels] * shape * chromatin * inside
    mix = rng.uniform(0.0, 0.35, n + 1).astype(np.float32)  # each nucleus's hue: blue .. purple
    return np.clip(hema, 0.0, 1.6).astype(np.float32), mix[labels] * inside


def _stroma_eosin(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Eosin OD of the stroma: a smooth level with thin darker fibres along one direction."""
    from scipy import ndimage

    fibre_sigma = (rng.uniform(0.8, 1.5), rng.uniform(4.0, 10.0))
    if rng.random() < 0.5:
        fibre_sigma = fibre_sigma[::-1]
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), fibre_sigma)
    field /= max(float(field.std()), 1e-6)
    fibres = np.exp(-((field / 0.25) ** 2))  # thin lines where the oriented field crosses zero
    eosin = rng.uniform(*HE_RANGES["stroma_eosin"]) * (1.0 + 0.3 * _smooth_noise(rng, shape, 8.0))
    return eosin + rng.uniform(0.05, 0.25) * fibres


def _cytoplasm_od(rng: np.random.Generator, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cell mask, eosin, hematoxylin) of a cellular field: granular lilac cell bodies between the nuclei.

    Each nucleus owns the pixels nearest to it within a reach of a few nucleus radii; each cell
    takes up its own amount of stain (the cell-to-cell mottle), with a fine granular texture
    (hematoxylin more than eosin, as measured) and a thin eosin border where cells meet.
    """
    from scipy import ndimage

    shape = labels.shape
    areas = np.bincount(labels.ravel())[1:]
    radius = float(np.sqrt(np.median(areas) / np.pi)) if areas.size else 5.0
    cells, membrane = _cells(labels, rng.uniform(*HE_RANGES["cell_reach"]) * radius)
    body = ndimage.gaussian_filter((cells > 0).astype(np.float32), 1.0)
    mottle = rng.uniform(*HE_RANGES["cytoplasm_mottle"])
    grain = rng.uniform(*HE_RANGES["cytoplasm_granularity"])
    level = rng.lognormal(0.0, mottle, int(labels.max()) + 1).astype(np.float32)[cells]
    texture = 1.0 + grain * _smooth_noise(rng, shape, 0.8) + mottle * _smooth_noise(rng, shape, 3.0)
    texture = np.clip(level * texture, 0.0, None)
    hema = rng.uniform(*HE_RANGES["cytoplasm_hematoxylin"]) * texture * body
    eosin = rng.uniform(*HE_RANGES["cytoplasm_eosin"]) * np.sqrt(texture) * body
    eosin += rng.uniform(*HE_RANGES["cell_border_eosin"]) * np.clip(membrane, 0.0, 1.0)
    return body, eosin, hema


def _tissue_od(rng: np.random.Generator, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(eosin, hematoxylin) OD of stroma, fibres, cytoplasm and red blood cells, with empty spaces."""
    from scipy import ndimage

    shape = labels.shape
    eosin = _stroma_eosin(rng, shape)
    hema = np.full(shape, rng.uniform(0.02, 0.1), np.float32)  # counterstain haze: lilac, not magenta
    if rng.random() < HE_RANGES["cellular_share"]:  # a cellular field: cytoplasm in place of most stroma
        body, cyto_e, cyto_h = _cytoplasm_od(rng, labels)
        eosin = eosin * (1.0 - rng.uniform(0.5, 1.0) * body) + cyto_e
        hema += cyto_h
    else:  # nuclei in stroma, each with a thin rim of cytoplasm
        cyto = _cell_bodies(rng, labels, rng.uniform(3, 7))  # lilac: a little of both stains
        eosin += rng.uniform(0.0, 0.15) * cyto
        hema += rng.uniform(0.04, 0.16) * cyto
    far = ndimage.gaussian_filter((labels > 0).astype(np.float32), 3.0) < 0.05
    holes = (_smooth_noise(rng, shape, rng.uniform(8, 24)) > rng.uniform(1.0, 2.6)) & far  # lumina, fat
    eosin[holes] *= 0.05
    hema[holes] *= 0.05
    rbc = _spots(rng, far & ~holes, density=rng.uniform(0.0, 4e-4) * (rng.random() < 0.6), sigma=rng.uniform(1.4, 2.2))
    eosin += rng.uniform(0.5, 0.9) * np.clip(rbc, 0.0, 1.0)
    return ndimage.gaussian_filter(np.clip(eosin, 0.0, None), 0.7), hema


def _render_he(rng: np.random.Generator, labels: np.ndarray, nrad: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    size = labels.shape[0]
    t = rng.uniform(0.0, 1.0)  # this slide's stains: between the Ruifrok and the slide-estimated vectors
    h_vec = _jitter_stain(rng, (1 - t) * _HEMATOXYLIN + t * _HEMATOXYLIN_SLIDE, 0.05)
    e_vec = _jitter_stain(rng, (1 - t) * _EOSIN + t * _EOSIN_SLIDE, 0.05)
    nuc_h, mix = _nuclei_od(rng, labels, nrad)
    eosin, hema = _tissue_od(rng, labels)
    eosin = eosin + mix * nuc_h
    # A nucleus lies in its cell, so its chromatin adds to the cell's stain (the cytoplasm above and below
    # it in the section): a pale nucleus stays darker than the cytoplasm around it. Taking the larger of
    # the two (the first version) let granular cytoplasm replace the inside of pale nuclei in cellular
    # fields: 13.5 % of the nuclei (median per image, 24 samples) were no darker than 1.1x their 2-px ring
    # in rgb2hed's haematoxylin, labelled nuclei nobody could see (2.2 % before cellular fields, 0.0 % now).
    od = ((hema + nuc_h)[..., None] * h_vec + eosin[..., None] * e_vec).astype(np.float32)
    if rng.random() < 0.2:
        od *= 1.0 + rng.uniform(0.5, 1.0) * _fold(rng, labels.shape, rng.uniform(8, 30))[..., None]
    od *= rng.uniform(0.75, 1.25)  # staining strength varies between slides
    white = rng.uniform(0.88, 1.0) * _illumination(rng, size, rng.uniform(0.0, 0.12))
    rgb = _absorbance_to_rgb(od, white[..., None])
    rgb = ndimage.gaussian_filter(rgb, (rng.uniform(0.4, 1.2),) * 2 + (0,))  # scanner optics
    rgb += rng.normal(0.0, rng.uniform(0.003, 0.015), rgb.shape).astype(np.float32)
    if rng.random() < 0.7:
        rgb = _jpeg(rgb, int(rng.integers(HE_RANGES["jpeg_quality"][0], HE_RANGES["jpeg_quality"][1] + 1)))
    return _to_uint8(rgb)
