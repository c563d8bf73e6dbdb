"""Issue 24's experiment: who should choose the tokens? On the demo's data and detector, at
each target sparsity: BAViT before the detector, the detector's own attention after k
layers, a trained gate inside it, BAViT with a sparsely fine-tuned detector (YOLOS-F),
BAViT and the detector trained jointly, the ground truth and chance. Every trained method
gets the same number of epochs; every row is measured by prune-eval (mAP, tokens,
GFLOPs, end-to-end latency against its run's own dense timing), all with the topk
policy, pruned tokens dropped.

    bavit demo --out demo
    python examples/selectors_experiment.py --demo demo --out selectors_exp

Writes ``OUT/table.csv``, ``OUT/table.md`` and ``OUT/pareto.png`` (mAP against measured
end-to-end latency, the Pareto front drawn), and every run it trained and evaluated.
About 11 minutes on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bavit_core.demo import shipped_detector  # noqa: E402
from bavit_core.evaluate.sweep import PruneEvalOptions, prune_eval  # noqa: E402
from bavit_core.finetune.loop import FinetuneOptions, finetune  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", required=True, help="a `bavit demo` output folder (data, labels, bavit-small)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--targets", default="0.25,0.5,0.75")
    ap.add_argument("--epochs", type=int, default=8, help="epochs for every trained method")
    ap.add_argument("--layers", default="1,2,4", help="attention@k for these k")
    ap.add_argument("--gate-layer", type=int, default=2)
    ap.add_argument("--timing-images", type=int, default=8)
    ap.add_argument("--timing-repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--summarise-only", action="store_true", help="redo table.md and pareto.png from OUT/table.csv")
    a = ap.parse_args()
    demo, out = Path(a.demo), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    targets = [float(t) for t in a.targets.split(",")]
    if a.summarise_only:
        summarise(out, targets)
        return
    det = str(shipped_detector())
    bavit = str(demo / "bavit-small")
    data = dict(root=str(demo / "data"), device=a.device, seed=0)
    evals = dict(split="val2017", policy="topk", timing_images=a.timing_images, timing_repeats=a.timing_repeats,
                 batch_size=8, **data)
    train = dict(split="train2017", val_split="val2017", epochs=a.epochs, batch_size=8, **data)
    rows: list[dict] = []
    t0 = time.perf_counter()

    def collect(res, method, trained=None, keep=lambda r: True):
        for r in res["rows"]:
            if r["selector"] == "dense" and any(x["method"] == "dense" for x in rows):
                continue
            if not keep(r):
                continue
            name = method(r) if callable(method) else method
            rows.append({"method": name, "target": r["target"], "sparsity": r["sparsity"], "map": r["map"],
                         "map50": r["map50"], "gflops": r["gflops"], "latency_ms": r["latency_ms"],
                         "speedup": r["speedup"], "detector_speedup": r["detector_speedup"],
                         "latency_spread": r["latency_spread"], "noisy": r["timing_noisy"],
                         "epochs": trained if trained is not None else 0})

    # training-free rows (and BAViT as trained by the demo): one run per attention layer
    for i, k in enumerate(int(x) for x in a.layers.split(",")):
        sel = ["dense", "bavit", "attention", "oracle", "random"] if i == 0 else ["attention"]
        res = prune_eval(PruneEvalOptions(detector=det, model=bavit, labels=str(demo / "labels_val2017.parquet"),
                                          selectors=sel, sparsities=targets, prune_at_layer=k,
                                          out=str(out / f"eval_attention{k}"), **evals))
        collect(res, lambda r, k=k: f"attention@{k}" if r["selector"] == "attention" else r["selector"])
    thr = {}  # BAViT's threshold reaching each target on val (a threshold-policy run; YOLOS-F trains at it)
    res = prune_eval(PruneEvalOptions(detector=det, model=bavit, selectors=["bavit"], sparsities=targets,
                                      timing_images=0, out=str(out / "eval_bavit_thresholds"),
                                      **{k: v for k, v in evals.items() if k not in ("policy", "timing_images")}))
    for r in res["rows"]:
        thr[r["target"]] = r["threshold"]

    for s in targets:
        tag = f"{s:.2f}"
        # the gate: the detector frozen, E epochs
        g = out / f"gate_{tag}"
        finetune(FinetuneOptions(detector=det, train_gate=True, target_sparsity=s, prune_at_layer=a.gate_layer,
                                 lr=1e-3, out=str(g), **train), overwrite=True)
        res = prune_eval(PruneEvalOptions(detector=str(g), selectors=["dense", "gate"], sparsities=[s],
                                          out=str(out / f"eval_gate_{tag}"), **evals))
        collect(res, f"gate@{a.gate_layer}", a.epochs, keep=lambda r: r["selector"] == "gate")
        res = prune_eval(PruneEvalOptions(detector=str(g), selectors=["dense", "gate"], thresholds=[0.5],
                                          out=str(out / f"eval_gate_own_{tag}"),
                                          **{k: v for k, v in evals.items() if k != "policy"}))
        collect(res, f"gate@{a.gate_layer} (own decisions)", a.epochs, keep=lambda r: r["selector"] == "gate")
        rows[-1]["target"] = s
        # BAViT + YOLOS-F: the detector sparsely fine-tuned on BAViT's tokens at the target's threshold
        f = out / f"yolos_f_{tag}"
        finetune(FinetuneOptions(detector=det, selector="bavit", model=bavit, threshold=float(thr[s]), lr=1e-4,
                                 warmup_epochs=0.5, out=str(f), **train), overwrite=True)
        res = prune_eval(PruneEvalOptions(detector=str(f), model=bavit, selectors=["bavit"], sparsities=[s],
                                          out=str(out / f"eval_yolos_f_{tag}"), **evals))
        collect(res, "bavit + YOLOS-F", a.epochs)
        # joint: BAViT and the detector trained together
        j = out / f"joint_{tag}"
        finetune(FinetuneOptions(detector=det, joint=True, model=bavit, labels=str(demo / "labels_train2017.parquet"),
                                 target_sparsity=s, lr=1e-4, warmup_epochs=0.5, out=str(j), **train), overwrite=True)
        res = prune_eval(PruneEvalOptions(detector=str(j), model=str(j / "bavit"), selectors=["bavit"],
                                          sparsities=[s], out=str(out / f"eval_joint_{tag}"), **evals))
        collect(res, "joint", a.epochs)

    cols = list(rows[0])
    with open(out / "table.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    (out / "run.json").write_text(json.dumps({"seconds": time.perf_counter() - t0, "epochs": a.epochs,
                                              "targets": targets, "bavit_thresholds": thr}, indent=2))
    summarise(out, targets)


def summarise(out: Path, targets) -> None:
    """table.md, pareto.png and the Pareto front from table.csv. Each prune-eval run times
    its rows against its own dense detector, side by side; across runs the dense time moves
    with the machine, so every row's latency is put on one scale: the first run's dense
    latency divided by the row's measured end-to-end speedup."""
    with open(out / "table.csv") as fh:
        rows = [{k: (v if k == "method" else v == "True" if k == "noisy" else float(v)) for k, v in r.items()}
                for r in csv.DictReader(fh)]
    ref = next(r["latency_ms"] for r in rows if r["method"] == "dense")
    for r in rows:
        r["latency_ms"] = ref / r["speedup"]
    front = "; ".join(f"{label(r)} ({r['map']:.3f}, {r['speedup']:.2f}×)" for r in pareto(rows))
    (out / "table.md").write_text(markdown(rows, targets) + f"\nPareto front (mAP against end-to-end latency): {front}\n")
    plot(rows, out / "pareto.png")
    print((out / "table.md").read_text())


