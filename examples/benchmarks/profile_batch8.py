"""Where the pruned forward's batch-8 time goes, against dense YOLOS-tiny (docs/performance.md).

    python examples/benchmarks/profile_batch8.py [--sparsity 0.5] [--batch 8]

1. torch.profiler op totals (self CPU) of dense YOLOS and the pruned forward, batch 8 (or --batch),
   512 px, random weights, images keeping target ± 0.05 of their tokens (3 calls each).
2. Scaled dot-product attention on (8, 3, L, 64): no mask, a boolean key mask, a float
   mask, and one call per image on its own length (medians of 9), L = 200-870.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F


def median_ms(f, k=9):
    ts = []
    for i in range(k + 2):
        t = time.perf_counter()
        f()
        if i >= 2:
            ts.append(time.perf_counter() - t)
    return 1000 * statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()
    from torch.profiler import profile
    from transformers import YolosForObjectDetection

    from bavit_core.detection.pruned import pruned_forward
    from bavit_core.detection.yolos import tiny_yolos_config

    torch.manual_seed(0)
    det = YolosForObjectDetection(tiny_yolos_config("tiny")).eval()
    x = torch.randn(a.batch, 3, 512, 512)
    g = torch.Generator().manual_seed(1)
    ss = [a.sparsity] if a.batch == 1 else np.clip(np.linspace(a.sparsity - 0.05, a.sparsity + 0.05, a.batch), 0, 0.98)
    keep = torch.stack([torch.rand(1024, generator=g) >= s for s in ss])
    with torch.inference_mode():
        for f in (lambda: det(pixel_values=x), lambda: pruned_forward(det, x, keep)):
            f()
        for name, f in (("dense", lambda: det(pixel_values=x)), ("pruned", lambda: pruned_forward(det, x, keep))):
            with profile() as prof:
                for _ in range(3):
                    f()
            print(f"{name}, 3 calls:")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
        for L in (870, 612, 357, 200):
            q, k, v = (torch.randn(8, 3, L, 64) for _ in range(3))
            lens = torch.linspace(L * 0.9, L, 8).long()
            bool_mask = (torch.arange(L)[None] < lens[:, None])[:, None, None, :]
            float_mask = torch.zeros(8, 1, 1, L).masked_fill(~bool_mask, float("-inf"))

            def per_image():
                for i in range(8):
                    n = int(lens[i])
                    F.scaled_dot_product_attention(q[i:i + 1, :, :n], k[i:i + 1, :, :n], v[i:i + 1, :, :n])

            print(f"L {L}: no mask {median_ms(lambda: F.scaled_dot_product_attention(q, k, v)):.1f} ms, "
                  f"bool mask {median_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask)):.1f}, "
                  f"float mask {median_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=float_mask)):.1f}, "
                  f"per image {median_ms(per_image):.1f}")


if __name__ == "__main__":
    main()
