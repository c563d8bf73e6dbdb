#!/usr/bin/env bash
# Sparse fine-tuning on generated data: dense / pruned / pruned + fine-tuned mAP at one
# BAViT threshold. Needs a demo run (for BAViT-small and the val split) and a detector.
#   DEMO=demo DET=bavit_core/assets/demo_detector DATA=detdata THR=0.5 EPOCHS=3 bash examples/sparse_finetune_results.sh
# DATA is the detector's generated training set (bavit synth --out detdata --num-images 8200
# --val-fraction 0.0244 --seed 1 --scenes simple), disjoint from the demo's seed-0 images.
# SIZE is the detector input size (the shipped demo detector's: 128).
set -euo pipefail
DEMO=${DEMO:-demo}
DET=${DET:-bavit_core/assets/demo_detector}
DATA=${DATA:-detdata}
THR=${THR:-0.5}
EPOCHS=${EPOCHS:-3}
SIZE=${SIZE:-128}
OUT=${OUT:-$DEMO/sparse-ft}
mkdir -p "$OUT"
bavit finetune --detector "$DET" --root "$DATA" --split train2017 --val-split val2017 \
  --selector bavit --model "$DEMO/bavit-small" --threshold "$THR" --detector-size "$SIZE" \
  --epochs "$EPOCHS" --batch-size 8 --lr 5e-5 --warmup-epochs 0.2 --out "$OUT/detector-F"
for name in base F; do
  det=$DET; [ "$name" = F ] && det=$OUT/detector-F
  bavit prune-eval --detector "$det" --model "$DEMO/bavit-small" --root "$DEMO/data" --split val2017 \
    --thresholds "$THR" --selectors dense,bavit --detector-size "$SIZE" --batch-size 8 \
    --timing-images 0 --out "$OUT/results-$name"
done
python - "$OUT" <<'PY'
import csv, sys
out = sys.argv[1]
rows = {n: list(csv.DictReader(open(f"{out}/results-{n}/results.csv"))) for n in ("base", "F")}
d, p = rows["base"][0], rows["base"][1]
f = rows["F"][1]
print("| detector | tokens | sparsity | mAP | AP50 |")
print("|---|---|---|---|---|")
print(f"| demo detector | all (dense) | 0 | {float(d['map']):.4f} | {float(d['map50']):.4f} |")
print(f"| demo detector | BAViT thr {p['threshold']} | {float(p['sparsity']):.3f} | {float(p['map']):.4f} | {float(p['map50']):.4f} |")
print(f"| sparse fine-tuned | BAViT thr {f['threshold']} | {float(f['sparsity']):.3f} | {float(f['map']):.4f} | {float(f['map50']):.4f} |")
PY
