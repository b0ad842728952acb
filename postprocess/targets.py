"""Instance labels -> 3-class training targets (background / interior / boundary).

The segmenters learn three classes per pixel; the watershed (``postprocess.watershed``)
turns the predicted class probabilities back into instances. Boundary pixels are
always pixels *of a nucleus* (never background), so a decoder that floods the whole
foreground (interior + boundary) from interior markers gets every nucleus back whole.

Two boundary modes:

* ``touching`` (default): a nucleus pixel is boundary only where another nucleus is
  near, i.e. where two nuclei meet or nearly meet (a background gap narrower than the
  width). This is the "touching borders" idea of the DSB 2018 winning solutions. It
  is the default because the boundary class is only spent where instance separation
  is actually ambiguous: isolated nuclei stay pure interior, so the interior
  probability alone carries each nucleus' extent, small nuclei never vanish into
  their own outline, and the rare class is not diluted with easy outline pixels.
* ``all``: every nucleus outline is boundary, as in Caicedo et al. 2019 (BBBC039).
  The interior is each nucleus shrunk by the width, so markers stay separated even
  when a network blurs contacts, at the price of more boundary pixels to learn.

Geometry. Distances are Euclidean: a pixel is boundary when a qualifying pixel lies
within a disk of radius ``w + 0.5`` (``w = 1`` is exactly the 8-neighbourhood). The
image edge is not an outline (a nucleus cut by the field of view keeps its interior
there). Three rules keep the targets *decodable*, i.e. the watershed gives the
labels back (round trip mean F1 >= 0.99 for every width and mode on the synthetic
data, ``benchmarks/bench_postprocess.py``):

1. ``width`` is a maximum: each nucleus gets ``w = clip(floor(r / 3), 1, width)``
   with ``r = sqrt(area / pi)``, so a boundary never takes more than a third of a
   nucleus' radius (a 5 px band on a 30 px nucleus would leave nothing to seed it).
   Two touching nuclei share the width of the narrower one, so a contact band is
   equally thick on both sides; in ``all`` mode an outline also narrows to the width
   of a narrower neighbour within reach.
2. Interiors of two nuclei are never 8-adjacent (the disk contains the
   8-neighbourhood), so 8-connected interior components belong to one nucleus.
3. Every nucleus has exactly one interior component: a nucleus left without
   interior keeps its core (the pixels farthest from its outline or contacts), and
   a nucleus whose interior fell apart keeps the largest piece (the others become
   boundary). Only nuclei at most 2 px thick can end up without interior.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

BACKGROUND, INTERIOR, BOUNDARY = 0, 1, 2
MODES = ("touching", "all")
MAX_WIDTH = 5
WIDTH_PER_RADIUS = 1 / 3  # a boundary never takes more than a third of a nucleus' radius
_EIGHT = np.ones((3, 3), bool)


def make_targets(labels: np.ndarray, *, width: int = 2, mode: str = "touching") -> np.ndarray:
    """Turn an instance label image into a 3-class mask.

    Args:
        labels: HxW integer instance labels, 0 = background; labels need not be
            consecutive.
        width: maximum boundary thickness in pixels on each nucleus, 1 to 5 (smaller
            nuclei get less: a third of their equivalent radius, at least 1).
        mode: ``"touching"`` (boundary only where nuclei meet or nearly meet) or
            ``"all"`` (every outline). See the module docstring for why ``touching``
            is the default.

    Returns:
        uint8 HxW mask with ``BACKGROUND`` (0), ``INTERIOR`` (1), ``BOUNDARY`` (2).

    Raises:
        ValueError: labels not 2-D, not integer, negative; width or mode invalid.

    Example:
        >>> lab = np.zeros((5, 7), np.uint16); lab[1:4, 1:4] = 1; lab[1:4, 4:6] = 2
        >>> make_targets(lab, width=1)
        array([[0, 0, 0, 0, 0, 0, 0],
               [0, 1, 1, 2, 2, 1, 0],
               [0, 1, 1, 2, 2, 1, 0],
               [0, 1, 1, 2, 2, 1, 0],
               [0, 0, 0, 0, 0, 0, 0]], dtype=uint8)
    """
    lab = _compact_labels(labels)
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"width must be an integer from 1 to {MAX_WIDTH}, got {width!r}")
    if mode not in MODES:
        raise ValueError(f"unknown boundary mode {mode!r}; valid: {', '.join(MODES)}")
    fg = lab > 0
    out = fg.astype(np.uint8)  # INTERIOR == 1 on foreground
    if not fg.any():
        return out
    interior = fg & ~_band(lab, int(width), mode)
    interior = _one_core_each(lab, interior, mode)
    out[fg & ~interior] = BOUNDARY
    return out


def nucleus_widths(labels: np.ndarray, width: int) -> np.ndarray:
    """Boundary width of each nucleus, indexed by label: ``clip(floor(r / 3), 1, width)``.

    ``r`` is the equivalent radius ``sqrt(area / pi)``; absent labels (and 0) get 0.
    """
    areas = np.bincount(np.asarray(labels).ravel())
    widths = np.clip(np.floor(np.sqrt(areas / np.pi) * WIDTH_PER_RADIUS), 1, int(width)).astype(np.int64)
    widths[areas == 0] = 0
    widths[0] = 0
    return widths


def _band(lab: np.ndarray, width: int, mode: str) -> np.ndarray:
    """Boolean mask of the nucleus pixels in the boundary band (before core fixes)."""
    fg = lab > 0
    widths = nucleus_widths(lab, width)
    top = lab.dtype.type(np.iinfo(lab.dtype).max)
    distinct = np.unique(widths[widths > 0])
    if mode == "all":
        # Outline width: near a narrower nucleus the outline narrows to its width too,
        # so the band around a contact is as thick on both sides.
        outline_width = widths[lab]
        if distinct.size > 1:
            width_map = np.where(fg, outline_width, MAX_WIDTH + 1).astype(np.uint8)
            for k in distinct[1:]:
                nearby = _disk_filter(width_map, int(k), np.minimum)
                sel = outline_width == k
                outline_width[sel] = nearby[sel]
    band = np.zeros(lab.shape, bool)
    for k in distinct:
        # Nuclei both at least k wide are separated by k pixels on each side (a
        # contact gets the width of its narrower nucleus, so it stays symmetric).
        active = widths >= k
        mine = active[lab]
        lab_k = np.where(mine, lab, 0).astype(lab.dtype, copy=False)
        lifted = np.where(mine, lab, top)
        near = _disk_filter(lab_k, int(k), np.maximum) != lab
        near |= _disk_filter(lifted, int(k), np.minimum) != lab
        if mode == "all":  # the outline against background
            outline = _disk_filter(fg.view(np.uint8), int(k), np.minimum) == 0
            near |= outline & (outline_width == k)
        band |= near & mine
    return band


def _one_core_each(lab: np.ndarray, interior: np.ndarray, mode: str) -> np.ndarray:
    """Give every nucleus exactly one interior component (where its shape allows).

    * A nucleus left without interior (smaller or thinner than about twice the width)
      keeps its *core* as interior: its pixels farthest from the nearest outline
      (``all``) or contact (``touching``), within one pixel of the farthest. Core
      pixels are never 8-adjacent to a different label (resp. another nucleus), so
      interiors of different nuclei still never touch. Only a nucleus whose every
      pixel is 8-adjacent to a different label (at most 2 px thick) keeps none.
    * A nucleus whose interior is split into several 8-connected pieces keeps the
      largest; the other pieces become boundary (one marker per nucleus).
    """
    n = int(lab.max())
    present = np.bincount(lab.ravel(), minlength=n + 1) > 0
    present[0] = False
    need = present & ~(np.bincount(lab[interior], minlength=n + 1) > 0)
    if need.any():
        _add_cores(lab, interior, need, mode)
    comps, n_comps = ndi.label(interior, structure=_EIGHT)
    if n_comps == 0:
        return interior
    owner = np.zeros(n_comps + 1, np.int64)
    owner[comps[interior]] = lab[interior]
    if n_comps == np.count_nonzero(np.bincount(owner[1:], minlength=n + 1)):
        return interior  # already one piece per nucleus
    sizes = np.bincount(comps.ravel(), minlength=n_comps + 1)
    order = np.lexsort((-sizes[1:], owner[1:])) + 1  # grouped by owner, largest first
    first = np.ones(order.size, bool)
    first[1:] = owner[order[1:]] != owner[order[:-1]]
    keep = np.zeros(n_comps + 1, bool)
    keep[order[first]] = True
    return interior & keep[comps]


def _add_cores(lab: np.ndarray, interior: np.ndarray, need: np.ndarray, mode: str) -> None:
    """Mark the core of each nucleus flagged in ``need`` as interior (in place)."""
    fg = lab > 0
    if mode == "all":
        edge = _disk_filter(lab, 1, np.maximum) != _disk_filter(lab, 1, np.minimum)
    else:
        lifted = np.where(fg, lab, lab.dtype.type(np.iinfo(lab.dtype).max))
        edge = (_disk_filter(lab, 1, np.maximum) != lab) | (_disk_filter(lifted, 1, np.minimum) != lab)
    edge &= fg
    candidates = need[lab] & ~edge
    if not candidates.any():
        return
    # Distance to the nearest edge pixel, computed only around the needy nuclei.
    rows = np.flatnonzero(candidates.any(axis=1))
    cols = np.flatnonzero(candidates.any(axis=0))
    box = (slice(max(rows[0] - 1, 0), rows[-1] + 2), slice(max(cols[0] - 1, 0), cols[-1] + 2))
    dist = ndi.distance_transform_edt(~edge[box])
    cand = candidates[box]
    owners = lab[box][cand]
    peak = np.zeros(need.size)
    np.maximum.at(peak, owners, dist[cand])
    core = np.zeros_like(cand)
    core[cand] = dist[cand] >= peak[owners] - 1.0
    interior[box] |= core


def _compact_labels(labels: np.ndarray) -> np.ndarray:
    """Validate labels and return them in the smallest unsigned dtype leaving one spare value."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D HxW array, got shape {labels.shape}")
    if labels.dtype == bool:
        return labels.astype(np.uint16)
    if labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be an integer array, got dtype {labels.dtype}")
    if labels.size == 0:
        return labels.astype(np.uint16)
    if labels.dtype.kind == "i" and labels.min() < 0:
        raise ValueError(f"labels must be non-negative, got minimum {labels.min()}")
    top = int(labels.max())
    if top < np.iinfo(np.uint16).max:
        return labels.astype(np.uint16, copy=False)
    if top < np.iinfo(np.uint32).max:
        return labels.astype(np.uint32, copy=False)
    # Very large ids: compress to consecutive ones (order preserved, background stays 0).
    _, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape)
    if labels.min() != 0:
        inverse += 1
    return inverse.astype(np.uint32)


