"""Pruned YOLOS-tiny per treatment vs its FLOP ideal, and end to end with BAViT-small: a thin
caller of ``bavit bench`` (bavit_core.evaluate.bench.run_bench, the toolkit's one timing loop)
on random-weight models of the real shapes (speed does not depend on the weights).

    python examples/benchmarks/bench_prune.py [--kept 0.75,0.5,0.25,0.1] [--treatments drop,pool,preserve]
        [--batches 1,8] [--device cpu|cuda] [--dtype fp32|bf16] [--repeats 3] [--max-repeats 10]
        [--threads N] [--out DIR]

YOLOS-tiny shape at 512×512 (1024 patch tokens), BAViT-small (2 layers, 384×384). Per batch
size, dense, BAViT and every (treatment, kept share) are timed round robin in one process
(a warm-up round, then rounds until every spread IQR/median ≤ 5 % or --max-repeats);
batches mix kept counts ±0.05 around the share. Prints, per row, the measured speedup,
the FLOP-ideal and their ratio ("share"), CPU time beside wall time, and the break-even
sparsity; speed.csv, speed.png and meta.json land in --out.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
from dataclasses import asdict
from pathlib import Path


def make_models(work: Path, seed: int = 0) -> tuple[Path, Path]:
    """A YOLOS-tiny-shaped detector (with a square 512 processor file) and a BAViT-small run."""
    import torch
    from transformers import YolosForObjectDetection

    from bavit_core.bavit.model import create_bavit, save_weights
    from bavit_core.detection.yolos import init_new_yolos, tiny_yolos_config

    torch.manual_seed(seed)
    det = YolosForObjectDetection(tiny_yolos_config("tiny"))
    init_new_yolos(det)
    det.save_pretrained(work / "det")
    bav = create_bavit(2)
    (work / "run").mkdir(parents=True, exist_ok=True)
    save_weights(bav, work / "run" / "model.safetensors")
    (work / "run" / "config.json").write_text(json.dumps({"model": asdict(bav.cfg)}))
    return work / "det", work / "run"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kept", default="0.75,0.5,0.25,0.1")
    ap.add_argument("--treatments", default="drop,pool,preserve")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--layout", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch threads [default: torch's]")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--out", default=None, help="speed directory [default: a temporary one]")
    a = ap.parse_args()
    import torch

    from bavit_core.evaluate.bench import BenchOptions, parse_batch_sizes, parse_kept, run_bench

    if a.threads:
        torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_prune-"))
    det, run = make_models(work)
    r = run_bench(BenchOptions(detector=str(det), model=str(run), device=a.device, dtypes=a.dtype.split(","),
                               batch_sizes=parse_batch_sizes(a.batches), kept=parse_kept(a.kept),
                               pruned_tokens=a.treatments.split(","), detector_size=(a.size, a.size), layout=a.layout,
                               repeats=a.repeats, max_repeats=a.max_repeats, out=a.out or str(work / "speed")))
    print(f"machine: {r['machine_description']}; input {a.size}x{a.size}; noisy: {r['noisy']}")
    print(f"{'batch':>5} {'dtype':>5} {'treatment':>9} {'sparsity':>8} {'ms/img':>8} {'spread':>6} {'CPU ms':>8} "
          f"{'dense ms':>8} {'speedup':>7} {'FLOP-ideal':>10} {'share':>6} {'e2e':>6} {'e2e ideal':>9}")
    worst = math.inf
    for x in r["rows"]:
        if x["workload"] != "pruned":
            continue
        share = x["detector_speedup"] / x["flop_speedup"]
        if 0.25 - 0.01 <= x["sparsity"] <= 0.9 + 0.01:  # the measured mean of whole-token counts
            worst = min(worst, share)
        print(f"{x['batch_size']:>5} {x['dtype']:>5} {x['treatment']:>9} {x['sparsity']:>8.3f} {x['latency_ms']:>8.1f} "
              f"{x['latency_spread']:>6.2f} {x['cpu_ms']:>8.1f} {x['dense_latency_ms']:>8.1f} "
              f"{x['detector_speedup']:>6.2f}x {x['flop_speedup']:>9.2f}x {share:>6.2f} {x['speedup']:>5.2f}x "
              f"{x['flop_speedup_end_to_end']:>8.2f}x" + (" *" if x["noisy"] else ""))
    print(f"lowest share of the FLOP ideal at sparsity 0.25-0.9: {worst:.2f}")
    for b in r["break_even"]:
        print(f"break-even ({b['of']}, {b['runtime']} {b['dtype']} batch {b['batch_size']} {b['treatment']}): "
              f"{b['break_even_sparsity']:.3f} ({b['how']})" if b["break_even_sparsity"] is not None else b)
    print(f"wrote {r['out']}")


if __name__ == "__main__":
    main()
