"""A/B: how a packed batch attends in the pruned forward on CPU — one padded SDPA call per
layer vs one call per image on its own length (pruned.CPU_PER_IMAGE_MIN_TOKENS picks with several threads).

    python examples/benchmarks/ab_pack_attention.py [--demo-detector] [--treatment drop] [--repeats 7]

Default: YOLOS-tiny shape at 512 px, random weights, batch 8, per-image sparsity target
± 0.05 at 0.5/0.75/0.9, ms per image. --demo-detector: the shipped demo detector at
128 px (64 patch + 10 detection tokens) at 0.1/0.5/0.85, ms per batch. The fused native
layer is switched off so both sides run the same per-op loop; interleaved, 2 warm-ups,
medians.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-detector", action="store_true")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--treatment", default="drop", choices=["drop", "pool", "preserve"])
    a = ap.parse_args()
    import bavit_core.detection.pruned as P

    torch.manual_seed(0)
    if a.demo_detector:
        from bavit_core.demo import shipped_detector
        from bavit_core.detection.yolos import load_detector

        m, size, p, sparsities, per = load_detector(str(shipped_detector())), 128, 64, (0.1, 0.5, 0.85), 1
    else:
        from transformers import YolosForObjectDetection

        from bavit_core.detection.yolos import init_new_yolos, tiny_yolos_config

        m = YolosForObjectDetection(tiny_yolos_config("tiny")).eval()
        init_new_yolos(m)
        size, p, sparsities, per = 512, 1024, (0.5, 0.75, 0.9), 8
    x = torch.randn(8, 3, size, size)
    rng = np.random.default_rng(0)
    P.NATIVE_MAX_TOKENS = 0
    n_spec = 1 + m.config.num_detection_tokens
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {a.treatment}; "
          f"ms per {'image' if per == 8 else 'batch of 8'}")
    for s in sparsities:
        keep = torch.zeros(8, p, dtype=torch.bool)
        for i in range(8):
            k = max(1, int(p * (1 - np.clip(s + rng.uniform(-0.05, 0.05), 0, 0.99))))
            keep[i, rng.choice(p, k, replace=False)] = True
        res = {"padded": [], "per image": []}
        with torch.inference_mode():
            for r in range(2 + a.repeats):
                for mode in res:
                    P._padded_on_cpu = (lambda keys: True) if mode == "padded" else (lambda keys: False)
                    t = time.perf_counter()
                    P.pruned_forward(m, x, keep, treatment=a.treatment)
                    if r >= 2:
                        res[mode].append(time.perf_counter() - t)
        lens = keep.sum(1) + n_spec
        print(f"sparsity {s:.2f} ({int(lens.min())}-{int(lens.max())} tokens): "
              + ", ".join(f"{k} {1000 * statistics.median(v) / per:.1f}" for k, v in res.items()))


if __name__ == "__main__":
    main()
