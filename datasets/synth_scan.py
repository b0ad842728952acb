"""Synthetic tile scans: one acquisition, continuous content, tile by tile.

:func:`~triageseg.datasets.synth.synth_sample` draws independent images: each has its
own exposure, background, illumination and nucleus sizes, and its nuclei stop at its
edges. Put side by side they make a mosaic no microscope produces (a nucleus cut by one
tile's edge lies against unrelated content of the next). A :class:`SynthScan` is what a
slide scanner or a tiled widefield acquisition gives instead:

- **one acquisition** for every tile (:class:`Acquisition`, drawn once from the scan's
  seed): nucleus size and density, brightness spread, background, autofluorescence,
  photons (noise), blur, exposure (the intensity mapped to white) and tint;
- **continuous content**: nuclei are placed per tile (each tile's own random stream,
  ``[seed, row, col]``) in image coordinates, without clipping, and a tile is rendered
  from its own nuclei and those of its 8 neighbours on a padded canvas, so a nucleus
  across a tile edge is whole and the same in both tiles, and the blur and cell bodies
  run across edges; the illumination is one smooth field over the whole scan;
- pixel noise (Poisson, read noise, chromatin texture) is drawn per tile, as a
  camera's is per field.

Labels are unique over the scan: nucleus ``k`` of tile ``(r, c)`` is
``(r * cols + c) * ID_STRIDE + k``. Only fluorescence is drawn this way (the modality of
tile scans in the benchmark). :mod:`~triageseg.datasets.synth` itself is unchanged: its
default random stream and output stay bit for bit as before.

Example:
    >>> scan = SynthScan(rows=2, cols=2, tile=256, seed=0)
    >>> image, labels = scan.tile(0, 1)
    >>> image.shape, labels.dtype
    ((256, 256, 3), dtype('uint32'))
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from triageseg.datasets.synth import STYLES, _profile, _smooth_noise, _to_uint8

ID_STRIDE = 100_000  # ids per tile (a 2000 px tile holds ~4000 nuclei)
_K_HARM = np.arange(2, 6)


@dataclass(frozen=True)
class Acquisition:
    """The image-level draws shared by every tile of a scan (fluorescence)."""

    r_center: float  # typical nucleus semi-axis
    coverage: float  # fraction of the area covered by nuclei
    clustered: float  # fraction of nuclei placed around cluster centres
    bright_sigma: float  # lognormal spread of nucleus brightness
    dim_fraction: float  # nuclei barely stained
    floor: float  # radial profile at the rim
    power: float  # radial profile exponent
    chromatin: float  # chromatin texture amplitude
    chromatin_sigma: float
    autofluorescence: float
    body_radius: float
    background: float
    illumination: float  # strength of the scan-wide illumination field
    illum: tuple[float, ...]  # its tilt (gy, gx), centre (cy, cx) and two slow waves
    blur: float
    photons: float
    read_noise: float
    exposure: float  # signal mapped to white
    tint: tuple[float, float, float]

    @classmethod
    def draw(cls, rng: np.random.Generator) -> Acquisition:
        """Draw the acquisition from the ranges :func:`~triageseg.datasets.synth.synth_sample` uses per image."""
        style = STYLES["fluorescence"]
        r_center = rng.uniform(*style.radius)
        coverage = rng.uniform(*style.coverage)
        clustered = rng.uniform(*style.clustered)
        values = dict(
            bright_sigma=rng.uniform(0.2, 0.5), dim_fraction=rng.uniform(0.0, 0.15), floor=rng.uniform(0.3, 0.7),
            power=rng.uniform(0.3, 0.8), chromatin=rng.uniform(0.05, 0.3), chromatin_sigma=rng.uniform(0.8, 2.0),
            autofluorescence=rng.uniform(0.0, 0.12), body_radius=rng.uniform(3, 7), background=rng.uniform(0.01, 0.08),
            illumination=rng.uniform(0.1, 0.6), illum=tuple(float(v) for v in (*rng.normal(0, 1, 2),
                                                                                *rng.uniform(-0.5, 0.5, 2),
                                                                                *rng.uniform(0, 2 * np.pi, 2))),
            blur=rng.uniform(0.5, 1.8), photons=rng.uniform(15, 400), read_noise=rng.uniform(0.005, 0.03),
        )
        exposure_factor = rng.uniform(0.8, 1.4)
        tint = (1.0, 1.0, 1.0)
        if rng.random() < 0.3:
            tint = ((0.3, 0.5, 1.0), (0.3, 1.0, 0.4), (1.0, 0.4, 0.9))[rng.integers(3)]
        # the exposure as synth_sample sets it per image (99.9th percentile of the signal), here once for the scan:
        # from a calibration field drawn with the scan's settings
        partial = cls(r_center, coverage, clustered, exposure=1.0, tint=tint, **values)
        calib = SynthScan(1, 1, 1024, acquisition=partial, seed=int(rng.integers(2**31)))
        signal = calib._signal(0, 0)[0]
        top = float(np.percentile(signal, 99.9)) * exposure_factor
        return cls(r_center, coverage, clustered, exposure=max(top, 1e-6), tint=tint, **values)


@dataclass(frozen=True)
class _Nuclei:
    """Nuclei of one tile in image coordinates: centre, semi-axes, angle, boundary harmonics."""

    cy: np.ndarray
    cx: np.ndarray
    a: np.ndarray
    b: np.ndarray
    theta: np.ndarray
    amp: np.ndarray  # (n, 4)
    phase: np.ndarray  # (n, 4)
    bright: np.ndarray  # (n,)
    first_id: int  # id of nucleus 0


def _shape(nuc: _Nuclei, k: int, y0: int, x0: int, shape) -> tuple[np.ndarray | None, tuple[int, int, int, int]]:
    """Normalised radius of nucleus ``k`` over its box on a canvas at image offset (y0, x0); None off the canvas."""
    h, w = shape
    cy, cx = nuc.cy[k] - y0, nuc.cx[k] - x0
    half = int(np.ceil(nuc.a[k] * (1 + np.abs(nuc.amp[k]).sum()))) + 1
    ya, yb = max(int(cy) - half, 0), min(int(cy) + half + 1, h)
    xa, xb = max(int(cx) - half, 0), min(int(cx) + half + 1, w)
    if yb - ya < 1 or xb - xa < 1:
        return None, (ya, yb, xa, xb)
    dy = (np.arange(ya, yb, dtype=np.float32) - np.float32(cy))[:, None]
    dx = (np.arange(xa, xb, dtype=np.float32) - np.float32(cx))[None, :]
    cos_t, sin_t = np.cos(nuc.theta[k]), np.sin(nuc.theta[k])
    u = (dx * cos_t + dy * sin_t) / nuc.a[k]
    v = (-dx * sin_t + dy * cos_t) / nuc.b[k]
    phi = np.arctan2(v, u)
    rmod = 1.0 + (nuc.amp[k][:, None, None] * np.cos(_K_HARM[:, None, None] * phi + nuc.phase[k][:, None, None])).sum(0)
    return (np.sqrt(u * u + v * v) / rmod).astype(np.float32), (ya, yb, xa, xb)


class SynthScan:
    """A ``rows x cols`` scan of ``tile`` px tiles (see the module docstring)."""

    def __init__(self, rows: int, cols: int, tile: int, *, seed: int = 0, acquisition: Acquisition | None = None):
        if rows < 1 or cols < 1 or tile < 64:
            raise ValueError(f"a scan needs rows, cols >= 1 and tiles >= 64 px, got {rows} x {cols} of {tile}")
        self.rows, self.cols, self.tile_size, self.seed = int(rows), int(cols), int(tile), int(seed)
        self.acquisition = acquisition or Acquisition.draw(np.random.default_rng([self.seed, 1 << 20]))
        style = STYLES["fluorescence"]
        # widest reach of a nucleus from its centre, and the canvas pad that keeps every nucleus touching a tile whole
        self.reach = int(np.ceil(1.2 * style.radius[1] * np.sqrt(style.aspect[1]) * (1 + 4 * style.roughness))) + 2
        self.pad = 2 * self.reach

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the whole scan."""
        return self.rows * self.tile_size, self.cols * self.tile_size

    @functools.lru_cache(maxsize=16)  # noqa: B019 - a scan lives as long as its tiles are drawn
    def _nuclei(self, r: int, c: int) -> _Nuclei:
        """The nuclei whose centres lie in tile (r, c), drawn from the tile's own stream."""
        acq, style, t = self.acquisition, STYLES["fluorescence"], self.tile_size
        rng = np.random.default_rng([self.seed, r, c])
        area = t * t
        target = acq.coverage * area
        n_clusters = max(1, int(rng.poisson(1 + target / (400 * acq.r_center**2) * 4)))
        cluster_xy = rng.uniform(0, t, (n_clusters, 2))
        count = 40 + int(8 * target / (np.pi * acq.r_center**2))  # candidates, as synth_sample's attempts
        r_lo, r_hi = style.radius
        rad = np.clip(acq.r_center * rng.lognormal(0.0, 0.18, count), 0.6 * r_lo, 1.2 * r_hi)
        aspect = rng.uniform(*style.aspect, count)
        theta = rng.uniform(0, np.pi, count)
        amp = style.roughness * rng.standard_normal((count, 4)) / np.sqrt(_K_HARM - 1)
        phase = rng.uniform(0, 2 * np.pi, (count, 4))
        in_cluster = rng.random(count) < acq.clustered
        centre = rng.uniform(0, t, (count, 2))
        near = cluster_xy[rng.integers(n_clusters, size=count)] + rng.normal(0, 1, (count, 2)) * (
            style.cluster_spread * rad[:, None])
        centre[in_cluster] = np.clip(near[in_cluster], 0, t - 1e-3)
        bright = rng.lognormal(0.0, acq.bright_sigma, count).astype(np.float32)
        dim = rng.random(count) < acq.dim_fraction
        bright[dim] *= rng.uniform(0.2, 0.4, int(dim.sum()))
        nuc = _Nuclei(centre[:, 0] + r * t, centre[:, 1] + c * t, rad * np.sqrt(aspect), rad / np.sqrt(aspect),
                      theta, amp, phase, bright, 0)
        # accept candidates in order, as synth_sample does, until the coverage is reached; a candidate mostly on
        # earlier ones is refused (on this tile's canvas; across tile edges the closer nucleus takes a pixel)
        canvas = np.full((t + 2 * self.reach,) * 2, np.inf, np.float32)
        kept, covered = [], 0.0
        for k in range(count):
            if covered >= target:
                break
            nr, (ya, yb, xa, xb) = _shape(nuc, k, r * t - self.reach, c * t - self.reach, canvas.shape)
            if nr is None:
                continue
            inside = nr <= 1.0
            n_in = int(inside.sum())
            box = canvas[ya:yb, xa:xb]
            if n_in < 12 or np.count_nonzero(inside & (box <= 1.0)) > style.max_overlap * n_in:
                continue
            win = inside & (nr < box)
            box[win] = nr[win]
            kept.append(k)
            covered += 0.9 * n_in
        idx = np.asarray(kept, np.intp)
        return _Nuclei(nuc.cy[idx], nuc.cx[idx], nuc.a[idx], nuc.b[idx], nuc.theta[idx], nuc.amp[idx], nuc.phase[idx],
                       nuc.bright[idx], (r * self.cols + c) * ID_STRIDE + 1)

    def _layout(self, r: int, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
        """Labels, normalised radius and brightness on tile (r, c)'s padded canvas, and the canvas origin."""
        t, p = self.tile_size, self.pad
        y0, x0 = r * t - p, c * t - p
        size = t + 2 * p
        labels = np.zeros((size, size), np.uint32)
        nrad = np.full((size, size), np.inf, np.float32)
        bright = np.zeros((size, size), np.float32)
        for rr in range(max(0, r - 1), min(self.rows, r + 2)):
            for cc in range(max(0, c - 1), min(self.cols, c + 2)):
                nuc = self._nuclei(rr, cc)
                near = np.flatnonzero((nuc.cy > y0 - self.reach) & (nuc.cy < y0 + size + self.reach)
                                      & (nuc.cx > x0 - self.reach) & (nuc.cx < x0 + size + self.reach))
                for k in near.tolist():
                    self._draw(nuc, k, labels, nrad, bright, y0, x0)
        # each nucleus keeps its largest 4-connected piece (as synth_sample); the canvas holds every nucleus that
        # reaches the tile whole, so the decision is the same in every tile it touches
        from scipy import ndimage

        ids, local = np.unique(labels, return_inverse=True)
        local = local.reshape(labels.shape)
        for k, sl in enumerate(ndimage.find_objects(local), start=1):
            if sl is None or ids[k] == 0:
                continue
            mine = local[sl] == k
            pieces, count = ndimage.label(mine)
            if count > 1:
                sizes = np.bincount(pieces.ravel())
                sizes[0] = 0
                mine &= pieces == sizes.argmax()
                labels[sl][(local[sl] == k) & ~mine] = 0
            if mine.sum() < 12:
                labels[sl][mine] = 0
        nrad[labels == 0] = np.inf
        bright[labels == 0] = 0.0
        return labels, nrad, bright, (y0, x0)

    def _draw(self, nuc: _Nuclei, k: int, labels, nrad, bright, y0: int, x0: int) -> None:
        """Paint nucleus ``k`` where it is relatively closer than what is there (smaller normalised radius)."""
        nr, (ya, yb, xa, xb) = _shape(nuc, k, y0, x0, labels.shape)
        if nr is None:
            return
        box = nrad[ya:yb, xa:xb]
        win = (nr <= 1.0) & (nr < box)
        labels[ya:yb, xa:xb][win] = nuc.first_id + k
        box[win] = nr[win]
        bright[ya:yb, xa:xb][win] = nuc.bright[k]

    def _illumination(self, y0: int, x0: int, size: int) -> np.ndarray:
        """The scan-wide illumination field on a canvas (smooth, mean about 1)."""
        acq = self.acquisition
        gy, gx, cy, cx, py, px = acq.illum
        h, w = self.shape
        y = (np.arange(y0, y0 + size, dtype=np.float32) / max(h - 1, 1) - 0.5)[:, None]
        x = (np.arange(x0, x0 + size, dtype=np.float32) / max(w - 1, 1) - 0.5)[None, :]
        wave = np.sin(2 * np.pi * 1.5 * y + py) * np.cos(2 * np.pi * 1.5 * x + px)
        field = 1.0 + acq.illumination * (0.6 * (gy * y + gx * x) - 1.2 * ((y - cy) ** 2 + (x - cx) ** 2) + 0.3 * wave)
        return np.clip(field, 0.2, None).astype(np.float32)

    def _signal(self, r: int, c: int) -> tuple[np.ndarray, np.ndarray]:
        """Tile (r, c)'s signal before the exposure (float32) and its labels, both the tile's size."""
        from scipy import ndimage

        acq = self.acquisition
        labels, nrad, bright, (y0, x0) = self._layout(r, c)
        rng = np.random.default_rng([self.seed, r, c, 1])
        size = labels.shape[0]
        chromatin = 1.0 + acq.chromatin * _smooth_noise(rng, labels.shape, acq.chromatin_sigma)
        signal = bright * _profile(nrad, labels, acq.floor, acq.power) * chromatin
        fg = (labels > 0).astype(np.float32)
        halo = ndimage.gaussian_filter(fg, acq.body_radius) + 0.15 * _smooth_noise(rng, labels.shape, 3.0)
        signal += acq.autofluorescence * np.clip((halo - 0.08) * 4.0, 0.0, 1.0)
        signal += acq.background
        signal *= self._illumination(y0, x0, size)
        signal = ndimage.gaussian_filter(signal, acq.blur)
        p, t = self.pad, self.tile_size
        signal = np.ascontiguousarray(signal[p : p + t, p : p + t])
        signal = rng.poisson(np.clip(signal, 0, None) * acq.photons).astype(np.float32) / acq.photons
        signal += rng.normal(0.0, acq.read_noise, signal.shape).astype(np.float32)
        return signal, np.ascontiguousarray(labels[p : p + t, p : p + t])

    def tile(self, r: int, c: int) -> tuple[np.ndarray, np.ndarray]:
        """Tile (r, c): (image uint8 HxWx3, labels uint32 with scan-wide ids, 0 = background)."""
        if not (0 <= r < self.rows and 0 <= c < self.cols):
            raise ValueError(f"tile ({r}, {c}) is outside the {self.rows} x {self.cols} scan")
        signal, labels = self._signal(r, c)
        gray = signal / np.float32(self.acquisition.exposure)
        return _to_uint8(gray[..., None] * np.asarray(self.acquisition.tint, np.float32)), labels
