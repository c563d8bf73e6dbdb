"""``bavit detect``: the pruned detector on your own images."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import cli_command, console, err_console, kv_table, print_table, progress_bar, resume_hint

UNITS = {"loading": "calibration images", "detecting": "images", "writing": ""}


@cli_command
def detect(
    images: List[str] = typer.Argument(..., help="Image files, folders (searched recursively) or glob patterns (quote them)."),
    model: Optional[Path] = typer.Option(None, "--model", help="BAViT run directory [default: none, the dense detector]."),
    detector: str = typer.Option("hustvl/yolos-tiny", "--detector", help="HF hub name (needs a network) or local YOLOS directory."),
    gate: bool = typer.Option(False, "--gate", help="The trained token gate beside --detector (bavit finetune --train-gate) chooses the tokens after its layer, instead of BAViT: --threshold is its drop probability [default 0.5, its own decision], --sparsity per image (topk)."),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", help="Share of the detector's tokens to prune (with --policy topk: in every image; threshold: on average over --calibrate-on)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Keep a token when BAViT's BG probability (with --gate: the gate's drop probability) is below this [default with --model or --gate and no --sparsity: 0.5, the selector's own decision]."),
    policy: Optional[str] = typer.Option(None, "--policy", help="How --sparsity is reached: topk (each image keeps the same count) or threshold (one threshold placed on --calibrate-on) [default: topk, threshold with --calibrate-on]."),
    calibrate_on: Optional[List[str]] = typer.Option(None, "--calibrate-on", help="Images (files, folders, patterns; repeatable) on which --sparsity's threshold is placed (--policy threshold)."),
    pruned_tokens: str = typer.Option("drop", "--pruned-tokens", help="What happens to pruned tokens: drop (the paper), pool (one mean token) or preserve (frozen keys/values)."),
    detector_size: Optional[str] = typer.Option(None, "--detector-size", help="Square protocol: every image stretched to N or HxW [default: the checkpoint's own protocol, from its preprocessor_config.json]."),
    runtime: str = typer.Option("torch", "--runtime", help="torch, or onnx: BAViT and the detector run from --exported graphs in ONNX Runtime."),
    exported: Optional[Path] = typer.Option(None, "--exported", help="Directory from bavit export (with --runtime onnx)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps (Apple GPUs)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per detector call."),
    score_threshold: float = typer.Option(0.5, "--score-threshold", help="Detections scoring above this are written and drawn (0 writes every detection token: for COCOeval)."),
    no_overlays: bool = typer.Option(False, "--no-overlays", help="Write no overlay images (large runs)."),
    strict: bool = typer.Option(False, "--strict", help="An unreadable image is an error (default: skipped and counted)."),
    out: Path = typer.Option(Path("detections"), "--out", help="Output directory: detections.json, summary.csv, overlays/, detect.json."),
) -> None:
    """Run the token-pruned detector on your images: boxes, labels, scores and the pruned patches.

    Writes detections.json (COCO results with file names), summary.csv (per image: kept
    tokens, sparsity, BAViT and detector ms, detections) and one overlay per image (boxes,
    labels, scores, pruned patches dimmed). Rerunning the same command continues an
    interrupted run and skips images already written.

    \b
    Example:
        bavit detect photos/ --model runs/bavit-small --detector hustvl/yolos-tiny --sparsity 0.35 --out det/
    Dense reference:  bavit detect photos/ --out det-dense/
    Calibrated:       bavit detect photos/ --model runs/bavit-small --sparsity 0.35 --policy threshold --calibrate-on val/
    Trained gate:     bavit detect photos/ --detector runs/gated --gate --out det-gate/
    """
    from bavit_core.data.grid import parse_size
    from bavit_core.detect.run import STAGES, DetectOptions, detect_images

    opts = DetectOptions(
        images=list(images), out=str(out), model=str(model) if model else None, detector=detector, gate=gate,
        threshold=threshold, sparsity=sparsity, policy=policy, calibrate_on=list(calibrate_on) if calibrate_on else None,
        pruned_tokens=pruned_tokens, detector_size=parse_size(detector_size) if detector_size else None,
        runtime=runtime, exported=str(exported) if exported else None, device=device, batch_size=batch_size,
        score_threshold=score_threshold, overlays=not no_overlays, strict=strict)
    hint = f"the same command (bavit detect ... --out {out}): images already written are skipped"
    with resume_hint(hint, lambda: (out / ".parts").is_dir()):
        with progress_bar("detect", stages=len(STAGES)) as progress:
            r = detect_images(opts, progress, on_stage=lambda s: progress.stage(s, UNITS.get(s)))
    rows = [("images", f"{r['n_images']} ({r['new_images']} new, {r['resumed_images']} from an earlier run)"),
            ("operating point", r["operating_point"]), ("input", r["input_protocol"]), ("runtime", r["runtime"]),
            ("mean sparsity", f"{r['mean_sparsity']:.3f}"), ("detections written", r["detections"]),
            ("seconds", f"{r['seconds']:.1f}")]
    if r["gate"]:
        g = r["gate"]
        t = g.get("target_sparsity")
        target = f", trained for sparsity {t:g}" if isinstance(t, (int, float)) else ""
        rows.insert(2, ("gate", f"{g['detector']}: after layer {g['layer']}{target}"))
    if r["calibration"]:
        c = r["calibration"]
        rows.insert(2, ("calibration", f"{c['images']} images, sparsity reached {c['sparsity_reached']:.3f}"))
    print_table(kv_table("bavit detect", rows))
    if r["skipped"]:
        first = r["skipped"][0]
        err_console.print(f"Skipped {len(r['skipped'])} unreadable image(s) (listed in detect.json); first: "
                          f"{first['file']}: {first['problem']}", highlight=False, soft_wrap=True, markup=False)
    from bavit_core.detection.gate import has_gate

    if not gate and model is None and has_gate(detector):
        err_console.print(f"Note: {detector} has a trained token gate; this run used every token (--gate uses it)",
                          highlight=False, soft_wrap=True, markup=False)
    console.print(f"Wrote {r['out']}/detections.json, summary.csv, "
                  f"{'overlays/, ' if not no_overlays else ''}detect.json", soft_wrap=True, highlight=False)
