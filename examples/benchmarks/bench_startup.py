"""Start-up cost of the CLI: wall time and peak memory of ``bavit --help`` and of a small
``bavit label`` run, against ``import torch`` (what every command paid before the CLI
imported the library lazily). Runs are interleaved, the first round is a warm-up; prints
medians with IQR/median.

    python examples/benchmarks/bench_startup.py [--rounds 7] [--old-tree DIR] [--demo DIR]

``--old-tree`` adds the same commands run from another checkout (e.g. ``git worktree add
/tmp/old 794b0d7``) for a before/after comparison in one process run. ``--demo`` (the output
folder of ``bavit demo``) adds ``bavit postprocess`` of its predictions and ``bavit report``
of its results, BAViT run and predictions: commands that load no model."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def run(cmd, pythonpath):
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    t0 = time.perf_counter()
    # cwd = the tree too: ``python -m`` puts the working directory first on sys.path
    p = subprocess.Popen(cmd, env=env, cwd=str(pythonpath), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {cmd}")
    return dt, ru.ru_maxrss / 1024  # MiB (ru_maxrss is KiB on Linux)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--old-tree", type=Path, default=None)
    ap.add_argument("--demo", type=Path, default=None, help="a `bavit demo` output folder")
    a = ap.parse_args()
    d = Path(tempfile.mkdtemp())
    from PIL import Image

    (d / "imgs").mkdir()
    for n in ("a.jpg", "b.jpg"):
        Image.fromarray(np.full((48, 64, 3), 100, np.uint8)).save(d / "imgs" / n)
    (d / "ann.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
                   {"id": 2, "file_name": "b.jpg", "width": 64, "height": 48}],
        "annotations": [{"id": 1, "image_id": 1, "bbox": [4, 4, 30, 20], "category_id": 1}],
        "categories": [{"id": 1, "name": "x"}]}))
    py = sys.executable
    label = ["label", "--ann", str(d / "ann.json"), "--images", str(d / "imgs"), "--out", str(d / "l.parquet")]
    cases = {"bavit --help": ([py, "-m", "bavit_cli", "--help"], ROOT),
             "bavit label (2 images)": ([py, "-m", "bavit_cli", *label], ROOT),
             "python -c 'import torch'": ([py, "-c", "import torch"], ROOT)}
    if a.demo:
        dm = a.demo.resolve()
        cases["bavit postprocess (demo)"] = ([py, "-m", "bavit_cli", "postprocess", "--pred", str(dm / "preds.parquet"),
                                              "--out", str(d / "r.parquet")], ROOT)
        cases["bavit report (demo)"] = ([py, "-m", "bavit_cli", "report", "--results", str(dm / "results"),
                                         "--model", str(dm / "bavit-small"), "--pred", str(dm / "preds.parquet"),
                                         "--out", str(d / "rep")], ROOT)
    if a.old_tree:
        for k in list(cases):
            if k.startswith("bavit"):
                cases["old " + k] = (cases[k][0], a.old_tree)
    res = {k: [] for k in cases}
    for r in range(a.rounds + 1):
        for k, (cmd, pp) in cases.items():
            t, m = run(cmd, pp)
            if r:
                res[k].append((t, m))
    print(f"{'command':<30} {'median s':>9} {'IQR/med':>8} {'peak MiB':>9}")
    for k, v in res.items():
        t = np.array([x[0] for x in v])
        m = np.array([x[1] for x in v])
        q1, med, q3 = np.percentile(t, [25, 50, 75])
        print(f"{k:<30} {med:>9.2f} {(q3 - q1) / med:>8.1%} {np.median(m):>9.0f}")


if __name__ == "__main__":
    main()
