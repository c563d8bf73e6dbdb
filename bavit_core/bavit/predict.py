"""Batch inference of BAViT → predictions parquet (per-token FG probability)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__
from ..data.images import list_images, load_image_sized, resolve_paths
from ..labels import read_labels
from ..runtime.devices import resolve_device
from ..runtime.distributed import Dist
from ..runtime.errors import InputFileError, OptionError
from ..runtime.fileio import check_output_writable, refuse_output_over_inputs, sha256_file
from .inference import fg_from_probs, infer_probs
from .metrics import grid_metrics
from .model import load_bavit
from .predfile import FORMAT, Predictions, postprocess_predictions, read_predictions, write_predictions

__all__ = ["FORMAT", "Predictions", "postprocess_predictions", "predict", "read_predictions", "write_predictions"]


def predict(
    model_dir: str | Path,
    out: str | Path,
    labels: str | Path | None = None,
    images: str | Path | None = None,
    threshold: float = 0.5,
    batch_size: int = 32,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Run BAViT on the images of a labels file (GT kept) or on every image of a folder."""
    if not 0.0 <= threshold <= 1.0:
        raise OptionError(f"--threshold must be in [0, 1], got {threshold}")
    if batch_size < 1:
        raise OptionError(f"--batch-size must be at least 1, got {batch_size}")
    model_dir = Path(model_dir).resolve()
    labels = Path(labels).resolve() if labels is not None else None
    refuse_output_over_inputs(out, [labels, model_dir / "config.json", model_dir / "model.safetensors",
                                     model_dir / "last.safetensors", model_dir])
    check_output_writable(out)
    dev = Dist.local_device(resolve_device(device))
    model = load_bavit(model_dir, device=dev)
    cfg = model.cfg
    gt = None
    if labels is not None:
        lab = read_labels(labels)
        if lab.grid_shape != cfg.grid_shape:
            raise OptionError(f"{labels}: label grid {lab.grid_shape} does not match the model grid {cfg.grid_shape}")
        img_dir = Path(images) if images else Path(lab.meta.get("images_dir") or ".")
        if not img_dir.is_dir():
            raise InputFileError(img_dir, "image directory not found")
        paths, missing = resolve_paths(img_dir, lab.file_names)
        if missing:
            lab = lab.subset(np.setdiff1d(np.arange(len(lab)), missing))
        ids, names, gt = lab.image_ids, lab.file_names, lab.grids
        widths, heights = lab.widths, lab.heights
    else:
        if images is None:
            raise OptionError("give --labels PARQUET (with GT) or --images DIR (a plain image folder)")
        img_dir = Path(images)
        if not img_dir.is_dir():
            raise InputFileError(img_dir, "image directory not found")
        names = list_images(img_dir)
        if not names:
            raise InputFileError(img_dir, "no images (.jpg, .jpeg, .png, .bmp, .webp) in the folder")
        paths, missing = [img_dir / n for n in names], []
        ids = np.arange(1, len(names) + 1, dtype=np.int64)
        widths, heights = np.zeros(len(names), np.int64), np.zeros(len(names), np.int64)
    if len(paths) == 0:
        raise InputFileError(img_dir, "none of the listed images is there")
    t0 = time.perf_counter()
    dist = Dist(dev)
    try:
        mine = dist.shard(len(paths))  # under torchrun: this process's block of the images

        def infer_shard():
            probs, sizes = [], np.zeros((len(mine), 2), np.int64)
            chunk = max(batch_size, 256)
            for s in range(0, len(mine), chunk):
                arr = []
                for k, i in enumerate(mine[s:s + chunk]):
                    a, sizes[s + k] = load_image_sized(paths[i], (cfg.input_h, cfg.input_w))
                    arr.append(a)
                probs.append(infer_probs(model, np.stack(arr), batch_size, dev, progress))
            gh, gw = cfg.grid_shape
            return (np.concatenate(probs) if probs else np.zeros((0, gh, gw), np.float32)), sizes

        parts = dist.run_shard(infer_shard)
    finally:
        dist.close()
    probs = np.concatenate([p for p, _ in parts])
    sizes = np.concatenate([z for _, z in parts])
    heights, widths = sizes[:, 0], sizes[:, 1]
    seconds = time.perf_counter() - t0
    grids = fg_from_probs(probs, threshold)
    meta = {
        "format": FORMAT,
        "bavit_version": __version__,
        "model_dir": str(model_dir),
        "model": {k: getattr(cfg, k) for k in ("depth", "input_h", "input_w", "patch")},
        "model_sha256": sha256_file(Path(model_dir) / "model.safetensors") if Path(model_dir).is_dir() else None,
        "threshold": threshold,
        "rule": "FG when BG probability < threshold",
        "labels": str(labels) if labels else None,
        "labels_sha256": sha256_file(labels) if labels else None,
        "images_dir": str(img_dir),
        "missing_images": len(missing),
        "postprocess": None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    metrics = grid_metrics(grids, gt) if gt is not None else None
    if metrics:
        meta["metrics"] = metrics
    meta["world_size"] = dist.world
    if dist.main:
        write_predictions(out, ids, names, widths, heights, probs, grids, gt, meta)
    return {"out": str(out), "images": len(ids), "missing": len(missing), "seconds": seconds,
            "images_per_s": len(ids) / seconds if seconds else 0.0, "metrics": metrics,
            "sparsity": float(1 - grids.mean())}
