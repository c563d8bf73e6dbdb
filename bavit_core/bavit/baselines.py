"""Label-free reference predictors for token FG/BG classification.

* majority: every token gets the class most frequent among the training tokens.
* centre prior: a token is FG where it was FG in more than half of the training images
  at that grid position (a learned spatial prior that ignores the image).
"""
from __future__ import annotations

import numpy as np

from .metrics import grid_metrics


def majority_grids(train_grids: np.ndarray, n: int) -> np.ndarray:
    fg = train_grids.mean() > 0.5
    return np.full((n,) + train_grids.shape[1:], fg, dtype=bool)


def centre_prior_grids(train_grids: np.ndarray, n: int) -> np.ndarray:
    prior = train_grids.mean(axis=0) > 0.5
    return np.broadcast_to(prior, (n,) + prior.shape).copy()


def baseline_metrics(train_grids: np.ndarray, val_grids: np.ndarray) -> dict[str, dict]:
    n = len(val_grids)
    return {
        "majority": grid_metrics(majority_grids(train_grids, n), val_grids),
        "centre prior": grid_metrics(centre_prior_grids(train_grids, n), val_grids),
    }
