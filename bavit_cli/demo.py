"""``bavit demo``: the whole pipeline on a generated dataset."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .common import cli_command, console, print_table, progress_bar


@cli_command
def demo(
    out: Path = typer.Option(Path("demo"), "--out", help="Directory for every stage's output."),
    quick: bool = typer.Option(False, "--quick", help="Smaller settings (about 40 s on 2 idle CPU cores)."),
    train_detector: bool = typer.Option(False, "--train-detector", help="Train the detector from scratch instead of using the shipped one (long)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the generated dataset and of training."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps (Apple GPUs)."),
) -> None:
    """Run synth → label → train → predict → postprocess → prune-eval → report on generated data.

    \b
    Example:
        bavit demo --out demo/ --quick
    """
    from bavit_core.demo import STAGES, DemoOptions, run_demo

    def on_stage(stage, msg):
        console.print(f"[bold green]✓[/] [bold]{stage:<11}[/] {msg}", highlight=False)

    # one progress display over the whole run, one numbered stage per pipeline stage
    with progress_bar("demo", stages=len(STAGES), unit="steps") as bar:
        def progress_for(stage):
            bar.stage(stage)
            return bar

        r = run_demo(DemoOptions(out=str(out), quick=quick, train_detector=train_detector, seed=seed, device=device),
                     on_stage=on_stage, progress_for=progress_for)
    print_table(demo_table(r))
    console.print("preserve: BAViT's tokens, the pruned ones kept as frozen keys/values (--pruned-tokens preserve); "
                  "attention@4: the detector keeps the tokens its CLS and detection tokens attend to in layer 4; "
                  "YOLOS-F: the detector fine-tuned on BAViT's tokens; gate@2: a token gate trained inside the "
                  "frozen detector (docs/results.md compares them all)", highlight=False)
    if any(row.get("timing_noisy") for row in r["rows"]):
        console.print("*: that row's timing was noisy (a spread or the dense drift passed 10 %); its speedups are "
                      "unreliable on a busy machine", highlight=False)
    console.print(f"Done in {r['seconds']:.0f} s. Open {r['report']}", highlight=False)


def demo_table(r: dict) -> Table:
    t = Table(title="prune-eval on the generated val (×: speedup, detector / end to end)", title_justify="left")
    for c in ("selector", "target", "sparsity", "mAP", "AP50", "reduct.", "det ×", "e2e ×"):
        t.add_column(c, justify="right")
    f = lambda v, p: "-" if v != v else f"{v:.{p}f}"  # noqa: E731
    x = lambda v: "-" if v != v else f"{v:.2f}x"  # noqa: E731
    rows = list(r["rows"]) + [dict(r["yolos_f"], selector="YOLOS-F")]
    if r.get("gate"):
        rows.append(dict(r["gate"], selector="gate"))
    for row in rows:
        noisy = "*" if row.get("timing_noisy") else ""
        layer = row.get("prune_layer", float("nan"))
        name = "preserve" if row.get("treatment") == "preserve" else row["selector"]
        name += "" if layer != layer else f"@{int(layer)}"
        t.add_row(name, f(row["target"], 2), f"{row['sparsity']:.3f}", f"{row['map']:.3f}",
                  f"{row['map50']:.3f}", f"{row['token_reduction_pct']:.1f}%", x(row["detector_speedup"]) + noisy, x(row["speedup"]) + noisy)
    return t
