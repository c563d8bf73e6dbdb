"""``bavit synth``: write a generated dataset in COCO or VOC layout."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import cli_command, console, kv_table, print_table, progress_bar, renamed


@cli_command
def synth(
    out: Path = typer.Option(..., "--out", help="Directory to write the dataset into."),
    num_images: int = typer.Option(200, "--num-images", help="Number of images (train + val)."),
    fmt: str = typer.Option("coco", "--format", help="On-disk layout: coco or voc."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the output depends only on it."),
    image_size: str = typer.Option("240x320", "--image-size", help="Image size HxW (or N for square)."),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="Share of images in the val split."),
    scenes: str = typer.Option("mixed", "--scenes", help="mixed: 1-6 shapes, some touching, overlapping or cut "
                               "by the border, crowds; simple: 1-3 larger shapes apart and inside the image "
                               "(for training small detectors from scratch)."),
    old_images: Optional[int] = typer.Option(None, "--images", hidden=True, help="Deprecated: --num-images."),
    old_size: Optional[str] = typer.Option(None, "--size", hidden=True, help="Deprecated: --image-size."),
) -> None:
    """Generate a small dataset of textured scenes with shapes (for tests and the demo).

    \b
    Example:
        bavit synth --out data/shapes --num-images 200 --format coco --seed 0
        bavit synth --out data/det --num-images 8200 --scenes simple --seed 1
    """
    from bavit_core.data.grid import parse_size
    from bavit_core.data.synthetic import synth_dataset

    images = renamed("--images", "--num-images", old_images, num_images, 200)
    hw = parse_size(renamed("--size", "--image-size", old_size, image_size, "240x320"))
    with progress_bar("synth", images) as progress:
        s = synth_dataset(out, images, fmt, seed, hw, val_fraction, progress, scenes)
    rows = [("format", s.fmt), ("output", s.out)] + [(f"images {k}", v) for k, v in s.splits.items()]
    rows += [("objects", s.objects), ("crowd annotations", s.crowd), ("seconds", f"{s.seconds:.1f}")]
    print_table(kv_table("bavit synth", rows))
    console.print(f"Wrote {sum(s.splits.values())} images to {s.out}")
