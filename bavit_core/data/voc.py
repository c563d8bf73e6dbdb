"""Pascal VOC (VOCdevkit/VOC20xx): XML boxes and palette segmentation PNGs."""
from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np

from ..runtime.errors import InputFileError, OptionError
from ..runtime.fileio import require_dir
from .base import AnnotationSet

VOID = 255
VOID_MODES = ("bg", "fg", "ignore")
MASK_KINDS = ("object", "class")
MAX_SIDE = 1 << 16  # pixels: larger "images" are refused as absurd


def voc_image_id(stem: str, fallback: int) -> int:
    """Integer id for a VOC image: its digits ("2007_000063" → 2007000063) or a fallback."""
    digits = stem.replace("_", "")
    return int(digits) if digits.isdigit() and len(digits) <= 18 else fallback


def _read_split(root: Path, sub: str, split: str) -> list[str] | None:
    f = root / "ImageSets" / sub / f"{split}.txt"
    if not f.is_file():
        return None
    return [ln.split()[0] for ln in f.read_text().splitlines() if ln.strip()]


def _parse_xml(path: Path, categories: dict[str, int]):
    root = ET.parse(path).getroot()
    size = root.find("size")
    w = int(float(size.findtext("width")))
    h = int(float(size.findtext("height")))
    objs = []
    for obj in root.findall("object"):
        name = (obj.findtext("name") or "").strip()
        bb = obj.find("bndbox")
        coords = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
        difficult = (obj.findtext("difficult") or "0").strip() == "1"
        if name not in categories:
            categories[name] = len(categories) + 1
        objs.append((categories[name], coords, difficult))
    return w, h, objs


def load_voc(
    root: str | os.PathLike,
    split: str = "val",
    need_masks: bool = False,
    check_images: bool = True,
    void: str = "bg",
    mask_kind: str = "object",
) -> AnnotationSet:
    """Read a VOCdevkit year directory (the one holding JPEGImages/ and Annotations/).

    Boxes come from Annotations/*.xml (1-based inclusive pixel coordinates, converted to
    continuous [xmin-1, xmax] x [ymin-1, ymax]). With ``need_masks`` the image list is
    ImageSets/Segmentation/<split>.txt and masks come from SegmentationObject (or
    SegmentationClass) PNGs; otherwise ImageSets/Main/<split>.txt.
    """
    if void not in VOID_MODES:
        raise OptionError(f"unknown --void {void!r}; choose one of {', '.join(VOID_MODES)}")
    if mask_kind not in MASK_KINDS:
        raise OptionError(f"unknown VOC mask kind {mask_kind!r}; choose one of {', '.join(MASK_KINDS)}")
    root = require_dir(root, "VOC directory")
    ann_dir = require_dir(root / "Annotations", "VOC Annotations directory")
    img_dir = root / "JPEGImages"
    sub = "Segmentation" if need_masks else "Main"
    stems = _read_split(root, sub, split)
    if stems is None:
        raise InputFileError(root / "ImageSets" / sub / f"{split}.txt", "split list not found")
    if not stems:
        raise InputFileError(root / "ImageSets" / sub / f"{split}.txt", "split list is empty")
    files_present = None
    if check_images:
        require_dir(img_dir, "VOC JPEGImages directory")
        files_present = set(os.listdir(img_dir))

    skipped: Counter = Counter()
    notes: Counter = Counter()
    categories: dict[str, int] = {}
    ids, names, widths, heights, xml_files = [], [], [], [], []
    boxes, box_img, box_cat, box_diff = [], [], [], []
    objects_per_image: list[list[bool]] = []
    for k, stem in enumerate(stems):
        xml = ann_dir / f"{stem}.xml"
        if not xml.is_file():
            skipped["annotation XML missing"] += 1
            continue
        try:
            w, h, objs = _parse_xml(xml, categories)
        except (ET.ParseError, AttributeError, TypeError, ValueError, OverflowError):
            skipped["unreadable annotation XML"] += 1
            continue
        if w <= 0 or h <= 0:
            skipped["image with non-positive size"] += 1
            continue
        if w > MAX_SIDE or h > MAX_SIDE:
            skipped["image with absurd size"] += 1
            continue
        name = f"{stem}.jpg"
        if files_present is not None and name not in files_present:
            skipped["image file missing"] += 1
            continue
        i = len(ids)
        ids.append(voc_image_id(stem, k + 1))
        names.append(name)
        widths.append(w)
        heights.append(h)
        xml_files.append(xml)
        diffs = []
        for cat, (x0, y0, x1, y1), difficult in objs:
            diffs.append(difficult)
            b = [x0 - 1.0, y0 - 1.0, x1, y1]
            if not all(math.isfinite(v) for v in b):
                skipped["box with non-finite coordinates"] += 1
                continue
            c = [min(max(b[0], 0.0), w), min(max(b[1], 0.0), h), min(max(b[2], 0.0), w), min(max(b[3], 0.0), h)]
            if b[2] <= b[0] or b[3] <= b[1]:
                skipped["box with zero or negative size"] += 1
                continue
            if c[2] <= c[0] or c[3] <= c[1]:
                skipped["box outside image"] += 1
                continue
            if c != b:
                notes["box clamped to image"] += 1
            boxes.append(c)
            box_img.append(i)
            box_cat.append(cat)
            box_diff.append(difficult)
        objects_per_image.append(diffs)
    if not ids:
        raise InputFileError(root, "no usable images in split " + repr(split) + _summary(skipped))

    aset = AnnotationSet(
        kind="voc",
        image_ids=np.asarray(ids, dtype=np.int64),
        file_names=names,
        widths=np.asarray(widths, dtype=np.int64),
        heights=np.asarray(heights, dtype=np.int64),
        boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        box_image=np.asarray(box_img, dtype=np.int64),
        box_category=np.asarray(box_cat, dtype=np.int64),
        box_crowd=np.zeros(len(boxes), dtype=bool),
        box_difficult=np.asarray(box_diff, dtype=bool),
        categories={v: k for k, v in categories.items()},
        images_dir=img_dir,
        source_files=sorted(xml_files),
        images_listed=len(stems),
        skipped=skipped,
        notes=notes,
    )
    if need_masks:
        aset.mask_fn = _VocMasks(root, names, widths, heights, objects_per_image, void, mask_kind)
    return aset


