"""What happens to pruned tokens (drop / pool / preserve) on the demo data and the shipped
detector, at target sparsities and at BAViT's default threshold, without and with a short
sparse fine-tuning (the same epochs for each treatment). Prints the table of
docs/results.md and writes it with every number to OUT/treatments.json.

    bavit demo --out demo
    python examples/treatments_results.py --demo demo --out demo/treatments [--epochs 3]

Operating points: ``bavit_0.50`` is BAViT's default (a token is kept when its BG
probability < 0.5, the per-image sparsity varies); ``top-k s`` keeps, in every image, the
round((1 - s) · P) tokens with the highest BAViT FG probability (per-image top-k, so every
image has sparsity ≈ s). The fine-tuning runs ``bavit finetune --selector bavit
--threshold 0.5 --pruned-tokens T`` on the demo's train split (BAViT's default tokens),
then every operating point is evaluated with the fine-tuned detector and the same
treatment. Speed: the detector alone (BAViT's cost is the same for every treatment),
dense vs each treatment interleaved in one process on the first ``--timing-images``
val images at batch 8 (medians, IQR/median spread), beside each one's FLOP ideal.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

TARGETS = (0.25, 0.5, 0.75)


def topk_keep(probs: np.ndarray, sparsity: float) -> np.ndarray:
    """Per image, the round((1 - s)·P) tokens with the highest FG probability (N, gh, gw)."""
    n = len(probs)
    flat = probs.reshape(n, -1)
    k = int(round((1 - sparsity) * flat.shape[1]))
    keep = np.zeros_like(flat, dtype=bool)
    order = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    np.put_along_axis(keep, order, True, axis=1)
    return keep.reshape(probs.shape)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", default="demo", help="a `bavit demo` output directory")
    ap.add_argument("--detector", default=None, help="[default: the shipped demo detector]")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--treatments", default="drop,pool,preserve")
    ap.add_argument("--timing-images", type=int, default=16)
    ap.add_argument("--timing-repeats", type=int, default=7)
    ap.add_argument("--out", default=None, help="[default: DEMO/treatments]")
    ap.add_argument("--threads", type=int, default=None, help="torch threads [default: torch's]")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from bavit_core.bavit.inference import infer_probs
    from bavit_core.bavit.model import load_bavit
    from bavit_core.data import open_dataset
    from bavit_core.data.grid import resample_grid
    from bavit_core.data.images import decode_once, resolve_paths, to_input
    from bavit_core.demo import shipped_detector
    from bavit_core.detection.protocol import square_protocol
    from bavit_core.detection.accounting import bavit_gflops, detector_gflops
    from bavit_core.detection.cocoeval import coco_ground_truth, detections_from_outputs, evaluate_detections
    from bavit_core.detection.pruned import pruned_forward
    from bavit_core.detection.selection import bavit_keep
    from bavit_core.detection.yolos import IMAGE_MEAN, IMAGE_STD, detector_grid, load_detector
    from bavit_core.finetune.loop import FinetuneOptions, finetune

    demo = Path(a.demo)
    out = Path(a.out or demo / "treatments")
    out.mkdir(parents=True, exist_ok=True)
    det_dir = Path(a.detector) if a.detector else shipped_detector()
    treatments = a.treatments.split(",")
    det_hw = square_protocol(str(det_dir)).size  # the size it was trained at (its processor file)
    base = load_detector(str(det_dir))
    dgrid = detector_grid(base, det_hw)
    n_patches = dgrid[0] * dgrid[1]
    bavit = load_bavit(str(demo / "bavit-small"))

    aset = open_dataset("coco", root=demo / "data", split="val2017")
    files, missing = resolve_paths(aset.images_dir, aset.file_names)
    assert not missing
    ids, widths, heights = aset.image_ids, aset.widths, aset.heights
    gt = coco_ground_truth(aset, ids, None)
    det_u8, bav_u8 = decode_once(files, [det_hw, (bavit.cfg.input_h, bavit.cfg.input_w)], out)
    probs = infer_probs(bavit, bav_u8, 32, torch.device("cpu"))  # (N, bh, bw) FG probability
    points = {"bavit_0.50": bavit_keep(probs, 0.5, dgrid)}
    for s in TARGETS:
        points[f"top-k {s:.2f}"] = resample_grid(topk_keep(probs, s), dgrid, "nearest")

    # ---- short sparse fine-tuning, once per treatment, same settings ---------------------
    tuned = {}
    for t in treatments:
        t0 = time.perf_counter()
        finetune(FinetuneOptions(detector=str(det_dir), root=str(demo / "data"), split="train2017",
                                 selector="bavit", model=str(demo / "bavit-small"), threshold=0.5,
                                 detector_size=det_hw, epochs=a.epochs, batch_size=8, lr=5e-5, warmup_epochs=0.2,
                                 pruned_tokens=t, seed=0, device="cpu", out=str(out / f"detector-F-{t}")))
        tuned[t] = load_detector(str(out / f"detector-F-{t}"))
        print(f"fine-tuned with {t}: {time.perf_counter() - t0:.0f} s", flush=True)

    def evaluate(model, keep, t):
        dets = []
        with torch.inference_mode():
            for s in range(0, len(ids), 8):
                sl = slice(s, s + 8)
                x = to_input(det_u8[sl], IMAGE_MEAN, IMAGE_STD)
                k = None if keep is None else torch.as_tensor(keep[sl])
                o = pruned_forward(model, x, k, treatment=t)
                dets += detections_from_outputs(o.logits, o.pred_boxes, ids[sl], widths[sl], heights[sl])
        return evaluate_detections(gt, dets, ids)

    def timing(keep):
        x = to_input(det_u8[:a.timing_images], IMAGE_MEAN, IMAGE_STD)
        fns = {"dense": lambda: base(pixel_values=x)}
        for t in treatments:
            k = torch.as_tensor(keep[:a.timing_images])
            fns[t] = (lambda t=t, k=k: [pruned_forward(base, x[i:i + 8], k[i:i + 8], treatment=t)
                                        for i in range(0, len(x), 8)])
        fns["dense"] = lambda: [base(pixel_values=x[i:i + 8]) for i in range(0, len(x), 8)]
        times = {k: [] for k in fns}
        with torch.inference_mode():
            for r in range(2 + a.timing_repeats):
                for name, f in fns.items():
                    t0 = time.perf_counter()
                    f()
                    if r >= 2:
                        times[name].append(time.perf_counter() - t0)
        res = {}
        for name, v in times.items():
            q = np.percentile(v, [25, 50, 75])
            res[name] = (q[1], (q[2] - q[0]) / q[1])
        return res

    dense_g = detector_gflops(base.config, np.full(len(ids), n_patches), n_patches)
    bg = bavit_gflops(bavit.cfg)
    result = {"dense": {"map": evaluate(base, None, "drop")["map"],
                        "map_F": {t: evaluate(tuned[t], None, "drop")["map"] for t in treatments},
                        "gflops": dense_g},
              "rows": [], "load": os.getloadavg(), "torch": torch.__version__, "epochs": a.epochs,
              "threads": torch.get_num_threads()}
    for name, keep in points.items():
        kept = keep.reshape(len(ids), -1).sum(1)
        tm = timing(keep)
        for t in treatments:
            g = detector_gflops(base.config, kept, n_patches, treatment=t)
            row = {"point": name, "treatment": t, "sparsity": float(1 - kept.mean() / n_patches),
                   "map": evaluate(base, keep, t)["map"], "map_F": evaluate(tuned[t], keep, t)["map"],
                   "gflops": g, "gflops_with_bavit": g + bg, "flop_ideal": dense_g / g,
                   "speedup": tm["dense"][0] / tm[t][0], "spread": max(tm["dense"][1], tm[t][1])}
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    result["load_after"] = os.getloadavg()
    (out / "treatments.json").write_text(json.dumps(result, indent=1))
    d = result["dense"]
    print(f"\ndense: mAP {d['map']:.3f} (fine-tuned: " +
          ", ".join(f"{t} {v:.3f}" for t, v in d["map_F"].items()) + f"), {d['gflops']:.3f} GFLOPs")
    print("| tokens | treatment | sparsity | GFLOPs (detector) | FLOP-ideal | measured speedup (spread) | mAP | mAP after FT |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['point']} | {r['treatment']} | {r['sparsity']:.3f} | {r['gflops']:.3f} | {r['flop_ideal']:.2f}x | "
              f"{r['speedup']:.2f}x ({r['spread']:.2f}) | {r['map']:.3f} | {r['map_F']:.3f} |")


if __name__ == "__main__":
    main()
