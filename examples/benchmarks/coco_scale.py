"""Write a COCO-scale instances file (default: 118 287 images of 640x480, ~7 objects each,
polygons of 10-60 vertices) for the labelling benchmark. No image files are written."""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def make(n_images: int, seed: int = 0, w: int = 640, h: int = 480) -> dict:
    rng = np.random.default_rng(seed)
    images = [{"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "width": w, "height": h} for i in range(n_images)]
    n_obj = rng.poisson(7, n_images)
    anns = []
    aid = 1
    for i in range(n_images):
        for _ in range(n_obj[i]):
            k = int(rng.integers(10, 61))
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            r = rng.uniform(8, 160)
            ang = np.sort(rng.uniform(0, 2 * np.pi, k))
            rad = r * rng.uniform(0.5, 1.0, k)
            xs = np.clip(cx + rad * np.cos(ang), 0, w)
            ys = np.clip(cy + rad * np.sin(ang), 0, h)
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max(), ys.max()
            poly = np.round(np.stack([xs, ys], 1).reshape(-1), 2).tolist()
            anns.append({"id": aid, "image_id": i + 1, "category_id": int(rng.integers(1, 81)),
                         "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                         "area": float((x1 - x0) * (y1 - y0)), "iscrowd": 0, "segmentation": [poly]})
            aid += 1
    return {"images": images, "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in range(1, 81)]}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", type=int, default=118287)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t = time.perf_counter()
    doc = make(a.images, a.seed)
    with open(a.out, "w") as f:
        json.dump(doc, f)
    print(f"wrote {a.out}: {a.images} images, {len(doc['annotations'])} annotations in {time.perf_counter() - t:.0f} s")
