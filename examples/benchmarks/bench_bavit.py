"""BAViT speed: training input pipeline overhead, predict throughput, postprocess rate.

    python examples/benchmarks/bench_bavit.py [--images 256] [--steps 20]

Training: the same optimisation steps (depth 2, 384×384, batch 32, CPU) fed (A) by the real
pipeline (labels parquet → decoded, resized uint8 cache → per-batch normalise + flip) and
(B) by tensors already in memory, interleaved, medians. The one-time decode into the cache is
reported separately and amortised over one epoch.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    a = ap.parse_args()
    from bavit_core.bavit.inference import infer_probs
    from bavit_core.bavit.model import create_bavit
    from bavit_core.bavit.postprocess import refine
    from bavit_core.bavit.train import _batch, acc_loss, load_split
    from bavit_core.data import open_dataset
    from bavit_core.data.synthetic import synth_dataset
    from bavit_core.labels import LabelOptions, label_dataset
    from bavit_core.runtime.distributed import epoch_order

    torch.manual_seed(0)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, python {platform.python_version()}")
    tmp = Path(tempfile.mkdtemp())
    synth_dataset(tmp / "d", a.images, "coco", 0, (480, 640), val_fraction=0.0)
    aset = open_dataset("coco", root=tmp / "d", split="train2017", need_masks=True)
    label_dataset(aset, LabelOptions(source="masks"), tmp / "l.parquet")
    model = create_bavit(2)
    cfg = model.cfg
    t = time.perf_counter()
    split, _ = load_split(str(tmp / "l.parquet"), None, cfg, None)
    decode_s = time.perf_counter() - t
    n = len(split.grids)
    perm, flips = epoch_order(0, 0, n)
    bs = a.batch_size
    x_mem, y_mem = _batch(split, perm[:bs], flips, cfg, "cpu")
    opt = torch.optim.Adam(model.parameters(), 1e-4)

    def step(x, y):
        loss = acc_loss(model(x), y, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def real(k):
        b = perm[(k * bs) % (n - bs):(k * bs) % (n - bs) + bs]
        x, y = _batch(split, b, flips, cfg, "cpu")
        step(x, y)

    def mem(k):
        step(x_mem, y_mem)

    for k in range(3):
        real(k), mem(k)
    ta, tb, tbatch = [], [], []
    for k in range(a.steps):
        t = time.perf_counter(); real(k); ta.append(time.perf_counter() - t)
        t = time.perf_counter(); mem(k); tb.append(time.perf_counter() - t)
        b = perm[:bs]
        t = time.perf_counter(); _batch(split, b, flips, cfg, "cpu"); tbatch.append(time.perf_counter() - t)
    ma, mb, mbatch = statistics.median(ta), statistics.median(tb), statistics.median(tbatch)
    steps_per_epoch = n / bs
    print(f"train step, real pipeline        {bs / ma:7.1f} images/s  ({ma * 1000:.0f} ms/step)")
    print(f"train step, tensors in memory    {bs / mb:7.1f} images/s  ({mb * 1000:.0f} ms/step)")
    print(f"pipeline share of step time      {100 * (ma - mb) / ma:7.1f} %  (batch assembly alone: "
          f"{100 * mbatch / ma:.1f} %)")
    print(f"one-time decode+resize into cache {decode_s:6.2f} s for {n} images of 640x480 "
          f"= {100 * decode_s / (decode_s + steps_per_epoch * ma):.1f} % of the first epoch, "
          f"{100 * decode_s / (decode_s + 30 * steps_per_epoch * ma):.1f} % over 30 epochs")
    imgs = split.images[:128]
    infer_probs(model, imgs[:32], 32)
    t = time.perf_counter(); infer_probs(model, imgs, 32); dt = time.perf_counter() - t
    print(f"predict (depth 2, 384, batch 32) {len(imgs) / dt:7.1f} images/s (model only, images decoded)")
    torch.set_num_threads(1)
    grids = np.random.default_rng(0).random((100_000, 24, 24)) < 0.5
    refine(grids[:1000], 3)
    t = time.perf_counter(); refine(grids, 3); dt = time.perf_counter() - t
    print(f"postprocess (24x24, 3 steps, 8-neighbour, one core) {len(grids) / dt:,.0f} grids/s")


if __name__ == "__main__":
    main()
