"""``bavit postprocess``: iterative connected-component clean-up of predicted grids."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import cli_command, console, print_table, renamed


@cli_command
def postprocess(
    pred: Path = typer.Option(..., "--pred", help="Predictions parquet from bavit predict."),
    steps: int = typer.Option(3, "--postprocess-steps", help="Clean-up iterations (the same option as prune-eval's)."),
    kernel: str = typer.Option("8", "--kernel", help="Neighbourhood: 8 or 4."),
    min_fg: int = typer.Option(2, "--min-fg", help="A BG token turns FG when more than this many neighbours are FG."),
    out: Path = typer.Option(Path("refined.parquet"), "--out", help="Output parquet."),
    old_steps: Optional[int] = typer.Option(None, "--steps", hidden=True, help="Deprecated: --postprocess-steps."),
) -> None:
    """Turn BG tokens surrounded by FG into FG, a few times over (paper appendix).

    \b
    Example:
        bavit postprocess --pred preds.parquet --postprocess-steps 3 --out refined.parquet
    """
    from bavit_core.bavit.predfile import postprocess_predictions

    steps = renamed("--steps", "--postprocess-steps", old_steps, steps, 3)
    r = postprocess_predictions(pred, out, steps, kernel, min_fg)
    hist = r["history"]
    t = Table(title=f"bavit postprocess ({r['images']} images)", title_justify="left")
    cols = ["step", "sparsity"] + [c for c in ("accuracy", "fg_recall", "iou", "bg_kept") if c in hist[0]]
    for c in cols:
        t.add_column(c, justify="right")
    for row in hist:
        t.add_row(*[str(row[c]) if c == "step" else f"{row[c]:.4f}" for c in cols])
    print_table(t)
    console.print(f"Wrote {r['out']}")
