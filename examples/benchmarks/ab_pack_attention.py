"""A/B: how a packed batch runs attention in the pruned forward at 2+ threads — one padded
SDPA call per layer (the default) vs one call per image (what one thread uses).

    python examples/benchmarks/ab_pack_attention.py

YOLOS-tiny shape at 512, random weights, batch 8, per-image sparsity target ± 0.05;
interleaved, 2 warm-ups, medians of 5, ms per image.
"""
import time, statistics, torch, numpy as np
import bavit_core.detection.pruned as P
from transformers import YolosForObjectDetection
from bavit_core.detection.yolos import tiny_yolos_config, init_new_yolos
torch.manual_seed(0)
m = YolosForObjectDetection(tiny_yolos_config("tiny")).eval(); init_new_yolos(m)
x = torch.randn(8, 3, 512, 512)
rng = np.random.default_rng(0)
real = torch.get_num_threads  # the per-image path is chosen when torch reports one thread
P.NATIVE_MAX_TOKENS = 0  # short sequences would otherwise skip both attentions (fused native layers)
for s in (0.5, 0.75, 0.9):
    keep = torch.zeros(8, 1024, dtype=torch.bool)
    for i in range(8):
        k = int(1024 * (1 - np.clip(s + rng.uniform(-0.05, 0.05), 0, 0.99)))
        keep[i, rng.choice(1024, k, replace=False)] = True
    res = {"pad": [], "per": []}
    with torch.inference_mode():
        for r in range(7):
            for mode in ("pad", "per"):
                P.torch.get_num_threads = real if mode == "pad" else (lambda: 1)
                t = time.perf_counter(); P.pruned_forward(m, x, keep); dt = time.perf_counter() - t
                if r >= 2: res[mode].append(dt)
    P.torch.get_num_threads = real
    print(s, {k: round(1000 * statistics.median(v) / 8, 1) for k, v in res.items()}, "threads", real())
