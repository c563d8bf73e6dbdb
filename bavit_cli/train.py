"""``bavit train``: fit BAViT on a labels parquet."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import cli_command, console, err_console, progress_bar, resumable_run


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


@cli_command
def train(
    labels: Optional[Path] = typer.Option(None, "--labels", help="Training labels parquet (from bavit label)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image directory [default: the one recorded in the labels]."),
    val_labels: Optional[Path] = typer.Option(None, "--val-labels", help="Validation labels parquet."),
    val_images: Optional[Path] = typer.Option(None, "--val-images", help="Validation image directory [default: the one recorded in --val-labels; never --images]."),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="Hold out this share of --labels when no --val-labels."),
    label_threshold: Optional[float] = typer.Option(None, "--label-threshold", help="Re-threshold label scores."),
    depth: int = typer.Option(2, "--depth", help="Transformer blocks: 2 = BAViT-small, 10 = BAViT-large."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="timm model name (downloads or uses the hub cache), local weights file (.safetensors/.bin/.pth/.pt) or a directory timm saved for the hub (config.json + model.safetensors or pytorch_model.bin) [default: random init]."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs [default: 100; with --resume: the run's own, or extend it to N]."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per step and per process."),
    lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="Adam weight decay."),
    step_size: int = typer.Option(30, "--step-size", help="StepLR: epochs between LR drops."),
    gamma: float = typer.Option(0.1, "--gamma", help="StepLR: LR factor per drop."),
    fg_weight: float = typer.Option(1.0, "--fg-weight", help="Weight of FG tokens in the loss (>1 favours FG recall)."),
    clip_grad: float = typer.Option(1.0, "--clip-grad", help="Gradient norm clipping (0 = off)."),
    flip: bool = typer.Option(True, "--flip/--no-flip", help="Random horizontal flips (label grid flipped too)."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    workers: int = typer.Option(0, "--workers", help="Parallel workers (threads) decoding images; 0 = automatic (one per usable core, up to 4)."),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="bf16 autocast on CUDA."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps (Apple GPUs)."),
    select: str = typer.Option("last", "--select", help="The run's model.safetensors: last (the last epoch's weights) or best (the epoch with the best validation accuracy; chosen on the split it is scored on, so that score is optimistic). last.safetensors always holds the last."),
    out: Path = typer.Option(Path("runs/bavit"), "--out", help="Run directory."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run already in --out (refused otherwise)."),
    force: bool = typer.Option(False, "--force", help="With --resume: continue even though the labels file changed."),
) -> None:
    """Train BAViT (per-token FG/BG ViT) with Accumulative Cross Entropy.

    \b
    Example:
        bavit train --labels train.parquet --val-labels val.parquet --depth 2 --epochs 30 --out runs/bavit-small
    Scale out:  torchrun --nproc_per_node 2 -m bavit_cli train --labels train.parquet ...
    """
    from bavit_core.bavit.train import TrainOptions, train_bavit

    if labels is None and not resume:
        raise typer.BadParameter("--labels is required (unless --resume)")
    opts = TrainOptions(
        labels=str(labels) if labels else "", images=str(images) if images else None,
        val_labels=str(val_labels) if val_labels else None, val_images=str(val_images) if val_images else None,
        val_fraction=val_fraction, label_threshold=label_threshold, depth=depth, pretrained=pretrained,
        epochs=epochs if epochs is not None or resume else TrainOptions.epochs, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, step_size=step_size, gamma=gamma, fg_weight=fg_weight, clip_grad=clip_grad,
        flip=flip, seed=seed, workers=workers, amp=amp, device=device, select=select, out=str(out),
    )
    main = _is_main()
    table = Table(title=f"bavit train → {out}", title_justify="left")
    for col in ("epoch", "loss", "acc", "val loss", "val acc", "val FG rec", "val IoU", "img/s", ""):
        table.add_column(col, justify="right")

    def on_epoch(row: dict) -> None:
        if not main:
            return
        v = lambda k: f"{row[k]:.4f}" if k in row else "-"  # noqa: E731
        console.print(
            f"epoch {row['epoch'] + 1:>3}  loss {row['train_loss']:.4f}  acc {row['train_accuracy']:.4f}  "
            f"val loss {v('val_loss')}  val acc {v('val_accuracy')}  val FG recall {v('val_recall')}  "
            f"val IoU {v('val_iou')}  {row['images_per_s']:.1f} img/s{'  *best' if row.get('best') and 'val_accuracy' in row else ''}",
            highlight=False)

    with resumable_run("train", out, main) as on_resume, \
            progress_bar("train", unit="steps", epochs=opts.epochs) as step:
        summary = train_bavit(opts, resume=resume, on_step=step if main else None, on_epoch=on_epoch,
                              on_stage=lambda s: err_console.print(s) if main and err_console.is_terminal else None,
                              overwrite=overwrite, force=force, on_resume=on_resume)
    if main:
        init = (f"pretrained from {summary['pretrained']} (input mean/std: {summary['normalisation']})"
                if summary["pretrained"] else "random init (no --pretrained)")
        console.print(f"Trained {summary['epochs']} epoch{'s' if summary['epochs'] != 1 else ''} on {summary['train_images']} images "
                      f"({summary['val_images']} val), {init}, {summary['world_size']} process(es). "
                      f"{_chosen(summary)}. Run: {summary['out']}", highlight=False)


def _chosen(s: dict) -> str:
    what = "val accuracy" if s["val_images"] else "train accuracy"
    if s["select"] == "last":
        return f"Model: the last epoch's, {what} {s['score']:.4f}"
    return (f"Model: epoch {s['selected_epoch'] + 1}'s, the best {what} ({s['score']:.4f}, chosen on the split it is "
            "scored on: optimistic)")
