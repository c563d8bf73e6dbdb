"""``bavit bench``: where pruning pays on this device and runtime.

Per (runtime, dtype, batch size): dense YOLOS, BAViT alone and the pruned detector at
every kept-token share and treatment are timed round robin in this process by the one
timing loop (timing.measure: warm-up, then rounds until the spreads are small), on random
inputs (speed does not depend on the pixels) with random token positions; within a batch
the images keep different counts (±0.05 around the share), as real images do. End to end
is BAViT's latency plus the pruned detector's, as prune-eval's rows count it. Writes a
speed directory whole: speed.csv (speedcurve.py), speed.png and meta.json (the machine,
the options, each curve's break-even sparsity).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from .. import __version__
from ..runtime.errors import OptionError
from ..runtime.options import check_option_values
from .options import _parse_range
from .speedcurve import SPEED_FILE, curves, write_speed_csv

DTYPES = ("fp32", "bf16", "fp16")
RUNTIMES = ("torch", "onnx")
MIXED_SPREAD = 0.05  # per-image kept shares spread ±this around the target within a batch


def parse_kept(text: str) -> list[float]:
    """Kept-token shares: ``start:stop[:step]`` or ``a,b,c``; values in (0, 1]."""
    vals = _parse_range(text, "--kept")
    bad = [v for v in vals if not 0.0 < v <= 1.0]
    if bad:
        raise OptionError(f"--kept must lie in (0, 1]; got {bad[0]}")
    return vals


def parse_list(text: str, option: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    vals = list(dict.fromkeys(v.strip() for v in str(text).split(",") if v.strip()))
    if not vals:
        raise OptionError(f"{option} is empty")
    for v in vals:
        if allowed and v not in allowed:
            raise OptionError(f"unknown {option} {v!r}; choose one of {', '.join(allowed)}")
    return vals


def parse_batch_sizes(text: str) -> list[int]:
    try:
        vals = [int(v) for v in parse_list(text, "--batch-sizes")]
    except ValueError:
        raise OptionError(f"cannot read --batch-sizes {text!r}: use a comma list of whole numbers, e.g. 1,8") from None
    if min(vals) < 1:
        raise OptionError(f"--batch-sizes must be at least 1, got {min(vals)}")
    return vals


@dataclass
class BenchOptions:
    detector: str
    model: str | None = None  # a BAViT run: end to end adds its latency
    runtimes: list[str] = field(default_factory=lambda: ["torch"])
    exported: str | None = None  # bavit export's directory (runtime onnx)
    device: str = "auto"
    dtypes: list[str] = field(default_factory=lambda: ["fp32"])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    kept: list[float] = field(default_factory=lambda: parse_kept("0.1:1.0:0.1"))
    pruned_tokens: list[str] = field(default_factory=lambda: ["drop"])
    detector_size: tuple[int, int] | None = None
    layout: str | None = None
    repeats: int = 3  # at least this many rounds ...
    max_repeats: int = 10  # ... and more, up to this, until every spread is at most half the noisy limit
    seed: int = 0
    out: str = "speed"


def check_bench_options(o: BenchOptions) -> None:
    from ..detection.pruned import LAYOUTS, TREATMENTS
    from ..runtime.devices import check_device_available
    from ..runtime.fileio import check_output_writable, refuse_output_over_inputs

    check_option_values(o.device, {"layout": (o.layout, LAYOUTS)}, repeats=(o.repeats, 1),
                        max_repeats=(o.max_repeats, 1))
    for name, vals, allowed in (("--runtime", o.runtimes, RUNTIMES), ("--dtype", o.dtypes, DTYPES),
                                ("--pruned-tokens", o.pruned_tokens, TREATMENTS)):
        if not vals:
            raise OptionError(f"{name} is empty")
        bad = [v for v in vals if v not in allowed]
        if bad:
            raise OptionError(f"unknown {name} {bad[0]!r}; choose one of {', '.join(allowed)}")
    if not o.kept or not o.batch_sizes:
        raise OptionError("--kept and --batch-sizes need at least one value")
    if "onnx" in o.runtimes:
        if not o.exported:
            raise OptionError("--runtime onnx needs --exported DIR (from bavit export)")
        if o.pruned_tokens != ["drop"] or o.dtypes != ["fp32"]:
            raise OptionError("--runtime onnx times the exported fp32 graphs, which drop pruned tokens: "
                              "use --dtype fp32 --pruned-tokens drop (or bench torch separately)")
    elif o.exported:
        raise OptionError("--exported goes with --runtime onnx")
    refuse_output_over_inputs(o.out, [o.detector, o.model, o.exported], is_dir=True)
    check_output_writable(o.out)
    check_device_available(o.device)


def bench_size(o: BenchOptions, det) -> tuple[int, int]:
    """The input size timed: --detector-size, else the exported graphs' size, else the
    checkpoint's square size or its shortest edge as a square."""
    from ..detection.protocol import input_protocol

    if o.detector_size is None and o.exported:
        from ..export.ort import read_manifest

        return tuple(read_manifest(o.exported)["detector"]["input_size"])
    proto = input_protocol(o.detector, o.detector_size, det.config.patch_size)
    if proto.size is not None:
        return tuple(proto.size)
    edge = proto.processor_size.get("shortest_edge")
    if not edge or edge % det.config.patch_size:
        raise OptionError("the detector's processor gives no square size to time: pass --detector-size")
    return int(edge), int(edge)


