"""``bavit synth``: write a generated dataset in COCO or VOC layout."""
from __future__ import annotations

from pathlib import Path

import typer

from .common import cli_command, console, kv_table, print_table, progress_bar


@cli_command
def synth(
    out: Path = typer.Option(..., "--out", help="Directory to write the dataset into."),
    images: int = typer.Option(200, "--images", help="Number of images (train + val)."),
    fmt: str = typer.Option("coco", "--format", help="On-disk layout: coco or voc."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the output depends only on it."),
    size: str = typer.Option("240x320", "--size", help="Image size HxW (or N for square)."),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="Share of images in the val split."),
    scenes: str = typer.Option("mixed", "--scenes", help="mixed: 1-6 shapes, some touching, overlapping or cut "
                               "by the border, crowds; simple: 1-3 larger shapes apart and inside the image "
                               "(for training small detectors from scratch)."),
) -> None:
    """Generate a small dataset of textured scenes with shapes (for tests and the demo).

    \b
    Example:
        bavit synth --out data/shapes --images 200 --format coco --seed 0
        bavit synth --out data/det --images 8200 --scenes simple --seed 1
    """
    from bavit_core.data.grid import parse_size
    from bavit_core.data.synthetic import synth_dataset

    hw = parse_size(size)
    with progress_bar("synth", images) as progress:
        s = synth_dataset(out, images, fmt, seed, hw, val_fraction, progress, scenes)
    rows = [("format", s.fmt), ("output", s.out)] + [(f"images {k}", v) for k, v in s.splits.items()]
    rows += [("objects", s.objects), ("crowd annotations", s.crowd), ("seconds", f"{s.seconds:.1f}")]
    print_table(kv_table("bavit synth", rows))
    console.print(f"Wrote {sum(s.splits.values())} images to {s.out}")
