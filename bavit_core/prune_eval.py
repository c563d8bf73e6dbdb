"""Sweep token selectors × thresholds over a dataset with the pruned YOLOS.

Per row (selector, threshold): COCO mAP (pycocotools), sparsity, Table-2 token columns,
analytic GFLOPs, and measured speed of dense YOLOS vs BAViT + pruned YOLOS timed side
by side in this process. Images are decoded once per chunk; BAViT runs once per image and
its probabilities serve every threshold.
"""
from __future__ import annotations

import csv
import io
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import __version__
from .cocoeval import STAT_NAMES, coco_ground_truth, detections_from_outputs, evaluate_detections, voc_category_map
from .datasets import open_dataset
from .detector import IMAGE_MEAN, IMAGE_STD, LAYOUTS, detector_grid, load_detector, pruned_forward
from .errors import InputFileError, OptionError
from .fileio import atomic_write_text, sha256_file
from .grid import nearest_index, resample_grid
from .images import load_image_sizes, resolve_paths, to_input
from .labels import read_labels
from .model import load_bavit
from .postprocess import refine
from .predict import fg_from_probs, infer_probs
from .timing import peak_memory_mb, time_interleaved
from .tokens import bavit_gflops, detector_gflops, token_columns
from .train import resolve_device

SELECTORS = ("dense", "bavit", "oracle", "random")
CSV_COLUMNS = (
    "selector", "threshold", "sparsity", *STAT_NAMES, "bavit_tokens", "yolos_tokens", "yolos_pruned_tokens",
    "total_tokens", "token_reduction_pct", "gflops", "latency_ms", "throughput_ips", "dense_latency_ms",
    "speedup", "detector_speedup", "flop_speedup", "peak_mem_mb", "device", "dtype", "batch_size", "n_images",
)


