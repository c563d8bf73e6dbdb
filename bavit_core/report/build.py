"""Turn prune-eval results (and optional training / prediction files) into tables,
figures and a static index.html."""
from __future__ import annotations

import html
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..evaluate.sweep import read_results
from ..runtime.errors import InputFileError
from ..runtime.fileio import atomic_write_text
from . import figures

WIDE_FIGURES = ("overlay_", "sparse_images", "postprocess", "detections")
MODEL_NAMES = {"bavit": "BAViT+YOLOS", "oracle": "Oracle+YOLOS", "random": "Random+YOLOS", "dense": "YOLOS"}


@dataclass
class ReportInputs:
    results: str | None = None
    train_runs: list[str] = field(default_factory=list)
    pred: str | None = None
    refined: str | None = None
    images: str | None = None
    finetune_run: str | None = None
    n_examples: int = 6
    out: str = "report"


def _fmt(v, p=2):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{p}f}" if isinstance(v, float) else str(v)


def table2(rows: list[dict]) -> list[dict]:
    """Table-2 style rows: the paper's columns, then ours."""
    out = []
    for r in rows:
        out.append({
            "model": MODEL_NAMES.get(r["selector"], r["selector"]),
            "selector": r["selector"],
            "threshold": _fmt(r["threshold"], 2),
            "sparsity %": _fmt(100 * r["sparsity"], 1),
            "mAP": _fmt(100 * r["map"], 2),
            "BAViT": _fmt(r["bavit_tokens"], 0),
            "YOLOS": _fmt(r["yolos_tokens"], 0),
            "YOLOS pruned": _fmt(r["yolos_pruned_tokens"], 0),
            "YOLOS+BAViT": _fmt(r["total_tokens"], 0),
            "% reduction": _fmt(r["token_reduction_pct"], 2),
            "AP50": _fmt(100 * r["map50"], 2),
            "AP75": _fmt(100 * r["map75"], 2),
            "GFLOPs": _fmt(r["gflops"], 3),
            "latency ms": _fmt(r["latency_ms"], 2),
            "throughput img/s": _fmt(r["throughput_ips"], 1),
            "speedup": _fmt(r["speedup"], 2),
            "detector speedup": _fmt(r["detector_speedup"], 2),
            "peak mem MB": _fmt(r["peak_mem_mb"], 1),
            "treatment": r.get("treatment", "drop"),
        })
    return out


def table1(train_runs: list[str], pred: str | None) -> list[dict]:
    """Table-1 style token accuracy: one row per training run (best val epoch) and per
    predictions file with GT."""
    from ..bavit.model import read_run_config
    from ..bavit.train import read_metrics

    rows = []
    for run in train_runs:
        cfg = read_run_config(run)
        ms = read_metrics(run)
        if not ms:
            continue
        key = "val_accuracy" if "val_accuracy" in ms[0] else "train_accuracy"
        best = max(ms, key=lambda r: r[key])
        pre = "val" if key.startswith("val") else "train"
        depth = cfg["model"]["depth"]
        rows.append({"model": {2: "BAViT-small", 10: "BAViT-large"}.get(depth, f"BAViT-d{depth}"), "depth": depth,
                     "dataset": cfg.get("labels_meta", {}).get("dataset", "?"), "source": f"{run} ({pre}, epoch {best['epoch'] + 1})",
                     "accuracy %": _fmt(100 * best[f"{pre}_accuracy"]), "FG recall %": _fmt(100 * best[f"{pre}_recall"]),
                     "FG IoU %": _fmt(100 * best[f"{pre}_iou"])})
    if pred:
        from ..bavit.predict import read_predictions

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


