"""A/B: YOLOS-tiny's encoder (12 layers, width 192, 3 heads) over one image's sequence of
n tokens, our per-op loop (``_encode``, per-image SDPA) vs torch's fused native encoder
layer (``_encode_native``, ``torch._transformer_encoder_layer_fwd``): where the fused layer
stops paying off picks ``pruned.NATIVE_MAX_TOKENS``.

    python examples/benchmarks/ab_native_layer.py [--threads 2,1] [--lengths 203,256,320,384,450,612]

Random weights, fp32, inference mode; per (threads, n): 1 warm-up round, then the two
interleaved, medians of --repeats (spread = IQR / median), ms per encoder call.
"""
import argparse
import statistics
import time

import numpy as np
import torch
from transformers import YolosForObjectDetection

from bavit_core.detection.attention import attend_packed
from bavit_core.detection.pruned import _encode, _encode_native
from bavit_core.detection.yolos import init_new_yolos, tiny_yolos_config

ap = argparse.ArgumentParser()
ap.add_argument("--threads", default="2,1")
ap.add_argument("--lengths", default="203,256,320,384,450,612")
ap.add_argument("--repeats", type=int, default=7)
a = ap.parse_args()
torch.manual_seed(0)
m = YolosForObjectDetection(tiny_yolos_config("tiny")).eval()
init_new_yolos(m)
c, heads = m.config.hidden_size, m.config.num_attention_heads
hd = c // heads


def spread(v):
    q1, q3 = np.percentile(v, [25, 75])
    return (q3 - q1) / statistics.median(v)


with torch.inference_mode():
    for th in map(int, a.threads.split(",")):
        torch.set_num_threads(th)
        for n in map(int, a.lengths.split(",")):
            h = torch.randn(n, c)
            fns = {"loop": lambda: _encode(m, h, None, lambda qkv, kv: attend_packed(qkv, kv, [n], None, heads, hd,
                                                                                      hd ** -0.5, 0.0), None),
                   "native": lambda: _encode_native(m, h, None, [(0, n)])}
            res = {k: [] for k in fns}
            for r in range(a.repeats + 1):
                for k, f in fns.items():
                    t = time.perf_counter()
                    f()
                    if r:
                        res[k].append(1000 * (time.perf_counter() - t))
            lo, na = (statistics.median(res[k]) for k in fns)
            print(f"threads {th} n {n:4d}: loop {lo:6.1f} ms ({spread(res['loop']):.2f})  "
                  f"native {na:6.1f} ms ({spread(res['native']):.2f})  native/loop {na / lo:.2f}", flush=True)
