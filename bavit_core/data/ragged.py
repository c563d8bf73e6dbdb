"""Per-image token grids of different shapes, held as one flat array.

Under the detector checkpoint's own input protocol (shortest edge S, longest ≤ L, aspect
kept) every image has its own detector grid: a 640×480 photo is 32×42 tokens at S = 512,
a 480×640 one 42×32. A :class:`Grids` holds one 2-D grid per image (kept tokens, FG
probabilities, priorities) in a single flat array with the images' shapes beside it, so
whole-set operations (a global threshold over every token, per-image sums) stay
vectorised, and a single-shape set (the square protocol) is just a reshaped
(N, gh, gw) array (:meth:`Grids.stacked`).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


class Grids:
    """N grids, grid ``i`` of shape ``shapes[i]`` (gh, gw), stored row-major one after the
    other in ``flat``."""

    __slots__ = ("flat", "shapes", "offsets")

    def __init__(self, flat: np.ndarray, shapes):
        self.flat = np.asarray(flat).reshape(-1)
        self.shapes = np.asarray(shapes, dtype=np.int64).reshape(-1, 2)
        sizes = self.shapes[:, 0] * self.shapes[:, 1]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        if self.offsets[-1] != self.flat.size:
            raise ValueError(f"{self.flat.size} values for grids holding {self.offsets[-1]}")

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def of(cls, grids) -> "Grids":
        """From a Grids (returned as is), an (N, gh, gw) array, or a list of 2-D arrays."""
        if isinstance(grids, Grids):
            return grids
        if isinstance(grids, np.ndarray) and grids.ndim == 3:
            n, gh, gw = grids.shape
            return cls(grids.reshape(-1), np.tile([gh, gw], (n, 1)))
        grids = [np.asarray(g) for g in grids]
        if not grids:
            return cls(np.zeros(0, dtype=bool), np.zeros((0, 2)))
        return cls(np.concatenate([g.reshape(-1) for g in grids]), [g.shape for g in grids])

    @classmethod
    def full(cls, shapes, value, dtype=bool) -> "Grids":
        shapes = np.asarray(shapes, dtype=np.int64).reshape(-1, 2)
        return cls(np.full(int((shapes[:, 0] * shapes[:, 1]).sum()), value, dtype=dtype), shapes)

    def like(self, flat: np.ndarray) -> "Grids":
        """Grids of the same shapes holding ``flat``."""
        return Grids(flat, self.shapes)

    # ---- access -----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i: int) -> np.ndarray:
        gh, gw = self.shapes[i]
        return self.flat[self.offsets[i]:self.offsets[i + 1]].reshape(gh, gw)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def sizes(self) -> np.ndarray:
        """Tokens per image, (N,)."""
        return self.shapes[:, 0] * self.shapes[:, 1]

    @property
    def uniform(self) -> bool:
        return len(self) == 0 or bool((self.shapes == self.shapes[0]).all())

    def stacked(self) -> np.ndarray:
        """(N, gh, gw) when every grid has one shape (a view of ``flat``)."""
        if not self.uniform:
            raise ValueError("grids of different shapes cannot be stacked")
        gh, gw = self.shapes[0] if len(self) else (0, 0)
        return self.flat.reshape(len(self), gh, gw)

    def sums(self) -> np.ndarray:
        """Per-image sum (kept tokens of a boolean grid), (N,) int64 or float64."""
        if not len(self):
            return np.zeros(0)
        acc = np.int64 if self.flat.dtype == bool or np.issubdtype(self.flat.dtype, np.integer) else np.float64
        c = np.concatenate([[0], np.cumsum(self.flat, dtype=acc)])
        return c[self.offsets[1:]] - c[self.offsets[:-1]]

    def means(self) -> np.ndarray:
        return self.sums() / np.maximum(self.sizes, 1)

    def take(self, idx: Iterable[int]) -> "Grids":
        """The grids of images ``idx`` (in that order)."""
        idx = [int(i) for i in idx]
        if not idx:
            return Grids(self.flat[:0], np.zeros((0, 2)))
        return Grids(np.concatenate([self.flat[self.offsets[i]:self.offsets[i + 1]] for i in idx]),
                     self.shapes[idx])

    def image_of_token(self) -> np.ndarray:
        """For every entry of ``flat``, the image it belongs to."""
        return np.repeat(np.arange(len(self)), self.sizes)


def group_by_shape(shapes: Sequence) -> dict[tuple[int, int], np.ndarray]:
    """Image indices per distinct shape, in first-seen order."""
    shapes = np.asarray(shapes, dtype=np.int64).reshape(-1, 2)
    out: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(map(tuple, shapes.tolist())):
        out.setdefault(s, []).append(i)
    return {k: np.asarray(v) for k, v in out.items()}


def resample_to(grids: np.ndarray, shapes, resample) -> Grids:
    """(N, gh, gw) grids (one shape: BAViT's or the labels' grid) resampled image by image to
    each image's detector grid ``shapes[i]`` with ``resample(grids, shape)`` (grouped by
    shape, so a single-shape set costs one call)."""
    grids = np.asarray(grids)
    shapes = np.asarray(shapes, dtype=np.int64).reshape(-1, 2)
    if len(grids) != len(shapes):
        raise ValueError(f"{len(grids)} grids for {len(shapes)} images")
    groups = group_by_shape(shapes)
    if len(groups) == 1:
        (shape, _), = groups.items()
        return Grids.of(resample(grids, shape))
    parts: list = [None] * len(grids)
    for shape, idx in groups.items():
        res = resample(grids[idx], shape)
        for k, i in enumerate(idx):
            parts[i] = res[k]
    return Grids.of(parts)
