"""Our dense row against Hugging Face's own pipeline, per hub checkpoint and input protocol.

For each of hustvl/yolos-tiny, -small and -base (random-weight replicas with the hub's
configuration, image processor and file layout, built by tests/hub_fixtures.py; nothing is
downloaded), runs ``bavit prune-eval --selectors dense`` on a COCO split and, on the same
images, transformers' ``AutoImageProcessor`` + ``YolosForObjectDetection`` +
``post_process_object_detection`` (threshold 0: every detection token), and prints the
largest box (px) and score differences and whether every label agrees:

* checkpoint protocol: the processor as the checkpoint ships it (aspect kept);
* square protocol: ``--detector-size S`` for us, the processor with ``size={"height": S,
  "width": S}`` for transformers.

Usage (from the repository root; full-size models, about 10 minutes on 2 CPU cores):

    python examples/hf_equivalence.py --root ../shared/data/coco_tiny --max-images 20
    python examples/hf_equivalence.py --root ../shared/data/coco_tiny --layers 2 --hidden 48   # quick
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def hf_dense(det_dir: Path, files: list[Path], square: int | None):
    """transformers' processor + model + post-processing, image by image."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, YolosForObjectDetection

    proc = AutoImageProcessor.from_pretrained(det_dir)
    model = YolosForObjectDetection.from_pretrained(det_dir).eval()
    out = []
    for f in files:
        im = Image.open(f).convert("RGB")
        kw = {} if square is None else {"size": {"height": square, "width": square}}
        inputs = proc(images=im, return_tensors="pt", **kw)
        with torch.no_grad():
            o = model(pixel_values=inputs["pixel_values"])
        out.append(proc.post_process_object_detection(o, threshold=0.0, target_sizes=[(im.height, im.width)])[0])
    return out


def compare(ours: list[dict], theirs: list, image_ids: list[int]) -> tuple[float, float, bool]:
    """(max |box| px, max |score|, labels all equal) over every detection token."""
    box_d = score_d = 0.0
    labels_equal = True
    for iid, r in zip(image_ids, theirs):
        mine = [d for d in ours if d["image_id"] == iid]
        if len(mine) != len(r["scores"]):
            raise SystemExit(f"image {iid}: {len(mine)} detections from bavit, {len(r['scores'])} from transformers")
        xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in mine)])
        labels_equal &= [d["category_id"] for d in mine] == r["labels"].tolist()
        box_d = max(box_d, float(np.abs(xyxy - r["boxes"].numpy()).max()))
        score_d = max(score_d, float(np.abs(np.array([d["score"] for d in mine]) - r["scores"].numpy()).max()))
    return box_d, score_d, labels_equal


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, required=True, help="COCO root (annotations/, <split>/)")
    ap.add_argument("--split", default="val2017")
    ap.add_argument("--max-images", type=int, default=20)
    ap.add_argument("--checkpoints", default="yolos-tiny,yolos-small,yolos-base")
    ap.add_argument("--square", type=int, default=512, help="the square protocol's size (Table 2: 512)")
    ap.add_argument("--layers", type=int, default=None, help="shrink depth (default: the hub's 12)")
    ap.add_argument("--hidden", type=int, default=None, help="shrink width (default: the hub's)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from bavit_cli.main import app
    from tests.hub_fixtures import build_hub_yolos
    from typer.testing import CliRunner

    ann = json.loads((a.root / "annotations" / f"instances_{a.split}.json").read_text())
    images = ann["images"][: a.max_images]
    files = [a.root / a.split / im["file_name"] for im in images]
    ids = [im["id"] for im in images]
    rows = []
    with tempfile.TemporaryDirectory(prefix="hf-eq-") as tmp:
        for name in a.checkpoints.split(","):
            det = build_hub_yolos(name, Path(tmp) / name, layers=a.layers, hidden=a.hidden)
            for protocol, square in (("checkpoint", None), ("square", a.square)):
                out = Path(tmp) / f"{name}-{protocol}"
                args = ["prune-eval", "--detector", str(det), "--root", str(a.root), "--split", a.split,
                        "--selectors", "dense", "--max-images", str(a.max_images), "--timing-images", "0",
                        "--device", "cpu", "--out", str(out)]
                if square:
                    args += ["--detector-size", str(square)]
                t0 = time.perf_counter()
                res = CliRunner().invoke(app, args, catch_exceptions=False)
                if res.exit_code:
                    raise SystemExit(res.stderr)
                t_ours = time.perf_counter() - t0
                meta = json.loads((out / "meta.json").read_text())
                ours = json.loads((out / "detections" / "dense.json").read_text())
                t0 = time.perf_counter()
                theirs = hf_dense(det, files, square)
                t_hf = time.perf_counter() - t0
                box_d, score_d, same = compare(ours, theirs, ids)
                rows.append({"checkpoint": name, "protocol": meta["input_protocol"]["description"],
                             "images": len(files), "tokens_mean": meta["detector_tokens"]["mean"],
                             "max_box_px": box_d, "max_score": score_d, "labels_equal": same,
                             "bavit_s": round(t_ours, 1), "transformers_s": round(t_hf, 1)})
                r = rows[-1]
                print(f"{name:12s} {r['protocol']:45s} tokens {r['tokens_mean']:7.1f}  max box {box_d:.2e} px  "
                      f"max score {score_d:.2e}  labels {'equal' if same else 'DIFFER'}", flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    ok = all(r["max_box_px"] < 0.01 and r["max_score"] < 1e-5 and r["labels_equal"] for r in rows)
    print("within 0.01 px and 1e-5:", "yes" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