def parse_thresholds(text: str) -> list[float]:
    """``start:stop[:step]`` (inclusive, default step 0.1) or ``a,b,c``; values in [0, 1]."""
    s = str(text).strip()
    try:
        if ":" in s:
            parts = [float(v) for v in s.split(":")]
            if len(parts) not in (2, 3):
                raise ValueError
            start, stop = parts[0], parts[1]
            step = parts[2] if len(parts) == 3 else 0.1
            if step <= 0:
                raise OptionError(f"--thresholds {text!r}: the step must be positive")
            n = int(math.floor((stop - start) / step + 1e-9)) + 1
            vals = [round(start + k * step, 10) for k in range(max(n, 0))]
        else:
            vals = [float(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise OptionError(f"cannot read --thresholds {text!r}: use start:stop[:step] or a,b,c") from None
    if not vals:
        raise OptionError(f"--thresholds {text!r} is an empty range")
    bad = [v for v in vals if not 0.0 <= v <= 1.0]
    if bad:
        raise OptionError(f"--thresholds must lie in [0, 1]; got {bad[0]}")
    return sorted(set(vals))


@dataclass
class PruneEvalOptions:
    detector: str
    dataset: str = "coco"
    root: str | None = None
    split: str | None = None
    ann: str | None = None
    images: str | None = None
    model: str | None = None
    labels: str | None = None
    thresholds: list[float] = field(default_factory=lambda: [0.5])
    selectors: list[str] | None = None
    batch_size: int = 1
    detector_size: tuple[int, int] = (512, 512)
    resample: str = "nearest"
    postprocess_steps: int = 0
    layout: str | None = None
    timing_images: int = 16
    timing_repeats: int = 5
    max_images: int | None = None
    dtype: str = "fp32"
    device: str = "auto"
    seed: int = 0
    out: str = "results"


@dataclass
class Row:
    selector: str
    threshold: float
    keep: np.ndarray  # (N, dh, dw) bool on the detector grid
    detections: list = field(default_factory=list)


def _selectors(opts: PruneEvalOptions) -> list[str]:
    allowed = ["dense"]
    if opts.model:
        allowed += ["bavit", "random"]
    if opts.labels:
        allowed.append("oracle")
    if opts.selectors is None:
        return [s for s in SELECTORS if s in allowed]
    for s in opts.selectors:
        if s not in SELECTORS:
            raise OptionError(f"unknown selector {s!r}; choose from {', '.join(SELECTORS)}")
        if s not in allowed:
            need = "--labels" if s == "oracle" else "--model"
            raise OptionError(f"selector {s!r} needs {need}")
    return list(dict.fromkeys(opts.selectors))


def prune_eval(opts: PruneEvalOptions, progress: Callable[[int, int], None] | None = None,
               on_stage: Callable[[str], None] | None = None) -> dict:
    t_start = time.perf_counter()
    if opts.batch_size < 1:
        raise OptionError("--batch-size must be at least 1")
    if opts.postprocess_steps < 0:
        raise OptionError("--postprocess-steps must be >= 0")
    if opts.dtype not in ("fp32", "bf16", "fp16"):
        raise OptionError("--dtype must be fp32, bf16 or fp16")
    selectors = _selectors(opts)
    device = resolve_device(opts.device)
    layout = opts.layout or ("pad" if device.type == "cuda" else "pack")
    if layout not in LAYOUTS:
        raise OptionError(f"--layout must be one of {', '.join(LAYOUTS)}")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[opts.dtype]
    if dtype != torch.float32 and device.type != "cuda" and opts.dtype == "fp16":
        raise OptionError("--dtype fp16 needs CUDA")

    stage = on_stage or (lambda s: None)
    stage("loading detector")
    det = load_detector(opts.detector, device)
    det_hw = tuple(opts.detector_size)
    dgrid = detector_grid(det, det_hw)
    bavit = load_bavit(opts.model, device=device) if opts.model else None

    aset = open_dataset(opts.dataset, root=opts.root, split=opts.split, ann=opts.ann, images=opts.images)
    img_dir = aset.images_dir
    if img_dir is None or not img_dir.is_dir():
        raise OptionError("prune-eval needs the images: give --root (with --split) or --ann with --images")
    _, missing = resolve_paths(img_dir, aset.file_names)
    present = np.setdiff1d(np.arange(aset.n_images), missing)
    if opts.max_images:
        present = present[: opts.max_images]
    if len(present) == 0:
        raise InputFileError(img_dir, "none of the dataset's images is there")
    ids = aset.image_ids[present]
    widths, heights = aset.widths[present], aset.heights[present]
    files = [img_dir / aset.file_names[i] for i in present]

    oracle = None
    if "oracle" in selectors:
        oracle = resample_grid(read_labels(opts.labels).grids_for(ids, opts.labels), dgrid, opts.resample)

    cat_map = None  # detections carry the detector label id (== COCO category id)
    if aset.kind == "voc":
        cat_map = voc_category_map(aset, det.config.id2label)
    gt = coco_ground_truth(aset, ids, cat_map)

    # ---- pass 1: BAViT probabilities (once per image) ------------------------------
    n = len(files)
    probs = None
    thresholds = opts.thresholds if any(s in selectors for s in ("bavit", "random")) else []
    rows: list[Row] = []
    chunk = max(opts.batch_size, 32)
    total_work = n * (1 + sum(1 for s in selectors if s in ("dense", "oracle")) +
                      len(thresholds) * sum(1 for s in selectors if s in ("bavit", "random")))
    if bavit is not None:
        stage("BAViT")
        probs = np.zeros((n,) + bavit.cfg.grid_shape, dtype=np.float32)
    # decode once: detector-size inputs for all rows, BAViT-size inputs for BAViT
    stage("decoding images")
    det_u8 = _image_store(n, det_hw, Path(opts.out))
    sizes = [det_hw] + ([(bavit.cfg.input_h, bavit.cfg.input_w)] if bavit is not None else [])
    n_timed = min(opts.timing_images, n)
    bav_timed = []  # BAViT inputs of the timed images, so timing sees what evaluation saw
    for s in range(0, n, chunk):
        bav_batch = []
        for k in range(s, min(s + chunk, n)):
            resized = load_image_sizes(files[k], sizes)
            det_u8[k] = resized[0]
            if bavit is not None:
                bav_batch.append(resized[1])
                if k < n_timed:
                    bav_timed.append(resized[1])
        if bavit is not None:
            probs[s:s + len(bav_batch)] = infer_probs(bavit, np.stack(bav_batch), opts.batch_size, device)
        if progress:
            progress(min(chunk, n - s), total_work)

    def bavit_keep(t: float) -> np.ndarray:
        g = fg_from_probs(probs, t)
        if opts.postprocess_steps:
            g = refine(g, opts.postprocess_steps)
        return resample_grid(g, dgrid, opts.resample)

    for sel in selectors:
        if sel == "dense":
            rows.append(Row("dense", float("nan"), np.ones((n,) + dgrid, dtype=bool)))
        elif sel == "oracle":
            rows.append(Row("oracle", float("nan"), oracle))
        elif sel == "bavit":
            rows += [Row("bavit", t, bavit_keep(t)) for t in thresholds]
        elif sel == "random":
            for t in thresholds:
                ref = bavit_keep(t)
                rng = np.random.default_rng([opts.seed, int(round(t * 1e6))])
                keep = np.zeros_like(ref)
                flat = keep.reshape(n, -1)
                for i in range(n):
                    k = int(ref[i].sum())
                    flat[i, rng.choice(flat.shape[1], size=k, replace=False)] = True
                rows.append(Row("random", t, keep))

    # ---- pass 2: detections per row --------------------------------------------------
    stage("detecting")
    det.to(dtype)
    with torch.inference_mode():
        for row in rows:
            for s in range(0, n, opts.batch_size):
                sl = slice(s, min(s + opts.batch_size, n))
                x = to_input(det_u8[sl], IMAGE_MEAN, IMAGE_STD, device).to(dtype)
                keep = None if row.selector == "dense" else torch.as_tensor(row.keep[sl], device=device)
                if keep is not None and bool(keep.all()):
                    keep = None
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32 and device.type == "cuda"):
                    out = pruned_forward(det, x, keep, layout=layout)
                row.detections += detections_from_outputs(out.logits, out.pred_boxes, ids[sl], widths[sl], heights[sl])
                if progress:
                    progress(sl.stop - sl.start, total_work)

    # ---- pass 3: metrics, tokens, timing ---------------------------------------------
    stage("timing")
    n_patches = dgrid[0] * dgrid[1]
    dense_g = detector_gflops(det.config, np.full(n, n_patches), n_patches)
    t_idx = np.arange(n_timed)
    results = []
    for row in rows:
        sparsity_i = 1.0 - row.keep.reshape(n, -1).mean(axis=1)
        kept_i = row.keep.reshape(n, -1).sum(axis=1)
        stats = evaluate_detections(gt, row.detections, ids)
        with_bavit = row.selector == "bavit"
        r = {"selector": row.selector, "threshold": row.threshold, "sparsity": float(sparsity_i.mean())}
        r.update(stats)
        r.update(token_columns(sparsity_i, n_patches, det.config.num_hidden_layers,
                               bavit.cfg.n_tokens if bavit else 0, bavit.cfg.depth if bavit else 0, with_bavit))
        g = detector_gflops(det.config, kept_i, n_patches)
        if with_bavit:
            g += bavit_gflops(bavit.cfg)
        r["gflops"] = g
        r["flop_speedup"] = dense_g / g
        r.update(_time_row(det, bavit if with_bavit else None, row, t_idx, det_u8, bav_timed, opts, device, dtype,
                           layout, dgrid))
        r.update(device=_device_name(device), dtype=opts.dtype, batch_size=opts.batch_size, n_images=n)
        results.append(r)

    out = Path(opts.out)
    _write_outputs(out, results, rows, opts, aset, ids, missing, det, bavit, layout, time.perf_counter() - t_start)
    return {"out": str(out), "rows": results, "n_images": n, "missing_images": len(missing),
            "seconds": time.perf_counter() - t_start}


def _image_store(n: int, hw, out: Path, limit: int = 2 << 30) -> np.ndarray:
    """(n, h, w, 3) uint8 for the decoded detector inputs: in memory, or a memory-mapped
    temporary file beside the results when it would exceed ``limit`` bytes (COCO val at
    512² is 3.9 GB). The file is unlinked at once, so it disappears with the array."""
    shape = (n, hw[0], hw[1], 3)
    if n * hw[0] * hw[1] * 3 <= limit:
        return np.empty(shape, dtype=np.uint8)
    import tempfile

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out, prefix=".images-", suffix=".u8") as f:
        return np.memmap(f.name, dtype=np.uint8, mode="w+", shape=shape)


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads, {platform.machine()})"


