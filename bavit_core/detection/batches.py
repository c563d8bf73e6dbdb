"""A batch of detector inputs and kept tokens, for images of one size or of many, and the
autocast settings a forward runs under (prune-eval's rows and timing, ``bavit detect``)."""
from __future__ import annotations

import torch

from ..data.images import to_input
from ..data.ragged import Grids


def autocast_args(device, dtype) -> dict:
    """``torch.autocast`` arguments: reduced precision on CUDA only (on CPU a bf16 detector
    is held in bf16 instead)."""
    return dict(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32 and device.type == "cuda")


def take(keep, idx):
    """The keep selections of images ``idx``: an array's rows, or a Grids' grids."""
    return keep.take(idx) if isinstance(keep, Grids) else keep[idx]


def batch_inputs(images, keep, sl: slice, proto, device, dtype):
    """A batch's detector inputs and kept tokens: one (B, 3, H, W) tensor and (B, gh, gw)
    mask, or lists of per-image ones when the images differ in size; the mask None when
    nothing is pruned."""
    x = to_input(images[sl], proto.mean, proto.std, device, proto.rescale)
    x = [xi.to(dtype) for xi in x] if isinstance(x, list) else x.to(dtype)
    if keep is None:
        return x, None
    if isinstance(keep, Grids):
        part = keep.take(range(sl.start, sl.stop))
        if bool(part.flat.all()):
            return x, None
        if isinstance(x, list):
            return x, [torch.as_tensor(g, device=device) for g in part]
        return x, torch.as_tensor(part.stacked(), device=device)
    k = torch.as_tensor(keep[sl], device=device)
    return x, (None if bool(k.all()) else k)
