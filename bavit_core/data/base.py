"""The dataset-independent view of an annotated image set that labelling needs."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np


@dataclass
class AnnotationSet:
    """Images and their objects, as read from COCO or VOC.

    Boxes are flat arrays over all objects of all images, in original pixel coordinates
    (x0, y0, x1, y1), already validated and clamped to their image. ``box_image`` indexes
    ``image_ids``. ``mask_fn(i, crowd=, difficult=)`` rasterises image i's object masks and returns
    ``(fg, valid, n_objects, issues)``: fg a (H, W) uint8 union of the objects' masks (None
    when the image has no usable mask), valid a (H, W) uint8 array of the pixels that count
    (None when all do), and a Counter of problems met (skipped parts, counted by reason).
    """

    kind: str
    image_ids: np.ndarray
    file_names: list[str]
    widths: np.ndarray
    heights: np.ndarray
    boxes: np.ndarray
    box_image: np.ndarray
    box_category: np.ndarray
    box_crowd: np.ndarray
    box_difficult: np.ndarray
    categories: dict[int, str]
    images_dir: Path | None
    source_files: list[Path]
    images_listed: int = 0
    skipped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    mask_fn: Callable[[int], tuple | None] | None = None
    #: COCO only: builds the validated ground truth (see :attr:`coco_gt`) on first use.
    coco_gt_fn: Callable[[], dict] | None = None

    @property
    def coco_gt(self) -> dict | None:
        """COCO only: the validated ground truth as a COCO dict (images, annotations with
        finite, positive-size boxes and integer ids, categories) for COCOeval, so prune-eval
        and finetune evaluate against exactly what the loader accepted, never the raw JSON."""
        if self.coco_gt_fn is None:
            return None
        cached = self.__dict__.get("_coco_gt")
        if cached is None:
            cached = self.__dict__["_coco_gt"] = self.coco_gt_fn()
        return cached

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    def entry_source(self, i: int) -> Path:
        """The file that describes image i (COCO: the instances JSON; VOC: its XML), for
        errors that name an entry."""
        if self.kind == "voc" and self.images_dir is not None:
            return self.images_dir.parent / "Annotations" / (Path(self.file_names[i]).stem + ".xml")
        return self.source_files[0]

    def skipped_summary(self) -> str:
        """What the reader skipped, for commands that print it beside their result
        (``""`` when nothing): ``skipped in ann.json: 2 annotation with non-integer category_id``."""
        items = [f"{v} {k}" for k, v in sorted(self.skipped.items()) if v]
        if not items:
            return ""
        src = self.source_files[0].name if len(self.source_files) == 1 else f"{len(self.source_files)} files"
        return f"skipped in {src}: " + ", ".join(items)

    def select_boxes(self, crowd: str, difficult: str) -> np.ndarray:
        """Boolean mask over boxes kept under the crowd / difficult options."""
        keep = np.ones(len(self.boxes), dtype=bool)
        if crowd == "exclude":
            keep &= ~self.box_crowd
        if difficult == "exclude":
            keep &= ~self.box_difficult
        return keep


def empty_boxes() -> dict:
    return dict(
        boxes=np.zeros((0, 4), dtype=np.float64),
        box_image=np.zeros(0, dtype=np.int64),
        box_category=np.zeros(0, dtype=np.int64),
        box_crowd=np.zeros(0, dtype=bool),
        box_difficult=np.zeros(0, dtype=bool),
    )
