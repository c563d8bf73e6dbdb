"""``bavit report``: tables, figures and an index.html from results and runs."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import cli_command, console


@cli_command
def report(
    results: Optional[Path] = typer.Option(None, "--results", help="Results directory from bavit prune-eval."),
    finetuned_results: Optional[Path] = typer.Option(None, "--finetuned-results", help="prune-eval results of a sparsely fine-tuned detector: its BAViT rows become YOLOS-F rows."),
    train_run: Optional[List[Path]] = typer.Option(None, "--train-run", help="BAViT run directory (repeatable)."),
    pred: Optional[Path] = typer.Option(None, "--pred", help="Predictions parquet (overlays, sparse images)."),
    refined: Optional[Path] = typer.Option(None, "--refined", help="Post-processed predictions (before/after figure)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image directory of --pred [default: recorded in it]."),
    finetune_run: Optional[Path] = typer.Option(None, "--finetune-run", help="Detector run from bavit finetune."),
    examples: int = typer.Option(6, "--examples", help="Images in the example figures."),
    out: Path = typer.Option(Path("report"), "--out", help="Report directory."),
) -> None:
    """Write Table-1/Table-2 CSV and Markdown, PNG figures and a static index.html.

    \b
    Example:
        bavit report --results results/ --train-run runs/bavit-small --pred preds.parquet --refined refined.parquet --out report/
    """
    from bavit_core.report.build import ReportInputs, build_report
    from bavit_core.runtime.errors import OptionError

    if not (results or train_run or pred):
        raise OptionError("nothing to report: give --results, --train-run or --pred")
    if finetuned_results and not results:
        raise OptionError("--finetuned-results goes with --results")
    r = build_report(ReportInputs(results=str(results) if results else None,
                                  finetuned_results=str(finetuned_results) if finetuned_results else None,
                                  train_runs=[str(t) for t in (train_run or [])], pred=str(pred) if pred else None,
                                  refined=str(refined) if refined else None, images=str(images) if images else None,
                                  finetune_run=str(finetune_run) if finetune_run else None, n_examples=examples,
                                  out=str(out)))
    console.print(f"Wrote {len(r['tables'])} tables and {len(r['figures'])} figures; open {r['out']}/index.html")
