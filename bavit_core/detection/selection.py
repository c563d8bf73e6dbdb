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

Every function returns a (N, gh, gw) array on the detector grid when given one grid
shape (gh, gw) for all images (the square protocol), or a :class:`~bavit_core.data.ragged.Grids`
when given one shape per image ((N, 2), the checkpoint's protocol: each image on its own
grid); the functions that take selections return the kind they are given.
"""
from __future__ import annotations

import math

import numpy as np

from ..bavit.inference import fg_from_probs
from ..bavit.postprocess import refine
from ..data.grid import resample_grid
from ..data.ragged import Grids, resample_to
from ..labels import read_labels
from ..runtime.errors import OptionError

POLICIES = ("threshold", "topk")


def _per_image(grid) -> bool:
    """Whether ``grid`` is one shape per image ((N, 2)) rather than one (gh, gw) for all."""
    return np.ndim(grid) == 2


def _resample(grids: np.ndarray, grid, resample: str):
    if _per_image(grid):
        return resample_to(grids, grid, lambda g, shape: resample_grid(g, tuple(int(v) for v in shape), resample))
    return resample_grid(grids, tuple(grid), resample)


def _like(out: Grids, given):
    """``out`` as the kind of ``given``: an (N, gh, gw) array for an array, else Grids."""
    return out if isinstance(given, Grids) else out.flat.reshape(np.shape(given))


def dense_keep(n: int, grid) -> np.ndarray | Grids:
    if _per_image(grid):
        return Grids.full(grid, True)
    return np.ones((n,) + tuple(grid), dtype=bool)


def bavit_keep(probs: np.ndarray, threshold: float, grid, resample: str = "nearest",
               postprocess_steps: int = 0):
    """BAViT's FG probabilities (N, bh, bw) → kept tokens on the detector grid(s)."""
    g = fg_from_probs(probs, threshold)
    if postprocess_steps:
        g = refine(g, postprocess_steps)
    return _resample(g, grid, resample)


def oracle_keep(labels_path, image_ids, grid, resample: str = "nearest"):
    """The ground-truth FG grids of ``image_ids`` (in that order) on the detector grid(s)."""
    return _resample(read_labels(labels_path).grids_for(image_ids, labels_path), grid, resample)


def random_keep(reference, seed):
    """Per image, as many tokens as ``reference`` keeps, drawn uniformly at random
    (``seed``: anything ``numpy.random.default_rng`` takes)."""
    ref = Grids.of(reference)
    rng = np.random.default_rng(seed)
    flat = np.zeros(ref.flat.shape, dtype=bool)
    counts = ref.sums()
    for i in range(len(ref)):
        o = ref.offsets[i]
        flat[o + rng.choice(int(ref.sizes[i]), size=int(counts[i]), replace=False)] = True
    return _like(ref.like(flat), reference)


# --------------------------------------------------------------------------- target sparsities
def bavit_priority(probs: np.ndarray, grid, resample: str = "nearest"):
    """BAViT's FG probability of each detector token: the higher, the earlier it is kept."""
    return _resample(np.asarray(probs, dtype=np.float64), grid, resample)


def oracle_priority(labels_path, image_ids, grid, resample: str = "nearest"):
    """A ranking of each detector token by the ground truth: FG tokens first, then by the
    label score (box coverage / mask fraction), then zero-score tokens by closeness
    (Chebyshev distance in tokens) to the nearest FG token. Keeping exactly the FG tokens is
    today's oracle (:func:`oracle_keep`)."""
    lab = read_labels(labels_path)
    fg = lab.grids_for(image_ids, labels_path)
    pos = {int(i): k for k, i in enumerate(lab.image_ids)}
    scores = np.asarray(lab.scores, dtype=np.float64)[[pos[int(i)] for i in image_ids]]
    fg_d = Grids.of(_resample(fg, grid, resample))
    sc_d = Grids.of(_resample(scores, grid, resample))
    out = []
    for f, sc in zip(fg_d, sc_d):
        dist = fg_distance(f[None])[0]
        # FG: 2 + score (in [2, 3]); BG with a score: the score (in [0, 1]); score 0: -distance
        out.append(np.where(f, 2.0 + sc, np.where(sc > 0, sc, -dist / (sum(f.shape) + 1.0))))
    res = Grids.of(out) if out else Grids.of(np.zeros((0, 1, 1)))
    return res if _per_image(grid) else res.flat.reshape((len(fg),) + tuple(grid))


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


