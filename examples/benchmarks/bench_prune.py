"""Pruned YOLOS-tiny speed vs the FLOP ideal, and end-to-end BAViT-small + pruned YOLOS.

    python examples/benchmarks/bench_prune.py [--repeats 9] [--device cpu|cuda] [--dtype fp32|bf16]

Random weights (speed does not depend on them), 512×512 input (32×32 = 1024 patch tokens,
+1 CLS +100 detection tokens). Batch 1, and batch 8 whose images keep different numbers of
tokens (sparsity spread ±15 points around the target). Dense HF YOLOS and the pruned forward
are timed interleaved in one process (warm-up, medians). FLOP-ideal speedup = encoder+embed
+heads FLOPs dense / pruned (bavit_core.detection.accounting.detector_gflops).
"""
from __future__ import annotations

import argparse
import os
import platform

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--layouts", default=None, help="comma list of pack,pad [default: pack on CPU, pack,pad on CUDA]")
    a = ap.parse_args()
    from transformers import YolosForObjectDetection

    from bavit_core.bavit.model import create_bavit
    from bavit_core.detection.accounting import bavit_gflops, detector_gflops
    from bavit_core.detection.pruned import pruned_forward
    from bavit_core.detection.yolos import tiny_yolos_config
    from bavit_core.evaluate.timing import time_interleaved

    dev = torch.device(a.device)
    dt = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    layouts = (a.layouts or ("pack,pad" if dev.type == "cuda" else "pack")).split(",")
    torch.manual_seed(0)
    det = YolosForObjectDetection(tiny_yolos_config("tiny")).eval().to(dev, dt)
    bav = create_bavit(2).eval().to(dev, dt)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; dtype {a.dtype}; repeats {a.repeats}")
    print(f"{'batch':>5} {'target':>6} {'actual':>6} {'layout':>6} {'dense ms/img':>12} {'pruned ms/img':>13} "
          f"{'speedup':>7} {'FLOP-ideal':>10} {'ratio':>6}")
    g = torch.Generator().manual_seed(1)
    for b in (1, 8):
        x = torch.randn(b, 3, 512, 512, device=dev, dtype=dt)
        for s in (0.35, 0.5):
            ss = [s] if b == 1 else np.linspace(s - 0.15, s + 0.15, b)
            keep = torch.stack([torch.rand(1024, generator=g) >= si for si in ss]).to(dev)
            kept = keep.sum(1).cpu().numpy()
            ideal = detector_gflops(det.config, np.full(b, 1024), 1024) / detector_gflops(det.config, kept, 1024)
            for lay in layouts:
                med = time_interleaved({"dense": lambda: det(pixel_values=x),
                                        "pruned": lambda: pruned_forward(det, x, keep, layout=lay)},
                                       dev, repeats=a.repeats)
                sp = med["dense"] / med["pruned"]
                print(f"{b:>5} {s:>6.2f} {1 - kept.mean() / 1024:>6.3f} {lay:>6} {1000 * med['dense'] / b:>12.1f} "
                      f"{1000 * med['pruned'] / b:>13.1f} {sp:>7.3f} {ideal:>10.3f} {sp / ideal:>6.2f}")
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
