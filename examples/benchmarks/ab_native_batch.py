"""Fused native encoder layer vs the packed loop with several images (pruned.NATIVE_MIN_TOKENS_BATCHED).

    python examples/benchmarks/ab_native_batch.py [--repeats 9]

The fused layer runs image by image; this times a batch of 8 both ways (fused: every image
through it, NATIVE_MIN_TOKENS_BATCHED = 0; loop: NATIVE_MAX_TOKENS = 0, the packed loop with
per-image attention), on the shipped demo detector (128 px,
64 patch tokens + 10 detection tokens) and a YOLOS-tiny-shaped one (512 px, random
weights), medians of interleaved calls, and prints ms per batch.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9)
    a = ap.parse_args()
    from transformers import YolosForObjectDetection

    import bavit_core.detection.pruned as P
    from bavit_core.demo import shipped_detector
    from bavit_core.detection.yolos import load_detector, tiny_yolos_config

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    cases = [("demo detector", load_detector(str(shipped_detector()), torch.device("cpu")).eval(), 128, 64,
              (0.25, 0.5, 0.85)),
             ("YOLOS-tiny", YolosForObjectDetection(tiny_yolos_config("tiny")).eval(), 512, 1024, (0.85, 0.9, 0.95))]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")
    for name, det, size, p, sparsities in cases:
        x = torch.randn(8, 3, size, size)
        n_spec = 1 + det.config.num_detection_tokens
        for s in sparsities:
            ss = np.clip(np.linspace(s - 0.03, s + 0.03, 8), 0, 0.99)
            keep = torch.stack([torch.rand(p, generator=g) >= si for si in ss])
            modes = {"fused": (10 ** 6, 0), "loop": (0, 0)}
            times = {k: [] for k in modes}
            with torch.inference_mode():
                for r in range(2 + a.repeats):
                    for k, (tok, imgs) in modes.items():
                        P.NATIVE_MAX_TOKENS, P.NATIVE_MIN_TOKENS_BATCHED = tok, imgs
                        t = time.perf_counter()
                        P.pruned_forward(det, x, keep)
                        if r >= 2:
                            times[k].append(time.perf_counter() - t)
            f, lo = (1000 * statistics.median(times[k]) for k in modes)
            lens = keep.sum(1) + n_spec
            print(f"{name:>13} batch 8, sparsity {s:.2f} ({int(lens.min())}-{int(lens.max())} tokens/image): "
                  f"fused {f:.1f} ms, loop {lo:.1f} ms, fused/loop {f / lo:.2f}")


if __name__ == "__main__":
    main()
