"""Why a small YOLOS trained from scratch does not detect, and what fixes it (docs/results.md).

    # box spread: std over val images of each detection token's box centre (fraction of the image)
    python examples/benchmarks/detector_probe.py spread --detector DIR --root detdata
    # a short from-scratch run of micro YOLOS at 128 px, batch 8, lr 4e-4 on the first 3000 images
    python examples/benchmarks/detector_probe.py train --variant base|xavier|bavit|dense-aux --root detdata \
        [--bavit RUN] [--steps 3000] [--every 500]

A detector whose tokens ignore the image has a spread near 0. The variants: ``base`` (set
loss only), ``xavier`` (Xavier-initialised encoder Linear layers), ``bavit`` (encoder
started from a BAViT run, as ``finetune --init-encoder``), ``dense-aux`` (the set loss plus
``finetune --dense-aux 1.0``). Prints losses, spread and val mAP every ``--every`` steps.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def load(root, split, size, n):
    from bavit_core.data import open_dataset
    from bavit_core.finetune.data import label_map_for as _label_map
    from bavit_core.finetune.data import prepare as _prepare

    aset = open_dataset("coco", root=root, split=split)
    return aset, _prepare(aset, np.arange(min(n, aset.n_images)), (size, size), _label_map(aset), None,
                          [aset.images_dir / f for f in aset.file_names])


def spread_and_map(model, aset, data):
    from bavit_core.data.images import to_input
    from bavit_core.detection.cocoeval import coco_ground_truth, detections_from_outputs, evaluate_detections
    from bavit_core.detection.pruned import pruned_forward
    from bavit_core.detection.yolos import IMAGE_MEAN, IMAGE_STD

    model.eval()
    with torch.no_grad():
        o = pruned_forward(model, to_input(data.images, IMAGE_MEAN, IMAGE_STD), None)
    model.train()
    dets = detections_from_outputs(o.logits, o.pred_boxes, data.ids, data.widths, data.heights)
    stats = evaluate_detections(coco_ground_truth(aset, data.ids), dets, data.ids)
    return o.pred_boxes[:, :, :2].std(0).mean().item(), stats


def train(a):
    from transformers import YolosForObjectDetection

    from bavit_core.detection.pruned import pruned_forward
    from bavit_core.detection.yolos import init_encoder_from_bavit, init_new_yolos, tiny_yolos_config
    from bavit_core.finetune.data import make_batch as _batch
    from bavit_core.finetune.dense_aux import dense_aux_loss

    aset, data = load(a.root, "train2017", 128, a.train_images)
    vset, val = load(a.root, "val2017", 128, 200)
    torch.manual_seed(0)
    m = YolosForObjectDetection(tiny_yolos_config("micro", num_labels=6, image_size=(128, 128),
                                                  num_detection_tokens=10)).train()
    init_new_yolos(m)
    if a.variant == "xavier":
        for mod in m.vit.encoder.modules():
            if isinstance(mod, torch.nn.Linear):
                torch.nn.init.xavier_uniform_(mod.weight)
                torch.nn.init.zeros_(mod.bias)
    elif a.variant == "bavit":
        from bavit_core.bavit.model import load_bavit

        init_encoder_from_bavit(m, load_bavit(a.bavit))
    opt = torch.optim.AdamW(m.parameters(), lr=4e-4, weight_decay=1e-4)
    n, hist, t0 = len(data.ids), [], time.perf_counter()
    for step in range(a.steps):
        for g in opt.param_groups:
            g["lr"] = 4e-4 * min(1.0, (step + 1) / 300)
        b = np.random.default_rng(step).choice(n, 8, replace=False)
        x, _, targets = _batch(data, b, None, "cpu")
        o = pruned_forward(m, x, None, return_hidden=a.variant == "dense-aux")
        loss, parts, _ = m.loss_function(o.logits, targets, "cpu", o.pred_boxes, m.config, None, None)
        if a.variant == "dense-aux":
            loss = loss + dense_aux_loss(m, o.last_hidden_state, targets, (8, 8))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 0.1)
        opt.step()
        hist.append([parts["loss_ce"].item(), parts["loss_bbox"].item(), parts["loss_giou"].item()])
        if (step + 1) % a.every == 0:
            spread, st = spread_and_map(m, vset, val)
            ce, l1, giou = np.mean(hist[-200:], axis=0)
            print(f"{a.variant} step {step + 1} ({time.perf_counter() - t0:.0f} s): CE {ce:.3f} L1 {l1:.3f} "
                  f"GIoU loss {giou:.3f}  spread {spread:.3f}  val mAP {st['map']:.4f} AP50 {st['map50']:.4f}",
                  flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("spread")
    s.add_argument("--detector", required=True)
    s.add_argument("--root", required=True)
    s.add_argument("--images", type=int, default=64)
    t = sub.add_parser("train")
    t.add_argument("--variant", choices=("base", "xavier", "bavit", "dense-aux"), required=True)
    t.add_argument("--root", required=True)
    t.add_argument("--bavit", help="BAViT run for --variant bavit (trained at 128 px on the same data)")
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--every", type=int, default=500)
    t.add_argument("--train-images", type=int, default=3000)
    a = p.parse_args()
    if a.cmd == "spread":
        from bavit_core.detection.yolos import load_detector

        model = load_detector(a.detector)
        vset, val = load(a.root, "val2017", model.config.image_size[0], a.images)
        spread, st = spread_and_map(model, vset, val)
        print(f"spread {spread:.3f} of the image; val mAP {st['map']:.4f} on {len(val.ids)} images")
    else:
        if a.variant == "bavit" and not a.bavit:
            p.error("--variant bavit needs --bavit RUN")
        train(a)


if __name__ == "__main__":
    main()