def run_bench(o: BenchOptions, progress: Callable[[int, int], None] | None = None) -> dict:
    """Measure and write ``o.out`` whole (speed.csv, speed.png, meta.json). Returns the rows,
    the curves' break-even sparsities, the machine and the noisy flag."""
    from ..bavit.model import load_bavit
    from ..detection.yolos import load_detector
    from ..runtime.devices import resolve_device
    from ..runtime.fileio import atomic_dir, atomic_write_text
    from .speedplot import speed_figure
    from .timing import describe_machine, machine_info, machine_load

    t0 = time.perf_counter()
    load0 = machine_load()
    check_bench_options(o)
    device = resolve_device(o.device)
    if device.type != "cuda" and "fp16" in o.dtypes:
        raise OptionError("--dtype fp16 needs CUDA")
    det = load_detector(o.detector, device).eval()
    bavit = load_bavit(o.model, device=device).eval() if o.model else None
    size = bench_size(o, det)
    ps = det.config.patch_size
    if size[0] % ps or size[1] % ps:
        raise OptionError(f"--detector-size {size[0]}x{size[1]} is not divisible by the detector patch {ps}")
    rt = None
    if "onnx" in o.runtimes:
        from ..export.ort import ExportedModels

        rt = ExportedModels(o.exported, det, size, bavit, str(device))
    machine = machine_info(device)
    groups = [(r, d, b) for r in o.runtimes for d in (o.dtypes if r == "torch" else ["fp32"]) for b in o.batch_sizes]
    def calls(runtime):  # the most timed calls of a group: a warm-up round and max_repeats rounds
        n = 1 + (bavit is not None) + len(o.kept) * (len(o.pruned_tokens) if runtime == "torch" else 1)
        return (1 + max(o.repeats, o.max_repeats)) * n

    total = sum(calls(r) for r, _, _ in groups)
    done = [0]

    def tick():
        done[0] += 1
        if progress:
            progress(1, total)

    rows, drifts = [], {}
    for runtime, dtype, bs in groups:
        start = done[0]
        g_rows, drift = _bench_group(o, det, bavit, rt, runtime, dtype, bs, size, device, machine, tick)
        rows += g_rows
        drifts[f"{runtime} {dtype} batch {bs}"] = drift
        per = calls(runtime)
        if progress and done[0] - start < per:  # stopped early: the spreads were small
            progress(per - (done[0] - start), total)
            done[0] = start + per
    cs = curves(rows)
    breaks = []
    for c in cs:
        s, how = c.break_even()
        breaks.append({"runtime": c.runtime, "dtype": c.dtype, "batch_size": c.batch_size, "treatment": c.treatment,
                       "break_even_sparsity": s, "how": how, "of": "end_to_end" if c.has_bavit else "detector"})
    noisy = any(r["noisy"] for r in rows)
    meta = {"bavit_version": __version__, "options": asdict(o), "machine": machine,
            "machine_description": describe_machine(machine), "device": str(device),
            "input_size": list(size), "n_patches": (size[0] // ps) * (size[1] // ps),
            "break_even": breaks, "noisy": noisy, "dense_drift": drifts, "load_start": load0,
            "load_end": machine_load(), "seconds": time.perf_counter() - t0}
    with atomic_dir(o.out, markers=(SPEED_FILE,)) as tmp:
        atomic_write_text(tmp / SPEED_FILE, write_speed_csv(tmp / SPEED_FILE, rows))
        speed_figure(cs, tmp / "speed.png", meta["machine_description"])
        atomic_write_text(tmp / "meta.json", json.dumps(_nan_null(meta), indent=2))
    return {"out": str(o.out), "rows": rows, "break_even": breaks, "noisy": noisy, "machine": machine,
            "machine_description": meta["machine_description"], "input_size": list(size),
            "dense_drift": drifts, "seconds": meta["seconds"]}


def _nan_null(v):
    """NaN → null (meta.json stays standard JSON), through dicts and lists."""
    if isinstance(v, dict):
        return {k: _nan_null(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_nan_null(x) for x in v]
    return None if isinstance(v, float) and math.isnan(v) else v


def kept_masks(kept: float, batch: int, n_patches: int, rng: np.random.Generator) -> np.ndarray:
    """(batch, n_patches) bool: image i keeps round(f_i · P) random tokens (at least one),
    the f_i spread evenly ±MIXED_SPREAD around ``kept`` when batch > 1 (less near 0 and 1,
    so the mean stays ``kept``)."""
    half = min(MIXED_SPREAD, 1.0 - kept, max(kept - 1.0 / n_patches, 0.0))
    fr = np.linspace(kept - half, kept + half, batch) if batch > 1 else np.array([kept])
    counts = np.clip(np.round(fr * n_patches).astype(int), 1, n_patches)
    out = np.zeros((batch, n_patches), dtype=bool)
    for i, c in enumerate(counts):
        out[i, rng.choice(n_patches, size=int(c), replace=False)] = True
    return out


def _bench_group(o, det, bavit, rt, runtime, dtype, bs, size, device, machine, tick) -> tuple[list[dict], float]:
    """One (runtime, dtype, batch size): every workload round robin, then its rows."""
    import torch

    from ..detection.accounting import bavit_gflops, detector_gflops
    from .speed import _bavit, _dense, _pruned, autocast_args, device_name
    from .timing import drift, is_noisy, measure

    tdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    ps = det.config.patch_size
    gh, gw = size[0] // ps, size[1] // ps
    P = gh * gw
    layout = o.layout or ("pad" if device.type == "cuda" else "pack")
    gen = torch.Generator().manual_seed(o.seed)
    rng = np.random.default_rng([o.seed, bs])
    x = torch.randn(bs, 3, *size, generator=gen)
    xb = None if bavit is None else torch.randn(bs, 3, bavit.cfg.input_h, bavit.cfg.input_w, generator=gen)
    treatments = o.pruned_tokens if runtime == "torch" else ["drop"]
    masks = {k: kept_masks(k, bs, P, rng) for k in o.kept}
    fns: dict[str, Callable] = {}
    if runtime == "torch":
        det.to(tdt)
        ac = autocast_args(device, tdt)
        xd = x.to(device, tdt)
        fns["dense"] = lambda: _dense(det, [xd], ac)
        if bavit is not None:
            xbd = xb.to(device, tdt if ac["enabled"] else torch.float32)
            fns["bavit"] = lambda: _bavit(bavit, [xbd], ac)
        for k, m in masks.items():
            kd = torch.as_tensor(m.reshape(bs, gh, gw), device=device)
            for t in treatments:
                fns[f"{t} {k}"] = lambda kd=kd, t=t: _pruned(det, [xd], [kd], layout, ac, t)
        dev_name = device_name(device)
    else:
        xn = x.numpy()
        fns["dense"] = lambda: rt.detect(xn, None)
        if bavit is not None:
            xbn = xb.numpy()
            fns["bavit"] = lambda: rt.bavit.run(None, {"image": xbn})
        for k, m in masks.items():
            fns[f"drop {k}"] = lambda m=m: rt.detect(xn, m)
        dev_name = f"onnxruntime {machine.get('onnxruntime')} on {device_name(device)}"
    s = measure(fns, device, o.repeats, o.max_repeats, warmup=1, tick=tick)
    per_img = {k: np.asarray(v.wall) / bs for k, v in s.items()}
    d = per_img["dense"]
    d_med, d_spread, d_drift = float(np.median(d)), s["dense"].spread, drift(d)
    b_med = float(np.median(per_img["bavit"])) if "bavit" in s else float("nan")
    dense_g = detector_gflops(det.config, np.full(bs, P), P)
    bav_g = bavit_gflops(bavit.cfg) if bavit is not None else float("nan")
    base = {"runtime": runtime, "device": dev_name, "dtype": dtype, "batch_size": bs, "n_patches": P}

    def row(name, workload, treatment, kept, kept_tokens, g):
        v = s[name]
        lat = float(np.median(per_img[name]))
        e2e = lat + b_med if workload == "pruned" else (lat if workload == "dense" else float("nan"))
        sp = [v.spread, d_spread, d_drift] + ([s["bavit"].spread] if workload == "pruned" and "bavit" in s else [])
        return dict(base, workload=workload, treatment=treatment, kept=kept, kept_tokens=kept_tokens,
                    sparsity=1.0 - kept_tokens / P if workload != "bavit" else float("nan"),
                    latency_ms=1000 * lat, latency_spread=v.spread, cpu_ms=1000 * v.cpu_median / bs,
                    cpu_spread=v.cpu_spread, throughput_ips=1.0 / lat, repeats=len(v.wall),
                    dense_latency_ms=1000 * d_med, bavit_latency_ms=1000 * b_med, end_to_end_ms=1000 * e2e,
                    detector_speedup=d_med / lat if workload != "bavit" else float("nan"),
                    speedup=d_med / e2e if workload != "bavit" else float("nan"),
                    flop_speedup=dense_g / g if workload != "bavit" else float("nan"),
                    flop_speedup_end_to_end=(dense_g / (g + bav_g) if workload == "pruned" else
                                             1.0 if workload == "dense" else float("nan")),
                    noisy=is_noisy(*sp))

    out = [row("dense", "dense", "", 1.0, float(P), dense_g)]
    if "bavit" in s:
        out.append(row("bavit", "bavit", "", float("nan"), float("nan"), bav_g))
    for t in treatments:
        for k, m in masks.items():
            kept_i = m.sum(1)
            out.append(row(f"{t} {k}", "pruned", t, k, float(kept_i.mean()),
                           detector_gflops(det.config, kept_i, P, t)))
    if runtime == "torch":
        det.to(torch.float32)
    return out, d_drift
