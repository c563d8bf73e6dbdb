"""``bavit demo``: the whole pipeline on a generated dataset."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .common import cli_command, console, early_option_checks, print_table, progress_bar


@cli_command
def demo(
    out: Path = typer.Option(Path("demo"), "--out", help="Directory for every stage's output."),
    quick: bool = typer.Option(False, "--quick", help="Smaller settings (about 2 minutes on a laptop CPU)."),
    train_detector: bool = typer.Option(False, "--train-detector", help="Train the detector from scratch instead of using the shipped one (long)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the generated dataset and of training."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Run synth → label → train → predict → postprocess → prune-eval → report on generated data.

    \b
    Example:
        bavit demo --out demo/ --quick
    """
    from bavit_core.demo import DemoOptions, run_demo

    early_option_checks(device)
    bars = {}

    def progress_for(stage):
        return lambda adv, total: bars.get(stage, lambda a, t: None)(adv, total)

    def on_stage(stage, msg):
        console.print(f"[bold green]✓[/] [bold]{stage:<11}[/] {msg}", highlight=False)

    # one progress bar over the whole run; stages report their own counts into it
    with progress_bar("demo") as bar:
        for s in ("synth", "train", "prune-eval", "detector"):
            bars[s] = bar
        r = run_demo(DemoOptions(out=str(out), quick=quick, train_detector=train_detector, seed=seed, device=device),
                     on_stage=on_stage, progress_for=progress_for)
    t = Table(title="prune-eval on the generated val split", title_justify="left")
    for c in ("selector", "threshold", "sparsity", "mAP", "AP50", "token reduction", "detector speedup", "speedup"):
        t.add_column(c, justify="right")
    for row in r["rows"]:
        thr = "-" if row["threshold"] != row["threshold"] else f"{row['threshold']:.2f}"
        t.add_row(row["selector"], thr, f"{row['sparsity']:.3f}", f"{row['map']:.3f}", f"{row['map50']:.3f}",
                  f"{row['token_reduction_pct']:.1f}%", f"{row['detector_speedup']:.2f}x", f"{row['speedup']:.2f}x")
    print_table(t)
    console.print(f"Done in {r['seconds']:.0f} s. Open {r['report']}", highlight=False)
