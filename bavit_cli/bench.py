"""``bavit bench``: latency vs kept tokens on this device and runtime, and the break-even sparsity."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import cli_command, console, err_console, print_table, progress_bar


@cli_command
def bench(
    detector: str = typer.Option("hustvl/yolos-tiny", "--detector", help="HF hub name (needs a network) or local YOLOS directory (random weights time the same)."),
    model: Optional[Path] = typer.Option(None, "--model", help="BAViT run directory: end to end adds its latency [default: the detector alone]."),
    runtime: str = typer.Option("torch", "--runtime", help="torch, onnx (the --exported graphs in ONNX Runtime), or torch,onnx."),
    exported: Optional[Path] = typer.Option(None, "--exported", help="Directory from bavit export (with --runtime onnx)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps (Apple GPUs)."),
    dtype: str = typer.Option("fp32", "--dtype", help="Comma list of fp32, bf16, fp16 (CUDA only)."),
    batch_sizes: str = typer.Option("1,8", "--batch-sizes", help="Comma list of images per call; within a batch images keep different counts (±0.05)."),
    kept: str = typer.Option("0.1:1.0:0.1", "--kept", help="Kept patch-token shares: start:stop[:step] or a,b,c, in (0, 1]."),
    pruned_tokens: str = typer.Option("drop", "--pruned-tokens", help="Comma list of treatments of the pruned tokens: drop, pool, preserve."),
    detector_size: Optional[str] = typer.Option(None, "--detector-size", help="Input timed, N or HxW [default: the checkpoint's square size or its shortest edge as a square; the graphs' size with --exported]."),
    layout: Optional[str] = typer.Option(None, "--layout", help="pack or pad [default: pack on CPU, pad on CUDA]."),
    repeats: int = typer.Option(3, "--repeats", help="Least round-robin rounds after the warm-up."),
    max_repeats: int = typer.Option(10, "--max-repeats", help="More rounds, up to this, until every spread (IQR/median) is at most 5 %."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random inputs and token positions."),
    out: Path = typer.Option(Path("speed"), "--out", help="Speed directory (speed.csv, speed.png, meta.json)."),
) -> None:
    """Measure where pruning pays here: latency vs kept tokens, dense and BAViT, break-even sparsity.

    \b
    Example:
        bavit bench --detector hustvl/yolos-tiny --model runs/bavit-small --batch-sizes 1,8 --kept 0.1:1.0:0.1 --out speed/
    Then: bavit report --results results/ --speed speed/   and   bavit prune-eval ... --latency-budget 120 --speed speed/
    """
    from bavit_core.data.grid import parse_size
    from bavit_core.evaluate.bench import (DTYPES, RUNTIMES, BenchOptions, parse_batch_sizes, parse_kept, parse_list,
                                           run_bench)

    opts = BenchOptions(
        detector=detector, model=str(model) if model else None, runtimes=parse_list(runtime, "--runtime", RUNTIMES),
        exported=str(exported) if exported else None, device=device, dtypes=parse_list(dtype, "--dtype", DTYPES),
        batch_sizes=parse_batch_sizes(batch_sizes), kept=parse_kept(kept),
        pruned_tokens=parse_list(pruned_tokens, "--pruned-tokens"),
        detector_size=parse_size(detector_size) if detector_size else None, layout=layout, repeats=repeats,
        max_repeats=max_repeats, seed=seed, out=str(out))
    with progress_bar("bench", unit="timed calls") as progress:
        r = run_bench(opts, progress)
    print_table(summary_table(r))
    for b in r["break_even"]:
        console.print(break_even_line(b) + (" (noisy timings: not to be trusted; rerun when idle)" if r["noisy"] else ""),
                      highlight=False, soft_wrap=True)
    if r["noisy"]:
        err_console.print("Warning: timing is noisy (rows marked *): a spread or the dense drift passed 10 %. "
                          "Speedups are unreliable on a busy machine; rerun when idle or with more --max-repeats.",
                          highlight=False, soft_wrap=True)
    console.print(f"Wrote {r['out']}/speed.csv, speed.png and meta.json")


def _f(v, p=2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{p}f}"


def break_even_line(b: dict) -> str:
    what = "end to end" if b["of"] == "end_to_end" else "detector alone"
    where = f"{b['runtime']} {b['dtype']} batch {b['batch_size']} {b['treatment']}"
    if b["how"] == "never":
        return f"Break-even sparsity ({what}, {where}): none (slower than dense at every measured sparsity)"
    if b["how"] == "from_start":
        return f"Break-even sparsity ({what}, {where}): at most {b['break_even_sparsity']:.2f} (faster from the lowest measured)"
    return f"Break-even sparsity ({what}, {where}): {b['break_even_sparsity']:.3f}"


def summary_table(r: dict) -> Table:
    t = Table(title=f"bavit bench, input {r['input_size'][0]}x{r['input_size'][1]} — {r['machine_description']}",
              title_justify="left")
    for c in ("runtime", "dtype", "batch", "workload", "sparsity", "ms/img", "CPU ms/img", "det. speedup",
              "end to end", "FLOP-ideal"):
        t.add_column(c, justify="right")
    for row in r["rows"]:
        sp = row["latency_spread"]
        ms = _f(row["latency_ms"], 1) + ("" if math.isnan(sp) else f"±{100 * sp:.0f}%")
        wl = row["workload"] + (f" {row['treatment']}" if row["treatment"] else "")
        t.add_row(row["runtime"], row["dtype"], str(row["batch_size"]), wl, _f(row["sparsity"]), ms,
                  _f(row["cpu_ms"], 1), _f(row["detector_speedup"]) + "x" + ("*" if row["noisy"] else ""),
                  _f(row["speedup"]) + "x" + ("*" if row["noisy"] else ""), _f(row["flop_speedup_end_to_end"]) + "x")
    return t