def topk_keep(priority, k):
    """Every image keeps its ``k`` highest-``priority`` tokens (``k`` one count, or one per
    image); ties go to the lower row-major index, as ONNX's TopK does, so the exported
    pipeline keeps the same tokens."""
    if not isinstance(priority, Grids):
        n = len(priority)
        flat = priority.reshape(n, -1)
        keep = np.zeros(flat.shape, dtype=bool)
        if np.ndim(k) == 0:
            np.put_along_axis(keep, np.argsort(-flat, axis=1, kind="stable")[:, :k], True, axis=1)
        else:
            for i in range(n):
                keep[i, np.argsort(-flat[i], kind="stable")[:int(k[i])]] = True
        return keep.reshape(priority.shape)
    ks = np.broadcast_to(np.asarray(k), (len(priority),))
    flat = np.zeros(priority.flat.shape, dtype=bool)
    for i, g in enumerate(priority):
        flat[priority.offsets[i] + np.argsort(-g.reshape(-1), kind="stable")[:int(ks[i])]] = True
    return priority.like(flat)


def _tiebreak(size, seed) -> np.ndarray:
    return np.random.default_rng(seed).random(size)


def select_target(priority, target: float, policy: str = "threshold", seed=0):
    """Keep the highest-``priority`` tokens so that the mean sparsity is ``target``.

    Returns (keep, the priority threshold: the lowest kept priority for ``threshold``, NaN
    for ``topk``); keep is of ``priority``'s kind ((N, gh, gw) array or Grids).
    ``threshold`` ranks every token of every image together (ties broken by a fixed
    pseudo-random order, ``seed``), keeping round((1 − target) · all tokens) of them, so the
    mean sparsity over tokens — over images too when every image has the same grid — is
    ``target``; ``topk`` as :func:`topk_keep` with each image's own count."""
    if policy not in POLICIES:
        raise OptionError(f"unknown policy {policy!r}; choose {' or '.join(POLICIES)}")
    if not 0.0 <= target < 1.0:
        raise OptionError(f"target sparsity must lie in [0, 1); got {target}")
    pr = Grids.of(priority)
    n = len(pr)
    keep = np.zeros(pr.flat.shape, dtype=bool)
    if n == 0:
        return _like(pr.like(keep), priority), float("nan")
    if policy == "topk":
        ks = np.array([kept_per_image(target, int(p)) for p in pr.sizes])
        k = ks if not pr.uniform else int(ks[0])
        out = topk_keep(pr if isinstance(priority, Grids) else priority, k)
        return out, float("nan")
    tie = _tiebreak(pr.flat.size, seed)
    total = int(round((1.0 - target) * pr.flat.size))
    total = max(total, n)  # at least one token per image overall
    order = np.lexsort((-tie, -pr.flat))[:total]
    keep[order] = True
    return _like(pr.like(keep), priority), float(pr.flat[order[-1]])


def sparsity_stats(keep) -> dict[str, float]:
    """Mean sparsity and its per-image spread (p10 / p90) of a keep selection ((N, gh, gw)
    array or Grids): the mean of the images' own sparsities."""
    g = Grids.of(keep)
    n = len(g)
    if not n:
        return {"sparsity": float("nan"), "sparsity_p10": float("nan"), "sparsity_p90": float("nan")}
    s = 1.0 - g.means()
    return {"sparsity": float(s.mean()), "sparsity_p10": float(np.percentile(s, 10)),
            "sparsity_p90": float(np.percentile(s, 90))}
