"""Token-level FG/BG metrics from confusion counts (so they reduce across processes)."""
from __future__ import annotations

import numpy as np

COUNT_KEYS = ("tp", "fp", "fn", "tn")


def confusion(pred: np.ndarray, gt: np.ndarray) -> dict[str, int]:
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    return {
        "tp": int((pred & gt).sum()),
        "fp": int((pred & ~gt).sum()),
        "fn": int((~pred & gt).sum()),
        "tn": int((~pred & ~gt).sum()),
    }


def token_metrics(tp: float, fp: float, fn: float, tn: float) -> dict[str, float]:
    """accuracy, FG precision/recall/F1, FG IoU, and fg_missed = share of FG tokens predicted BG."""
    n = tp + fp + fn + tn

    def div(a, b):
        return float(a / b) if b else 0.0

    prec, rec = div(tp, tp + fp), div(tp, tp + fn)
    return {
        "accuracy": div(tp + tn, n),
        "precision": prec,
        "recall": rec,
        "f1": div(2 * prec * rec, prec + rec),
        "iou": div(tp, tp + fp + fn),
        "fg_missed": div(fn, tp + fn),
        "sparsity": div(fn + tn, n),
    }


def grid_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    return token_metrics(**confusion(pred, gt))
