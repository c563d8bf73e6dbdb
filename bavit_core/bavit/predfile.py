"""A predictions file (predictions parquet): one row per image with BAViT's per-token FG
probabilities and decisions on its grid (and the labels' grid when known); writing,
reading and the connected-component clean-up (`bavit postprocess`). No torch: reading
and refining predictions needs none."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..labels import META_KEY, fixed_list_to_numpy, read_parquet_table
from ..labels.labelfile import grid_shape_of, require_columns
from ..runtime.errors import InputFileError
from ..runtime.fileio import atomic_path, check_output_writable, refuse_output_over_inputs, sha256_file

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
    check_output_writable(out)
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