def _row_halfwidths(width: int) -> list[int]:
    """Half-width of the disk of radius ``width + 0.5`` on each row offset 0..width."""
    r2 = (width + 0.5) ** 2
    return [int(np.floor(np.sqrt(r2 - dy * dy))) for dy in range(width + 1)]


def _disk_filter(lab: np.ndarray, width: int, op) -> np.ndarray:
    """Maximum (``op=np.maximum``) or minimum filter over the disk of radius ``width + 0.5``.

    The disk is decomposed into rows: one fast horizontal 1-D filter per distinct row
    half-width, then a shifted element-wise max/min per row offset. Rows outside the
    image are skipped, which equals scipy's ``mode="nearest"`` for this footprint.
    """
    filt1d = ndi.maximum_filter1d if op is np.maximum else ndi.minimum_filter1d
    halves = _row_halfwidths(width)
    rows = {h: filt1d(lab, 2 * h + 1, axis=1, mode="nearest") for h in set(halves)}
    out = rows[halves[0]].copy()
    height = lab.shape[0]
    for dy in range(1, width + 1):
        if dy >= height:
            break
        src = rows[halves[dy]]
        op(out[dy:], src[:-dy], out=out[dy:])
        op(out[:-dy], src[dy:], out=out[:-dy])
    return out
