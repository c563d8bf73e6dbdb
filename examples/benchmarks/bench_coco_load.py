"""COCO loading (JSON parse + type validation) of this tree against another checkout,
interleaved, each run in a fresh process; prints medians with IQR/median.

    git worktree add /tmp/old 794b0d7   # or: git archive 794b0d7 bavit_core | tar -x -C /tmp/old
    python examples/benchmarks/bench_coco_load.py --old-tree /tmp/old --images 20000 --rounds 4
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from coco_scale import make  # noqa: E402


def load(tree: Path, ann: Path) -> float:
    code = (f"import sys, time; sys.path.insert(0, {str(tree)!r}); from bavit_core.data.coco import load_coco; "
            f"t = time.perf_counter(); a = load_coco({str(ann)!r}, None); print(time.perf_counter() - t)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                cwd=str(tree)).stdout.split()[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old-tree", type=Path, required=True)
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=4)
    a = ap.parse_args()
    ann = Path(tempfile.mkdtemp()) / "coco.json"
    ann.write_text(json.dumps(make(a.images)))
    res = {"this tree": [], "old tree": []}
    for r in range(a.rounds + 1):  # round 0 warms the page cache
        for k, tree in (("old tree", a.old_tree), ("this tree", ROOT)):
            t = load(tree, ann)
            if r:
                res[k].append(t)
    for k, v in res.items():
        q1, m, q3 = np.percentile(v, [25, 50, 75])
        print(f"{k:<10} median {m:.2f} s  IQR/median {(q3 - q1) / m:.1%}")
    print(f"ratio this/old {np.median(res['this tree']) / np.median(res['old tree']):.3f}")


if __name__ == "__main__":
    main()
