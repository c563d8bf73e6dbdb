"""Training throughput of YOLOS with token pruning vs without, measured in one run.

    python examples/benchmarks/bench_finetune.py [--repeats 7]

One optimisation step = pruned (or dense) forward + transformers' DETR set loss + backward
+ AdamW step, on random images with 3 random boxes each. Dense and pruned steps alternate;
medians. Configs: the demo's micro YOLOS at 192×192 (batch 16) and YOLOS-tiny at 512×512
(batch 4); sparsity 35 % and 50 % with per-image spread.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    from transformers import YolosForObjectDetection

    from bavit_core.detection.pruned import pruned_forward
    from bavit_core.detection.yolos import tiny_yolos_config

    print(f"machine: cpu {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'config':>14} {'batch':>5} {'sparsity':>8} {'dense img/s':>11} {'pruned img/s':>12} {'gain':>6}")
    g = torch.Generator().manual_seed(0)
    for name, size, bs in (("micro", 192, 16), ("tiny", 512, 4)):
        cfg = tiny_yolos_config(name, num_labels=6, image_size=(size, size),
                                **({"num_detection_tokens": 10} if name == "micro" else {}))
        torch.manual_seed(0)
        model = YolosForObjectDetection(cfg).train()
        opt = torch.optim.AdamW(model.parameters(), 1e-4)
        x = torch.randn(bs, 3, size, size, generator=g)
        targets = [{"class_labels": torch.randint(1, 6, (3,), generator=g),
                    "boxes": torch.rand(3, 4, generator=g) * 0.4 + 0.1} for _ in range(bs)]
        n = (size // 16) ** 2

        def step(keep):
            o = pruned_forward(model, x, keep)
            loss, _, _ = model.loss_function(o.logits, targets, "cpu", o.pred_boxes, model.config, None, None)
            opt.zero_grad()
            loss.backward()
            opt.step()

        for s in (0.35, 0.5):
            keep = torch.stack([torch.rand(n, generator=g) >= v for v in np.linspace(s - 0.1, s + 0.1, bs)])
            for _ in range(2):
                step(None), step(keep)
            td, tp = [], []
            for _ in range(a.repeats):
                t = time.perf_counter(); step(None); td.append(time.perf_counter() - t)
                t = time.perf_counter(); step(keep); tp.append(time.perf_counter() - t)
            d, p = statistics.median(td), statistics.median(tp)
            print(f"{name + '@' + str(size):>14} {bs:>5} {1 - keep.float().mean().item():>8.3f} {bs / d:>11.1f} "
                  f"{bs / p:>12.1f} {d / p:>5.2f}x")


if __name__ == "__main__":
    main()
