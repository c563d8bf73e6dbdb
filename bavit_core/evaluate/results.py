"""prune-eval's results directory: results.csv (one row per operating point), the
detections of every row, meta.json; and its reader."""
from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..data.ragged import Grids

from .. import __version__
from ..detection.cocoeval import STAT_NAMES
from ..runtime.errors import InputFileError
from ..runtime.fileio import atomic_dir, atomic_write_text, sha256_file

CSV_COLUMNS = (
    "selector", "threshold", "policy", "target", "treatment", "prune_layer", "sparsity", "sparsity_p10", "sparsity_p90",
    *STAT_NAMES, "bavit_tokens", "yolos_tokens", "yolos_pruned_tokens", "kv_only_tokens", "total_tokens",
    "token_reduction_pct", "gflops", "latency_ms", "latency_spread", "throughput_ips", "dense_latency_ms",
    "dense_spread", "speedup", "detector_speedup", "flop_speedup", "timing_noisy", "peak_mem_mb", "device", "dtype",
    "batch_size", "n_images",
)
TEXT_COLUMNS = ("selector", "policy", "treatment", "device", "dtype")


def row_name(sel: str, t: float, target: float = float("nan"), policy: str = "threshold",
             treatment: str = "drop", prune_layer: float = float("nan")) -> str:
    """A row's file name stem: ``bavit_0.30`` at a threshold, ``bavit_s0.35`` at a target
    sparsity (``bavit_topk_s0.35`` with the topk policy), ``dense``; suffixed ``_pool`` or
    ``_preserve`` for those treatments of the pruned tokens. A selector choosing inside the
    detector after k layers is named with its layer: ``attention@2_topk_s0.50``."""
    if prune_layer is not None and not math.isnan(prune_layer):
        sel = f"{sel}@{int(prune_layer)}"
    if not math.isnan(target):
        name = f"{sel}_{'topk_' if policy == 'topk' else ''}s{target:.2f}"
    else:
        name = sel if math.isnan(t) else f"{sel}_{t:.2f}"
    return name if treatment == "drop" else f"{name}_{treatment}"


def write_results(out: Path, results, rows, opts, aset, ids, missing, det, bavit, layout, seconds, run_info=None):
    """Write the results directory whole (built in a temporary sibling, renamed into place),
    so a results folder never mixes two runs."""
    with atomic_dir(out, markers=("results.csv", "meta.json")) as tmp:
        _write_results(tmp, results, rows, opts, aset, ids, missing, det, bavit, layout, seconds, run_info)


def _write_results(out: Path, results, rows, opts, aset, ids, missing, det, bavit, layout, seconds, run_info=None):
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in results:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    for row in rows:
        atomic_write_text(out / "detections" / f"{row.name}.json",
                          json.dumps(row.detections))
    import torch
    import transformers

    meta = {
        "format": "bavit-prune-eval/1",
        "bavit_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()},
        "layout": layout,
        "dataset": aset.kind,
        "source_sha256": sha256_file(aset.source_files[0]) if aset.kind == "coco" else None,
        "model_sha256": sha256_file(Path(opts.model) / "model.safetensors") if opts.model else None,
        "labels_sha256": sha256_file(opts.labels) if opts.labels else None,
        "detector_config": det.config.to_dict() if hasattr(det.config, "to_dict") else None,
        "bavit": asdict(bavit.cfg) if bavit else None,
        "n_images": len(ids),
        "missing_images": len(missing),
        "skipped_annotations": dict(sorted(aset.skipped.items())),
        "rows": [r.name for r in rows],
        "per_image_sparsity": {r.name:
                               np.round(1 - Grids.of(r.keep).means(), 4).tolist() for r in rows},
        "image_ids": [int(i) for i in ids],
        "seconds": seconds,
        **(run_info or {}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=1, default=str))
    atomic_write_text(out / "results.csv", buf.getvalue())


def read_results(results_dir) -> list[dict]:
    """results.csv's rows: prune-eval's number columns as floats (an empty cell, or one a
    short row lacks, as NaN), text columns as text, ``timing_noisy`` as a bool; columns
    prune-eval does not write are kept (as floats where they parse). A damaged file (not
    text, a row longer than the header, text in a number column) is an InputFileError
    naming its line."""
    p = Path(results_dir) / "results.csv"
    if not p.is_file():
        raise InputFileError(p, "results file not found (run bavit prune-eval first)")
    numbers = set(CSV_COLUMNS) - set(TEXT_COLUMNS) - {"timing_noisy"}
    rows = []
    try:
        with open(p, encoding="utf-8-sig", newline="") as f:  # -sig: a BOM (a spreadsheet's save) is no column name
            reader = csv.DictReader(f)
            for r in reader:
                if None in r:
                    raise InputFileError(p, f"line {reader.line_num} has more fields than the header")
                r.setdefault("treatment", "drop")  # results written before treatments existed
                if "timing_noisy" in r:
                    r["timing_noisy"] = r["timing_noisy"] == "True"
                for k, v in r.items():
                    if k in TEXT_COLUMNS or k == "timing_noisy":
                        continue
                    try:
                        r[k] = math.nan if v is None or v == "" else float(v)
                    except ValueError:
                        if k in numbers:
                            raise InputFileError(p, f"line {reader.line_num}: {k} is {str(v)[:40]!r}, "
                                                    "not a number") from None
                rows.append(r)
    except (csv.Error, UnicodeDecodeError) as exc:
        raise InputFileError(p, f"unreadable results.csv ({str(exc)[:80]})") from None
    return rows
