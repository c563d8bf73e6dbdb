#!/usr/bin/env bash
# The CUDA checklist of docs/performance.md ("bench" section) in one run of at most ~8 minutes,
# everything written under one folder:
#
#     bash examples/benchmarks/bench_cuda.sh [OUT]        # OUT defaults to cuda_bench/
#
# Random-weight YOLOS-tiny and YOLOS-small shapes at 512x512 and a BAViT-small run (speed does
# not depend on the weights), then `bavit bench --device cuda --dtype fp32,bf16 --batch-sizes
# 1,8,32` for each, with the padded layout (key-padding mask, the CUDA default) and, for
# tiny, the pack layout (per-image / variable-length attention) beside it. Each bench is
# bounded by `timeout`; a step that fails or runs out of time is recorded and the rest go on.
set -u
OUT=${1:-cuda_bench}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: > "$LOG"
step() {  # step SECONDS NAME COMMAND...
  local t=$1 name=$2; shift 2
  echo "== $name: $*" | tee -a "$LOG"
  local s=$SECONDS
  timeout "$t" "$@" > "$OUT/$name.out" 2>&1
  echo "   exit $? after $((SECONDS - s)) s" | tee -a "$LOG"
}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python - "$OUT" <<'PY' >> "$LOG" 2>&1
import json, sys
from dataclasses import asdict
from pathlib import Path
import torch
from transformers import YolosForObjectDetection
from bavit_core.bavit.model import create_bavit, save_weights
from bavit_core.detection.yolos import init_new_yolos, tiny_yolos_config
out = Path(sys.argv[1])
for name, over in (("tiny", {}), ("small", dict(hidden_size=384, num_attention_heads=6, intermediate_size=1536))):
    torch.manual_seed(0)
    det = YolosForObjectDetection(tiny_yolos_config("tiny", **over))
    init_new_yolos(det)
    det.save_pretrained(out / f"det_{name}")
bav = create_bavit(2)
(out / "bavit").mkdir(exist_ok=True)
save_weights(bav, out / "bavit" / "model.safetensors")
(out / "bavit" / "config.json").write_text(json.dumps({"model": asdict(bav.cfg)}))
print("models:", torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))
PY
COMMON=(--model "$OUT/bavit" --device cuda --dtype fp32,bf16 --batch-sizes 1,8,32 --kept 0.1,0.25,0.5,0.65,0.75,0.9,1.0
        --detector-size 512 --repeats 3 --max-repeats 8)
step 150 tiny_pad   python -m bavit_cli bench --detector "$OUT/det_tiny" "${COMMON[@]}" --layout pad --out "$OUT/tiny_pad"
step 150 tiny_pack  python -m bavit_cli bench --detector "$OUT/det_tiny" "${COMMON[@]}" --layout pack --out "$OUT/tiny_pack"
step 150 small_pad  python -m bavit_cli bench --detector "$OUT/det_small" "${COMMON[@]}" --layout pad --out "$OUT/small_pad"
echo "done; speed dirs, outputs and log.txt in $OUT" | tee -a "$LOG"
