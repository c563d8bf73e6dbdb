"""prune-eval's timing of its rows: dense YOLOS once per run, BAViT once, and every row's
pruned YOLOS, round robin in this process, with spreads and the noisy flag."""
from __future__ import annotations

import platform
import time
from typing import Callable

import numpy as np
import torch

from ..data.images import to_input
from ..data.ragged import Grids
from ..detection.layered import layered_forward
from ..detection.pruned import pruned_forward
from ..detection.batches import autocast_args, batch_inputs, take
from .timing import drift, is_noisy, peak_memory_mb, spread, time_round_robin


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads, {platform.machine()})"


NO_TIMING = {"latency_ms": float("nan"), "latency_spread": float("nan"), "throughput_ips": float("nan"),
             "dense_latency_ms": float("nan"), "dense_spread": float("nan"), "speedup": float("nan"),
             "detector_speedup": float("nan"), "peak_mem_mb": float("nan"), "timing_noisy": False}


@torch.inference_mode()
def time_rows(det, bavit, rows, det_u8, bav_u8, opts, device, dtype, layout, tick, proto,
              scorer: Callable | None = None) -> tuple[list[dict], dict]:
    """Dense YOLOS (once), BAViT (once, when a row uses it) and every row's pruned YOLOS on
    the first timing images, round robin over ``timing_repeats`` rounds after one warm-up
    round; rows whose timed images keep the same token counts under the same treatment
    are one workload, timed once. Per row: medians per image, spreads (IQR / median) and the noisy flag; per run:
    the dense reference's samples and drift. Dense is transformers' own model, image by
    image for a batch of images of different sizes (the checkpoint's protocol), as its
    users would run it (its processor pads a batch with zeros, which YOLOS does not mask).
    ``scorer(row)``: the keyword arguments an in-detector row's forward takes (a gate and
    its threshold), {} for the attention selector."""
    scorer = scorer or (lambda row: {})
    n_t = len(det_u8)
    if n_t == 0 or opts.timing_repeats < 1:
        return [dict(NO_TIMING) for _ in rows], {"dense_drift": float("nan"), "timing_seconds": 0.0}
    t0 = time.perf_counter()
    bs = opts.batch_size
    ac = autocast_args(device, dtype)
    xs = [batch_inputs(det_u8, None, slice(s, min(s + bs, n_t)), proto, device, dtype)[0] for s in range(0, n_t, bs)]
    fns: dict[str, Callable] = {}
    warm: dict[str, Callable] = {}  # the same work on the first batch: warm-up and memory probe
    fns["dense"] = lambda xs=xs: _dense(det, xs, ac)
    warm["dense"] = lambda: _dense(det, xs[:1], ac)
    if bavit is not None and any(r.selector == "bavit" for r in rows):
        xbs = [to_input(bav_u8[s:s + bs], bavit.cfg.mean, bavit.cfg.std, device) for s in range(0, n_t, bs)]
        if ac["enabled"]:  # CUDA autocast; on CPU BAViT runs in fp32, as in the selection stage
            xbs = [xb.to(dtype) for xb in xbs]
        fns["bavit"] = lambda: _bavit(bavit, xbs, ac)
        warm["bavit"] = lambda: _bavit(bavit, xbs[:1], ac)
    workload, names = {}, {}  # row index → the name of its timed detector work; work → name
    for k, row in enumerate(rows):
        if row.selector == "dense":
            continue
        key = _workload_key(row, n_t)  # rows keeping the same counts (random beside bavit): timed once
        name = names.setdefault(key, f"row{k}")
        workload[k] = name
        if name in fns:
            continue
        if row.prune_layer is not None:  # the detector chooses its tokens: its scoring is timed too
            fns[name] = lambda r=row: _layered(det, xs, r.prune_layer, r.target, layout, ac, r.treatment, scorer(r))
            warm[name] = lambda r=row: _layered(det, xs[:1], r.prune_layer, r.target, layout, ac, r.treatment,
                                                scorer(r))
            continue
        ks = [batch_inputs(det_u8, row.keep, slice(s, min(s + bs, n_t)), proto, device, dtype)[1]
              for s in range(0, n_t, bs)]
        fns[name] = lambda ks=ks, t=row.treatment: _pruned(det, xs, ks, layout, ac, t)
        warm[name] = lambda ks=ks, t=row.treatment: _pruned(det, xs[:1], ks[:1], layout, ac, t)
    total = (opts.timing_repeats + 2) * len(fns)
    samples = time_round_robin(fns, device, repeats=opts.timing_repeats, warmup=1, tick=lambda: tick(1, total),
                               warmup_fns=warm)
    peaks = {}
    for name, f in warm.items():
        if name != "bavit":
            peaks[name] = peak_memory_mb(f, device)
        tick(1, total)
    per_img = lambda v: np.asarray(v) / n_t  # noqa: E731
    d = per_img(samples["dense"])
    d_med, d_spread, d_drift = float(np.median(d)), spread(d), drift(d)
    b = per_img(samples["bavit"]) if "bavit" in samples else None
    out = []
    for k, row in enumerate(rows):
        if row.selector == "dense":
            det_s = full = d
        else:
            det_s = per_img(samples[workload[k]])
            full = det_s + b if (row.selector == "bavit" and b is not None) else det_s
        lat = float(np.median(full))
        lat_spread = spread(full)
        noisy = is_noisy(lat_spread, d_spread, d_drift)
        out.append({
            "latency_ms": 1000 * lat, "latency_spread": lat_spread, "throughput_ips": 1.0 / lat,
            "dense_latency_ms": 1000 * d_med, "dense_spread": d_spread,
            "speedup": d_med / lat, "detector_speedup": d_med / float(np.median(det_s)),
            "peak_mem_mb": peaks.get("dense" if row.selector == "dense" else workload[k], float("nan")),
            "timing_noisy": noisy,
        })
    run = {"dense_drift": d_drift, "dense_samples_ms": [1000 * v for v in d.tolist()],
           "dense_peak_mem_mb": peaks.get("dense"), "timing_seconds": time.perf_counter() - t0}
    return out, run


def _workload_key(row, n_t: int):
    """What a row's timed detector call depends on: its treatment, the layer where the
    detector chooses its own tokens (None: chosen before it) and how many tokens each
    timed image keeps (which tokens does not change the work), so a random row costs what
    the BAViT row it copies the counts of costs, and an in-detector row (attention, gate)
    never shares another selector's timing."""
    kept = Grids.of(take(row.keep, np.arange(n_t))).sums()
    return row.treatment, row.prune_layer, row.selector if row.prune_layer is not None else None, tuple(
        int(v) for v in kept)


def _dense(det, xs, ac):
    for x in xs:
        with torch.autocast(**ac):
            if isinstance(x, list):
                for xi in x:
                    det(pixel_values=xi[None])
            else:
                det(pixel_values=x)


def _bavit(bavit, xbs, ac):
    for xb in xbs:
        with torch.autocast(**ac):
            bavit.fg_prob(xb)


def _layered(det, xs, layer, sparsity, layout, ac, treatment="drop", scorer=None):
    scorer = scorer or {}
    if scorer.get("threshold") is not None:
        sparsity = None
    for x in xs:
        with torch.autocast(**ac):
            layered_forward(det, x, layer, sparsity=sparsity, layout=layout, treatment=treatment, **scorer)


def _pruned(det, xs, keeps, layout, ac, treatment="drop"):
    for x, k in zip(xs, keeps):
        with torch.autocast(**ac):
            pruned_forward(det, x, k, layout=layout, treatment=treatment)
