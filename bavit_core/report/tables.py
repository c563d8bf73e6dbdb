"""Report tables: Table 1 (BAViT runs), Table 2 and its details (prune-eval rows), and their
CSV, Markdown and HTML renderings."""
from __future__ import annotations

import html
import math

import numpy as np

MODEL_NAMES = {"bavit": "BAViT+YOLOS", "oracle": "Oracle+YOLOS", "random": "Random+YOLOS", "dense": "YOLOS"}


def _model(r: dict) -> str:
    """The model column: a selector inside the detector is named with its layer,
    e.g. ``YOLOS (gate@2)``."""
    if r.get("model"):
        return r["model"]
    layer = r.get("prune_layer")
    if layer is not None and not _nan(layer):
        return f"YOLOS ({r['selector']}@{int(float(layer))})"
    return MODEL_NAMES.get(r["selector"], r["selector"])


def _fmt(v, p=2):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{p}f}" if isinstance(v, float) else str(v)


def _nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _point(r: dict) -> str:
    """A row's operating point: the target sparsity (``topk 0.50`` for the fixed-rate
    policy), else the BG threshold, else ``-``."""
    if not _nan(r.get("target")):
        return f"{'topk ' if r.get('policy') == 'topk' else ''}{r['target']:.2f}"
    return _fmt(r["threshold"], 2)


def _pm(v, spread, p=2) -> str:
    return _fmt(v, p) + ("" if _nan(spread) else f" ±{100 * spread:.0f}%")


def _speed_spread(r: dict) -> float:
    """Relative spread of a speedup: the latency's and the dense reference's combined."""
    a, b = r.get("latency_spread", float("nan")), r.get("dense_spread", float("nan"))
    if _nan(a) or _nan(b):
        return float("nan")
    return float(math.hypot(a, b)) if r["selector"] != "dense" else float(a)


def table2(rows: list[dict]) -> list[dict]:
    """Table-2 style rows: the paper's columns and the measured speedup (noisy timing
    marked *); the rest goes to :func:`table2_details`."""
    out = []
    for r in rows:
        noisy = "*" if r.get("timing_noisy") else ""
        out.append({
            "model": _model(r),
            "selector": r["selector"],
            "target": _point(r),
            "treatment": r.get("treatment", "drop"),
            "sparsity %": _fmt(100 * r["sparsity"], 1),
            "mAP": _fmt(100 * r["map"], 2),
            "BAViT": _fmt(r["bavit_tokens"], 0),
            "YOLOS": _fmt(r["yolos_tokens"], 0),
            "YOLOS pruned": _fmt(r["yolos_pruned_tokens"], 0),
            "YOLOS+BAViT": _fmt(r["total_tokens"], 0),
            "% reduction": _fmt(r["token_reduction_pct"], 2),
            "speedup": _pm(r["speedup"], _speed_spread(r)) + noisy,
        })
    return out


def table2_details(rows: list[dict]) -> list[dict]:
    """The secondary columns of Table 2: spread of sparsity, more AP, FLOPs, timing and memory."""
    out = []
    for r in rows:
        out.append({
            "model": _model(r),
            "target": _point(r),
            "policy": r.get("policy", "-") if not _nan(r.get("target")) else "-",
            "BG threshold": _fmt(r["threshold"], 3),
            "sparsity p10–p90 %": f"{_fmt(100 * r.get('sparsity_p10', float('nan')), 1)}–"
                                  f"{_fmt(100 * r.get('sparsity_p90', float('nan')), 1)}",
            "AP50": _fmt(100 * r["map50"], 2),
            "AP75": _fmt(100 * r["map75"], 2),
            "GFLOPs": _fmt(r["gflops"], 3),
            "FLOP speedup": _fmt(r["flop_speedup"], 2),
            "latency ms": _pm(r["latency_ms"], r.get("latency_spread")),
            "dense ms": _pm(r["dense_latency_ms"], r.get("dense_spread")),
            "detector speedup": _fmt(r["detector_speedup"], 2),
            "throughput img/s": _fmt(r["throughput_ips"], 1),
            "peak mem MB": _fmt(r["peak_mem_mb"], 1),
            "timing": "noisy" if r.get("timing_noisy") else ("-" if _nan(r["latency_ms"]) else "ok"),
        })
    return out


