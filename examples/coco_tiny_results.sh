#!/usr/bin/env bash
# BAViT on real COCO images (../shared/data/coco_tiny): train on train2017 (80 images),
# evaluate on val2017 (80 images), mask labels, against label-free baselines.
# Writes to ${OUT:-/tmp/coco_tiny_run}. Numbers in docs/results.md.
set -euo pipefail
DATA=${DATA:-../shared/data/coco_tiny}
OUT=${OUT:-/tmp/coco_tiny_run}
EPOCHS=${EPOCHS:-40}
DEPTHS=${DEPTHS:-2}
mkdir -p "$OUT"
bavit label --root "$DATA" --split train2017 --source masks --out "$OUT/train.parquet"
bavit label --root "$DATA" --split val2017 --source masks --out "$OUT/val.parquet"
for depth in $DEPTHS; do
  bavit train --labels "$OUT/train.parquet" --val-labels "$OUT/val.parquet" --depth $depth \
    --epochs "$EPOCHS" --batch-size 16 --lr 5e-4 --step-size 30 --seed 0 --out "$OUT/bavit-d$depth"
  bavit predict --model "$OUT/bavit-d$depth" --labels "$OUT/val.parquet" --out "$OUT/preds-d$depth.parquet"
done
python - "$OUT" $DEPTHS <<'PY'
import sys
from bavit_core import read_labels, read_predictions
from bavit_core.bavit.baselines import baseline_metrics
out = sys.argv[1]
tr, va = read_labels(f"{out}/train.parquet"), read_labels(f"{out}/val.parquet")
rows = baseline_metrics(tr.grids, va.grids)
for d in map(int, sys.argv[2:]):
    rows[f"BAViT depth {d}"] = read_predictions(f"{out}/preds-d{d}.parquet").meta["metrics"]
print("| predictor | token accuracy | FG recall | FG IoU |")
print("|---|---|---|---|")
for name, m in rows.items():
    print(f"| {name} | {100*m['accuracy']:.2f} % | {100*m['recall']:.2f} % | {100*m['iou']:.2f} % |")
PY
