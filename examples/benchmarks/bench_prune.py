"""Pruned YOLOS-tiny speed per treatment of the pruned tokens vs each one's FLOP ideal, and
end-to-end BAViT-small + pruned YOLOS.

    python examples/benchmarks/bench_prune.py [--repeats 7] [--sparsities 0.25,0.5,0.75,0.9]
        [--treatments drop,pool,preserve] [--batches 1,8] [--device cpu|cuda] [--dtype fp32|bf16]
        [--no-end-to-end]

Random weights (speed does not depend on them), 512×512 input (32×32 = 1024 patch tokens,
+1 CLS +100 detection tokens). Batch 1, and batch 8 whose images keep different numbers of
tokens (sparsity spread ±0.05 around the target, clipped to [0, 0.98]). Per (batch,
sparsity), dense HF YOLOS and the pruned forward of every treatment are timed interleaved
in one process (2 warm-up rounds, then D, T1, T2, T3, D, T1, ... ; medians); spread =
IQR / median of each. FLOP-ideal speedup = dense GFLOPs / the treatment's own GFLOPs
(bavit_core.detection.accounting.detector_gflops); share = measured / ideal.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch


def interleaved(fns: dict, device, repeats: int, warmup: int = 2, clock=time.perf_counter) -> dict:
    """Median seconds and IQR/median spread per function, called in turn."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times = {k: [] for k in fns}
    with torch.inference_mode():
        for r in range(warmup + repeats):
            for k, f in fns.items():
                sync()
                t = clock()
                f()
                sync()
                if r >= warmup:
                    times[k].append(clock() - t)
    out = {}
    for k, v in times.items():
        q = np.percentile(v, [25, 50, 75])
        out[k] = (statistics.median(v), (q[2] - q[0]) / q[1])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--layouts", default=None, help="comma list of pack,pad [default: pack on CPU, pad on CUDA]")
    ap.add_argument("--sparsities", default="0.25,0.5,0.75,0.9")
    ap.add_argument("--treatments", default="drop,pool,preserve")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--no-end-to-end", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads [default: torch's]")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="wall: perf_counter; cpu: this process's CPU time (steadier on a shared machine; "
                         "with 1 thread it is the compute alone)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    clock = time.perf_counter if a.clock == "wall" else time.process_time
    from transformers import YolosForObjectDetection

    from bavit_core.bavit.model import create_bavit
    from bavit_core.detection.accounting import bavit_gflops, detector_gflops
    from bavit_core.detection.pruned import pruned_forward
    from bavit_core.detection.yolos import tiny_yolos_config
    from bavit_core.evaluate.timing import time_interleaved

    dev = torch.device(a.device)
    dt = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    layouts = (a.layouts or ("pad" if dev.type == "cuda" else "pack")).split(",")
    treatments = a.treatments.split(",")
    torch.manual_seed(0)
    det = YolosForObjectDetection(tiny_yolos_config("tiny")).eval().to(dev, dt)
    bav = create_bavit(2).eval().to(dev, dt)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; dtype {a.dtype}; repeats {a.repeats}; clock {a.clock}; "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"{'batch':>5} {'target':>6} {'actual':>6} {'layout':>6} {'treatment':>9} {'dense ms/img':>12} {'spread':>6} "
          f"{'pruned ms/img':>13} {'spread':>6} {'speedup':>7} {'FLOP-ideal':>10} {'share':>6}")
    g = torch.Generator().manual_seed(1)
    worst = 1e9
    for b in [int(v) for v in a.batches.split(",")]:
        x = torch.randn(b, 3, 512, 512, device=dev, dtype=dt)
        for s in [float(v) for v in a.sparsities.split(",")]:
            ss = [s] if b == 1 else np.clip(np.linspace(s - 0.05, s + 0.05, b), 0, 0.98)
            keep = torch.stack([torch.rand(1024, generator=g) >= si for si in ss]).to(dev)
            kept = keep.sum(1).cpu().numpy()
            dense_g = detector_gflops(det.config, np.full(b, 1024), 1024)
            for lay in layouts:
                fns = {"dense": lambda: det(pixel_values=x)}
                for t in treatments:
                    fns[t] = (lambda t=t: pruned_forward(det, x, keep, layout=lay, treatment=t))
                med = interleaved(fns, dev, a.repeats, clock=clock)
                for t in treatments:
                    sp = med["dense"][0] / med[t][0]
                    ideal = dense_g / detector_gflops(det.config, kept, 1024, treatment=t)
                    worst = min(worst, sp / ideal)
                    print(f"{b:>5} {s:>6.2f} {1 - kept.mean() / 1024:>6.3f} {lay:>6} {t:>9} "
                          f"{1000 * med['dense'][0] / b:>12.1f} {med['dense'][1]:>6.2f} {1000 * med[t][0] / b:>13.1f} "
                          f"{med[t][1]:>6.2f} {sp:>7.3f} {ideal:>10.3f} {sp / ideal:>6.2f}", flush=True)
    print(f"lowest share of the FLOP ideal: {worst:.2f}; load {os.getloadavg()[0]:.2f}")
    if a.no_end_to_end:
        return
    # end to end at 35 % sparsity: BAViT-small (384) + threshold + resample + pruned YOLOS
    print("\nend to end, 35 % sparsity (BAViT-small 384 + pruned YOLOS-tiny 512) vs dense YOLOS-tiny")
    for b in (1, 8):
        x = torch.randn(b, 3, 512, 512, device=dev, dtype=dt)
        xb = torch.randn(b, 3, 384, 384, device=dev, dtype=dt)
        ss = [0.35] if b == 1 else np.linspace(0.2, 0.5, b)
        # a BAViT grid at 24x24 with the target sparsity, upsampled to 32x32 like prune-eval does
        g24 = torch.stack([torch.rand(576, generator=g) >= si for si in ss]).reshape(b, 24, 24).to(dev)
        ri = ((2 * torch.arange(32) + 1) * 24) // 64

        def full():
            p = bav.fg_prob(xb)  # the real BAViT compute; its decision is replaced by g24 for a fixed sparsity
            k = (g24 | (p > 2)).float()[:, ri.to(dev)][:, :, ri.to(dev)].bool()
            return pruned_forward(det, x, k, layout=layouts[0])

        k32 = g24[:, ri.to(dev)][:, :, ri.to(dev)]
        med = time_interleaved({"dense": lambda: det(pixel_values=x), "full": full,
                                "bavit": lambda: bav.fg_prob(xb)}, dev, repeats=a.repeats)
        flops = (detector_gflops(det.config, np.full(b, 1024), 1024) /
                 (detector_gflops(det.config, k32.reshape(b, -1).sum(1).cpu().numpy(), 1024) + bavit_gflops(bav.cfg)))
        print(f"batch {b}: sparsity {1 - k32.float().mean().item():.3f}  dense {1000 * med['dense'] / b:.1f} ms/img  "
              f"BAViT {1000 * med['bavit'] / b:.1f} ms/img  BAViT+pruned {1000 * med['full'] / b:.1f} ms/img  "
              f"throughput x{med['dense'] / med['full']:.3f}  (FLOP ratio x{flops:.3f})")


if __name__ == "__main__":
    main()
