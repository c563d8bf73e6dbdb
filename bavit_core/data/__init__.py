"""Data: dataset readers (COCO, VOC, generated), image decoding, patch-grid geometry.

Dataset readers are picked from a table by name (:func:`open_dataset`)."""
from __future__ import annotations

from pathlib import Path

from ..runtime.errors import OptionError
from .base import AnnotationSet
from .coco import coco_paths, load_coco
from .voc import load_voc

DATASETS = ("coco", "voc")


def open_dataset(
    dataset: str,
    root: str | Path | None = None,
    split: str | None = None,
    ann: str | Path | None = None,
    images: str | Path | None = None,
    need_masks: bool = False,
    check_images: bool = True,
    void: str = "bg",
    voc_mask: str = "object",
) -> AnnotationSet:
    """Open a COCO (``--root`` + ``--split`` or ``--ann`` + ``--images``) or VOC dataset."""
    if dataset == "coco":
        if ann is not None:
            if root is not None:
                raise OptionError("give either --root (with --split) or --ann (with --images), not both")
            return load_coco(ann, images, check_images=check_images and images is not None)
        if root is None:
            raise OptionError("COCO needs --root DIR (with --split) or --ann FILE.json (with --images DIR)")
        ann_file, img_dir = coco_paths(Path(root), split or "val2017")
        return load_coco(ann_file, img_dir, check_images=check_images)
    if dataset == "voc":
        if root is None or ann is not None:
            raise OptionError("VOC needs --root VOCdevkit/VOC20xx (and --split); --ann is for COCO")
        return load_voc(root, split or "val", need_masks=need_masks, check_images=check_images,
                        void=void, mask_kind=voc_mask)
    raise OptionError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


__all__ = ["AnnotationSet", "DATASETS", "open_dataset", "load_coco", "load_voc"]
