"""Batch inference of BAViT → predictions parquet (per-token FG probability)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import __version__
from ..data.images import list_images, load_image_sized, resolve_paths
from ..labels import META_KEY, fixed_list_to_numpy, read_labels, read_parquet_table
from ..labels.labelfile import grid_shape_of, require_columns
from ..runtime.devices import resolve_device
from ..runtime.distributed import Dist
from ..runtime.errors import InputFileError, OptionError
from ..runtime.fileio import atomic_path, refuse_output_over_inputs, sha256_file
from .inference import fg_from_probs, infer_probs
from .metrics import grid_metrics
from .model import load_bavit

FORMAT = "bavit-preds/1"


@dataclass
class Predictions:
    image_ids: np.ndarray
    file_names: list[str]
    widths: np.ndarray
    heights: np.ndarray
    probs: np.ndarray  # (N, gh, gw) float32 FG probability
    grids: np.ndarray  # (N, gh, gw) bool FG decision
    gt: np.ndarray | None
    meta: dict

    def __len__(self):
        return len(self.image_ids)


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


def write_predictions(out, ids, names, widths, heights, probs, grids, gt, meta) -> None:
    n, gh, gw = probs.shape
    m = gh * gw
    cols = {
        "image_id": pa.array(np.asarray(ids, dtype=np.int64)),
        "file_name": pa.array(list(names), type=pa.string()),
        "width": pa.array(np.asarray(widths, dtype=np.int32)),
        "height": pa.array(np.asarray(heights, dtype=np.int32)),
        "probs": pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(probs, np.float32).reshape(-1)), m),
        "fg": pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(grids, bool).reshape(-1)), m),
        "grid_h": pa.array(np.full(n, gh, dtype=np.int16)),
        "grid_w": pa.array(np.full(n, gw, dtype=np.int16)),
    }
    if gt is not None:
        cols["gt"] = pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(gt, bool).reshape(-1)), m)
    meta = dict(meta, grid_shape=[gh, gw])
    table = pa.table(cols).replace_schema_metadata({META_KEY: json.dumps(meta, default=str).encode()})
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_predictions(path) -> Predictions:
    table, meta = read_parquet_table(path, "predictions")
    if not str(meta.get("format", "")).startswith("bavit-preds/"):
        raise InputFileError(path, f"not a predictions file (format {meta.get('format')!r})")
    gh, gw = grid_shape_of(path, meta)
    require_columns(path, table, ("image_id", "file_name", "width", "height", "probs", "fg"))
    try:
        return _predictions(table, meta, gh, gw)
    except (ValueError, TypeError, KeyError, pa.ArrowException) as exc:
        raise InputFileError(path, f"damaged predictions file ({type(exc).__name__}: {str(exc)[:120]})") from None


def _predictions(table, meta, gh, gw) -> Predictions:
    gt = fixed_list_to_numpy(table["gt"], (gh, gw), bool) if "gt" in table.column_names else None
    return Predictions(
        image_ids=table["image_id"].to_numpy(),
        file_names=table["file_name"].to_pylist(),
        widths=table["width"].to_numpy().astype(np.int64),
        heights=table["height"].to_numpy().astype(np.int64),
        probs=fixed_list_to_numpy(table["probs"], (gh, gw), np.float32),
        grids=fixed_list_to_numpy(table["fg"], (gh, gw), bool),
        gt=gt,
        meta=meta,
    )


def postprocess_predictions(pred_path, out, steps: int = 3, kernel: str = "8", min_fg: int = 2) -> dict:
    """Refine a predictions file's FG grids; store before/after metrics in its metadata."""
    from .postprocess import check_options, refine_with_history

    check_options(steps, kernel, min_fg)
    refuse_output_over_inputs(out, [pred_path])
    p = read_predictions(pred_path)
    t0 = time.perf_counter()
    grids, history = refine_with_history(p.grids, p.gt, steps, kernel, min_fg)
    seconds = time.perf_counter() - t0
    pp = {"steps": steps, "kernel": kernel, "min_fg": min_fg, "history": history,
          "source": str(pred_path), "source_sha256": sha256_file(pred_path)}
    prior = p.meta.get("postprocess")
    meta = dict(p.meta, postprocess=pp if not prior else {**pp, "previous": prior})
    write_predictions(out, p.image_ids, p.file_names, p.widths, p.heights, p.probs, grids, p.gt, meta)
    return {"out": str(out), "images": len(p), "history": history, "seconds": seconds}
