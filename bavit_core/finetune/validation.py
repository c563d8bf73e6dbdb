"""Validation of a fine-tuning run: mAP (COCOeval) of the detector on the validation
split, sharded over processes and gathered, and the share of patch tokens it pruned."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..data.images import to_input
from ..detection.cocoeval import detections_from_outputs, evaluate_detections
from ..detection.pruned import pruned_forward
from ..runtime.distributed import Dist
from .data import FinetuneData


@torch.no_grad()
def evaluate_map(model, data: FinetuneData, gt, batch_size, device, dist: Dist, treatment: str = "drop",
                 forward: Callable | None = None) -> dict:
    """COCOeval's metrics of ``model`` on ``data`` (every process its share of the images,
    the detections gathered). The forward is the pruned one on ``data.keep``, or
    ``forward(x, idx)`` → (logits, boxes, kept tokens (B, P) or None) for a run whose tokens
    are chosen as it trains (a gate, joint BAViT); with kept tokens the result holds the
    pruned share, ``sparsity``."""
    was = model.training
    model.eval()
    dets, kept, tokens = [], 0.0, 0.0
    idx = np.arange(len(data.ids))[dist.rank::dist.world]
    for s in range(0, len(idx), batch_size):
        b = idx[s:s + batch_size]
        x = to_input(data.images[b], data.mean, data.std, device, data.rescale)
        if forward is None:
            keep = None if data.keep is None else torch.as_tensor(data.keep[b], device=device)
            out = pruned_forward(model, x, keep, treatment=treatment)
            logits, boxes, keep = out.logits, out.pred_boxes, keep
        else:
            logits, boxes, keep = forward(x, b)
        dets += detections_from_outputs(logits, boxes, data.ids[b], data.widths[b], data.heights[b])
        if keep is not None:
            kept, tokens = kept + float(keep.sum()), tokens + keep.numel()
    if dist.enabled:
        gathered = [None] * dist.world
        torch.distributed.all_gather_object(gathered, dets)
        dets = [d for part in gathered for d in part]
        kept, tokens = dist.sum([kept, tokens])
    model.train(was)
    m = evaluate_detections(gt, dets, data.ids)
    if forward is not None:
        m["sparsity"] = 1 - kept / max(tokens, 1.0)
    return m
