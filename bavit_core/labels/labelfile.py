"""The labels parquet: one row per image (ids, size, grid, FG grid, scores), its reader
and writer. ``scores`` hold the continuous per-token value the FG decision is made from
(box overlap or mask pixel fraction), so thresholds can change without relabelling; ``fg``
holds the decision under the options in the file's metadata."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..runtime.errors import InputFileError, OptionError
from ..runtime.fileio import atomic_path

META_KEY = b"bavit"
FORMAT = "bavit-labels/1"


def threshold_scores(scores: np.ndarray, threshold: float, comparison: str) -> np.ndarray:
    if comparison == ">=":
        return scores >= threshold
    if comparison == ">":
        return scores > threshold
    raise OptionError(f"unknown comparison {comparison!r}")


@dataclass
class Labels:
    """What :func:`read_labels` returns: arrays aligned on the image axis."""

    image_ids: np.ndarray
    file_names: list[str]
    widths: np.ndarray
    heights: np.ndarray
    grids: np.ndarray
    scores: np.ndarray
    n_objects: np.ndarray
    meta: dict

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def grid_shape(self) -> tuple[int, int]:
        return tuple(self.grids.shape[1:])

    @property
    def fg_fraction(self) -> np.ndarray:
        return self.grids.reshape(len(self), -1).mean(axis=1)

    def grids_for(self, image_ids, source) -> np.ndarray:
        """The label grids of ``image_ids``, in that order; an image without labels is an
        OptionError naming ``source`` (the labels file)."""
        pos = {int(i): k for k, i in enumerate(self.image_ids)}
        absent = [int(i) for i in image_ids if int(i) not in pos]
        if absent:
            raise OptionError(f"{source}: has no labels for {len(absent)} of the {len(image_ids)} images "
                              f"(e.g. image id {absent[0]}); label the same split")
        return self.grids[[pos[int(i)] for i in image_ids]]

    def subset(self, index) -> "Labels":
        index = np.asarray(index)
        return Labels(
            image_ids=self.image_ids[index],
            file_names=[self.file_names[i] for i in np.arange(len(self))[index]],
            widths=self.widths[index],
            heights=self.heights[index],
            grids=self.grids[index],
            scores=self.scores[index],
            n_objects=self.n_objects[index],
            meta=self.meta,
        )


# --------------------------------------------------------------------------- parquet I/O
def write_labels(out, *, image_ids, file_names, widths, heights, grids, scores, n_objects, meta) -> None:
    n, gh, gw = grids.shape
    m = gh * gw
    table = pa.table(
        {
            "image_id": pa.array(np.asarray(image_ids, dtype=np.int64)),
            "file_name": pa.array(list(file_names), type=pa.string()),
            "width": pa.array(np.asarray(widths, dtype=np.int32)),
            "height": pa.array(np.asarray(heights, dtype=np.int32)),
            "grid_h": pa.array(np.full(n, gh, dtype=np.int16)),
            "grid_w": pa.array(np.full(n, gw, dtype=np.int16)),
            "fg": pa.FixedSizeListArray.from_arrays(pa.array(grids.reshape(-1).astype(bool)), m),
            "scores": pa.FixedSizeListArray.from_arrays(
                pa.array(np.ascontiguousarray(scores, dtype=np.float64).reshape(-1)), m),
            "fg_fraction": pa.array(grids.reshape(n, -1).mean(axis=1).astype(np.float32)),
            "n_objects": pa.array(np.asarray(n_objects, dtype=np.int32)),
        }
    )
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_parquet_table(path, kind: str) -> tuple[pa.Table, dict]:
    p = Path(path)
    if not p.is_file():
        raise InputFileError(p, f"{kind} file not found")
    try:
        table = pq.read_table(p)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputFileError(p, f"not a readable parquet file ({str(exc).splitlines()[0]})") from None
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise InputFileError(p, f"not a bavit {kind} file (no bavit metadata)")
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        meta = None
    if not isinstance(meta, dict):
        raise InputFileError(p, f"damaged {kind} file (its bavit metadata is not a JSON object)")
    return table, meta


def grid_shape_of(path, meta: dict) -> tuple[int, int]:
    """The (gh, gw) a labels/predictions file records, checked."""
    g = meta.get("grid_shape")
    if (not isinstance(g, (list, tuple)) or len(g) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 4096 for v in g)):
        raise InputFileError(path, f"damaged file: metadata grid_shape {g!r} is not two positive integers")
    return int(g[0]), int(g[1])


def require_columns(path, table: pa.Table, names) -> None:
    missing = [c for c in names if c not in table.column_names]
    if missing:
        raise InputFileError(path, f"damaged file: column(s) {', '.join(missing)} missing")


def fixed_list_to_numpy(col: pa.ChunkedArray, shape: tuple[int, ...], dtype) -> np.ndarray:
    arr = col.combine_chunks()
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    return flat.astype(dtype, copy=False).reshape((len(arr),) + tuple(shape))


def read_labels(path, threshold: float | None = None) -> Labels:
    """Read a labels parquet. ``threshold`` re-derives the FG grids from the scores."""
    table, meta = read_parquet_table(path, "labels")
    if not str(meta.get("format", "")).startswith("bavit-labels/"):
        raise InputFileError(path, f"not a labels file (format {meta.get('format')!r})")
    gh, gw = grid_shape_of(path, meta)
    require_columns(path, table, ("image_id", "file_name", "width", "height", "fg", "scores", "n_objects"))
    if threshold is not None and meta.get("comparison") not in (">=", ">"):
        raise InputFileError(path, f"damaged labels file: metadata comparison {meta.get('comparison')!r}")
    try:
        return _labels(table, meta, gh, gw, threshold)
    except (ValueError, TypeError, KeyError, pa.ArrowException) as exc:
        raise InputFileError(path, f"damaged labels file ({type(exc).__name__}: {str(exc)[:120]})") from None


def _labels(table, meta, gh, gw, threshold) -> Labels:
    scores = fixed_list_to_numpy(table["scores"], (gh, gw), np.float64)
    if threshold is None:
        grids = fixed_list_to_numpy(table["fg"], (gh, gw), bool)
    else:
        if not 0.0 <= threshold <= 1.0:
            raise OptionError(f"label threshold must be in [0, 1], got {threshold}")
        grids = threshold_scores(scores, threshold, meta["comparison"])
        meta = dict(meta, threshold=threshold)
    return Labels(
        image_ids=table["image_id"].to_numpy(),
        file_names=table["file_name"].to_pylist(),
        widths=table["width"].to_numpy().astype(np.int64),
        heights=table["height"].to_numpy().astype(np.int64),
        grids=grids,
        scores=scores,
        n_objects=table["n_objects"].to_numpy().astype(np.int64),
        meta=meta,
    )
