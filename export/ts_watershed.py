"""A torch-only seeded flood, scriptable with TorchScript: could instances live inside a package?

InstanSeg puts its post-processing inside TorchScript. Ours is a priority-flood watershed
(skimage), which has no tensor form; this module is the closest tensor-only version, to be
*measured* against it (``benchmarks/bench_bioimageio.py``), not used by the pipeline:

1. foreground and seeds by the same thresholds as :func:`postprocess.watershed.decode_components`;
2. seed components by iterative 3x3 max-pool propagation of pixel ids (8-connected);
3. flooding by levels: the elevation ``1 - P_interior`` is cut into ``levels`` bands; in each
   band, labels grow by 3x3 max-pool steps into unlabelled foreground pixels of that band or
   lower until nothing changes (a geodesic dilation per level, not a pixel-exact priority queue);
4. foreground components without a seed get their own label; small seeds / objects and objects
   whose highest interior probability is below ``min_score`` dropped.

Steps 2 and 3 iterate about as often as an object (or a band of it) is wide, each step a full
image max-pool.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _propagate(lab: torch.Tensor, allowed: torch.Tensor, max_iter: int) -> torch.Tensor:
    """Grow positive labels by 3x3 max-pool steps into ``allowed`` pixels (labelled pixels keep theirs)."""
    for _ in range(max_iter):
        grown = F.max_pool2d(lab[None, None], 3, 1, 1)[0, 0]
        new = torch.where((lab == 0) & allowed, grown, lab)
        if bool(torch.equal(new, lab)):
            break
        lab = new
    return lab


def _components(mask: torch.Tensor, max_iter: int) -> torch.Tensor:
    """8-connected components of ``mask`` labelled by the largest pixel id in each (0 outside)."""
    h, w = mask.shape
    ids = torch.arange(1, h * w + 1, dtype=torch.float32, device=mask.device).view(h, w)
    lab = torch.where(mask, ids, torch.zeros_like(ids))
    for _ in range(max_iter):
        new = torch.where(mask, F.max_pool2d(lab[None, None], 3, 1, 1)[0, 0], lab)
        if bool(torch.equal(new, lab)):
            break
        lab = new
    return lab


def _drop_small(lab: torch.Tensor, min_count: int) -> torch.Tensor:
    if min_count <= 1:
        return lab
    flat = lab.flatten().long()
    counts = torch.bincount(flat, minlength=int(flat.max().item()) + 1)
    small = counts < min_count
    small[0] = False
    return torch.where(small[flat].view(lab.shape), torch.zeros_like(lab), lab)


def _drop_unsure(lab: torch.Tensor, interior: torch.Tensor, min_score: float) -> torch.Tensor:
    if min_score <= 0.0:
        return lab
    ids, inverse = torch.unique(lab.flatten(), return_inverse=True)
    peak = torch.zeros(ids.shape, dtype=interior.dtype, device=lab.device)
    peak = peak.scatter_reduce(0, inverse, interior.flatten(), reduce="amax")
    unsure = (peak < min_score) & (ids > 0)
    return torch.where(unsure[inverse].view(lab.shape), torch.zeros_like(lab), lab)


def seeded_flood(probs: torch.Tensor, marker_threshold: float = 0.4, mask_threshold: float = 0.5,
                 min_marker_size: int = 3, min_size: int = 10, levels: int = 16,
                 max_iter: int = 512, min_score: float = 0.0) -> torch.Tensor:
    """3xHxW probabilities -> HxW labels (float ids, not consecutive; 0 = background)."""
    interior, boundary = probs[1], probs[2]
    fg = (interior + boundary) > mask_threshold
    seeds = ((interior - boundary) > marker_threshold) & fg
    markers = _drop_small(_components(seeds, max_iter), min_marker_size)
    elevation = 1.0 - interior
    lab = markers
    for k in range(1, levels + 1):
        band = fg & (elevation <= float(k) / float(levels))
        lab = _propagate(lab, band, max_iter)
    lab = _propagate(lab, fg, max_iter)
    # foreground components that no seed reached: one object each, ids above every pixel id
    rest = fg & (lab == 0)
    if bool(rest.any()):
        extra = _components(rest, max_iter)
        lab = torch.where(rest, extra + float(probs.shape[1] * probs.shape[2]), lab)
    return _drop_small(_drop_unsure(lab, interior, min_score), min_size)


def scripted():
    """The TorchScript-compiled flood (what a package would carry)."""
    return torch.jit.script(seeded_flood)
