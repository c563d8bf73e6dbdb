"""``bavit predict``: BAViT inference → predictions parquet."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import cli_command, console, kv_table, print_table, progress_bar


@cli_command
def predict(
    model: Path = typer.Option(..., "--model", help="Run directory from bavit train."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Labels parquet: predict its images and keep GT."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image directory (or a plain folder without --labels)."),
    threshold: float = typer.Option(0.5, "--threshold", help="A token is BG when its BG probability >= this."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps (Apple GPUs)."),
    out: Path = typer.Option(Path("preds.parquet"), "--out", help="Output parquet."),
) -> None:
    """Predict per-token FG probabilities with a trained BAViT.

    \b
    Example:
        bavit predict --model runs/bavit-small --labels val.parquet --out preds.parquet
    Scale out:  torchrun --nproc_per_node 2 -m bavit_cli predict --model runs/bavit-small ...
    """
    from bavit_core.bavit.predict import predict as run_predict
    from bavit_core.runtime.launch import is_main_process

    main = is_main_process()
    with progress_bar("predict") as progress:
        r = run_predict(model, out, labels, images, threshold, batch_size, device, progress)
    if not main:
        return
    rows = [("images", r["images"]), ("missing images", r["missing"]), ("predicted sparsity", f"{r['sparsity']:.3f}"),
            ("images/s", f"{r['images_per_s']:.1f}")]
    if r["metrics"]:
        m = r["metrics"]
        rows += [("token accuracy", f"{m['accuracy']:.4f}"), ("FG precision", f"{m['precision']:.4f}"),
                 ("FG recall", f"{m['recall']:.4f}"), ("FG F1", f"{m['f1']:.4f}"), ("FG IoU", f"{m['iou']:.4f}"),
                 ("FG predicted BG", f"{m['fg_missed']:.4f}")]
    print_table(kv_table("bavit predict", rows))
    console.print(f"Wrote {r['out']}")
