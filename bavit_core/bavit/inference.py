"""BAViT inference on decoded images: per-token FG probabilities and the FG decision."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..data.images import to_input
from .model import BAViT


def fg_from_probs(probs: np.ndarray, threshold: float) -> np.ndarray:
    """A token is BG (pruned) when its BG probability 1 - p_fg is >= threshold."""
    return (1.0 - np.asarray(probs, dtype=np.float64)) < threshold


@torch.no_grad()
def infer_probs(model: BAViT, images_u8: np.ndarray, batch_size: int = 32, device=None,
                progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """FG probabilities (N, gh, gw) float32 for resized uint8 images (N, h, w, 3)."""
    device = device or next(model.parameters()).device
    model.eval()
    out = []
    for s in range(0, len(images_u8), batch_size):
        x = to_input(images_u8[s:s + batch_size], model.cfg.mean, model.cfg.std, device)
        out.append(model.fg_prob(x).cpu().numpy().astype(np.float32))
        if progress:
            progress(len(x), len(images_u8))
    gh, gw = model.cfg.grid_shape
    return np.concatenate(out) if out else np.zeros((0, gh, gw), np.float32)