def _time_row(det, bavit, row, t_idx, det_u8, bav_timed, opts, device, dtype, layout, dgrid) -> dict:
    """Dense YOLOS vs (BAViT +) pruned YOLOS on the first images, batch by batch,
    interleaved in this process; medians per batch summed over the timing set."""
    if len(t_idx) == 0 or opts.timing_repeats < 1:
        return {"latency_ms": float("nan"), "throughput_ips": float("nan"), "dense_latency_ms": float("nan"),
                "speedup": float("nan"), "detector_speedup": float("nan"), "peak_mem_mb": float("nan")}
    bs = opts.batch_size
    totals = {"dense": 0.0, "pruned": 0.0, "full": 0.0}
    peak = 0.0
    autocast = dict(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32 and device.type == "cuda")
    for s in range(0, len(t_idx), bs):
        sl = t_idx[s:s + bs]
        x = to_input(det_u8[sl], IMAGE_MEAN, IMAGE_STD, device).to(dtype)
        keep = torch.as_tensor(row.keep[sl], device=device)
        if row.selector == "dense":
            keep = None
        fns = {"dense": lambda: _dense(det, x, autocast)}
        if keep is not None:
            fns["pruned"] = lambda: _pruned(det, x, keep, layout, autocast)
        if bavit is not None:
            xb = to_input(np.stack([bav_timed[i] for i in sl]), bavit.cfg.mean, bavit.cfg.std, device)
            t = row.threshold

            def full():
                with torch.autocast(**autocast):
                    p = bavit.fg_prob(xb.to(dtype) if dtype != torch.float32 else xb)
                g = (1.0 - p.float()) < t
                if opts.postprocess_steps:
                    g = torch.as_tensor(refine(g.cpu().numpy(), opts.postprocess_steps), device=device)
                k = _resample_torch(g, dgrid)
                return _pruned(det, x, k, layout, autocast)

            fns["full"] = full
        med = time_interleaved(fns, device, repeats=opts.timing_repeats)
        totals["dense"] += med["dense"]
        totals["pruned"] += med.get("pruned", med["dense"])
        totals["full"] += med.get("full", med.get("pruned", med["dense"]))
        peak = max(peak, peak_memory_mb(fns.get("full", fns.get("pruned", fns["dense"])), device))
    n = len(t_idx)
    return {
        "latency_ms": 1000 * totals["full"] / n,
        "throughput_ips": n / totals["full"],
        "dense_latency_ms": 1000 * totals["dense"] / n,
        "speedup": totals["dense"] / totals["full"],
        "detector_speedup": totals["dense"] / totals["pruned"],
        "peak_mem_mb": peak,
    }


