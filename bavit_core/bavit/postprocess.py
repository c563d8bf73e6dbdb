"""The paper's iterative clean-up of predicted FG/BG grids (appendix).

Each step convolves the FG grid with a 3×3 neighbour kernel (centre excluded; 8 or 4
neighbours) and turns a BG token FG where the neighbour sum is > ``min_fg``. Only BG→FG
flips happen, so FG recall never drops. Vectorised over a whole (N, gh, gw) batch.
"""
from __future__ import annotations

import numpy as np

from ..runtime.errors import OptionError
from .metrics import grid_metrics

KERNELS = {
    "8": ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)),
    "4": ((-1, 0), (0, -1), (0, 1), (1, 0)),
}


def neighbour_sum(grids: np.ndarray, kernel: str = "8") -> np.ndarray:
    """Number of FG neighbours of every token; outside the grid counts as BG."""
    if kernel not in KERNELS:
        raise OptionError(f"unknown --kernel {kernel!r}; choose 8 or 4")
    g = np.asarray(grids, dtype=np.uint8)
    n, h, w = g.shape
    p = np.zeros((n, h + 2, w + 2), dtype=np.uint8)
    p[:, 1:-1, 1:-1] = g
    s = np.zeros((n, h, w), dtype=np.uint8)
    for dy, dx in KERNELS[kernel]:
        s += p[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
    return s


def refine_step(grids: np.ndarray, kernel: str = "8", min_fg: int = 2) -> np.ndarray:
    g = np.asarray(grids, dtype=bool)
    return g | (neighbour_sum(g, kernel) > min_fg)


def check_options(steps: int, kernel: str, min_fg: int) -> None:
    """Validate the clean-up options (before any file is read or written)."""
    if steps < 0:
        raise OptionError(f"--postprocess-steps must be >= 0, got {steps}")
    if kernel not in KERNELS:
        raise OptionError(f"unknown --kernel {kernel!r}; choose 8 or 4")
    if not 0 <= min_fg < len(KERNELS[kernel]):
        raise OptionError(f"--min-fg must be in [0, {len(KERNELS[kernel]) - 1}], got {min_fg}")


def refine(grids: np.ndarray, steps: int = 3, kernel: str = "8", min_fg: int = 2) -> np.ndarray:
    """Apply ``steps`` clean-up steps to (N, gh, gw) or (gh, gw) boolean grids."""
    check_options(steps, kernel, min_fg)
    g = np.asarray(grids, dtype=bool)
    single = g.ndim == 2
    if single:
        g = g[None]
    for _ in range(steps):
        g = refine_step(g, kernel, min_fg)
    return g[0] if single else g


def refine_with_history(grids, gt=None, steps=3, kernel="8", min_fg=2):
    """Refined grids and one row per step (0 = before) of sparsity and, with GT,
    accuracy, FG recall and BG kept (share of GT-BG tokens still predicted BG)."""
    check_options(steps, kernel, min_fg)
    g = np.asarray(grids, dtype=bool)
    history = []
    for step in range(steps + 1):
        if step:
            g = refine_step(g, kernel, min_fg)
        row = {"step": step, "sparsity": float(1.0 - g.mean())}
        if gt is not None:
            m = grid_metrics(g, gt)
            bg = ~np.asarray(gt, dtype=bool)
            row.update(accuracy=m["accuracy"], fg_recall=m["recall"], iou=m["iou"],
                       bg_kept=float((~g & bg).sum() / max(bg.sum(), 1)))
        history.append(row)
    return g, history
