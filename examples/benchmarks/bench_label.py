"""Labelling benchmark at COCO scale: `bavit label` vs a per-cell shapely baseline.

    python examples/benchmarks/coco_scale.py --out /tmp/coco118k.json
    python examples/benchmarks/bench_label.py --ann /tmp/coco118k.json

Prints: whole CLI runs (JSON parse included) for boxes and masks (--workers 2), the
scoring rate on one core, and the same images through a straightforward per-cell shapely
implementation measured in the same process, with the ratio.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np


def shapely_boxes(aset, idx, gh=24, gw=24):
    from shapely.geometry import box

    out = np.zeros((len(idx), gh, gw))
    for k, i in enumerate(idx):
        w, h = aset.widths[i], aset.heights[i]
        bs = [box(*b) for b in aset.boxes[aset.box_image == i]]
        for r in range(gh):
            for c in range(gw):
                cell = box(c * w / gw, r * h / gh, (c + 1) * w / gw, (r + 1) * h / gh)
                out[k, r, c] = max([cell.intersection(b).area / cell.area for b in bs], default=0.0)
    return out


def shapely_masks(aset, idx, gh=24, gw=24):
    from shapely.geometry import Polygon, box
    from shapely.ops import unary_union

    out = np.zeros((len(idx), gh, gw))
    for k, i in enumerate(idx):
        w, h = aset.widths[i], aset.heights[i]
        polys = []
        for seg, _ in aset.mask_fn.segs[i]:
            for p in seg:
                polys.append(Polygon(np.asarray(p).reshape(-1, 2)).buffer(0))
        u = unary_union(polys)
        for r in range(gh):
            for c in range(gw):
                cell = box(c * w / gw, r * h / gh, (c + 1) * w / gw, (r + 1) * h / gh)
                out[k, r, c] = cell.intersection(u).area / cell.area
    return out


def run_cli(args):
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bavit_cli", "label", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ann", required=True)
    ap.add_argument("--baseline-images", type=int, default=100)
    ap.add_argument("--skip-cli", action="store_true")
    a = ap.parse_args()
    from bavit_core import labels as L
    from bavit_core.data import open_dataset

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    rows = []
    tmp = tempfile.mkdtemp()
    if not a.skip_cli:
        t = run_cli(["--ann", a.ann, "--no-check-images", "--out", f"{tmp}/b.parquet"])
        rows.append(("CLI boxes, whole run (parse + score + write)", f"{t:.1f} s"))
        t = run_cli(["--ann", a.ann, "--no-check-images", "--source", "masks", "--workers", "2", "--out", f"{tmp}/m.parquet"])
        rows.append(("CLI masks --workers 2, whole run", f"{t:.1f} s"))
    t = time.perf_counter()
    aset = open_dataset("coco", ann=a.ann, check_images=False)
    rows.append(("load + validate annotations", f"{time.perf_counter() - t:.1f} s ({aset.n_images} images)"))
    for crit in ("coverage", "jaccard"):
        t = time.perf_counter()
        L.compute_box_scores(aset, L.LabelOptions(criterion=crit))
        dt = time.perf_counter() - t
        rows.append((f"box scoring ({crit}), 1 core", f"{aset.n_images / dt:,.0f} images/s"))
    box_rate = aset.n_images / dt
    L._JOB["aset"], L._JOB["opts"] = aset, L.LabelOptions(source="masks")
    n = min(5000, aset.n_images)
    t = time.perf_counter()
    L._mask_range((0, n))
    mask_rate = n / (time.perf_counter() - t)
    rows.append(("mask scoring (pycocotools raster + exact counts), 1 core", f"{mask_rate:,.0f} images/s"))
    idx = np.arange(a.baseline_images)
    t = time.perf_counter()
    shapely_boxes(aset, idx)
    sb = len(idx) / (time.perf_counter() - t)
    t = time.perf_counter()
    shapely_masks(aset, idx)
    sm = len(idx) / (time.perf_counter() - t)
    rows.append(("shapely per-cell baseline, boxes (jaccard-free coverage)", f"{sb:,.1f} images/s"))
    rows.append(("shapely per-cell baseline, polygons", f"{sm:,.1f} images/s"))
    rows.append(("ratio boxes (bavit jaccard / shapely)", f"{box_rate / sb:,.0f}x"))
    rows.append(("ratio masks (bavit / shapely)", f"{mask_rate / sm:,.0f}x"))
    w = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")


if __name__ == "__main__":
    main()
