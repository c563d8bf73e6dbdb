"""``bavit finetune``: sparse fine-tuning of YOLOS, or a small YOLOS from scratch."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from .common import cli_command, console, err_console, progress_bar, resumable_run


@cli_command
def finetune(
    detector: Optional[str] = typer.Option(None, "--detector", help="YOLOS to fine-tune: HF hub name or local directory."),
    from_scratch: bool = typer.Option(False, "--from-scratch", help="Build a new YOLOS with random weights."),
    detector_config: str = typer.Option("micro", "--detector-config", help="With --from-scratch: tiny, micro or nano."),
    num_detection_tokens: Optional[int] = typer.Option(None, "--det-tokens", help="With --from-scratch: detection tokens."),
    init_encoder: Optional[Path] = typer.Option(None, "--init-encoder", help="With --from-scratch: a BAViT run of the "
                                                "same width whose patch embedding and layers start the encoder."),
    dense_aux: float = typer.Option(0.0, "--dense-aux", help="Weight of a per-token auxiliary loss (each patch "
                                    "token predicts its object's class and box); gets from-scratch training "
                                    "off the ground. 0 = DETR set loss only."),
    dataset: str = typer.Option("coco", "--dataset", help="coco or voc."),
    root: Optional[Path] = typer.Option(None, "--root", help="Dataset root."),
    split: Optional[str] = typer.Option(None, "--split", help="Training split [default: val2017 (COCO), val (VOC)]."),
    ann: Optional[Path] = typer.Option(None, "--ann", help="COCO instances JSON (instead of --root)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image directory that goes with --ann."),
    val_split: Optional[str] = typer.Option(None, "--val-split", help="Validation split under --root."),
    val_labels: Optional[Path] = typer.Option(None, "--val-labels", help="Labels of the validation split (oracle selector)."),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="Hold-out share when no --val-split."),
    selector: str = typer.Option("none", "--selector", help="Tokens kept in training: none (dense), oracle or bavit."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Labels parquet of the training images (oracle)."),
    model: Optional[Path] = typer.Option(None, "--model", help="BAViT run (bavit selector)."),
    threshold: float = typer.Option(0.5, "--threshold", help="BAViT: a token is pruned when its BG probability >= this."),
    resample: str = typer.Option("nearest", "--resample", help="How the token grid (GT labels or BAViT's) is brought to the detector grid: nearest, or any (a detector token is kept when any grid cell it covers is kept)."),
    pruned_tokens: str = typer.Option("drop", "--pruned-tokens", help="What happens to pruned tokens in training and "
                                      "validation: drop (the paper), pool (one mean token) or preserve (frozen keys/values)."),
    detector_size: Optional[str] = typer.Option(None, "--detector-size", help="Square training size, N or HxW, written to the detector's preprocessor_config.json [default: the --detector's own square size, else its processor's shortest edge (hustvl/yolos-tiny: 512), else 512]."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs [default: 30; with --resume: the run's own, or extend it to N (--schedule step runs only: a cosine schedule spans its own length)]."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per step and per process."),
    lr: float = typer.Option(1e-4, "--lr", help="AdamW learning rate."),
    weight_decay: float = typer.Option(1e-4, "--weight-decay", help="AdamW weight decay."),
    warmup_epochs: float = typer.Option(1.0, "--warmup-epochs", help="Linear warm-up length in epochs."),
    schedule: str = typer.Option("cosine", "--schedule", help="cosine, or step (LR times --gamma every --step-size epochs)."),
    step_size: int = typer.Option(20, "--step-size", help="--schedule step: epochs between LR drops."),
    gamma: float = typer.Option(0.1, "--gamma", help="--schedule step: LR factor per drop."),
    flip: bool = typer.Option(True, "--flip/--no-flip", help="Random horizontal flips (boxes and kept tokens flipped too)."),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="bf16 autocast on CUDA."),
    select: str = typer.Option("last", "--select", help="The run's detector: last (the last epoch's weights) or best (the epoch with the best validation mAP; chosen on the split it is scored on, so that score is optimistic). last/ always holds the last."),
    clip_grad: float = typer.Option(0.1, "--clip-grad", help="Gradient norm clipping (0 = off)."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    max_images: Optional[int] = typer.Option(None, "--max-images", help="Use only the first N training images."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps (Apple GPUs)."),
    out: Path = typer.Option(Path("detectors/yolos-F"), "--out", help="Output directory (HF layout)."),
    train_gate: bool = typer.Option(False, "--train-gate", help="Train a token gate (SViT-style 2-layer MLP after layer --prune-at-layer) for the frozen --detector; saved beside it (gate.safetensors, gate.json): prune-eval's gate selector."),
    joint: bool = typer.Option(False, "--joint", help="Train the BAViT run --model and the --detector together: the detection loss reaches BAViT through a straight-through keep mask; writes the detector and its BAViT run (OUT/bavit)."),
    target_sparsity: Optional[float] = typer.Option(None, "--target-sparsity", help="--train-gate/--joint: the mean share of patch tokens to prune, held by the keep-ratio loss (images differ)."),
    prune_at_layer: int = typer.Option(2, "--prune-at-layer", help="--train-gate: encoder layers run on every token before the gate decides."),
    gate_hidden: Optional[int] = typer.Option(None, "--gate-hidden", help="--train-gate: the gate MLP's width [default: max(16, detector width / 4)]."),
    relaxation: str = typer.Option("ste", "--relaxation", help="--train-gate/--joint: how the hard keep decision passes gradients: ste (straight-through) or gumbel (straight-through with logistic noise)."),
    temperature: float = typer.Option(1.0, "--temperature", help="--train-gate/--joint: temperature of the relaxation's sigmoid (its gradient's width)."),
    ratio_weight: float = typer.Option(100.0, "--ratio-weight", help="--train-gate/--joint: weight of the keep-ratio loss (mean kept share - (1 - target))^2."),
    token_loss_weight: float = typer.Option(1.0, "--token-loss-weight", help="--joint: weight of BAViT's token loss (eq. 3) on --labels (labels on BAViT's grid); 0 = detection and ratio losses only."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run already in --out (refused otherwise)."),
    force: bool = typer.Option(False, "--force", help="With --resume: continue even though the dataset or labels files changed."),
) -> None:
    """Train YOLOS on FG tokens only (sparse fine-tuning), or a small YOLOS from scratch.

    \b
    Example:
        bavit finetune --detector hustvl/yolos-tiny --root coco --split train2017 --selector oracle --labels train.parquet --epochs 30 --out detectors/yolos-tiny-F
        bavit finetune --from-scratch --detector-config micro --dense-aux 1.0 --root data/det --split train2017 --detector-size 128 --out detectors/det
    """
    from bavit_core.data.grid import parse_size
    from bavit_core.finetune.loop import FinetuneOptions
    from bavit_core.finetune.loop import finetune as run_finetune

    opts = FinetuneOptions(
        dataset=dataset, root=str(root) if root else None, split=split, ann=str(ann) if ann else None,
        images=str(images) if images else None, val_split=val_split, val_labels=str(val_labels) if val_labels else None,
        val_fraction=val_fraction, detector=detector, from_scratch=from_scratch, detector_config=detector_config,
        num_detection_tokens=num_detection_tokens,
        init_encoder=str(init_encoder) if init_encoder else None, dense_aux=dense_aux, detector_size=parse_size(detector_size) if detector_size else None, selector=selector,
        labels=str(labels) if labels else None, model=str(model) if model else None, threshold=threshold,
        pruned_tokens=pruned_tokens,
        epochs=epochs if epochs is not None or resume else FinetuneOptions.epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
        schedule=schedule, step_size=step_size, gamma=gamma, flip=flip, amp=amp, resample=resample, select=select,
        clip_grad=clip_grad, seed=seed, max_images=max_images, device=device, out=str(out),
        train_gate=train_gate, joint=joint, target_sparsity=target_sparsity, prune_at_layer=prune_at_layer,
        gate_hidden=gate_hidden, relaxation=relaxation, temperature=temperature, ratio_weight=ratio_weight,
        token_loss_weight=token_loss_weight,
    )
    main = os.environ.get("RANK", "0") == "0"

    def on_epoch(row):
        if main:
            v = f"  val mAP {row['val_map']:.4f}  AP50 {row['val_map50']:.4f}" if "val_map" in row else ""
            if "train_sparsity" in row:  # a gate or a joint run: its other losses, the share it pruned
                extra = f"  ratio {row['train_loss_ratio']:.4f}" + (
                    f"  token {row['train_loss_token']:.3f}" if "train_loss_token" in row else "")
                v = extra + v + f"  sparsity {row['train_sparsity']:.3f}" + (
                    f" (val {row['val_sparsity']:.3f})" if "val_sparsity" in row else "")
            console.print(f"epoch {row['epoch'] + 1:>3}  loss {row['train_loss']:.4f} (ce {row['train_loss_ce']:.3f} "
                          f"L1 {row['train_loss_bbox']:.3f} giou {row['train_loss_giou']:.3f}){v}  "
                          f"{row['images_per_s']:.1f} img/s{'  *best' if row.get('best') and 'val_map' in row else ''}", highlight=False)

    with resumable_run("finetune", out, main) as on_resume, \
            progress_bar("finetune", unit="steps", epochs=opts.epochs) as step:
        r = run_finetune(opts, resume=resume, on_step=step if main else None, on_epoch=on_epoch,
                         overwrite=overwrite, on_resume=on_resume, force=force)
    if main:
        if r.get("skipped"):
            err_console.print(f"Note: {r['skipped']} (trained and validated without them)", highlight=False,
                              markup=False, soft_wrap=True)
        sp = "" if r["train_sparsity"] is None or r["trains"] != "detector" else f", training sparsity {r['train_sparsity']:.3f}"
        console.print(f"Trained {r['epochs']} epoch{'s' if r['epochs'] != 1 else ''} on {r['train_images']} images ({r['val_images']} val){sp}. "
                      f"{_chosen(r)} in {r['out']} (last epoch's in {r['out']}/last).", highlight=False)
        c = r.get("chosen") or {}
        reached = c.get("val_sparsity", c.get("train_sparsity"))
        if r["trains"] == "gate":
            console.print(f"Gate (after layer {r['prune_at_layer']}): sparsity {reached:.3f} for target "
                          f"{r['target_sparsity']:.3f}, saved beside the detector. Evaluate: bavit prune-eval "
                          f"--detector {r['out']} --selectors dense,gate …", highlight=False)
        elif r["trains"] == "joint":
            console.print(f"Joint: sparsity {reached:.3f} at threshold {r['threshold']:g} for target "
                          f"{r['target_sparsity']:.3f}; its BAViT run is {r['out']}/bavit. Evaluate the pair: "
                          f"bavit prune-eval --model {r['out']}/bavit --detector {r['out']} …", highlight=False)


def _chosen(r: dict) -> str:
    if r["select"] == "last":
        return "Detector: the last epoch's"
    return (f"Detector: epoch {r['selected_epoch'] + 1}'s, the best validation score ({r['score']:.4f}, chosen on "
            "the split it is scored on: optimistic)")
