"""``bavit prune-eval``: YOLOS computing only the FG tokens, swept over operating points."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import cli_command, console, err_console, print_table, progress_bar

UNITS = {"loading": "", "decoding": "images", "BAViT": "images", "detecting": "image passes",
         "timing": "timed calls", "COCOeval": "rows"}


@cli_command
def prune_eval_cmd(
    detector: str = typer.Option("hustvl/yolos-tiny", "--detector", help="HF hub name (needs a network) or local YOLOS directory."),
    model: Optional[Path] = typer.Option(None, "--model", help="BAViT run directory (enables the bavit and random selectors)."),
    dataset: str = typer.Option("coco", "--dataset", help="coco or voc."),
    root: Optional[Path] = typer.Option(None, "--root", help="Dataset root (as for bavit label)."),
    split: Optional[str] = typer.Option(None, "--split", help="Split [default: val2017 (COCO), val (VOC)]."),
    ann: Optional[Path] = typer.Option(None, "--ann", help="COCO instances JSON (instead of --root)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image directory that goes with --ann."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Labels parquet of the same images (enables the oracle selector)."),
    thresholds: str = typer.Option("0.3:0.9", "--thresholds", help="BG-probability thresholds: start:stop[:step] or a,b,c."),
    sparsities: Optional[str] = typer.Option(None, "--sparsities", help="Target mean sparsities instead of thresholds: start:stop[:step] or a,b,c (e.g. 0:0.9:0.1)."),
    policy: str = typer.Option("threshold", "--policy", help="How --sparsities are reached: threshold (one global BG threshold, per-image sparsity varies) or topk (every image keeps the same count)."),
    selectors: Optional[str] = typer.Option(None, "--selectors", help="Comma list of dense,bavit,oracle,random,attention,gate [default: all the inputs allow, except attention; gate when --detector has a trained gate beside it]."),
    prune_at_layer: int = typer.Option(2, "--prune-at-layer", help="The attention selector: encoder layers run on every token before the detector keeps the patch tokens its layer-k attention from CLS and detection tokens ranks highest (topk at each --sparsities). The gate selector reads its own layer from gate.json."),
    category_map: Optional[Path] = typer.Option(None, "--category-map", help='JSON {"dataset class": "detector class"} for classes whose names differ.'),
    batch_size: int = typer.Option(1, "--batch-size", help="Images per detector call."),
    detector_size: Optional[str] = typer.Option(None, "--detector-size", help="Square protocol: every image stretched to N or HxW (the paper's Table 2: 512) [default: the checkpoint's own protocol, from its preprocessor_config.json: hustvl/yolos-tiny keeps the aspect, shortest edge 512, longest 1333, each image on its own grid]."),
    resample: str = typer.Option("nearest", "--resample", help="BAViT grid → detector grid: nearest or any."),
    postprocess_steps: int = typer.Option(0, "--postprocess-steps", help="Clean-up steps on BAViT's grids first (with --thresholds)."),
    layout: Optional[str] = typer.Option(None, "--layout", help="pack or pad [default: pack on CPU, pad on CUDA]."),
    pruned_tokens: str = typer.Option("drop", "--pruned-tokens", help="What happens to pruned tokens: drop (the paper), "
                                      "pool (one mean token) or preserve (frozen keys/values); a comma list adds rows per treatment."),
    treatments_for: Optional[str] = typer.Option(None, "--treatments-for", help="Comma list of selectors swept over every --pruned-tokens treatment; the others get the first one only [default: all]."),
    timing_images: int = typer.Option(8, "--timing-images", help="Images timed (0 = no timing)."),
    timing_repeats: int = typer.Option(3, "--timing-repeats", help="Round-robin repeats of dense, BAViT and every row (medians, spreads)."),
    max_images: Optional[int] = typer.Option(None, "--max-images", help="Evaluate only the first N images."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32; bf16 (CUDA: autocast; CPU: the detector held in bf16, BAViT in fp32); fp16 (CUDA only)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps (Apple GPUs)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random selector and of tie-breaking."),
    out: Path = typer.Option(Path("results"), "--out", help="Results directory."),
    runtime: str = typer.Option("torch", "--runtime", help="torch, or onnx: BAViT and the detector run from --exported graphs in ONNX Runtime (no timing columns; time the graphs with bavit bench --runtime onnx)."),
    exported: Optional[Path] = typer.Option(None, "--exported", help="Directory from bavit export (with --runtime onnx)."),
    latency_budget: Optional[float] = typer.Option(None, "--latency-budget", help="ms per image: add the target sparsity whose measured end-to-end latency in --speed meets it (the lowest such; the only target without --sparsities)."),
    speed: Optional[Path] = typer.Option(None, "--speed", help="Directory from bavit bench (with --latency-budget): its curve at this run's runtime, dtype, batch size and first --pruned-tokens."),
) -> None:
    """Evaluate YOLOS on FG tokens only: mAP, tokens and speed per selector and operating point.

    \b
    Example:
        bavit prune-eval --model runs/bavit-small --detector hustvl/yolos-tiny --root coco --split val2017 --labels val.parquet --sparsities 0:0.9:0.1 --out results/
    Meet a latency budget measured by bavit bench: add --latency-budget 120 --speed speed/.
    Table 2's protocol (every image 512x512, 1 024 tokens): add --detector-size 512.
    Scale out:  torchrun --nproc_per_node 4 -m bavit_cli prune-eval ... (images sharded, rank 0 writes)
    """
    from bavit_core.data.grid import parse_size
    from bavit_core.evaluate.options import apply_latency_budget
    from bavit_core.evaluate.sweep import STAGES, PruneEvalOptions, parse_sparsities, parse_thresholds, prune_eval
    from bavit_core.runtime.launch import is_main_process

    opts = PruneEvalOptions(
        detector=detector, dataset=dataset, root=str(root) if root else None, split=split,
        ann=str(ann) if ann else None, images=str(images) if images else None,
        model=str(model) if model else None, labels=str(labels) if labels else None,
        thresholds=parse_thresholds(thresholds), sparsities=parse_sparsities(sparsities) if sparsities else None,
        policy=policy, selectors=[s.strip() for s in selectors.split(",") if s.strip()] if selectors else None,
        category_map=str(category_map) if category_map else None,
        batch_size=batch_size, detector_size=parse_size(detector_size) if detector_size else None, resample=resample,
        postprocess_steps=postprocess_steps, layout=layout, timing_images=timing_images,
        timing_repeats=timing_repeats, max_images=max_images, dtype=dtype, device=device, seed=seed, out=str(out),
        runtime=runtime, exported=str(exported) if exported else None,
        pruned_tokens=[s.strip() for s in pruned_tokens.split(",") if s.strip()],
        treatments_for=[s.strip() for s in treatments_for.split(",") if s.strip()] if treatments_for else None,
        latency_budget_ms=latency_budget, speed=str(speed) if speed else None, prune_at_layer=prune_at_layer,
    )
    budget = apply_latency_budget(opts)  # resolved and told before the long run
    if budget is not None and is_main_process():
        err_console.print(budget_line(budget), highlight=False, soft_wrap=True)
    n_stages = len(STAGES) - (0 if model else 1)
    with progress_bar("prune-eval", stages=n_stages) as progress:
        r = prune_eval(opts, progress, on_stage=lambda s: progress.stage(s, UNITS.get(s)))
    if not is_main_process():  # under torchrun rank 0 reports
        return
    print_table(summary_table(r, batch_size))
    if r.get("skipped"):
        err_console.print(f"Note: {r['skipped']} (scored without them)", highlight=False, markup=False, soft_wrap=True)
    if r["timing_noisy"]:
        err_console.print(timing_warning(r), highlight=False, soft_wrap=True)
    joint = r.get("bavit_joint")
    if joint is not None:
        err_console.print(f"Note: the BAViT run was trained jointly with {'this detector' if joint['pair'] else 'the detector in ' + str(joint.get('detector')) + ', not this one'} (target sparsity {joint.get('target_sparsity')})",
                          highlight=False, markup=False, soft_wrap=True)
    console.print(f"Wrote {r['out']}/results.csv, detections/ and meta.json")


def _f(v, p=3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{p}f}"


def summary_table(r: dict, batch_size: int) -> Table:
    proto = r.get("input_protocol", {}).get("description", "")
    t = Table(title=f"bavit prune-eval ({r['n_images']} images, batch {batch_size}, input {proto})",
              title_justify="left")
    for c in ("selector", "point", "sparsity", "mAP", "AP50", "reduct.", "ms/img", "speedup"):
        t.add_column(c, justify="right")
    for row in r["rows"]:
        if not math.isnan(row["target"]):
            point = f"{'topk' if row['policy'] == 'topk' else 's'} {row['target']:.2f}"
        else:
            point = _f(row["threshold"], 2) if not math.isnan(row["threshold"]) else "-"
        spread = row["latency_spread"]
        ms = _f(row["latency_ms"], 1) + ("" if math.isnan(spread) else f"±{100 * spread:.0f}%")
        noisy = "*" if row["timing_noisy"] else ""
        layer = row.get("prune_layer", float("nan"))
        sel = row["selector"] + ("" if math.isnan(layer) else f"@{int(layer)}")
        sel += "" if row.get("treatment", "drop") == "drop" else f"/{row['treatment']}"
        t.add_row(sel, point, _f(row["sparsity"]), _f(row["map"]), _f(row["map50"]),
                  _f(row["token_reduction_pct"], 1) + "%", ms, _f(row["speedup"], 2) + "x" + noisy)
    return t


def budget_line(b: dict) -> str:
    what = "end to end" if b["end_to_end"] else "detector alone"
    return (f"Latency budget {b['budget_ms']:g} ms/image → target sparsity {b['sparsity']:.2f} "
            f"({_f(b['curve_latency_ms'], 1)} ms/image {what} on bench's curve {b['curve']}, {b['device']})")


def timing_warning(r: dict) -> str:
    d = r.get("dense_drift", float("nan"))
    spreads = [row["latency_spread"] for row in r["rows"] if not math.isnan(row["latency_spread"])]
    worst = max(spreads) if spreads else float("nan")
    load = r.get("load_start", {}).get("load_1m", float("nan")), r.get("load_end", {}).get("load_1m", float("nan"))
    return (f"Warning: timing is noisy (rows marked *): worst spread {_f(100 * worst, 0)} %, dense drift "
            f"{_f(100 * d, 0)} % over the run (limit 10 %); load {_f(load[0], 1)} → {_f(load[1], 1)}. "
            "Speedups are unreliable on a busy machine; rerun when idle or with more --timing-repeats.")
