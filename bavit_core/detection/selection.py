"""Token selection: which patch tokens the detector computes, per image, on its grid.

One piece for prune-eval, finetune and export. Selectors:

* ``dense``  — every token;
* ``bavit``  — BAViT's FG decision at a BG-probability threshold (a token is kept when
  1 - p_fg < threshold), optionally post-processed, resampled to the detector grid; or
  BAViT's FG probabilities ranked to reach a target sparsity (:func:`select_target`);
* ``oracle`` — the labels file's FG grid, resampled to the detector grid; for a target
  sparsity its tokens ranked by the ground-truth score, then by closeness to FG;
* ``random`` — per image, as many random tokens as a reference selection keeps.

Operating points at a target mean sparsity ``s`` (on the detector grid, P tokens/image):

* ``threshold`` policy (dynamic, the paper's): one global priority threshold over all the
  evaluated images' tokens, placed so the mean sparsity is ``s``; images differ. Ties at
  the threshold (saturated probabilities) are broken by a fixed pseudo-random order, so
  the reached mean is within one token of ``s`` over the whole set.
* ``topk`` policy (fixed rate): every image keeps its ceil((1 - s)·P) highest-priority
  tokens (ties: the lower row-major index, as the exported pipeline's TopK).

Every function returns a (N, gh, gw) bool array on the detector grid.
"""
from __future__ import annotations

import math

import numpy as np

from ..bavit.inference import fg_from_probs
from ..bavit.postprocess import refine
from ..data.grid import resample_grid
from ..labels import read_labels
from ..runtime.errors import OptionError

SELECTORS = ("dense", "bavit", "oracle", "random")
POLICIES = ("threshold", "topk")


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


# --------------------------------------------------------------------------- target sparsities
def bavit_priority(probs: np.ndarray, grid: tuple[int, int], resample: str = "nearest") -> np.ndarray:
    """BAViT's FG probability of each detector token: the higher, the earlier it is kept."""
    return resample_grid(np.asarray(probs, dtype=np.float64), grid, resample)


def oracle_priority(labels_path, image_ids, grid: tuple[int, int], resample: str = "nearest") -> np.ndarray:
    """A ranking of each detector token by the ground truth: FG tokens first, then by the
    label score (box coverage / mask fraction), then zero-score tokens by closeness
    (Chebyshev distance in tokens) to the nearest FG token. Keeping exactly the FG tokens is
    today's oracle (:func:`oracle_keep`)."""
    lab = read_labels(labels_path)
    fg = lab.grids_for(image_ids, labels_path)
    pos = {int(i): k for k, i in enumerate(lab.image_ids)}
    scores = np.asarray(lab.scores, dtype=np.float64)[[pos[int(i)] for i in image_ids]]
    fg_d = resample_grid(fg, grid, resample)
    sc_d = resample_grid(scores, grid, resample)
    dist = fg_distance(fg_d)
    # FG: 2 + score (in [2, 3]); BG with a score: the score (in [0, 1]); score 0: -distance
    return np.where(fg_d, 2.0 + sc_d, np.where(sc_d > 0, sc_d, -dist / (sum(grid) + 1.0)))


def fg_distance(fg: np.ndarray) -> np.ndarray:
    """Per token, the Chebyshev distance (in tokens) to the nearest FG token of its image;
    images without FG get the grid's size."""
    n, gh, gw = fg.shape
    ys, xs = np.mgrid[0:gh, 0:gw]
    out = np.full(fg.shape, float(gh + gw))
    for i in range(n):
        fy, fx = np.nonzero(fg[i])
        if len(fy):
            d = np.maximum(np.abs(ys[..., None] - fy), np.abs(xs[..., None] - fx)).min(axis=-1)
            out[i] = d
    return out


def kept_per_image(target: float, n_tokens: int) -> int:
    """topk: tokens each image keeps at target sparsity ``target`` (at least one)."""
    return max(1, min(n_tokens, math.ceil((1.0 - target) * n_tokens - 1e-9)))


def topk_keep(priority: np.ndarray, k: int) -> np.ndarray:
    """Every image keeps its ``k`` highest-``priority`` tokens; ties go to the lower
    row-major index, as ONNX's TopK does, so the exported pipeline keeps the same tokens."""
    n = len(priority)
    flat = priority.reshape(n, -1)
    keep = np.zeros(flat.shape, dtype=bool)
    np.put_along_axis(keep, np.argsort(-flat, axis=1, kind="stable")[:, :k], True, axis=1)
    return keep.reshape(priority.shape)


def _tiebreak(shape, seed) -> np.ndarray:
    return np.random.default_rng(seed).random(shape)


def select_target(priority: np.ndarray, target: float, policy: str = "threshold", seed=0) -> tuple[np.ndarray, float]:
    """Keep the highest-``priority`` tokens so that the mean sparsity is ``target``.

    Returns (keep (N, gh, gw) bool, the priority threshold: the lowest kept priority for
    ``threshold``, NaN for ``topk``). ``threshold`` breaks ties by a fixed pseudo-random
    order (``seed``); ``topk`` as :func:`topk_keep`."""
    if policy not in POLICIES:
        raise OptionError(f"unknown policy {policy!r}; choose {' or '.join(POLICIES)}")
    if not 0.0 <= target < 1.0:
        raise OptionError(f"target sparsity must lie in [0, 1); got {target}")
    n = len(priority)
    flat = priority.reshape(n, -1)
    p = flat.shape[1]
    keep = np.zeros(flat.shape, dtype=bool)
    if n == 0:
        return keep.reshape(priority.shape), float("nan")
    if policy == "topk":
        return topk_keep(priority, kept_per_image(target, p)), float("nan")
    tie = _tiebreak(flat.shape, seed)
    total = int(round((1.0 - target) * n * p))
    total = max(total, n)  # at least one token per image overall
    order = np.lexsort((-tie.ravel(), -flat.ravel()))[:total]
    keep.ravel()[order] = True
    return keep.reshape(priority.shape), float(flat.ravel()[order[-1]])


def sparsity_stats(keep: np.ndarray) -> dict[str, float]:
    """Mean sparsity and its per-image spread (p10 / p90) of a (N, gh, gw) keep array."""
    n = len(keep)
    s = 1.0 - keep.reshape(n, -1).mean(axis=1) if n else np.zeros(0)
    if not n:
        return {"sparsity": float("nan"), "sparsity_p10": float("nan"), "sparsity_p90": float("nan")}
    return {"sparsity": float(s.mean()), "sparsity_p10": float(np.percentile(s, 10)),
            "sparsity_p90": float(np.percentile(s, 90))}
