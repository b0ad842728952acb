"""Tiled inference: an image of any size -> softmax class probabilities 3xHxW.

The image is padded (reflect) to a multiple of 32; an image that fits one tile is
run whole, a larger one in overlapping tiles, batched, and blended with a smooth
window whose ramps lie only where a tile has a neighbour, so the image borders are
not down-weighted. Probabilities are accumulated into one float32 3xHxW array and
one HxW weight array, so memory grows with the image, not with the tile count.

Example:
    >>> model, cfg, params = load_segmenter("bundle/segmenters/he")       # doctest: +SKIP
    >>> probs = predict(model, image, tile_size=cfg.tile_size, scale=cfg.scale)  # doctest: +SKIP
    >>> labels = watershed(probs, params)                                 # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from triageseg.devices import DEVICE_SPECS, resolve_device  # noqa: F401 - re-exported
from triageseg.segmenters.model import DEFAULT_OVERLAP, DEFAULT_TILE_SIZE
from triageseg.segmenters.scale import (
    RowResizer,
    check_scale,
    first_source_row,
    resample_probability_stream,
    resize_image,
    resize_probabilities,
    scaled_shape,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

RowReader = Callable[[int, int], np.ndarray]  # (y0, y1) -> float32 rows y0:y1 of a normalised HxWxC image
# An axis up to this many times the tile size runs as one tile. Two tiles always compute more pixels than one
# (the overlap, and each rounded up to 32), and blending them costs more; the tile size bounds memory, which a
# tile 1.25x as wide raises by at most 1.56x, and only for images that are small anyway (a slide's long axis
# is tiled as before). Measured, one fluorescence specialist on OpenVINO bf16, 2 cores, medians of 5: an
# axis of 928 px as one tile 0.262 s against four of 480 px 0.323 s, 864 px 0.219 / 0.233 s, 800 px 0.207 /
# 0.204 s; per pixel the network costs the same at 416 to 1024 px (0.29-0.32 us).
SINGLE_TILE_SLACK = 1.25

# Smallest blending weight: keeps every pixel's weight sum positive and tile edges usable.
WINDOW_FLOOR = 1e-3


def autocast_context(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA where supported (else fp16); a no-op elsewhere."""
    import torch

    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)`` with at most ``stride`` between them."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def tile_grid(length: int, tile_size: int, overlap: int) -> tuple[int, list[int]]:
    """(tile side, tile starts) along one padded axis of ``length`` (a multiple of 32).

    As few tiles as ``tile_size`` needs, each shrunk to the smallest multiple of 32 that
    still covers the axis with ``overlap`` between neighbours: a 672-px axis takes two
    384-px tiles, not two of 512 (0.75x the pixels per axis), a 2048-px one five of 480.
    An axis that fits is one tile of its own length, and so is one up to
    :data:`SINGLE_TILE_SLACK` times ``tile_size`` (see there).
    """
    if length <= max(tile_size, 32 * int(SINGLE_TILE_SLACK * tile_size / 32)):
        return length, [0]
    n = len(tile_starts(length, tile_size, tile_size - overlap))
    side = 32 * math.ceil((length + (n - 1) * overlap) / (32 * n))
    side = min(tile_size, max(side, 32 * math.ceil((2 * overlap + 1) / 32)))  # the ramps need 2 * overlap < side
    return side, tile_starts(length, side, side - overlap)


