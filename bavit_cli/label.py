"""``bavit label``: patch-level FG/BG annotations from COCO or VOC → labels parquet."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import cli_command, console, kv_table, print_table, progress_bar


@cli_command
def label(
    dataset: str = typer.Option("coco", "--dataset", help="coco or voc."),
    root: Optional[Path] = typer.Option(None, "--root", help="COCO root (annotations/, <split>/) or VOCdevkit/VOC20xx."),
    split: Optional[str] = typer.Option(None, "--split", help="Split name [default: val2017 (COCO), val (VOC)]."),
    ann: Optional[Path] = typer.Option(None, "--ann", help="COCO instances JSON (instead of --root)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image directory that goes with --ann."),
    source: str = typer.Option("boxes", "--source", help="boxes or masks."),
    criterion: str = typer.Option("coverage", "--criterion", help="Box overlap: coverage |P∩B|/|P| or jaccard |P∩B|/|P∪B|."),
    tau: float = typer.Option(0.5, "--tau", help="Boxes: FG when overlap >= tau."),
    mask_threshold: float = typer.Option(0.10, "--mask-threshold", help="Masks: FG when the FG pixel fraction > this."),
    input_size: str = typer.Option("384", "--input-size", help="ViT input size, N or HxW."),
    patch_size: int = typer.Option(16, "--patch-size", help="Patch size in input pixels."),
    crowd: str = typer.Option("include", "--crowd", help="COCO crowd annotations: include or exclude."),
    difficult: str = typer.Option("include", "--difficult", help="VOC difficult objects: include or exclude."),
    void: str = typer.Option("bg", "--void", help="VOC void (255) pixels: bg, fg or ignore (left out of the count)."),
    voc_mask: str = typer.Option("object", "--voc-mask", help="VOC masks from SegmentationObject (object) or SegmentationClass (class)."),
    check_images: bool = typer.Option(True, "--check-images/--no-check-images", help="Skip images whose file is missing."),
    workers: int = typer.Option(1, "--workers", help="Parallel workers (processes) for the mask path; 0 = automatic (one per usable core, up to 4)."),
    out: Path = typer.Option(Path("labels.parquet"), "--out", help="Output parquet."),
) -> None:
    """Label every patch of every image FG or BG from boxes or masks.

    \b
    Example:
        bavit label --dataset coco --root data/shapes --split val2017 --source masks --out labels.parquet
    """
    from bavit_core.data import open_dataset
    from bavit_core.data.grid import GridSpec, parse_size
    from bavit_core.labels import LabelOptions, label_dataset
    from bavit_core.runtime.errors import OptionError
    from bavit_core.runtime.fileio import refuse_output_over_inputs

    ih, iw = parse_size(input_size)
    opts = LabelOptions(source=source, criterion=criterion, tau=tau, mask_threshold=mask_threshold,
                        grid=GridSpec(ih, iw, patch_size), crowd=crowd, difficult=difficult, void=void)
    opts.validate()
    if workers < 0:  # before the dataset is read; label_dataset resolves 0
        raise OptionError(f"--workers must be >= 0 (0 = automatic), got {workers}")
    if voc_mask not in ("object", "class"):
        raise OptionError(f"unknown --voc-mask {voc_mask!r}; choose object or class")
    refuse_output_over_inputs(out, [ann, images, root])
    aset = open_dataset(dataset, root=root, split=split, ann=ann, images=images,
                        need_masks=(source == "masks"), check_images=check_images, void=void, voc_mask=voc_mask)
    with progress_bar(f"label ({source})", aset.n_images) as progress:
        s = label_dataset(aset, opts, out, workers=workers, progress=progress)
    gh, gw = opts.grid.shape
    rows = [
        ("images listed", s.images_listed),
        ("images labelled", s.images_labelled),
        ("annotations used", s.annotations_used),
        ("grid", f"{gh}x{gw}"),
        ("FG fraction mean", f"{s.fg_fraction_mean:.3f}"),
        ("FG fraction median", f"{s.fg_fraction_median:.3f}"),
    ]
    rows += [(f"skipped: {k}", v) for k, v in sorted(s.skipped.items())]
    rows += [(f"note: {k}", v) for k, v in sorted(s.notes.items())]
    rows.append(("seconds", f"{s.seconds:.2f}"))
    print_table(kv_table("bavit label", rows))
    console.print(f"Wrote {s.out}")
