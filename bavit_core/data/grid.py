"""Patch-grid geometry: which pixels and which box areas fall in which token.

The grid of a ``input_h x input_w`` ViT input with ``patch`` px patches is laid over the
*original* image: token (i, j) covers the rectangle
``[j*W/gw, (j+1)*W/gw) x [i*H/gh, (i+1)*H/gh)`` in original pixel coordinates, which is
what a stretch-resize to the input size followed by patchifying sees.

* Box overlaps are computed analytically (areas of rectangle intersections), exactly.
* Mask fractions are pixel counts: pixel (x, y) (the unit square with centre
  (x+0.5, y+0.5)) belongs to the token that contains its centre, so every pixel belongs
  to exactly one token and the counts of a token are integers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..runtime.errors import OptionError

CRITERIA = ("coverage", "jaccard")


@dataclass(frozen=True)
class GridSpec:
    """ViT input size and patch size, hence the token grid shape."""

    input_h: int = 384
    input_w: int = 384
    patch: int = 16

    def __post_init__(self):
        if self.patch <= 0 or self.input_h <= 0 or self.input_w <= 0:
            raise OptionError("input size and patch size must be positive")
        if self.input_h % self.patch or self.input_w % self.patch:
            raise OptionError(
                f"input size {self.input_h}x{self.input_w} is not divisible by patch size {self.patch}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return (self.input_h // self.patch, self.input_w // self.patch)

    @property
    def n_tokens(self) -> int:
        gh, gw = self.shape
        return gh * gw

    def as_dict(self) -> dict:
        return {"input_h": self.input_h, "input_w": self.input_w, "patch": self.patch}


def parse_size(text: str | int) -> tuple[int, int]:
    """Parse ``"384"`` or ``"384x512"`` (height x width) into (h, w)."""
    if isinstance(text, int):
        text = str(text)
    s = str(text).lower().strip()
    try:
        if "x" in s:
            h, w = s.split("x", 1)
            hw = (int(h), int(w))
        else:
            v = int(s)
            hw = (v, v)
    except ValueError:
        raise OptionError(f"cannot read size {text!r}: use N or HxW, e.g. 384 or 384x512") from None
    if not all(0 < v <= 16384 for v in hw):
        raise OptionError(f"size {text!r} must be positive and at most 16384 pixels per side")
    return hw


# --------------------------------------------------------------------------- boxes
def _axis_overlap(lo: np.ndarray, hi: np.ndarray, n: int) -> np.ndarray:
    """Overlap length of intervals [lo, hi] (in cell units) with cells [j, j+1), j < n.

    lo, hi: (K,) arrays. Returns (K, n).
    """
    edges = np.arange(n, dtype=np.float64)
    ov = np.minimum(hi[:, None], edges[None, :] + 1.0) - np.maximum(lo[:, None], edges[None, :])
    np.maximum(ov, 0.0, out=ov)
    return ov


def box_cell_scores(
    boxes: np.ndarray,
    img_w: np.ndarray,
    img_h: np.ndarray,
    grid_shape: tuple[int, int],
    criterion: str = "coverage",
) -> np.ndarray:
    """Per-box, per-cell overlap scores.

    boxes: (K, 4) x0, y0, x1, y1 in original pixels (already clamped to the image);
    img_w, img_h: (K,) size of each box's image. Returns (K, gh, gw) float64:
    ``coverage`` = |P∩B| / |P|, ``jaccard`` = |P∩B| / |P∪B|.
    Work is done in cell units (a cell has area 1), where both ratios are unchanged.
    """
    if criterion not in CRITERIA:
        raise OptionError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    gh, gw = grid_shape
    boxes = np.asarray(boxes, dtype=np.float64)
    sx = gw / np.asarray(img_w, dtype=np.float64)
    sy = gh / np.asarray(img_h, dtype=np.float64)
    u0, u1 = boxes[:, 0] * sx, boxes[:, 2] * sx
    v0, v1 = boxes[:, 1] * sy, boxes[:, 3] * sy
    ox = _axis_overlap(u0, u1, gw)
    oy = _axis_overlap(v0, v1, gh)
    inter = oy[:, :, None] * ox[:, None, :]
    if criterion == "coverage":
        return inter
    area = ((u1 - u0) * (v1 - v0))[:, None, None]
    return inter / (1.0 + area - inter)


def image_box_scores(
    boxes: np.ndarray,
    box_image: np.ndarray,
    img_w: np.ndarray,
    img_h: np.ndarray,
    grid_shape: tuple[int, int],
    criterion: str = "coverage",
    chunk: int = 16384,
) -> np.ndarray:
    """Max over each image's boxes of :func:`box_cell_scores`.

    boxes: (K, 4); box_image: (K,) index of the image each box belongs to, in [0, N);
    img_w, img_h: (N,) image sizes. Returns (N, gh, gw) float64 (0 where an image has no box).
    """
    n = len(img_w)
    gh, gw = grid_shape
    out = np.zeros((n, gh, gw), dtype=np.float64)
    if len(boxes) == 0:
        return out
    order = np.argsort(box_image, kind="stable")
    boxes = np.asarray(boxes, dtype=np.float64)[order]
    box_image = np.asarray(box_image)[order]
    img_w = np.asarray(img_w, dtype=np.float64)
    img_h = np.asarray(img_h, dtype=np.float64)
    k = len(boxes)
    start = 0
    while start < k:
        stop = min(start + chunk, k)
        # keep an image's boxes in one chunk so reduceat sees all of them
        if stop < k:
            last = box_image[stop - 1]
            while stop < k and box_image[stop] == last:
                stop += 1
        idx = box_image[start:stop]
        s = box_cell_scores(boxes[start:stop], img_w[idx], img_h[idx], grid_shape, criterion)
        seg = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1]])
        out[idx[seg]] = np.maximum.reduceat(s, seg, axis=0)
        start = stop
    return out


# --------------------------------------------------------------------------- pixels
def cell_starts(size: int, cells: int) -> np.ndarray:
    """First pixel index of each of ``cells`` cells along an axis of ``size`` pixels.

    Pixel p belongs to cell floor((2p + 1) * cells / (2 * size)) (its centre's cell).
    Requires size >= cells, which guarantees every cell holds at least one pixel.
    """
    if size < cells:
        raise OptionError(f"an axis of {size} px cannot hold {cells} cells")
    p = np.arange(size, dtype=np.int64)
    cell = ((2 * p + 1) * cells) // (2 * size)
    return np.searchsorted(cell, np.arange(cells, dtype=np.int64), side="left")


def cell_pixel_counts(mask: np.ndarray, grid_shape: tuple[int, int]) -> np.ndarray:
    """Number of true pixels of ``mask`` (H, W) in each grid cell → (gh, gw) int64."""
    gh, gw = grid_shape
    h, w = mask.shape[:2]
    rs = cell_starts(h, gh)
    cs = cell_starts(w, gw)
    m = mask if mask.dtype == np.uint8 else mask.astype(np.uint8)
    rows = np.add.reduceat(m, rs, axis=0, dtype=np.int64)
    return np.add.reduceat(rows, cs, axis=1)


def cell_sizes(h: int, w: int, grid_shape: tuple[int, int]) -> np.ndarray:
    """Number of pixels in each cell of an (h, w) image → (gh, gw) int64."""
    gh, gw = grid_shape
    rh = np.diff(np.r_[cell_starts(h, gh), h])
    cw = np.diff(np.r_[cell_starts(w, gw), w])
    return rh[:, None] * cw[None, :]


# --------------------------------------------------------------------------- resampling
def nearest_index(src: int, dst: int) -> np.ndarray:
    """For each of ``dst`` target cells along an axis, the source cell (of ``src``) that
    contains its centre."""
    return ((2 * np.arange(dst) + 1) * src) // (2 * dst)


def nearest_flat_index(src: tuple[int, int], dst: tuple[int, int]) -> np.ndarray:
    """``resample_grid(mode="nearest")`` as one gather: for each of the dst grid's cells in
    row-major order, the row-major index of its source cell (device-side resampling)."""
    ri, ci = nearest_index(src[0], dst[0]), nearest_index(src[1], dst[1])
    return (ri[:, None] * src[1] + ci[None, :]).reshape(-1)


def resample_grid(grid: np.ndarray, shape: tuple[int, int], mode: str = "nearest") -> np.ndarray:
    """Resample (..., gh, gw) grids to (..., H, W) keeping relative positions.

    ``nearest``: each target cell takes the source cell containing its centre.
    ``any``: a target cell is true when any source cell it overlaps is true (boolean grids;
    conservative for pruning: never drops a token that touches FG); for score grids, the
    highest score it overlaps.
    """
    gh, gw = grid.shape[-2:]
    th, tw = shape
    if (gh, gw) == (th, tw):
        return grid.copy()
    if mode == "nearest":
        ri, ci = nearest_index(gh, th), nearest_index(gw, tw)
        return grid[..., ri[:, None], ci[None, :]]
    if mode == "any":
        out = np.zeros(grid.shape[:-2] + (th, tw), dtype=grid.dtype)
        for ti in range(th):
            r0 = (ti * gh) // th
            r1 = -((-(ti + 1) * gh) // th)
            for tj in range(tw):
                c0 = (tj * gw) // tw
                c1 = -((-(tj + 1) * gw) // tw)
                out[..., ti, tj] = grid[..., r0:r1, c0:c1].max(axis=(-1, -2))
        return out
    raise OptionError(f"unknown resampling mode {mode!r}; choose nearest or any")
