"""``bavit prune-eval``: YOLOS computing only the FG tokens, swept over thresholds."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from bavit_core.data.grid import parse_size
from bavit_core.evaluate.sweep import PruneEvalOptions, parse_thresholds, prune_eval

from .common import cli_command, console, err_console, print_table, progress_bar


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
    selectors: Optional[str] = typer.Option(None, "--selectors", help="Comma list of dense,bavit,oracle,random [default: all the inputs allow]."),
    batch_size: int = typer.Option(1, "--batch-size", help="Images per detector call."),
    detector_size: str = typer.Option("512", "--detector-size", help="Detector input size, N or HxW (stretch-resize)."),
    resample: str = typer.Option("nearest", "--resample", help="BAViT grid → detector grid: nearest or any."),
    postprocess_steps: int = typer.Option(0, "--postprocess-steps", help="Clean-up steps on BAViT's grids first."),
    layout: Optional[str] = typer.Option(None, "--layout", help="pack or pad [default: pack on CPU, pad on CUDA]."),
    pruned_tokens: str = typer.Option("drop", "--pruned-tokens", help="What happens to pruned tokens: drop (the paper), "
                                      "pool (one mean token) or preserve (frozen keys/values); a comma list adds rows per treatment."),
    timing_images: int = typer.Option(16, "--timing-images", help="Images timed side by side per row (0 = no timing)."),
    timing_repeats: int = typer.Option(5, "--timing-repeats", help="Interleaved repeats per timing (medians)."),
    max_images: Optional[int] = typer.Option(None, "--max-images", help="Evaluate only the first N images."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, or bf16/fp16 on CUDA."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random selector."),
    out: Path = typer.Option(Path("results"), "--out", help="Results directory."),
) -> None:
    """Evaluate YOLOS on FG tokens only: mAP, tokens and speed per selector and threshold.

    \b
    Example:
        bavit prune-eval --model runs/bavit-small --detector hustvl/yolos-tiny --root coco --split val2017 --labels val.parquet --thresholds 0.3:0.9 --out results/
    """
    opts = PruneEvalOptions(
        detector=detector, dataset=dataset, root=str(root) if root else None, split=split,
        ann=str(ann) if ann else None, images=str(images) if images else None,
        model=str(model) if model else None, labels=str(labels) if labels else None,
        thresholds=parse_thresholds(thresholds),
        selectors=[s.strip() for s in selectors.split(",") if s.strip()] if selectors else None,
        batch_size=batch_size, detector_size=parse_size(detector_size), resample=resample,
        postprocess_steps=postprocess_steps, layout=layout, timing_images=timing_images,
        timing_repeats=timing_repeats, max_images=max_images, dtype=dtype, device=device, seed=seed, out=str(out),
        pruned_tokens=[s.strip() for s in pruned_tokens.split(",") if s.strip()],
    )
    with progress_bar("prune-eval") as progress:
        r = prune_eval(opts, progress, on_stage=lambda s: err_console.print(f"[dim]{s}[/]") if err_console.is_terminal else None)
    t = Table(title=f"bavit prune-eval ({r['n_images']} images, batch {batch_size})", title_justify="left")
    for c in ("selector", "thr", "sparsity", "mAP", "AP50", "tokens", "reduction", "GFLOPs", "ms/img", "speedup", "det speedup"):
        t.add_column(c, justify="right")
    for row in r["rows"]:
        f = lambda v, p=3: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{p}f}"  # noqa: E731
        sel = row["selector"] + ("" if row["treatment"] == "drop" else f"/{row['treatment']}")
        t.add_row(sel, f(row["threshold"], 2), f(row["sparsity"]), f(row["map"]), f(row["map50"]),
                  f(row["total_tokens"], 0), f(row["token_reduction_pct"], 1) + "%", f(row["gflops"], 2),
                  f(row["latency_ms"], 1), f(row["speedup"], 2) + "x", f(row["detector_speedup"], 2) + "x")
    print_table(t)
    console.print(f"Wrote {r['out']}/results.csv, detections/ and meta.json")