def _ramp_1d(size: int, ramp: int, left: bool, right: bool) -> np.ndarray:
    """1-D weights: 1 in the middle, a sin^2 ramp of ``ramp`` pixels on sides that have a neighbour."""
    w = np.ones(size, dtype=np.float32)
    ramp = min(ramp, size // 2)
    if ramp > 0:
        r = np.sin(0.5 * np.pi * (np.arange(ramp, dtype=np.float64) + 0.5) / ramp) ** 2
        r = np.maximum(r, WINDOW_FLOOR).astype(np.float32)
        if left:
            w[:ramp] = r
        if right:
            w[size - ramp :] = r[::-1]
    return w


def _d4(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    import torch

    if flip:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, k, dims=(-2, -1))


def _d4_inverse(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    import torch

    x = torch.rot90(x, -k, dims=(-2, -1))
    if flip:
        x = torch.flip(x, dims=(-1,))
    return x


def _input_channels(model: torch.nn.Module) -> int | None:
    if getattr(model, "in_channels", None) is not None:  # served from its export (segmenters.served)
        return int(model.in_channels)
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            return module.in_channels
    return None


def _check_tiling(tile_size: int, overlap: int, batch_size: int) -> None:
    if tile_size < 32 or tile_size % 32:
        raise ValueError(f"tile_size must be a positive multiple of 32, got {tile_size}")
    if not 0 <= overlap < tile_size // 2:
        raise ValueError(f"overlap must be in [0, tile_size/2), got {overlap} for tile {tile_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _runs_on_numpy(model) -> bool:
    """Whether ``model`` is an exported network (ONNX Runtime, OpenVINO) that ``predict`` runs on numpy arrays."""
    return getattr(model, "numpy_forward", None) is not None


def _run_batch_numpy(model, arr: np.ndarray, transforms: list) -> np.ndarray:
    """:func:`_run_batch` of an exported network, without torch: the same tiles, flips and rotations, in numpy.

    Served networks (:mod:`triageseg.segmenters.served`) and the wrappers of eager ones that
    run their export (:func:`~triageseg.segmenters.backends.prepare_network`) both come here,
    so the two give the same probabilities bit for bit.
    """
    x = np.ascontiguousarray(arr, dtype=np.float32)
    probs = None
    for k, flip in transforms:
        view = x
        if k or flip:
            view = np.ascontiguousarray(np.rot90(view[..., ::-1] if flip else view, k, axes=(-2, -1)))
        p = _softmax_classes(np.asarray(model.numpy_forward(view), dtype=np.float32))
        if k or flip:
            p = np.rot90(p, -k, axes=(-2, -1))
            p = p[..., ::-1] if flip else p
        probs = np.ascontiguousarray(p) if probs is None else np.add(probs, p, out=probs)  # p: a new array
    if len(transforms) > 1:
        probs /= len(transforms)
    return probs


def _softmax_classes(logits: np.ndarray) -> np.ndarray:
    """Softmax over axis 1 (the classes) of N x C x h x w float32 logits, in place."""
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return logits


def _run_batch(model, arr: np.ndarray, dev, channels_last: bool, transforms: list, amp: bool) -> np.ndarray:
    """Softmax probabilities of a batch of tiles (B x C x h x w), averaged over ``transforms`` (D4 TTA)."""
    if _runs_on_numpy(model):
        return _run_batch_numpy(model, arr, transforms)
    import torch

    with torch.inference_mode(), autocast_context(dev, amp):
        xb = torch.from_numpy(arr).to(dev, non_blocking=True)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        probs = None
        for k, flip in transforms:
            logits = model(_d4(xb, k, flip) if (k or flip) else xb)
            p = torch.softmax(logits.float(), dim=1)
            p = _d4_inverse(p, k, flip) if (k or flip) else p
            probs = p if probs is None else probs.add_(p)
        if len(transforms) > 1:  # x / 1 is x: no copy of the whole batch for the usual single pass
            probs /= len(transforms)
        return probs.cpu().numpy()


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def predict(
    model: torch.nn.Module,
    image: np.ndarray,
    *,
    tile_size: int = DEFAULT_TILE_SIZE,
    overlap: int = DEFAULT_OVERLAP,
    batch_size: int = 4,
    tta: bool = False,
    device: str | torch.device | None = None,
    amp: bool = True,
    scale: float = 1.0,
) -> np.ndarray:
    """Softmax class probabilities of ``model`` for an image of any size.

    Args:
        model: a segmentation network returning ``(B, classes, h, w)`` logits for inputs
            whose sides are multiples of 32 (any memory format).
        image: float HxWxC image in [0, 1] (``datasets.io.read_image``).
        tile_size: tile side in pixels (multiple of 32). An image whose padded size fits
            is run whole.
        overlap: overlap between neighbouring tiles in pixels (< tile_size / 2).
        batch_size: tiles per forward pass.
        tta: average over the 8 flips/rotations of the dihedral group D4 (8x slower).
        device: where to run; ``None`` keeps the model where it is, otherwise the model
            is moved there (``auto|cpu|cuda|cuda:N|mps``).
        amp: mixed precision on CUDA (bf16 where supported, else fp16).
        scale: resize the image by this factor before the network and the probabilities
            back afterwards (the segmenter's ``SegmenterConfig.scale``; see
            :mod:`triageseg.segmenters.scale`). Tiles are in the resized image.

    Returns:
        float32 array ``(classes, H, W)`` at the image's own size; the classes sum to 1
        at every pixel.

    Raises:
        ValueError: an image that is not HxWxC float, or bad tiling options.
    """
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
    expected_c = _input_channels(model)
    if image.ndim != 3 or (expected_c is not None and image.shape[2] != expected_c):
        raise ValueError(f"image must be HxWx{expected_c or 'C'}, got shape {image.shape}")
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(
            f"image must be float in [0, 1] (datasets.io.normalize_image), got dtype {image.dtype}"
        )
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image is empty: shape {image.shape}")
    _check_tiling(tile_size, overlap, batch_size)
    scale = check_scale(scale)
    if scale != 1.0:
        resized = resize_image(np.asarray(image, dtype=np.float32), scaled_shape(image.shape, scale))
        probs = _single_tile(model, resized, tile_size=tile_size, overlap=overlap, tta=tta, device=device, amp=amp,
                             copy=False)
        if probs is None:
            probs = predict(model, resized, tile_size=tile_size, overlap=overlap, batch_size=batch_size, tta=tta,
                            device=device, amp=amp)
        return resize_probabilities(probs, image.shape[:2])

    h, w = image.shape[:2]
    image = np.asarray(image, dtype=np.float32)
    single = _single_tile(model, image, tile_size=tile_size, overlap=overlap, tta=tta, device=device, amp=amp)
    if single is not None:
        return single
    out: np.ndarray | None = None
    for y0, y1, rows in stream_probabilities(model, lambda a, b: image[a:b], (h, w), tile_size=tile_size,
                                             overlap=overlap, batch_size=batch_size, tta=tta, device=device, amp=amp):
        if out is None:
            out = np.empty((rows.shape[0], h, w), np.float32)
        out[:, y0:y1] = rows
    assert out is not None  # at least one tile always exists
    return out


def _single_tile(model, image: np.ndarray, *, tile_size: int, overlap: int, tta: bool, device, amp: bool,
                 copy: bool = True) -> np.ndarray | None:
    """:func:`predict`'s probabilities of an image that runs as one tile; None when it takes several.

    One tile has no neighbour, so its blending window is 1 everywhere and the blended rows
    are the tile's own probabilities: this gives the streamed path's values bit for bit
    (the same padded input, the same batch of one) without its accumulator, weights and
    copies (about 10 ms of a 512 x 512 image enlarged to 742 px, on 2 cores). ``copy``
    False may return a view of the padded output (the caller resizes it anyway).
    """
    h, w = image.shape[:2]
    hp, wp = 32 * math.ceil(h / 32), 32 * math.ceil(w / 32)
    if len(tile_grid(hp, tile_size, overlap)[1]) > 1 or len(tile_grid(wp, tile_size, overlap)[1]) > 1:
        return None
    dev, channels_last = _prepare_model(model, device)
    padded = _gather_padded(image, _reflect_index(h, hp), _reflect_index(w, wp) if wp != w else None)
    # 1 x C x hp x wp in the streamed batch's memory layout (np.stack keeps the tiles' H x W x C order in memory)
    arr = np.stack([padded.transpose(2, 0, 1)])
    transforms = [(k, f) for f in (False, True) for k in range(4)] if tta else [(0, False)]
    was_training = model.training
    if was_training:
        model.eval()
    try:
        probs = _run_batch(model, arr, dev, channels_last, transforms, amp)[0]
    finally:
        if was_training:
            model.train()
    probs = probs[:, :h, :w]
    return np.ascontiguousarray(probs) if copy else probs


def _prepare_model(model, device) -> tuple:
    """(the device the model runs on, whether its weights are channels_last), moving it to ``device`` if asked.

    An exported network runs on numpy arrays on the CPU (:func:`_run_batch_numpy`): ``(None, False)``.
    """
    if _runs_on_numpy(model):
        return None, False
    import torch

    if device is None:
        param = next(model.parameters(), None)
        dev = param.device if param is not None else torch.device("cpu")
    else:
        dev = resolve_device(device)
        param = next(model.parameters(), None)
        if param is None or param.device != dev:  # .to() walks every module (~5 ms per image on 2 cores)
            model.to(dev)
    # the first 4-D weight whose two layouts differ (a 1 x 1 or depthwise kernel can be both) stands for all: a
    # model is converted whole, and walking every parameter of an efficientnet-b3 Unet took ~2 ms per image
    first = next((p for p in model.parameters()
                  if p.dim() == 4 and p.is_contiguous() != p.is_contiguous(memory_format=torch.channels_last)), None)
    return dev, first is not None and not first.is_contiguous()


def _reflect_index(length: int, padded: int) -> np.ndarray:
    """Source index of each position of ``np.pad(..., (0, padded - length), mode="reflect")``."""
    return np.pad(np.arange(length), (0, padded - length), mode="reflect")


class _PaddedRows:
    """Rows of the reflect-padded image (multiples of 32), read from the caller's row reader and kept while needed."""

    def __init__(self, read_rows: RowReader, shape: tuple[int, int], padded: tuple[int, int]):
        self._read = read_rows
        self._iy = _reflect_index(shape[0], padded[0])
        self._ix = _reflect_index(shape[1], padded[1]) if padded[1] != shape[1] else None
        self._start, self._rows = 0, None

    def get(self, y0: int, y1: int) -> np.ndarray:
        """Padded rows ``y0:y1`` (``y0`` never decreases between calls); rows already read are not read again."""
        end = self._start + (0 if self._rows is None else self._rows.shape[0])
        keep = self._rows[y0 - self._start :] if self._rows is not None and self._start <= y0 < end else None
        if y1 > end or keep is None:
            lo = y0 if keep is None else end
            src = self._iy[lo:y1]
            first = int(src.min())
            raw = np.asarray(self._read(first, int(src.max()) + 1), dtype=np.float32)
            # C-contiguous HxWxC, as np.pad gives: the tiles' memory layout decides the convolutions' rounding
            rows = _gather_padded(raw, src - first, self._ix)
            keep = rows if keep is None else np.concatenate([keep, rows])
        self._start, self._rows = y0, keep
        return keep[: y1 - y0]


def _run_length(idx: np.ndarray) -> int:
    """How many of ``idx`` count up by one from ``idx[0]`` (the rows or columns inside the image)."""
    steps = np.flatnonzero(np.diff(idx) != 1)
    return int(steps[0]) + 1 if steps.size else int(idx.size)


def _gather_padded(raw: np.ndarray, rows: np.ndarray, cols: np.ndarray | None) -> np.ndarray:
    """``raw[rows][:, cols]`` as a C-contiguous array (``cols`` None: every column), copied by slices.

    The indices are reflect padding's: a run inside the image, then (at the far edges) the
    reflected rows and columns, at most 31 of each for images of 32 px and more. Fancy
    indexing gathered the whole band element by element (13 ms for a 768 x 768 x 3 tile, 4x
    a copy); here the run is one slice copy and only the reflected part is gathered. The
    values are the same either way (copies only). Inside the image with every column, the
    rows come back as a view of ``raw`` when it is C-contiguous.
    """
    kr = _run_length(rows)
    if cols is None:
        if kr == rows.size:
            return np.ascontiguousarray(raw[rows[0] : rows[0] + kr])
        cols = np.arange(raw.shape[1])
    kc = _run_length(cols)
    out = np.empty((rows.size, cols.size) + raw.shape[2:], np.float32)
    inside = raw[rows[0] : rows[0] + kr]
    out[:kr, :kc] = inside[:, cols[0] : cols[0] + kc]
    if kc < cols.size:
        out[:kr, kc:] = inside[:, cols[kc:]]
    if kr < rows.size:
        out[kr:] = raw[rows[kr:]][:, cols]
    return out


def stream_probabilities(
    model: torch.nn.Module,
    read_rows: RowReader,
    shape: tuple[int, int],
    *,
    tile_size: int = DEFAULT_TILE_SIZE,
    overlap: int = DEFAULT_OVERLAP,
    batch_size: int = 4,
    tta: bool = False,
    device: str | torch.device | None = None,
    amp: bool = True,
    start: int = 0,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """:func:`predict` band by band: the same tiles, batches and blending, rows yielded as they are final.

    The tiles are those :func:`predict` uses for the whole image (reflect padding to a
    multiple of 32, :func:`tile_starts`, the same ramps) and run in the same batches, so
    the rows are bit for bit those of :func:`predict` (scale 1). Memory holds one band of
    tile rows: the input rows the pending tiles need and the accumulator of the rows
    they still add to.

    Args:
        model: as for :func:`predict`.
        read_rows: ``(y0, y1) -> float32 (y1 - y0) x W x C`` rows of the normalised image
            (called with increasing ``y0``).
        shape: the image's (H, W).
        tile_size, overlap, batch_size, tta, device, amp: as for :func:`predict`.
        start: skip the rows above this one (resume): only the batches that add to rows
            ``>= start`` run.

    Yields:
        ``(y0, y1, probs)``: float32 ``(classes, y1 - y0, W)`` for consecutive row ranges
        from ``start`` to H.
    """
    h, w = int(shape[0]), int(shape[1])
    _check_tiling(tile_size, overlap, batch_size)
    if not 0 <= start <= h:
        raise ValueError(f"start must be in [0, {h}], got {start}")
    if start == h:
        return
    dev, channels_last = _prepare_model(model, device)
    hp, wp = 32 * math.ceil(h / 32), 32 * math.ceil(w / 32)
    (th, ys), (tw, xs) = tile_grid(hp, tile_size, overlap), tile_grid(wp, tile_size, overlap)
    tiles = [(y, x) for y in ys for x in xs]
    first = next(i for i, (y, _) in enumerate(tiles) if y + th > start)
    tiles = tiles[first - first % batch_size :]  # whole batches, as the whole image runs them
    source = _PaddedRows(read_rows, (h, w), (hp, wp))
    ramps_x = {x: _ramp_1d(tw, overlap, x > 0, x + tw < wp) for x in xs}
    acc: np.ndarray | None = None
    wsum = np.zeros((0, wp), np.float32)
    top = tiles[0][0]  # padded row where acc and wsum begin
    emitted = start
    transforms = [(k, f) for f in (False, True) for k in range(4)] if tta else [(0, False)]
    was_training = model.training
    if was_training:  # eval() / train() walk every module (an exported model's wrapper too): only when needed
        model.eval()
    try:
        for n_done, batch in zip(itertools.count(batch_size, batch_size), _batches(tiles, batch_size)):
            y_lo, y_hi = batch[0][0], batch[-1][0] + th
            band = source.get(y_lo, y_hi)
            arr = np.stack([band[y - y_lo : y - y_lo + th, x : x + tw].transpose(2, 0, 1) for y, x in batch])
            probs = _run_batch(model, arr, dev, channels_last, transforms, amp)
            if acc is None:
                acc = np.zeros((probs.shape[1], 0, wp), np.float32)
            if y_hi - top > acc.shape[1]:  # grow the accumulator down to the batch's last row
                grow = y_hi - top - acc.shape[1]
                acc = np.concatenate([acc, np.zeros((acc.shape[0], grow, wp), np.float32)], axis=1)
                wsum = np.concatenate([wsum, np.zeros((grow, wp), np.float32)])
            for (y, x), p in zip(batch, probs):
                win = np.outer(_ramp_1d(th, overlap, y > 0, y + th < hp), ramps_x[x])
                acc[:, y - top : y - top + th, x : x + tw] += np.multiply(p, win, out=p)  # in place: no temporary
                wsum[y - top : y - top + th, x : x + tw] += win
            # rows above the next pending tile get nothing more: they are final
            final = tiles[n_done][0] if n_done < len(tiles) else hp
            if final > top:
                lo, hi = max(emitted, top), min(final, h)
                if hi > lo:
                    out = acc[:, lo - top : hi - top, :w]
                    out /= wsum[None, lo - top : hi - top, :w]
                    yield lo, hi, np.ascontiguousarray(out, dtype=np.float32)
                    emitted = hi
                # views: the next growth copies anyway, and the emitted rows above are never written again
                acc, wsum, top = acc[:, final - top :], wsum[final - top :], final
    finally:
        if was_training:
            model.train()


def stream_probabilities_scaled(
    model: torch.nn.Module,
    read_rows: RowReader,
    shape: tuple[int, int],
    *,
    scale: float = 1.0,
    start: int = 0,
    **options,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """:func:`stream_probabilities` with the network at ``scale``: rows bit for bit those of :func:`predict`.

    The image rows are resized band by band (:class:`~triageseg.segmenters.scale.RowResizer`)
    on their way to the network, and the probability rows back to the native grid
    (:func:`~triageseg.segmenters.scale.resample_probability_stream`), each band exactly the
    rows the whole image's resize gives. ``start`` and the yielded rows are native rows.
    """
    scale = check_scale(scale)
    if scale == 1.0:
        yield from stream_probabilities(model, read_rows, shape, start=start, **options)
        return
    h, w = int(shape[0]), int(shape[1])
    if start >= h:
        return
    net = scaled_shape((h, w), scale)
    resizer = RowResizer(read_rows, (h, w), net)
    net_start = first_source_row(net, (h, w), start)
    bands = stream_probabilities(model, resizer.rows, net, start=net_start, **options)
    yield from resample_probability_stream(bands, net, (h, w), start=start)
