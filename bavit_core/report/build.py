"""Turn prune-eval results (and optional training / prediction files) into tables,
figures and a static index.html."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..evaluate.results import read_results, row_name
from ..runtime.errors import BavitError, InputFileError
from ..runtime.fileio import atomic_write_text
from . import figures
from .page import _write_index
from .tables import _csv, _fmt, _ideal, _markdown, _point, table1, table2, table2_details

@dataclass
class ReportInputs:
    results: str | None = None
    finetuned_results: str | None = None  # prune-eval of a sparsely fine-tuned detector: its rows are YOLOS-F
    train_runs: list[str] = field(default_factory=list)
    pred: str | None = None
    refined: str | None = None
    images: str | None = None
    finetune_run: str | None = None
    speed: str | None = None  # bavit bench's directory: mAP against measured latency
    n_examples: int = 6
    out: str = "report"


def build_report(inp: ReportInputs, progress=None) -> dict:
    """Write the report directory whole: built in a temporary sibling and renamed into
    place on success, so a failure or a kill leaves no partial report (and the previous
    report, if any, intact)."""
    from dataclasses import replace

    from ..runtime.errors import OptionError
    from ..runtime.fileio import atomic_dir, check_output_writable, refuse_output_over_inputs

    if inp.n_examples < 1:
        raise OptionError(f"--examples must be at least 1, got {inp.n_examples}")
    final = Path(inp.out)
    refuse_output_over_inputs(final, [inp.results, *inp.train_runs, inp.pred, inp.refined, inp.images,
                                      inp.finetune_run, inp.speed], is_dir=True)
    check_output_writable(final)
    _check_inputs(inp)
    with atomic_dir(final, markers=("index.html",)) as tmp:
        r = _build_report(replace(inp, out=str(tmp)), progress)
    return dict(r, out=str(final))


def _check_inputs(inp: ReportInputs) -> None:
    """Damaged inputs of ours (results.csv without its columns, unreadable meta.json or
    metrics.jsonl) are one clean error before anything is drawn."""
    from ..runtime.errors import InputFileError
    from ..runtime.typed import check_metric_rows

    for d in [r for r in (inp.results, inp.finetuned_results) if r]:
        _check_results(d)
    if inp.speed:  # bench's speed.csv, read before anything is drawn
        from ..evaluate.speedcurve import read_speed

        read_speed(inp.speed)
    if inp.results:
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
            check_metric_rows(rows, mf)  # a value of the wrong type (a string accuracy) names its line and key
    for run in inp.train_runs:  # Table 1 reads a BAViT run's depth and token accuracy
        from ..bavit.runfiles import read_metrics, read_run_config

        try:
            depth = read_run_config(run).get("model", {}).get("depth")
        except (ValueError, UnicodeDecodeError, AttributeError):
            depth = None
        if not isinstance(depth, int) or not all("train_accuracy" in r for r in read_metrics(run)):
            raise InputFileError(run, "not a BAViT run from bavit train (no BAViT config or token accuracy in "
                                      "its metrics); a detector run from bavit finetune goes to --detector")


# The results.csv columns the report cannot do without
REPORT_NUMBERS = ("sparsity", "map", "map50", "map75", "bavit_tokens", "yolos_tokens", "yolos_pruned_tokens",
                  "total_tokens", "token_reduction_pct", "gflops", "latency_ms", "throughput_ips",
                  "dense_latency_ms", "speedup", "detector_speedup", "flop_speedup", "peak_mem_mb", "batch_size")


def _check_results(results_dir) -> None:
    """results.csv is prune-eval's (``read_results`` checks the values): rows, and the
    columns the report reads."""
    from ..runtime.errors import InputFileError

    p = Path(results_dir) / "results.csv"
    rows = read_results(results_dir)
    if not rows:
        raise InputFileError(p, "results.csv holds no rows")
    missing = [c for c in ("selector", "threshold", "device", *REPORT_NUMBERS) if c not in rows[0]]
    if missing:
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        raise InputFileError(p, f"results.csv without column(s) {', '.join(missing[:4])}{more} (not from bavit prune-eval?)")


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
        if inp.speed:
            figs.append(_latency_section(all_rows, inp.speed, out, tables))
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
        from ..bavit.runfiles import read_metrics

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
    skipped: list[str] = []
    figs += _image_figures(inp, out)
    if inp.results and rows:  # needs only the results and the dataset they were made on, not --pred
        figs += _detection_figure(inp, rows, meta, out, skipped)
    _write_index(out, tables, figs, inp, meta, notes, greys)
    return {"out": str(out), "tables": list(tables), "figures": [f[0] for f in figs], "skipped": skipped}


def _latency_section(rows, speed, out: Path, tables: dict) -> tuple[str, str, str]:
    """``--speed``: every row at its measured latency on bench's curves, the Pareto front."""
    from .latency import latency_table, map_vs_latency

    t = latency_table(rows, speed)
    atomic_write_text(out / "map_vs_latency.csv", _csv(t))
    tables["mAP vs measured latency (bench), Pareto front marked"] = t
    map_vs_latency(t, out / "map_vs_latency.png")
    return ("map_vs_latency.png", "mAP vs measured latency",
            f"Each row at the latency bench measured at its sparsity ({t[0]['bench'] if t else ''}; BAViT rows end to "
            "end, other selectors the detector alone); the step line is the Pareto front, hollow markers lie off it.")


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


def _image_figures(inp: ReportInputs, out: Path) -> list:
    """Overlay, sparse-image and before/after figures from the prediction files."""
    from ..data.images import load_image

    figs = []
    if not inp.pred:
        return figs
    from ..bavit.predfile import read_predictions

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
    return figs


def _row_file(r: dict) -> str:
    layer = r.get("prune_layer")
    return row_name(r["selector"], r["threshold"], r.get("target", float("nan")), r.get("policy", "threshold"),
                    r.get("treatment") or "drop", float("nan") if layer in (None, "") else float(layer))


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


def _detection_figure(inp, rows, meta, out, skipped: list) -> list:
    from ..data.images import load_image

    det_dir = Path(inp.results) / "detections"
    bav = sorted((r for r in rows if r["selector"] == "bavit" and (r.get("treatment") or "drop") == "drop"),
                 key=lambda r: r["sparsity"])
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
    except (BavitError, OSError, ValueError, KeyError, TypeError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        skipped.append(f"the detections figure: cannot open the dataset the results were made on ({why})")
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