def _summary(c: Counter) -> str:
    return " (" + ", ".join(f"{k}: {v}" for k, v in c.items()) + ")" if c else ""


class _VocMasks:
    """Read one image's VOC palette PNG into (fg, valid) arrays.

    Index 0 is background and 255 the void border. ``void``: ``bg`` counts void pixels
    as background, ``fg`` as foreground, ``ignore`` leaves them out of the token's pixel
    count (numerator and denominator). With SegmentationObject, instance k is the k-th
    object of the XML, which lets ``--difficult exclude`` drop difficult objects' pixels.
    """

    def __init__(self, root, names, widths, heights, objects, void, mask_kind):
        self.dir = Path(root) / ("SegmentationObject" if mask_kind == "object" else "SegmentationClass")
        self.names, self.widths, self.heights = names, widths, heights
        self.objects, self.void, self.mask_kind = objects, void, mask_kind

    def __call__(self, i: int, crowd: str = "include", difficult: str = "include"):
        from PIL import Image, UnidentifiedImageError

        issues: Counter = Counter()
        png = self.dir / (Path(self.names[i]).stem + ".png")
        if not png.is_file():
            issues["segmentation PNG missing"] += 1
            return None, None, 0, issues
        try:
            with Image.open(png) as im:
                if im.mode not in ("P", "L"):
                    issues["segmentation PNG is not a palette/index image"] += 1
                    return None, None, 0, issues
                a = np.asarray(im)
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError):
            issues["unreadable segmentation PNG"] += 1
            return None, None, 0, issues
        if a.shape != (self.heights[i], self.widths[i]):
            issues["segmentation PNG size differs from XML"] += 1
            return None, None, 0, issues
        void = a == VOID
        fg = (a != 0) & ~void
        diffs = self.objects[i]
        if self.mask_kind == "object" and difficult == "exclude" and any(diffs):
            drop = [k + 1 for k, d in enumerate(diffs) if d]
            fg &= ~np.isin(a, drop)
        if self.mask_kind == "object":
            present = np.unique(a[fg])
            n_obj = int(len(present))
        else:
            n_obj = sum(1 for d in diffs if not (d and difficult == "exclude"))
        valid = None
        if self.void == "fg":
            fg |= void
        elif self.void == "ignore":
            valid = (~void).astype(np.uint8)
        return fg.astype(np.uint8), valid, n_obj, issues