def table1(train_runs: list[str], pred: str | None) -> list[dict]:
    """Table-1 style token accuracy: one row per training run (the epoch whose weights are the
    run's model: the last, or with ``--select best`` the best on validation, marked as chosen
    on the split it is scored on) and per predictions file with GT."""
    from ..bavit.runfiles import read_run_config
    from ..bavit.runfiles import read_metrics

    rows = []
    for run in train_runs:
        cfg = read_run_config(run)
        ms = read_metrics(run)
        if not ms:
            continue
        key = "val_accuracy" if "val_accuracy" in ms[0] else "train_accuracy"
        select = (cfg.get("train") or {}).get("select", "best")  # runs before the engine kept the best epoch
        if select == "best":
            best = max(ms, key=lambda r: r[key])
            how = "best epoch, chosen on this split: optimistic"
        else:
            best, how = ms[-1], "last epoch"
        pre = "val" if key.startswith("val") else "train"
        depth = cfg["model"]["depth"]
        rows.append({"model": {2: "BAViT-small", 10: "BAViT-large"}.get(depth, f"BAViT-d{depth}"), "depth": depth,
                     "dataset": cfg.get("labels_meta", {}).get("dataset", "?"), "source": f"{run} ({pre}, epoch {best['epoch'] + 1}: {how})",
                     "accuracy %": _fmt(100 * best[f"{pre}_accuracy"]), "FG recall %": _fmt(100 * best[f"{pre}_recall"]),
                     "FG IoU %": _fmt(100 * best[f"{pre}_iou"])})
    if pred:
        from ..bavit.predfile import read_predictions

        p = read_predictions(pred)
        m = p.meta.get("metrics")
        if m:
            rows.append({"model": f"BAViT-d{p.meta['model']['depth']}", "depth": p.meta["model"]["depth"],
                         "dataset": "-", "source": str(pred), "accuracy %": _fmt(100 * m["accuracy"]),
                         "FG recall %": _fmt(100 * m["recall"]), "FG IoU %": _fmt(100 * m["iou"])})
    return rows


def _csv(rows: list[dict]) -> str:
    import csv
    import io

    if not rows:
        return ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _markdown(rows: list[dict]) -> str:
    if not rows:
        return "_no rows_\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _html_table(rows: list[dict], grey: list[bool] | None = None) -> str:
    if not rows:
        return "<p><em>no rows</em></p>"
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    grey = grey or [False] * len(rows)
    body = "".join(("<tr class='noisy'>" if g else "<tr>") + "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in cols)
                   + "</tr>" for r, g in zip(rows, grey))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _ideal(meta: dict):
    from types import SimpleNamespace

    from ..detection.accounting import detector_gflops

    cfg = meta.get("detector_config")
    if not cfg:
        return None
    c = SimpleNamespace(**{k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                               "num_detection_tokens", "patch_size")},
                        num_labels=len(cfg.get("id2label", {})) or 91)
    tokens = (meta.get("detector_tokens") or {}).get("mean")
    if tokens:  # the run's own mean tokens per image (each image its own grid under the checkpoint's protocol)
        n = float(tokens)
    else:  # results written before the input protocol was recorded
        size = meta.get("detector_size") or meta["options"]["detector_size"] or cfg.get("image_size")
        if isinstance(size, int):
            size = (size, size)
        n = (size[0] // c.patch_size) * (size[1] // c.patch_size)
    s = np.linspace(0, 0.95, 96)
    dense = detector_gflops(c, np.array([n]), n)
    return s, np.array([dense / detector_gflops(c, np.array([n * (1 - v)]), n) for v in s])
