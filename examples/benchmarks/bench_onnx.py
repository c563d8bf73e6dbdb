"""ONNX Runtime: dense vs pruned YOLOS-tiny, the whole pipeline, and how batches are served.

    python examples/benchmarks/bench_onnx.py [--repeats 15] [--threads 0] [--clock wall|cpu] [--int8]

YOLOS-tiny shape (12 layers, 192 wide, 3 heads, 100 detection tokens; random weights: speed
does not depend on them) at 512×512 (32×32 = 1024 patch tokens), BAViT-small (2 layers,
384×384). The graphs are made by ``bavit export`` (``export_onnx``) into a temporary
directory. Everything is timed in this process, interleaved (A, B, C, A, B, C, …) after a
warm-up; each cell is the median, with its spread IQR/median. FLOP-ideal speedup =
``detector_gflops`` dense / pruned (+ ``bavit_gflops`` for the pipeline); "share" = measured
speedup / FLOP-ideal. A run flags itself noisy when a spread passes 10 %.

``--clock cpu`` runs PyTorch and ONNX Runtime on one thread each and times the process's
CPU time (the timing loop records it beside wall time): on a machine shared with other jobs this keeps
what they take from the figures (not their effect on caches); wall-clock latency on an
idle machine is the figure to publish.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch


def interleaved(fns: dict, repeats: int, warmup: int = 3, clock: str = "wall") -> dict:
    """{name: (median s, IQR/median)}: the toolkit's one timing loop
    (bavit_core.evaluate.timing.measure, round robin), wall or CPU time."""
    import torch

    from bavit_core.evaluate.timing import measure

    s = measure(fns, torch.device("cpu"), repeats, warmup=warmup)
    return {k: ((v.median, v.spread) if clock == "wall" else (v.cpu_median, v.cpu_spread)) for k, v in s.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0 = its default, one per core)")
    ap.add_argument("--int8", action="store_true", help="also time onnxruntime's quantize_dynamic int8 graphs")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: one thread each, time the process's CPU time")
    ap.add_argument("--keep", default=None, help="keep the exported graphs in this directory")
    a = ap.parse_args()
    clock = a.clock
    if a.clock == "cpu":  # one thread each; process CPU time (measure's cpu samples)
        a.threads = 1
        torch.set_num_threads(1)
    import onnxruntime as ort
    from transformers import YolosForObjectDetection

    from bavit_core.bavit.model import create_bavit, save_weights
    from bavit_core.detection.accounting import bavit_gflops, detector_gflops
    from bavit_core.detection.yolos import init_new_yolos, tiny_yolos_config
    from bavit_core.detection.selection import kept_per_image as topk_count
    from bavit_core.export.onnx_export import ExportOptions, export_onnx
    from bavit_core.export.ort import session

    torch.manual_seed(0)
    det = YolosForObjectDetection(tiny_yolos_config("tiny")).eval()
    init_new_yolos(det)
    bav = create_bavit(2).eval()
    tmp = Path(a.keep or tempfile.mkdtemp(prefix="bench_onnx-"))
    det.save_pretrained(tmp / "det")
    (tmp / "run").mkdir(parents=True, exist_ok=True)
    save_weights(bav, tmp / "run" / "model.safetensors")
    (tmp / "run" / "config.json").write_text(json.dumps({"model": asdict(bav.cfg)}))
    t = time.perf_counter()
    if not (tmp / "exp" / "manifest.json").is_file():  # --keep DIR: exported once, reused (same seeds)
        export_onnx(ExportOptions(detector=str(tmp / "det"), model=str(tmp / "run"), out=str(tmp / "exp"),
                                  sparsity=0.35, policy="topk", dense=True))
    t_export = time.perf_counter() - t

    load = os.getloadavg()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); onnxruntime {ort.__version__} ({a.threads or 'default'} threads); "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; repeats {a.repeats}; clock {a.clock}; "
          f"export {t_export:.1f} s")
    exp = tmp / "exp"
    s_det = session(exp / "detector.onnx", threads=a.threads)
    s_dense = session(exp / "detector_dense.onnx", threads=a.threads)
    s_pipe = session(exp / "pipeline.onnx", threads=a.threads)
    s_bav = session(exp / "bavit.onnx", threads=a.threads)
    P = 1024
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 512, 512, generator=g)
    xn = x.numpy()
    xb = torch.randn(1, 3, 384, 384, generator=g).numpy()
    keeps = {s: np.sort(torch.randperm(P, generator=g)[:topk_count(s, P)].numpy()).astype(np.int64) for s in (0.35, 0.5)}
    all_idx = np.arange(P, dtype=np.int64)
    dense_g = detector_gflops(det.config, np.array([P]), P)

    fns = {
        "torch dense": lambda: det(pixel_values=x),
        "ORT dense": lambda: s_dense.run(None, {"pixel_values": xn}),
        "ORT pruned K=P": lambda: s_det.run(None, {"pixel_values": xn, "keep": all_idx}),
        "ORT pruned 35 %": lambda: s_det.run(None, {"pixel_values": xn, "keep": keeps[0.35]}),
        "ORT pruned 50 %": lambda: s_det.run(None, {"pixel_values": xn, "keep": keeps[0.5]}),
        "ORT bavit.onnx": lambda: s_bav.run(None, {"image": xb}),
        "ORT pipeline 35 %": lambda: s_pipe.run(None, {"pixel_values": xn, "bavit_pixel_values": xb}),
    }
    ideal = {"ORT pruned K=P": 1.0,
             "ORT pruned 35 %": dense_g / detector_gflops(det.config, np.array([len(keeps[0.35])]), P),
             "ORT pruned 50 %": dense_g / detector_gflops(det.config, np.array([len(keeps[0.5])]), P),
             "ORT pipeline 35 %": dense_g / (detector_gflops(det.config, np.array([topk_count(0.35, P)]), P)
                                             + bavit_gflops(bav.cfg))}
    with torch.inference_mode():
        med = interleaved(fns, a.repeats, clock=clock)
    noisy = any(sp > 0.10 for _, sp in med.values())
    print("\nbatch 1, 512x512, YOLOS-tiny shape" + ("  [NOISY: a spread > 10 %]" if noisy else ""))
    print(f"{'':<20} {'ms':>8} {'IQR/med':>8} {'vs ORT dense':>13} {'FLOP-ideal':>10} {'share':>6}")
    ref = med["ORT dense"][0]
    for k, (m, sp) in med.items():
        speed = ref / m
        row = f"{k:<20} {1000 * m:>8.1f} {100 * sp:>7.1f}% {speed:>12.3f}x"
        if k in ideal:
            row += f" {ideal[k]:>9.3f}x {100 * speed / ideal[k]:>5.0f}%"
        print(row)
    print(f"torch dense / ORT dense: {med['torch dense'][0] / ref:.3f}x")

    # batches: the pruned graph serves a batch as a loop of single images (each its own K)
    b = 8
    xs = torch.randn(b, 3, 512, 512, generator=g).numpy()
    ss = np.linspace(0.2, 0.5, b)
    kb = [np.sort(torch.randperm(P, generator=g)[:topk_count(s, P)].numpy()).astype(np.int64) for s in ss]
    xt = torch.from_numpy(xs)
    bfns = {
        "torch dense batch 8": lambda: det(pixel_values=xt),
        "ORT dense batch 8 (one call)": lambda: s_dense.run(None, {"pixel_values": xs}),
        "ORT dense loop of 8": lambda: [s_dense.run(None, {"pixel_values": xs[i:i + 1]}) for i in range(b)],
        "ORT pruned loop of 8": lambda: [s_det.run(None, {"pixel_values": xs[i:i + 1], "keep": kb[i]}) for i in range(b)],
    }
    with torch.inference_mode():
        bmed = interleaved(bfns, max(5, a.repeats // 3), clock=clock)
    bideal = dense_g * b / sum(detector_gflops(det.config, np.array([len(k)]), P) for k in kb)
    print(f"\nbatch {b} (pruned: sparsity 0.20..0.50 per image, mean {1 - np.mean([len(k) for k in kb]) / P:.3f})"
          + ("  [NOISY]" if any(sp > 0.10 for _, sp in bmed.values()) else ""))
    print(f"{'':<30} {'ms/img':>8} {'IQR/med':>8} {'vs ORT dense batch':>19}")
    bref = bmed["ORT dense batch 8 (one call)"][0]
    for k, (m, sp) in bmed.items():
        print(f"{k:<30} {1000 * m / b:>8.1f} {100 * sp:>7.1f}% {bref / m:>18.3f}x")
    print(f"FLOP-ideal of the pruned loop: {bideal:.3f}x; share {100 * bref / bmed['ORT pruned loop of 8'][0] / bideal:.0f}%")

    if a.int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        for name in ("detector", "detector_dense"):
            quantize_dynamic(str(exp / f"{name}.onnx"), str(tmp / f"{name}.int8.onnx"), weight_type=QuantType.QInt8)
        q_det = session(tmp / "detector.int8.onnx", threads=a.threads)
        q_dense = session(tmp / "detector_dense.int8.onnx", threads=a.threads)
        qfns = {"ORT dense fp32": fns["ORT dense"], "ORT dense int8": lambda: q_dense.run(None, {"pixel_values": xn}),
                "ORT pruned 35 % fp32": fns["ORT pruned 35 %"],
                "ORT pruned 35 % int8": lambda: q_det.run(None, {"pixel_values": xn, "keep": keeps[0.35]})}
        qmed = interleaved(qfns, a.repeats, clock=clock)
        print("\nint8 (quantize_dynamic, weights QInt8), batch 1")
        for k, (m, sp) in qmed.items():
            print(f"{k:<22} {1000 * m:>8.1f} ms {100 * sp:>6.1f}%  {qmed['ORT dense fp32'][0] / m:.3f}x vs dense fp32")
    if not a.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