def label(r) -> str:
    return r["method"] if math.isnan(r["target"]) else f"{r['method']} at {r['target']:.2f}"


def pareto(rows) -> list[dict]:
    """The rows no other row beats on both mAP and latency, fastest first; the oracle (the
    labels' own tokens) and random are references, not methods, and stay off it."""
    front, best = [], -1.0
    methods = (r for r in rows if not math.isnan(r["latency_ms"]) and r["method"] not in ("oracle", "random"))
    for r in sorted(methods, key=lambda r: (r["latency_ms"], -r["map"])):
        if r["map"] > best:
            front.append(r)
            best = r["map"]
    return front


def markdown(rows, targets) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    head = "| method | epochs | " + " | ".join(f"mAP / sparsity / GFLOPs / speedup at {t:.2f}" for t in targets)
    lines = [head + " |", "|---|---|" + "---|" * len(targets)]
    for m in methods:
        cells = []
        for t in targets:
            r = next((x for x in rows if x["method"] == m and (m == "dense" or x["target"] == t)), None)
            cells.append("-" if r is None else f"{r['map']:.3f} / {r['sparsity']:.2f} / {r['gflops']:.3f} / "
                         f"{r['speedup']:.2f}×{'*' if r['noisy'] else ''}")
        ep = next(x["epochs"] for x in rows if x["method"] == m)
        lines.append(f"| {m} | {ep:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for i, m in enumerate(dict.fromkeys(r["method"] for r in rows)):
        rs = [r for r in rows if r["method"] == m and not math.isnan(r["latency_ms"])]
        ref = m in ("oracle", "random")  # references, drawn thin
        ax.plot([r["latency_ms"] for r in rs], [r["map"] for r in rs], ("s" if m == "dense" else "o") + "-",
                color="k" if m == "dense" else plt.cm.tab10(i % 10), lw=0.8 if ref else 1.6, alpha=0.5 if ref else 1,
                ls=":" if ref else "-", label=m + (" (reference)" if ref else ""))
    front = [(r["latency_ms"], r["map"]) for r in pareto(rows)]
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="k", lw=1, ls="--",
            label="Pareto front")
    ax.set_xlabel("end-to-end latency, ms/image (dense's, divided by the measured speedup)")
    ax.set_ylabel("mAP (demo val)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
