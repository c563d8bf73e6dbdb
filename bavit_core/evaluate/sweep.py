"""prune-eval: sweep token selectors × thresholds over a dataset with the pruned YOLOS.

Per row (selector, threshold): COCO mAP (pycocotools), sparsity, Table-2 token columns,
analytic GFLOPs, and measured speed of dense YOLOS vs BAViT + pruned YOLOS timed side
by side in this process. Images are decoded once per chunk; BAViT runs once per image and
its probabilities serve every threshold.
"""
from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..bavit.inference import infer_probs
from ..bavit.model import load_bavit
from ..bavit.postprocess import refine
from ..data import open_dataset
from ..data.images import decode_once, resolve_paths, to_input
from ..detection.accounting import bavit_gflops, detector_gflops, token_columns
from ..detection.cocoeval import coco_ground_truth, detections_from_outputs, evaluate_detections, voc_category_map
from ..detection.pruned import LAYOUTS, TREATMENTS, pruned_forward
from ..detection.selection import SELECTORS, bavit_keep, dense_keep, oracle_keep, random_keep, resample_torch
from ..detection.yolos import IMAGE_MEAN, IMAGE_STD, detector_grid, load_detector
from ..runtime.devices import resolve_device
from ..runtime.errors import InputFileError, OptionError
from .results import CSV_COLUMNS, read_results, write_results
from .timing import peak_memory_mb, time_interleaved

__all__ = ["CSV_COLUMNS", "PruneEvalOptions", "parse_thresholds", "prune_eval", "read_results"]



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
    pruned_tokens: list[str] = field(default_factory=lambda: ["drop"])  # treatments of pruned tokens


@dataclass
class Row:
    selector: str
    threshold: float
    keep: np.ndarray  # (N, dh, dw) bool on the detector grid
    detections: list = field(default_factory=list)
    treatment: str = "drop"  # what happens to the pruned tokens (detection/pruned.py)


def _per_treatment(rows: list[Row], treatments: list[str]) -> list[Row]:
    """Every row that prunes, once per treatment of the pruned tokens (the dense row once:
    with nothing pruned every treatment is the dense model)."""
    out = []
    for r in rows:
        for t in (["drop"] if r.selector == "dense" else treatments):
            out.append(Row(r.selector, r.threshold, r.keep, treatment=t))
    return out


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
    treatments = list(dict.fromkeys(opts.pruned_tokens))
    bad = [t for t in treatments if t not in TREATMENTS]
    if bad or not treatments:
        raise OptionError(f"unknown --pruned-tokens {bad[0] if bad else ''!r}; choose from {', '.join(TREATMENTS)}")
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

    oracle = oracle_keep(opts.labels, ids, dgrid, opts.resample) if "oracle" in selectors else None

    cat_map = None  # detections carry the detector label id (== COCO category id)
    if aset.kind == "voc":
        cat_map = voc_category_map(aset, det.config.id2label)
    gt = coco_ground_truth(aset, ids, cat_map)

    # ---- pass 1: decode once; BAViT probabilities (once per image) -------------------
    n = len(files)
    thresholds = opts.thresholds if any(s in selectors for s in ("bavit", "random")) else []
    total_work = n * (1 + (bavit is not None) + ("dense" in selectors) + len(treatments) * (
        ("oracle" in selectors) + len(thresholds) * sum(1 for s in selectors if s in ("bavit", "random"))))
    tick = (lambda k, _total: progress(k, total_work)) if progress else None
    stage("decoding images")
    sizes = [det_hw] + ([(bavit.cfg.input_h, bavit.cfg.input_w)] if bavit is not None else [])
    stores = decode_once(files, sizes, Path(opts.out), tick)
    det_u8 = stores[0]
    n_timed = min(opts.timing_images, n)
    probs = bav_timed = None
    if bavit is not None:
        stage("BAViT")
        probs = infer_probs(bavit, stores[1], opts.batch_size, device, tick)
        bav_timed = stores[1][:n_timed]  # timing sees the BAViT inputs evaluation saw

    rows: list[Row] = []
    for sel in selectors:
        if sel == "dense":
            rows.append(Row("dense", float("nan"), dense_keep(n, dgrid)))
        elif sel == "oracle":
            rows.append(Row("oracle", float("nan"), oracle))
        elif sel == "bavit":
            rows += [Row("bavit", t, bavit_keep(probs, t, dgrid, opts.resample, opts.postprocess_steps))
                     for t in thresholds]
        elif sel == "random":
            for t in thresholds:
                ref = bavit_keep(probs, t, dgrid, opts.resample, opts.postprocess_steps)
                rows.append(Row("random", t, random_keep(ref, [opts.seed, int(round(t * 1e6))])))
    rows = _per_treatment(rows, treatments)

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
                    out = pruned_forward(det, x, keep, layout=layout, treatment=row.treatment)
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
                               bavit.cfg.n_tokens if bavit else 0, bavit.cfg.depth if bavit else 0, with_bavit,
                               row.treatment))
        g = detector_gflops(det.config, kept_i, n_patches, row.treatment)
        if with_bavit:
            g += bavit_gflops(bavit.cfg)
        r["gflops"] = g
        r["flop_speedup"] = dense_g / g
        r.update(_time_row(det, bavit if with_bavit else None, row, t_idx, det_u8, bav_timed, opts, device, dtype,
                           layout, dgrid))
        r.update(device=_device_name(device), dtype=opts.dtype, batch_size=opts.batch_size, n_images=n)
        results.append(r)

    out = Path(opts.out)
    write_results(out, results, rows, opts, aset, ids, missing, det, bavit, layout, time.perf_counter() - t_start)
    return {"out": str(out), "rows": results, "n_images": n, "missing_images": len(missing),
            "seconds": time.perf_counter() - t_start}


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
            fns["pruned"] = lambda: _pruned(det, x, keep, layout, autocast, row.treatment)
        if bavit is not None:
            xb = to_input(np.stack([bav_timed[i] for i in sl]), bavit.cfg.mean, bavit.cfg.std, device)
            t = row.threshold

            def full():
                with torch.autocast(**autocast):
                    p = bavit.fg_prob(xb.to(dtype) if dtype != torch.float32 else xb)
                g = (1.0 - p.float()) < t
                if opts.postprocess_steps:
                    g = torch.as_tensor(refine(g.cpu().numpy(), opts.postprocess_steps), device=device)
                k = resample_torch(g, dgrid)
                return _pruned(det, x, k, layout, autocast, row.treatment)

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


def _dense(det, x, autocast):
    with torch.autocast(**autocast):
        return det(pixel_values=x)


def _pruned(det, x, keep, layout, autocast, treatment="drop"):
    with torch.autocast(**autocast):
        return pruned_forward(det, x, keep, layout=layout, treatment=treatment)