def _resample_torch(g: torch.Tensor, shape) -> torch.Tensor:
    """resample_grid(mode="nearest") on a (B, gh, gw) tensor, staying on its device."""
    ri = torch.as_tensor(nearest_index(g.shape[-2], shape[0]), device=g.device)
    ci = torch.as_tensor(nearest_index(g.shape[-1], shape[1]), device=g.device)
    return g[:, ri][:, :, ci]


def _dense(det, x, autocast):
    with torch.autocast(**autocast):
        return det(pixel_values=x)


def _pruned(det, x, keep, layout, autocast):
    with torch.autocast(**autocast):
        return pruned_forward(det, x, keep, layout=layout)


def _row_name(sel: str, t: float) -> str:
    return sel if math.isnan(t) else f"{sel}_{t:.2f}"


def _write_outputs(out: Path, results, rows, opts, aset, ids, missing, det, bavit, layout, seconds):
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in results:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    for row in rows:
        atomic_write_text(out / "detections" / f"{_row_name(row.selector, row.threshold)}.json",
                          json.dumps(row.detections))
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
        "rows": [_row_name(r.selector, r.threshold) for r in rows],
        "per_image_sparsity": {_row_name(r.selector, r.threshold):
                               np.round(1 - r.keep.reshape(len(ids), -1).mean(axis=1), 4).tolist() for r in rows},
        "image_ids": [int(i) for i in ids],
        "seconds": seconds,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=1, default=str))
    atomic_write_text(out / "results.csv", buf.getvalue())


def read_results(results_dir) -> list[dict]:
    p = Path(results_dir) / "results.csv"
    if not p.is_file():
        raise InputFileError(p, "results file not found (run bavit prune-eval first)")
    with open(p) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            if k not in ("selector", "device", "dtype"):
                try:
                    r[k] = float(v)
                except (TypeError, ValueError):
                    pass
    return rows
