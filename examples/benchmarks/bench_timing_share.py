"""How much of a prune-eval run is the timing phase, before/after (issue #11).

    # once: labels, a 1-epoch BAViT-small and a YOLOS-tiny-shaped random detector with
    # COCO's class names, on ../shared/data/coco_tiny (80 val images, 512 px)
    PYTHONPATH=. python examples/benchmarks/bench_timing_share.py prepare --work /tmp/ts
    # per code tree (e.g. a `git archive 794b0d7` checkout for "before"):
    PYTHONPATH=<tree> python examples/benchmarks/bench_timing_share.py run --work /tmp/ts --thresholds 0.3:0.9

``run`` calls prune_eval with the CLI's default options of that tree (its own defaults for
batch size, timing images and repeats), records when each stage starts, and prints one
JSON line: wall seconds, seconds per stage, the timing share and the machine load.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "coco_tiny"


def prepare(work: Path) -> None:
    import torch
    from transformers import YolosForObjectDetection

    from bavit_core.bavit.train import TrainOptions, train_bavit
    from bavit_core.data import open_dataset
    from bavit_core.data.grid import GridSpec
    from bavit_core.detection.yolos import tiny_yolos_config
    from bavit_core.labels import LabelOptions, label_dataset

    work.mkdir(parents=True, exist_ok=True)
    for split in ("train2017", "val2017"):
        aset = open_dataset("coco", root=DATA, split=split, need_masks=True)
        label_dataset(aset, LabelOptions(source="masks", grid=GridSpec(384, 384, 16)), work / f"{split}.parquet")
    train_bavit(TrainOptions(labels=str(work / "train2017.parquet"), depth=2, epochs=1, batch_size=16,
                             out=str(work / "bavit")))
    cats = json.loads((DATA / "annotations" / "instances_val2017.json").read_text())["categories"]
    id2label = {0: "N/A", **{int(c["id"]): c["name"] for c in cats}}
    id2label.update({i: "N/A" for i in range(91) if i not in id2label})
    torch.manual_seed(0)
    YolosForObjectDetection(tiny_yolos_config("tiny", num_labels=91, image_size=(512, 512), id2label=id2label)
                            ).save_pretrained(work / "detector")


def run(work: Path, thresholds: str, out: Path) -> dict:
    import inspect

    from bavit_core.evaluate.sweep import PruneEvalOptions, parse_thresholds, prune_eval

    cli_defaults = {}
    from bavit_cli.prune_eval import prune_eval_cmd

    for name, p in inspect.signature(prune_eval_cmd).parameters.items():
        d = getattr(p.default, "default", None)
        if name in ("batch_size", "timing_images", "timing_repeats"):
            cli_defaults[name] = d
    marks = []
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    opts = PruneEvalOptions(detector=str(work / "detector"), root=str(DATA), split="val2017",
                            model=str(work / "bavit"), labels=str(work / "val2017.parquet"),
                            thresholds=parse_thresholds(thresholds), out=str(out), **cli_defaults)
    if "detector_size" in PruneEvalOptions.__dataclass_fields__:
        opts.detector_size = (512, 512)
    r = prune_eval(opts, on_stage=lambda s: marks.append((s, time.perf_counter() - t0)))
    wall = time.perf_counter() - t0
    marks.append(("end", wall))
    stages = {a[0]: round(b[1] - a[1], 1) for a, b in zip(marks, marks[1:])}
    timing = sum(v for k, v in stages.items() if k.startswith("timing"))
    return {"wall_s": round(wall, 1), "stages_s": stages, "timing_share": round(timing / wall, 3),
            "rows": len(r["rows"]), "images": r["n_images"], "options": cli_defaults,
            "load_start": [round(v, 2) for v in load0], "load_end": [round(v, 2) for v in os.getloadavg()]}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("prepare", "run"))
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--thresholds", default="0.3:0.9")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    if a.what == "prepare":
        prepare(a.work)
    else:
        print(json.dumps(run(a.work, a.thresholds, a.out or a.work / f"res_{time.time():.0f}")))
