"""``bavit export``: ONNX graphs of BAViT, the pruned YOLOS and the whole pipeline."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bavit_core.data.grid import parse_size

from .common import cli_command, console, err_console, kv_table, print_table


@cli_command
def export(
    detector: str = typer.Option("hustvl/yolos-tiny", "--detector", help="HF hub name (needs a network) or local YOLOS directory."),
    model: Optional[Path] = typer.Option(None, "--model", help="BAViT run directory (adds bavit.onnx and pipeline.onnx)."),
    out: Path = typer.Option(Path("exported"), "--out", help="Output directory (graphs + manifest.json)."),
    detector_size: Optional[str] = typer.Option(None, "--detector-size", help="Square size the graphs are fixed to, N or HxW [default: the detector's own square size, else its processor's shortest edge (hustvl/yolos-tiny: 512), else 512]."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="pipeline.onnx keeps a token when 1 - p_fg < this [default: 0.5]."),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", help="Share of tokens pruned per image (with --policy topk)."),
    policy: Optional[str] = typer.Option(None, "--policy", help="threshold (--threshold) or topk (--sparsity: every image keeps ceil((1-S)*P) tokens) [default: topk with --sparsity, as in detect; else threshold]."),
    pruned_tokens: str = typer.Option("drop", "--pruned-tokens", help="Pruned-token treatment; only drop (the paper) is exported yet, not pool or preserve."),
    dense: bool = typer.Option(False, "--dense", help="Also export the unpruned detector (detector_dense.onnx) for comparison."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset, 7..20 (bavit.onnx and pipeline.onnx need 14 or more)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random inputs each graph is checked on against torch (within 1e-4)."),
) -> None:
    """Export BAViT and the token-pruned YOLOS to ONNX, checked in ONNX Runtime.

    Writes detector.onnx (pixel values + kept token indices of dynamic length K → logits,
    boxes), with --model bavit.onnx (image → FG probability per token) and pipeline.onnx
    (BAViT, the token decision, grid resampling and the pruned detector in one graph),
    with --dense detector_dense.onnx, and manifest.json. Needs the [onnx] extra.

    \b
    Example:
        bavit export --model runs/bavit-small --detector hustvl/yolos-tiny --out exported/ --sparsity 0.35 --policy topk --dense
    """
    from bavit_core.export.onnx_export import ExportOptions, export_onnx

    if policy is None:
        policy = "topk" if sparsity is not None else "threshold"
    opts = ExportOptions(detector=detector, out=str(out), seed=seed, model=str(model) if model else None,
                         detector_size=parse_size(detector_size) if detector_size else None, threshold=threshold, sparsity=sparsity,
                         policy=policy, pruned_tokens=pruned_tokens, dense=dense, opset=opset)
    show = (lambda s: err_console.print(f"[dim]exporting {s}[/]")) if err_console.is_terminal else None
    r = export_onnx(opts, show)
    console.print(f"Input: {r['input_protocol']}", soft_wrap=True)
    console.print(f"Grids: {r['grids']}", soft_wrap=True)
    rows = []
    for name, diffs in r["verified"].items():
        rows.append((f"{name}.onnx", "max |ORT - PyTorch| " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())))
    print_table(kv_table(f"bavit export ({r['seconds']:.1f} s)", rows))
    console.print(f"Wrote {', '.join(r['graphs'])} and manifest.json to {r['out']}", soft_wrap=True)
    from bavit_core.detection.gate import has_gate

    if has_gate(detector):
        err_console.print(f"Note: {detector} has a trained token gate; bavit export writes no gate graph (the "
                          "graphs run BAViT's tokens or every token; the gate runs in PyTorch: bavit detect --gate)",
                          highlight=False, soft_wrap=True, markup=False)
