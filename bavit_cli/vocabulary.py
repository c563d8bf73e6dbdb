"""One name per concept across commands: the options more than one command takes, what
each means everywhere, and the old spellings that still work for one release. docs/cli.md
renders this table (with the commands read from the CLI itself); a test fails when an
option shared by two commands is missing here or an entry here is no longer shared."""
from __future__ import annotations

RULES = """\
Naming rules: a singular option takes one value (`--threshold 0.5`, `--sparsity 0.35`), its
plural a list or range that a command sweeps (`--thresholds 0.3:0.9`, `--sparsities
0.25,0.5`, `--batch-sizes 1,8`). A BAViT run is always `--model`, a detector (hub name or
directory, fine-tuned runs included) always `--detector`; `--images` is always an image
folder (never a count). Three sizes, three names: `--image-size` (the images `synth`
draws), `--input-size` (BAViT's input, fixed by `label`), `--detector-size` (the detector's
input). `--init-encoder RUN` (finetune) is the one other BAViT-run option: a second role
(the run whose layers start a new detector), beside `--model` (the run that prunes).
"""

VOCABULARY: dict[str, str] = {
    "--out": "where the command writes (a file or a directory); written whole or not at all",
    "--device": "auto, cpu, cuda, cuda:N or mps; checked before anything is read or written",
    "--model": "a BAViT run directory (from bavit train)",
    "--detector": "a YOLOS detector: hub name (e.g. hustvl/yolos-tiny) or a directory in Hugging Face layout, "
                  "finetune's runs included",
    "--seed": "random seed; the same seed gives the same output",
    "--images": "an image folder (for --ann, a labels file, or plain images)",
    "--batch-size": "images per step (per process under torchrun)",
    "--detector-size": "the detector's input: N or HxW, the square protocol [default: the checkpoint's own]",
    "--pruned-tokens": "what happens to the tokens not computed: drop (the paper), pool or preserve "
                       "(a comma list where the command sweeps)",
    "--labels": "a labels parquet (from bavit label)",
    "--threshold": "one BG-probability threshold: a token is pruned when BAViT's BG probability is >= it",
    "--val-fraction": "the share of images held out for validation (synth: written as the val split)",
    "--dataset": "coco or voc",
    "--root": "the dataset's root folder (with --split)",
    "--split": "the split under --root (COCO: val2017, train2017; VOC: val, train)",
    "--ann": "a COCO instances JSON (instead of --root; with --images)",
    "--policy": "threshold (one global threshold, per-image sparsity varies) or topk (every image keeps the "
                "same share)",
    "--runtime": "torch or onnx (onnx with --exported DIR from bavit export)",
    "--exported": "a directory written by bavit export",
    "--workers": "parallel workers (label: processes for masks; train: threads decoding images); "
                 "0 = automatic (one per usable core, up to 4)",
    "--val-labels": "the labels parquet of the validation split",
    "--epochs": "epochs to train; with --resume, extends the run to N",
    "--lr": "base learning rate",
    "--weight-decay": "weight decay",
    "--step-size": "step schedule: epochs between learning-rate drops",
    "--gamma": "step schedule: learning-rate factor per drop",
    "--clip-grad": "gradient norm clipping (0 = off)",
    "--flip": "random horizontal flips, targets flipped with the image (--no-flip: off)",
    "--amp": "bf16 autocast on CUDA (--no-amp: off)",
    "--select": "which epoch's weights are the run's model: last (default) or best on validation "
                "(optimistic: chosen on the split it is scored on)",
    "--resume": "continue the interrupted run in --out, bitwise as if never interrupted",
    "--overwrite": "replace the run already in --out (refused otherwise)",
    "--force": "with --resume: continue although an input file changed since the run started",
    "--prune-at-layer": "encoder layers the detector runs on every token before it chooses its own tokens "
                        "(prune-eval's attention selector; the gate finetune --train-gate trains)",
    "--pred": "a predictions parquet (from bavit predict or postprocess)",
    "--postprocess-steps": "iterations of the connected-component clean-up of BAViT's grid (paper appendix)",
    "--resample": "how a token grid is brought to the detector grid: nearest, or any (kept when any cell it "
                  "covers is kept)",
    "--layout": "how images with different kept counts are batched: pack (one sequence) or pad (with a mask)",
    "--max-images": "use only the first N images",
    "--dtype": "fp32, bf16 or fp16 of the detector (a comma list where the command sweeps)",
    "--speed": "a directory written by bavit bench (measured latency against kept tokens)",
    "--sparsity": "one target sparsity: the mean share of the detector's patch tokens pruned",
}

# old spelling -> (command, new spelling): hidden in --help, work until the next release with a note
DEPRECATED: dict[str, tuple[str, str]] = {
    "--images": ("synth", "--num-images"),
    "--size": ("synth", "--image-size"),
    "--steps": ("postprocess", "--postprocess-steps"),
    "--train-run": ("report", "--model"),
    "--finetune-run": ("report", "--detector"),
}


def _options(hidden: bool) -> dict[str, list[str]]:
    """Each option (visible, or hidden: the old spellings) with the commands that take it,
    read from the CLI itself."""
    import click
    import typer

    from .main import COMMANDS, app

    root = typer.main.get_command(app)
    ctx = click.Context(root, info_name="bavit")
    use: dict[str, list[str]] = {}
    for name in COMMANDS:
        for p in root.get_command(ctx, name).params:
            if p.param_type_name == "option" and p.opts[0] != "--help" and bool(p.hidden) == hidden:
                use.setdefault(p.opts[0], []).append(name)
    return use


def shared_options() -> dict[str, list[str]]:
    """Every visible option of two or more commands, with the commands that take it."""
    return {o: c for o, c in _options(hidden=False).items() if len(c) >= 2}


def hidden_options() -> dict[str, list[str]]:
    return _options(hidden=True)


def render() -> str:
    shared = shared_options()
    lines = ["## Option vocabulary\n", RULES, "| option | means (in every command) | commands |", "|---|---|---|"]
    for opt, meaning in VOCABULARY.items():
        lines.append(f"| `{opt}` | {meaning} | {', '.join(shared.get(opt, []))} |")
    lines += ["", "Old spellings (hidden in `--help`; they work until the next release and say so):", ""]
    lines += [f"- `bavit {cmd} {old}` → `{new}`" for old, (cmd, new) in DEPRECATED.items()]
    return "\n".join(lines) + "\n"