def _html_table(rows: list[dict]) -> str:
    if not rows:
        return "<p><em>no rows</em></p>"
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in cols) + "</tr>" for r in rows)
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
    size = meta["options"]["detector_size"]
    n = (size[0] // c.patch_size) * (size[1] // c.patch_size)
    s = np.linspace(0, 0.9, 46)
    dense = detector_gflops(c, np.array([n]), n)
    return s, np.array([dense / detector_gflops(c, np.array([n * (1 - v)]), n) for v in s])


def build_report(inp: ReportInputs, progress=None) -> dict:
    out = Path(inp.out)
    out.mkdir(parents=True, exist_ok=True)
    figs: list[tuple[str, str, str]] = []  # (file, title, caption)
    tables = {}
    rows, meta = [], {}
    if inp.results:
        all_rows = read_results(inp.results)
        rows = [r for r in all_rows if r["treatment"] == "drop"]  # other treatments: their own figure
        mp = Path(inp.results) / "meta.json"
        meta = json.loads(mp.read_text()) if mp.is_file() else {}
        t2 = table2(all_rows)
        atomic_write_text(out / "table2.csv", _csv(t2))
        atomic_write_text(out / "table2.md", _markdown(t2))
        tables["Table 2: token reduction, accuracy and speed"] = t2
        figures.map_vs_sparsity(rows, out / "map_vs_sparsity.png")
        figs.append(("map_vs_sparsity.png", "mAP vs sparsity",
                     "Each selector's mAP as sparsity grows; the dashed line is dense YOLOS. Labels on BAViT points are BG-probability thresholds."))
        figures.speedup_vs_sparsity(rows, out / "speedup_vs_sparsity.png", _ideal(meta))
        figs.append(("speedup_vs_sparsity.png", "Speedup vs sparsity",
                     "Measured speedups (timed side by side with dense YOLOS in one process) against the FLOP-ideal curve."))
        figures.reduction_vs_map(rows, out / "reduction_vs_map.png")
        figs.append(("reduction_vs_map.png", "Token reduction vs mAP",
                     "Paper eq. 4: reduction counts BAViT's own tokens, so light pruning can be a net increase."))
        if len({r["treatment"] for r in all_rows if r["selector"] == "bavit"}) > 1:
            figures.treatments(all_rows, out / "treatments.png")
            figs.append(("treatments.png", "What happens to pruned tokens",
                         "BAViT rows per treatment of the pruned tokens (drop: the paper; pool: one mean token; "
                         "preserve: frozen keys/values): mAP, and measured end-to-end speedup beside each one's FLOP ideal."))
        per = meta.get("per_image_sparsity", {})
        pick = {k: v for k, v in per.items() if k.startswith("bavit_")}
        if pick:
            keys = sorted(pick)
            sel = {k: pick[k] for k in (keys[0], keys[len(keys) // 2], keys[-1])}
            figures.sparsity_hist(sel, out / "sparsity_hist.png")
            figs.append(("sparsity_hist.png", "Per-image sparsity",
                         "Sparsity varies from image to image at a fixed threshold (BAViT rows)."))
    t1 = table1(inp.train_runs, inp.pred)
    if t1:
        atomic_write_text(out / "table1.csv", _csv(t1))
        atomic_write_text(out / "table1.md", _markdown(t1))
        tables["Table 1: token classification accuracy"] = t1
    for run in inp.train_runs:
        from ..bavit.train import read_metrics

        ms = read_metrics(run)
        if ms:
            name = f"training_{Path(run).name}.png"
            figures.training_curves(ms, out / name, f"BAViT training: {Path(run).name}")
            figs.append((name, f"Training curves ({Path(run).name})", "Loss and token metrics per epoch (metrics.jsonl)."))
    if inp.finetune_run:
        fm = Path(inp.finetune_run) / "metrics.jsonl"
        if fm.is_file():
            ms = [json.loads(x) for x in fm.read_text().splitlines() if x.strip()]
            _finetune_curve(ms, out / "finetune_curves.png")
            figs.append(("finetune_curves.png", "Detector training", "Set loss and val mAP per epoch."))
    figs += _image_figures(inp, rows, meta, out)
    _write_index(out, tables, figs, inp, meta)
    return {"out": str(out), "tables": list(tables), "figures": [f[0] for f in figs]}


def _finetune_curve(ms, path):
    plt = figures._plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    ep = [r["epoch"] + 1 for r in ms]
    for k in ("train_loss", "train_loss_ce", "train_loss_bbox", "train_loss_giou"):
        a.plot(ep, [r[k] for r in ms], label=k.replace("train_", ""))
    a.set_xlabel("epoch"), a.set_title("DETR set loss"), a.legend(fontsize=8)
    if "val_map" in ms[0]:
        b.plot(ep, [r["val_map"] for r in ms], label="mAP")
        b.plot(ep, [r["val_map50"] for r in ms], label="AP50")
    b.set_xlabel("epoch"), b.set_ylim(0, 1), b.set_title("val"), b.legend(fontsize=8)
    figures._save(fig, path)


def _image_figures(inp: ReportInputs, rows, meta, out: Path) -> list:
    """Overlay, sparse-image, before/after and detection figures from the prediction files."""
    from ..data.images import load_image

    figs = []
    if not inp.pred:
        return figs
    from ..bavit.predict import read_predictions

    p = read_predictions(inp.pred)
    img_dir = Path(inp.images or p.meta.get("images_dir") or ".")
    if not img_dir.is_dir():
        raise InputFileError(img_dir, "image directory for the report figures not found (pass --images)")
    # a spread of examples: sorted by predicted sparsity
    order = np.argsort(1 - p.grids.reshape(len(p), -1).mean(1))
    pick = order[np.linspace(0, len(order) - 1, min(inp.n_examples, len(order))).astype(int)]
    imgs = [load_image(img_dir / p.file_names[i]) for i in pick]
    if p.gt is not None:
        figures.overlays(imgs, [p.gt[i] for i in pick], out / "overlay_gt.png",
                         title="Ground-truth patch labels: FG red, BG grey")
        figs.append(("overlay_gt.png", "Patch labels (paper Fig. 2)", "Ground-truth FG tokens in red, BG in grey, on the token grid."))
    figures.overlays(imgs, [p.grids[i] for i in pick], out / "overlay_pred.png", title="BAViT predictions: FG red, BG grey")
    figs.append(("overlay_pred.png", "BAViT predictions", "Tokens BAViT keeps (red) and prunes (grey)."))
    figures.sparse_images(imgs, [p.grids[i] for i in pick], out / "sparse_images.png")
    figs.append(("sparse_images.png", "Sparse images (paper Fig. 4)", "Background patches blanked: what the pruned detector computes on."))
    if inp.refined and p.gt is not None:
        r = read_predictions(inp.refined)
        pos = {int(i): k for k, i in enumerate(r.image_ids)}
        sub = [i for i in pick if int(p.image_ids[i]) in pos][:4]
        if sub:
            steps = (r.meta.get("postprocess") or {}).get("steps", "?")
            figures.before_after([load_image(img_dir / p.file_names[i]) for i in sub], [p.gt[i] for i in sub],
                                 [p.grids[i] for i in sub], [r.grids[pos[int(p.image_ids[i])]] for i in sub],
                                 out / "postprocess.png", steps)
            figs.append(("postprocess.png", "Post-processing (paper Fig. 6)", "GT, BAViT's grid, and the refined grid."))
    if inp.results and rows:
        figs += _detection_figure(inp, rows, meta, out)
    return figs


def _detection_figure(inp, rows, meta, out) -> list:
    from ..data.images import load_image

    det_dir = Path(inp.results) / "detections"
    bav = sorted((r for r in rows if r["selector"] == "bavit"), key=lambda r: r["sparsity"])
    dense = [r for r in rows if r["selector"] == "dense"]
    if not bav or not (det_dir / "dense.json").is_file():
        return []
    a_name = "dense.json" if dense else f"bavit_{bav[0]['threshold']:.2f}.json"
    hi = bav[-1]
    b_name = f"bavit_{hi['threshold']:.2f}.json"
    if not (det_dir / b_name).is_file():
        return []
    da = json.loads((det_dir / a_name).read_text())
    db = json.loads((det_dir / b_name).read_text())
    ids = meta.get("image_ids", [])[:4]
    opts = meta.get("options", {})
    from ..data import open_dataset

    try:
        aset = open_dataset(opts.get("dataset", "coco"), root=opts.get("root"), split=opts.get("split"),
                            ann=opts.get("ann"), images=opts.get("images"))
    except Exception:
        return []
    pos = {int(i): k for k, i in enumerate(aset.image_ids)}
    imgs, ga, gb = [], [], []
    for iid in ids:
        if iid not in pos:
            continue
        imgs.append(load_image(aset.images_dir / aset.file_names[pos[iid]]))
        ga.append([d for d in da if d["image_id"] == iid])
        gb.append([d for d in db if d["image_id"] == iid])
    if not imgs:
        return []
    id2name = {int(k): v for k, v in ((meta.get("detector_config") or {}).get("id2label") or {}).items()}
    names = ("dense YOLOS" if dense else f"BAViT thr {bav[0]['threshold']:.2f}",
             f"BAViT thr {hi['threshold']:.2f} (sparsity {100 * hi['sparsity']:.0f} %)")
    figures.detections(imgs, ga, gb, names, None, out / "detections.png", id2name)
    return [("detections.png", "Detections at two sparsities", "Boxes with score ≥ 0.5 from dense YOLOS and from the sparsest BAViT row.")]


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.3rem}
table{border-collapse:collapse;font-size:.8rem;margin:.5rem 0;display:block;overflow-x:auto}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:right;white-space:nowrap}th{background:#f4f4f4}
tr:nth-child(even) td{background:#fafafa}.figs{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:1.2rem}
figure{margin:0;border:1px solid #eee;padding:.6rem;border-radius:6px}figure img{width:100%}figcaption{font-size:.8rem;color:#555}figure.wide{grid-column:1/-1}
.meta{font-size:.8rem;color:#666}"""


def _write_index(out: Path, tables: dict, figs: list, inp: ReportInputs, meta: dict) -> None:
    from .. import __version__

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>bavit report</title><style>{CSS}</style></head><body>",
             "<h1>BAViT token pruning report</h1>",
             f"<p class='meta'>bavit {__version__} · {time.strftime('%Y-%m-%d %H:%M')} · results: "
             f"{html.escape(str(inp.results))} · images evaluated: {meta.get('n_images', '-')}</p>"]
    for title, rows in tables.items():
        parts.append(f"<h2>{html.escape(title)}</h2>{_html_table(rows)}")
    if figs:
        parts.append("<h2>Figures</h2><div class='figs'>")
        for f, t, c in figs:
            wide = " class='wide'" if f.startswith(WIDE_FIGURES) else ""
            parts.append(f"<figure{wide}><img src='{f}' alt='{html.escape(t)}'><figcaption><b>{html.escape(t)}.</b> "
                         f"{html.escape(c)}</figcaption></figure>")
        parts.append("</div>")
    parts.append("</body></html>")
    atomic_write_text(out / "index.html", "\n".join(parts))
