"""``bavit report``: tables, figures and an index.html from results and runs."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import cli_command, console, err_console, renamed


@cli_command
def report(
    results: Optional[Path] = typer.Option(None, "--results", help="Results directory from bavit prune-eval."),
    finetuned_results: Optional[Path] = typer.Option(None, "--finetuned-results", help="prune-eval results of a sparsely fine-tuned detector: its BAViT rows become YOLOS-F rows."),
    model: Optional[List[Path]] = typer.Option(None, "--model", help="BAViT run directory, for Table 1 and its training curves (repeatable)."),
    pred: Optional[Path] = typer.Option(None, "--pred", help="Predictions parquet (overlays, sparse images)."),
    refined: Optional[Path] = typer.Option(None, "--refined", help="Post-processed predictions (before/after figure)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image directory of --pred [default: recorded in it]."),
    detector: Optional[Path] = typer.Option(None, "--detector", help="Detector run directory from bavit finetune, for its training curves."),
    speed: Optional[Path] = typer.Option(None, "--speed", help="Directory from bavit bench: mAP against measured latency, with the Pareto front (with --results)."),
    examples: int = typer.Option(6, "--examples", help="Images in the example figures."),
    out: Path = typer.Option(Path("report"), "--out", help="Report directory."),
    old_train_run: Optional[List[Path]] = typer.Option(None, "--train-run", hidden=True, help="Deprecated: --model."),
    old_finetune_run: Optional[Path] = typer.Option(None, "--finetune-run", hidden=True, help="Deprecated: --detector."),
) -> None:
    """Write Table-1/Table-2 CSV and Markdown, PNG figures and a static index.html.

    \b
    Example:
        bavit report --results results/ --model runs/bavit-small --pred preds.parquet --refined refined.parquet --out report/
    """
    from bavit_core.report.build import ReportInputs, build_report
    from bavit_core.runtime.errors import OptionError

    train_run = renamed("--train-run", "--model", old_train_run, model, None)
    finetune_run = renamed("--finetune-run", "--detector", old_finetune_run, detector, None)
    if not (results or train_run or pred):
        raise OptionError("nothing to report: give --results, --model or --pred")
    if finetuned_results and not results:
        raise OptionError("--finetuned-results goes with --results")
    if speed and not results:
        raise OptionError("--speed goes with --results (it places prune-eval's rows at their measured latency)")
    r = build_report(ReportInputs(results=str(results) if results else None,
                                  finetuned_results=str(finetuned_results) if finetuned_results else None,
                                  train_runs=[str(t) for t in (train_run or [])], pred=str(pred) if pred else None,
                                  refined=str(refined) if refined else None, images=str(images) if images else None,
                                  finetune_run=str(finetune_run) if finetune_run else None,
                                  speed=str(speed) if speed else None, n_examples=examples,
                                  out=str(out)))
    for what in r.get("skipped", []):
        err_console.print(f"Skipped {what}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"Wrote {len(r['tables'])} tables and {len(r['figures'])} figures; open {r['out']}/index.html")
