"""Token selection: which patch tokens the detector computes, per image, on its grid.

One piece for prune-eval and finetune. Selectors:

* ``dense``  — every token;
* ``bavit``  — BAViT's FG decision at a BG-probability threshold (a token is kept when
  1 - p_fg < threshold), optionally post-processed, resampled to the detector grid;
* ``oracle`` — the labels file's FG grid, resampled to the detector grid;
* ``random`` — per image, as many random tokens as a reference selection keeps.

Every function returns a (N, gh, gw) bool array on the detector grid.
"""
from __future__ import annotations

import numpy as np
import torch

from ..bavit.inference import fg_from_probs
from ..bavit.postprocess import refine
from ..data.grid import nearest_index, resample_grid
from ..labels import read_labels

SELECTORS = ("dense", "bavit", "oracle", "random")


def dense_keep(n: int, grid: tuple[int, int]) -> np.ndarray:
    return np.ones((n,) + tuple(grid), dtype=bool)


def bavit_keep(probs: np.ndarray, threshold: float, grid: tuple[int, int], resample: str = "nearest",
               postprocess_steps: int = 0) -> np.ndarray:
    """BAViT's FG probabilities (N, bh, bw) → kept tokens on the detector grid."""
    g = fg_from_probs(probs, threshold)
    if postprocess_steps:
        g = refine(g, postprocess_steps)
    return resample_grid(g, grid, resample)


def oracle_keep(labels_path, image_ids, grid: tuple[int, int], resample: str = "nearest") -> np.ndarray:
    """The ground-truth FG grids of ``image_ids`` (in that order) on the detector grid."""
    return resample_grid(read_labels(labels_path).grids_for(image_ids, labels_path), grid, resample)


def random_keep(reference: np.ndarray, seed) -> np.ndarray:
    """Per image, as many tokens as ``reference`` keeps, drawn uniformly at random
    (``seed``: anything ``numpy.random.default_rng`` takes)."""
    n = len(reference)
    rng = np.random.default_rng(seed)
    keep = np.zeros_like(reference, dtype=bool)
    flat = keep.reshape(n, -1)
    for i in range(n):
        k = int(reference[i].sum())
        flat[i, rng.choice(flat.shape[1], size=k, replace=False)] = True
    return keep


def resample_torch(g: torch.Tensor, shape) -> torch.Tensor:
    """resample_grid(mode="nearest") on a (B, gh, gw) tensor, staying on its device."""
    ri = torch.as_tensor(nearest_index(g.shape[-2], shape[0]), device=g.device)
    ci = torch.as_tensor(nearest_index(g.shape[-1], shape[1]), device=g.device)
    return g[:, ri][:, :, ci]
