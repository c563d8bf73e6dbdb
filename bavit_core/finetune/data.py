"""Fine-tuning data: decoded images, box targets in the detector's label space, the kept
tokens of every image (through the shared token selection), and batches with flips."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..bavit.inference import infer_probs
from ..bavit.model import load_bavit
from ..data import AnnotationSet
from ..data.grid import resample_grid
from ..data.images import decode_for_detector, to_input
from ..detection.cocoeval import voc_category_map
from ..detection.selection import bavit_keep
from ..labels import read_labels
from .options import FinetuneOptions


@dataclass
class FinetuneData:
    images: np.ndarray  # (N, h, w, 3) uint8 at the detector size
    targets: list  # per image: (labels (n,), boxes (n, 4) normalised cx, cy, w, h)
    keep: np.ndarray | None  # (N, gh, gw) bool or None
    ids: np.ndarray
    widths: np.ndarray
    heights: np.ndarray
    mean: tuple  # the input protocol's normalisation
    std: tuple
    rescale: float
    bavit_images: np.ndarray | None = None  # (N, bh, bw, 3) uint8 at BAViT's size (joint training)
    token_labels: np.ndarray | None = None  # (N, bh, bw) FG/BG on BAViT's grid (joint training's token loss)


def label_map_for(aset: AnnotationSet, model_cfg=None) -> dict[int, int]:
    """Dataset category id → detector label id. COCO: identical ids. VOC: by class name."""
    if aset.kind == "coco":
        return {c: c for c in set(aset.box_category.tolist()) | set(aset.categories)}
    if model_cfg is not None:
        return voc_category_map(aset, model_cfg.id2label)
    names = sorted(set(aset.categories.values()))
    return {cid: names.index(n) + 1 for cid, n in aset.categories.items()}


def prepare(aset: AnnotationSet, idx: np.ndarray, proto, label_map, keep_sel, paths,
            keep_bavit_images: bool = False) -> FinetuneData:
    """Decode each image once: the detector's pixels through the input protocol (its
    processor's resize at the square size), box targets, and the kept-token grid (the
    BAViT selector gets BAViT-size copies from the same decode)."""
    keep_fn, keep_size = keep_sel if keep_sel else (None, None)
    stores = decode_for_detector([paths[i] for i in idx], proto.prepare, proto.size,
                                 [keep_size] if keep_size else [])
    imgs, small = stores[0], (stores[1] if keep_size else None)
    targets = []
    use = ~aset.box_crowd & ~aset.box_difficult
    for i in idx:
        sel = np.flatnonzero((aset.box_image == i) & use)
        b = aset.boxes[sel]
        w, h = float(aset.widths[i]), float(aset.heights[i])
        cxcywh = np.stack([(b[:, 0] + b[:, 2]) / 2 / w, (b[:, 1] + b[:, 3]) / 2 / h,
                           (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h], axis=1) if len(b) else np.zeros((0, 4))
        labels = np.array([label_map.get(int(c), -1) for c in aset.box_category[sel]], dtype=np.int64)
        ok = labels >= 0
        targets.append((labels[ok], cxcywh[ok].astype(np.float32)))
    keep = keep_fn(idx, small) if keep_fn else None
    return FinetuneData(imgs, targets, keep, aset.image_ids[idx], aset.widths[idx], aset.heights[idx],
                        proto.mean, proto.std, proto.rescale, small if keep_bavit_images else None)


def token_labels_for(labels_path, image_ids, grid_shape) -> np.ndarray:
    """The labels file's FG grids of ``image_ids`` (in that order), which must be on BAViT's
    grid ``grid_shape`` (joint training's token loss compares them token by token)."""
    from ..runtime.errors import InputFileError

    grids = read_labels(labels_path).grids_for(image_ids, labels_path)
    if tuple(grids.shape[1:]) != tuple(grid_shape):
        raise InputFileError(labels_path, f"labels on a {grids.shape[1]}x{grids.shape[2]} grid; the BAViT run's "
                                          f"token loss needs its own {grid_shape[0]}x{grid_shape[1]} grid "
                                          "(label the images with bavit label at its input size)")
    return grids.astype(np.int64)


def keep_selector(opts: FinetuneOptions, aset, grid, device, labels_path):
    """(function(idx, bavit_inputs) → kept grids, BAViT input size or None), or None for dense;
    for joint training (None, BAViT's input size): no fixed selection, only BAViT's inputs."""
    if opts.selector == "none":
        return None
    if opts.selector == "oracle":
        lab = read_labels(labels_path)

        def oracle(idx, _inputs):
            return resample_grid(lab.grids_for(aset.image_ids[idx], labels_path), grid, opts.resample)

        return oracle, None
    bavit = load_bavit(opts.model, device=device)
    if opts.joint:  # BAViT's decisions change as it trains: only its inputs are kept (FinetuneData.bavit_images)
        return None, (bavit.cfg.input_h, bavit.cfg.input_w)

    def from_bavit(idx, inputs):
        return bavit_keep(infer_probs(bavit, inputs, 32, device), opts.threshold, grid, opts.resample)

    return from_bavit, (bavit.cfg.input_h, bavit.cfg.input_w)


def make_batch(data: FinetuneData, b, flips, device):
    x = to_input(data.images[b], data.mean, data.std, device, data.rescale)
    keep = None if data.keep is None else torch.as_tensor(data.keep[b], device=device)
    targets = []
    for k, i in enumerate(b):
        labels, boxes = data.targets[i]
        boxes = torch.as_tensor(boxes, device=device)
        if flips is not None and flips[i]:
            boxes = boxes.clone()
            boxes[:, 0] = 1.0 - boxes[:, 0]
        targets.append({"class_labels": torch.as_tensor(labels, device=device), "boxes": boxes})
    if flips is not None:
        f = torch.as_tensor(flips[b], device=device)
        if f.any():
            x[f] = x[f].flip(-1)
            if keep is not None:
                keep[f] = keep[f].flip(-1)
    return x, keep, targets
