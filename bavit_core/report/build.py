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

from ..evaluate.results import row_name
from ..evaluate.sweep import read_results
from ..runtime.errors import InputFileError
from ..runtime.fileio import atomic_write_text
from . import figures

WIDE_FIGURES = ("overlay_", "sparse_images", "postprocess", "detections")
MODEL_NAMES = {"bavit": "BAViT+YOLOS", "oracle": "Oracle+YOLOS", "random": "Random+YOLOS", "dense": "YOLOS"}


@dataclass
class ReportInputs:
    results: str | None = None
    finetuned_results: str | None = None  # prune-eval of a sparsely fine-tuned detector: its rows are YOLOS-F
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
            "model": r.get("model") or MODEL_NAMES.get(r["selector"], r["selector"]),
            "selector": r["selector"],
            "target": _point(r),
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
            "model": r.get("model") or MODEL_NAMES.get(r["selector"], r["selector"]),
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
    size = meta.get("detector_size") or meta["options"]["detector_size"] or cfg.get("image_size")
    if isinstance(size, int):
        size = (size, size)
    n = (size[0] // c.patch_size) * (size[1] // c.patch_size)
    s = np.linspace(0, 0.95, 96)
    dense = detector_gflops(c, np.array([n]), n)
    return s, np.array([dense / detector_gflops(c, np.array([n * (1 - v)]), n) for v in s])


def build_report(inp: ReportInputs, progress=None) -> dict:
    """Write the report directory whole: built in a temporary sibling and renamed into
    place on success, so a failure or a kill leaves no partial report (and the previous
    report, if any, intact)."""
    from dataclasses import replace

    from ..runtime.errors import OptionError
    from ..runtime.fileio import atomic_dir, refuse_output_over_inputs

    if inp.n_examples < 1:
        raise OptionError(f"--examples must be at least 1, got {inp.n_examples}")
    final = Path(inp.out)
    refuse_output_over_inputs(final, [inp.results, *inp.train_runs, inp.pred, inp.refined, inp.images,
                                      inp.finetune_run], is_dir=True)
    _check_inputs(inp)
    with atomic_dir(final, markers=("index.html",)) as tmp:
        r = _build_report(replace(inp, out=str(tmp)), progress)
    return dict(r, out=str(final))


def _check_inputs(inp: ReportInputs) -> None:
    """Damaged inputs of ours (results.csv without its columns, unreadable meta.json or
    metrics.jsonl) are one clean error before anything is drawn."""
    from ..runtime.errors import InputFileError

    if inp.results:
        import csv

        p = Path(inp.results) / "results.csv"
        try:
            rows = read_results(inp.results)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise InputFileError(p, f"unreadable results.csv ({str(exc)[:80]})") from None
        if not rows:
            raise InputFileError(p, "results.csv holds no rows")
        missing = [c for c in ("selector", "threshold", "sparsity") if c not in rows[0]]
        if missing:
            raise InputFileError(p, f"results.csv without column(s) {', '.join(missing)} (not from bavit prune-eval?)")
        mp = Path(inp.results) / "meta.json"
        if mp.is_file():
            try:
                doc = json.loads(mp.read_text())
            except (ValueError, UnicodeDecodeError):
                doc = None
            if not isinstance(doc, dict):
                raise InputFileError(mp, "unreadable meta.json (not a JSON object)")
    for run in ([*inp.train_runs] + ([inp.finetune_run] if inp.finetune_run else [])):
        mf = Path(run) / "metrics.jsonl"
        if not Path(run).is_dir():
            raise InputFileError(run, "run directory not found")
        if mf.is_file():
            try:
                rows = [json.loads(ln) for ln in mf.read_text().splitlines() if ln.strip()]
            except (ValueError, UnicodeDecodeError):
                rows = None
            if rows is None or not all(isinstance(r, dict) and "epoch" in r for r in rows):
                raise InputFileError(mf, "unreadable metrics.jsonl (each line must be a JSON object with an epoch)")


def _build_report(inp: ReportInputs, progress=None) -> dict:
    out = Path(inp.out)
    out.mkdir(parents=True, exist_ok=True)
    figs: list[tuple[str, str, str]] = []  # (file, title, caption)
    tables = {}
    rows, meta = [], {}
    notes: dict[str, str] = {}
    greys: dict[str, list[bool]] = {}
    if inp.results:
        res_rows = read_results(inp.results)
        rows = [r for r in res_rows if r["treatment"] == "drop"]  # other treatments: their own figure
        mp = Path(inp.results) / "meta.json"
        meta = json.loads(mp.read_text()) if mp.is_file() else {}
        f_rows = []
        if inp.finetuned_results:
            f_rows = [dict(r, model="BAViT+YOLOS-F") for r in read_results(inp.finetuned_results)
                      if r["selector"] == "bavit"]
        all_rows = res_rows + f_rows
        t2, t2d = table2(all_rows), table2_details(all_rows)
        atomic_write_text(out / "table2.csv", _csv(t2))
        atomic_write_text(out / "table2.md", _markdown(t2))
        atomic_write_text(out / "table2_details.csv", _csv(t2d))
        title2 = "Table 2: token reduction, accuracy and speed"
        tables[title2] = t2
        tables["Table 2, details: sparsity spread, AP, FLOPs, timing, memory"] = t2d
        grey = [bool(r.get("timing_noisy")) for r in all_rows]
        greys[title2] = greys["Table 2, details: sparsity spread, AP, FLOPs, timing, memory"] = grey
        notes[title2] = _timing_note(all_rows, meta)
        figures.map_vs_sparsity(rows, out / "map_vs_sparsity.png", f_rows)
        figs.append(("map_vs_sparsity.png", "mAP vs sparsity",
                     "Each selector's mAP over the sparsities evaluated (one line per selector); the dashed line is "
                     "dense YOLOS, the star the sparsely fine-tuned YOLOS-F."))
        figures.speedup_vs_sparsity(rows, out / "speedup_vs_sparsity.png", _ideal(meta))
        figs.append(("speedup_vs_sparsity.png", "Speedup vs sparsity",
                     "Measured speedups over dense YOLOS (timed round robin with it in one process; error bars: "
                     "the spreads, IQR/median, of both) against the FLOP-ideal curve. Hollow markers: noisy timing."))
        figures.reduction_vs_map(rows, out / "reduction_vs_map.png")
        figs.append(("reduction_vs_map.png", "Token reduction vs mAP",
                     "Paper eq. 4: reduction counts BAViT's own tokens, so light pruning can be a net increase."))
        if len({r["treatment"] for r in res_rows if r["selector"] == "bavit"}) > 1:
            figures.treatments(res_rows, out / "treatments.png")
            figs.append(("treatments.png", "What happens to pruned tokens",
                         "BAViT rows per treatment of the pruned tokens (drop: the paper; pool: one mean token; "
                         "preserve: frozen keys/values): mAP, and measured end-to-end speedup beside each one's FLOP ideal."))
        per = meta.get("per_image_sparsity", {})
        pick = {k: v for k, v in per.items() if k.startswith("bavit_")}
        if pick:
            keys = list(pick)  # in row order: increasing target or threshold
            sel = {k: pick[k] for k in dict.fromkeys((keys[0], keys[len(keys) // 2], keys[-1]))}
            figures.sparsity_hist(sel, out / "sparsity_hist.png")
            figs.append(("sparsity_hist.png", "Per-image sparsity",
                         "Sparsity varies from image to image under one global threshold (BAViT rows)."))
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
    _write_index(out, tables, figs, inp, meta, notes, greys)
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


def _row_file(r: dict) -> str:
    return row_name(r["selector"], r["threshold"], r.get("target", float("nan")), r.get("policy", "threshold"))


def _timing_note(rows: list[dict], meta: dict) -> str:
    noisy = [r for r in rows if r.get("timing_noisy")]
    ls, le = (meta.get("load_start") or {}), (meta.get("load_end") or {})
    load = (f" Machine load (1 min) {_fmt(ls.get('load_1m'), 1)} at the start, {_fmt(le.get('load_1m'), 1)} at the end"
            f" ({ls.get('cpus', '?')} CPUs).") if ls else ""
    if not noisy:
        return "Speedups: medians of round-robin repeats against dense YOLOS timed in the same process." + load
    spreads = [max(r.get("latency_spread") or 0, r.get("dense_spread") or 0) for r in noisy]
    return (f"Rows in grey (speedup marked *) have noisy timing: a spread (IQR / median) above 10 % "
            f"(worst {100 * max(spreads):.0f} %) or the dense reference drifting by "
            f"{_fmt(100 * (meta.get('dense_drift') or float('nan')), 0)} % over the run (limit 10 %); "
            "their speed numbers are not reliable." + load)


def _detection_figure(inp, rows, meta, out) -> list:
    from ..data.images import load_image

    det_dir = Path(inp.results) / "detections"
    bav = sorted((r for r in rows if r["selector"] == "bavit"), key=lambda r: r["sparsity"])
    dense = [r for r in rows if r["selector"] == "dense"]
    if not bav or not (det_dir / "dense.json").is_file():
        return []
    a_name = "dense.json" if dense else f"{_row_file(bav[0])}.json"
    hi = bav[-1]
    b_name = f"{_row_file(hi)}.json"
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
    names = ("dense YOLOS" if dense else f"BAViT {_point(bav[0])}",
             f"BAViT at sparsity {100 * hi['sparsity']:.0f} %")
    figures.detections(imgs, ga, gb, names, None, out / "detections.png", id2name)
    return [("detections.png", "Detections at two sparsities", "Boxes with score ≥ 0.5 from dense YOLOS and from the sparsest BAViT row.")]


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.3rem}
table{border-collapse:collapse;font-size:.8rem;margin:.5rem 0;display:block;overflow-x:auto}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:right;white-space:nowrap}th{background:#f4f4f4}
tr:nth-child(even) td{background:#fafafa}.figs{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:1.2rem}
figure{margin:0;border:1px solid #eee;padding:.6rem;border-radius:6px}figure img{width:100%}figcaption{font-size:.8rem;color:#555}figure.wide{grid-column:1/-1}
.meta{font-size:.8rem;color:#666}.note{font-size:.8rem;color:#555;max-width:60rem}
tr.noisy td{color:#999;background:#f0f0f0}"""


def _write_index(out: Path, tables: dict, figs: list, inp: ReportInputs, meta: dict, notes=None, greys=None) -> None:
    from .. import __version__

    notes, greys = notes or {}, greys or {}
    opts = meta.get("options", {})
    what = ""
    if meta:
        data = opts.get("root") or opts.get("ann") or "-"
        split = f" / {opts['split']}" if opts.get("split") else ""
        size = meta.get("detector_size") or opts.get("detector_size")
        what = (f" · detector: {html.escape(str(opts.get('detector', '-')))}"
                f"{' at ' + 'x'.join(map(str, size)) if size else ''}"
                f" · dataset: {html.escape(str(meta.get('dataset', '-')))} {html.escape(str(data))}{html.escape(split)}")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>bavit report</title><style>{CSS}</style></head><body>",
             "<h1>BAViT token pruning report</h1>",
             f"<p class='meta'>bavit {__version__} · {time.strftime('%Y-%m-%d %H:%M')} · results: "
             f"{html.escape(str(inp.results))}{what} · images evaluated: {meta.get('n_images', '-')}</p>"]
    for title, rows in tables.items():
        parts.append(f"<h2>{html.escape(title)}</h2>{_html_table(rows, greys.get(title))}")
        if title in notes:
            parts.append(f"<p class='note'>{html.escape(notes[title])}</p>")
    if figs:
        parts.append("<h2>Figures</h2><div class='figs'>")
        for f, t, c in figs:
            wide = " class='wide'" if f.startswith(WIDE_FIGURES) else ""
            parts.append(f"<figure{wide}><img src='{html.escape(f, quote=True)}' alt='{html.escape(t, quote=True)}'>"
                         f"<figcaption><b>{html.escape(t)}.</b> {html.escape(c)}</figcaption></figure>")
        parts.append("</div>")
    parts.append("</body></html>")
    atomic_write_text(out / "index.html", "\n".join(parts))
