"""COCO instances JSON: images, boxes and masks (polygons, RLE compressed or not)."""
from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

import numpy as np

from ..runtime.errors import InputFileError
from ..runtime.fileio import parse_json_file, require_dir, require_file
from .base import AnnotationSet

def coco_paths(root: Path, split: str) -> tuple[Path, Path]:
    return root / "annotations" / f"instances_{split}.json", root / split


def load_coco(
    ann_file: str | os.PathLike,
    images_dir: str | os.PathLike | None = None,
    check_images: bool = True,
) -> AnnotationSet:
    """Read a COCO instances file into an :class:`AnnotationSet`.

    Problems that leave something sensible to label are skipped and counted in
    ``skipped`` (images with bad sizes or missing files, annotations for unknown images,
    boxes of zero or negative size, polygons with fewer than 3 points); boxes that stick
    out of their image are clamped and counted in ``notes``.
    """
    ann_path = require_file(ann_file, "annotation file")
    doc = parse_json_file(ann_path)
    if not isinstance(doc, dict):
        raise InputFileError(ann_path, "not a COCO instances file (top level is not an object)")
    for key in ("images", "annotations"):
        if not isinstance(doc.get(key), list):
            raise InputFileError(ann_path, f"not a COCO instances file (no '{key}' list)")
    skipped: Counter = Counter()
    notes: Counter = Counter()

    files_present = None
    img_dir = None
    if images_dir is not None:
        img_dir = Path(images_dir)
        if check_images:
            require_dir(img_dir, "image directory")
            files_present = set(os.listdir(img_dir))

    ids, names, widths, heights = [], [], [], []
    index: dict = {}
    for entry in doc["images"]:
        got = _image_entry(entry)
        if isinstance(got, str):
            skipped[got] += 1
            continue
        iid, name, w, h = got
        if iid in index:
            skipped["duplicate image id"] += 1
            continue
        if files_present is not None and name not in files_present:
            skipped["image file missing"] += 1
            index[iid] = -1
            continue
        index[iid] = len(ids)
        ids.append(iid)
        names.append(name)
        widths.append(w)
        heights.append(h)
    n = len(ids)
    if n == 0:
        raise InputFileError(ann_path, "no usable images (" + _describe(skipped) + ")")

    raw_boxes, box_img, cats, crowd, raw_anns = [], [], [], [], []
    segs: list[list] = [[] for _ in range(n)]
    for ann in doc["annotations"]:
        if not isinstance(ann, dict):
            skipped["annotation malformed"] += 1
            continue
        iid = ann.get("image_id")
        if type(iid) is not int:  # noqa: E721 (exact type: bool and float ids are malformed)
            skipped["annotation malformed"] += 1
            continue
        i = index.get(iid)
        if i is None:
            skipped["annotation for unknown image"] += 1
            continue
        if i < 0:
            continue  # its image was skipped and counted already
        bbox = ann.get("bbox")
        if (type(bbox) is not list or len(bbox) != 4 or type(bbox[0]) not in _NUM or type(bbox[1]) not in _NUM
                or type(bbox[2]) not in _NUM or type(bbox[3]) not in _NUM):
            skipped["annotation malformed"] += 1
            continue
        cat = ann.get("category_id", 0)
        if type(cat) is not int:  # noqa: E721 (a string "1" is not category 1)
            skipped["annotation with non-integer category_id"] += 1
            continue
        if not 0 <= cat <= MAX_CATEGORY_ID:
            skipped[f"annotation with category_id outside [0, {MAX_CATEGORY_ID}]"] += 1
            continue
        is_crowd = ann.get("iscrowd", 0)
        if is_crowd not in (0, 1) or isinstance(is_crowd, float):
            skipped["annotation with iscrowd not 0 or 1"] += 1
            continue
        is_crowd = bool(is_crowd)
        raw_boxes.append(bbox)
        box_img.append(i)
        cats.append(int(cat))
        crowd.append(is_crowd)
        raw_anns.append(ann)
        seg = ann.get("segmentation")
        if seg:
            segs[i].append((seg, is_crowd))

    boxes, box_img, cats, crowd, kept = _clean_boxes(raw_boxes, box_img, cats, crowd, widths, heights,
                                                     skipped, notes)
    gt_images = [ids[i] for i in box_img]
    categories = {}
    cat_list = doc.get("categories")
    if cat_list is not None and not isinstance(cat_list, list):
        skipped["'categories' not a list"] += 1
    for c in cat_list if isinstance(cat_list, list) else []:
        if isinstance(c, dict) and _is_int(c.get("id")) and 0 <= c["id"] <= MAX_CATEGORY_ID:
            categories[int(c["id"])] = str(c.get("name", c["id"]))
        else:
            skipped["category entry malformed or id out of range"] += 1

    widths_a = np.asarray(widths, dtype=np.int64)
    heights_a = np.asarray(heights, dtype=np.int64)
    aset = AnnotationSet(
        kind="coco",
        image_ids=np.asarray(ids, dtype=np.int64),
        file_names=names,
        widths=widths_a,
        heights=heights_a,
        boxes=boxes,
        box_image=box_img,
        box_category=cats,
        box_crowd=crowd,
        box_difficult=np.zeros(len(boxes), dtype=bool),
        categories=categories,
        images_dir=img_dir,
        source_files=[ann_path],
        images_listed=len(doc["images"]),
        skipped=skipped,
        notes=notes,
    )
    aset.mask_fn = _CocoMasks(segs, widths, heights)
    aset.coco_gt_fn = _CocoGroundTruth(ids, names, widths, heights, [raw_anns[k] for k in kept],
                                       [raw_boxes[k] for k in kept], gt_images, cats, crowd, categories)
    return aset


class _CocoGroundTruth:
    """Builds ``AnnotationSet.coco_gt`` on first use (labelling never needs it)."""

    def __init__(self, ids, names, widths, heights, anns, bboxes, gt_images, cats, crowd, categories):
        self.args = (ids, names, widths, heights, anns, bboxes, gt_images, cats, crowd, categories)

    def __call__(self) -> dict:
        ids, names, widths, heights, anns, bboxes, gt_images, cats, crowd, categories = self.args
        return {
            "images": [{"id": int(i), "file_name": f, "width": int(w), "height": int(h)}
                       for i, f, w, h in zip(ids, names, widths, heights)],
            "annotations": _gt_annotations(anns, bboxes, gt_images, cats, crowd),
            "categories": [{"id": k, "name": v} for k, v in categories.items()] or
                          [{"id": c, "name": str(c)} for c in sorted(set(int(c) for c in cats))],
        }


MAX_ID = 2**63 - 1
_NUM = frozenset({int, float})  # exact types: a bool or a string is not a coordinate
MAX_SIDE = 1 << 16  # pixels: larger "images" are refused as absurd
# category ids: a detector trained from scratch gets max id + 1 labels, so an id of 10**12
# would ask for a 10**12-way head (COCO's ids stop at 90, LVIS's at 1203)
MAX_CATEGORY_ID = 100_000


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -MAX_ID <= v <= MAX_ID


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _number(v) -> float:
    if not _is_number(v):
        raise TypeError("not a number")
    return float(v)


def _image_entry(entry):
    """(id, file_name, width, height) of a valid images[] entry, or the reason to skip it."""
    if not isinstance(entry, dict):
        return "image entry malformed"
    iid, name, w, h = entry.get("id"), entry.get("file_name"), entry.get("width"), entry.get("height")
    if not _is_int(iid) or not isinstance(name, str) or not name:
        return "image entry malformed"
    if isinstance(w, float) and w.is_integer():
        w = int(w)
    if isinstance(h, float) and h.is_integer():
        h = int(h)
    if not _is_int(w) or not _is_int(h):
        return "image entry malformed"
    if w <= 0 or h <= 0:
        return "image with non-positive size"
    if w > MAX_SIDE or h > MAX_SIDE:
        return "image with absurd size"
    return iid, name, w, h


def _gt_annotations(anns, bboxes, image_ids, cats, crowd) -> list[dict]:
    """The validated annotations as a COCO ground truth for COCOeval: the published boxes,
    areas and crowd flags of every annotation that labelling keeps (nothing non-finite)."""
    out = []
    for k, (a, bb) in enumerate(zip(anns, bboxes)):
        x, y, w, h = (float(v) for v in bb)
        area = a.get("area")
        if not isinstance(area, (int, float)) or isinstance(area, bool) or not math.isfinite(area) or area < 0:
            area = w * h
        out.append({"id": k + 1, "image_id": int(image_ids[k]), "bbox": [x, y, w, h], "area": float(area),
                    "iscrowd": int(crowd[k]), "category_id": int(cats[k])})
    return out


def _clean_boxes(raw_boxes, box_img, cats, crowd, widths, heights, skipped, notes):
    """Vectorised validation of [x, y, w, h] boxes: drop empty ones, clamp the rest."""
    try:
        b = np.asarray(raw_boxes, dtype=np.float64).reshape(-1, 4)
    except (TypeError, ValueError, OverflowError):
        b = np.full((len(raw_boxes), 4), np.nan)
        for k, bb in enumerate(raw_boxes):
            try:
                b[k] = [_number(v) for v in bb]
            except (TypeError, ValueError, OverflowError):
                pass
    box_img = np.asarray(box_img, dtype=np.int64)
    cats = np.asarray(cats, dtype=np.int64) if len(cats) else np.zeros(0, dtype=np.int64)
    crowd = np.asarray(crowd, dtype=bool)
    idx = np.arange(len(b))
    with np.errstate(all="ignore"):
        return _clean_finite(b, box_img, cats, crowd, idx, widths, heights, skipped, notes)


def _clean_finite(b, box_img, cats, crowd, idx, widths, heights, skipped, notes):
    finite = np.isfinite(b).all(axis=1)
    skipped["annotation malformed"] += int((~finite).sum())
    empty = finite & ((b[:, 2] <= 0) | (b[:, 3] <= 0))
    skipped["box with zero or negative size"] += int(empty.sum())
    keep = finite & ~empty
    b, box_img, cats, crowd, idx = b[keep], box_img[keep], cats[keep], crowd[keep], idx[keep]
    w = np.asarray(widths, dtype=np.float64)[box_img]
    h = np.asarray(heights, dtype=np.float64)[box_img]
    xyxy = np.stack([b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]], axis=1)
    clamped = np.stack(
        [np.clip(xyxy[:, 0], 0, w), np.clip(xyxy[:, 1], 0, h), np.clip(xyxy[:, 2], 0, w), np.clip(xyxy[:, 3], 0, h)],
        axis=1,
    )
    changed = (clamped != xyxy).any(axis=1)
    outside = (clamped[:, 2] <= clamped[:, 0]) | (clamped[:, 3] <= clamped[:, 1])
    notes["box clamped to image"] += int((changed & ~outside).sum())
    skipped["box outside image"] += int(outside.sum())
    keep = ~outside
    return clamped[keep], box_img[keep], cats[keep], crowd[keep], idx[keep]


def _describe(counter: Counter) -> str:
    items = [f"{k}: {v}" for k, v in counter.items() if v]
    return ", ".join(items) if items else "the file lists none"


class _CocoMasks:
    """Rasterise the union of one image's COCO masks with pycocotools (picklable)."""

    def __init__(self, segs, widths, heights):
        self.segs = segs
        self.widths = widths
        self.heights = heights

    def __call__(self, i: int, crowd: str = "include", difficult: str = "include"):
        from pycocotools import mask as mask_utils

        h, w = self.heights[i], self.widths[i]
        rles = []
        n_obj = 0
        issues: Counter = Counter()
        for seg, is_crowd in self.segs[i]:
            if is_crowd and crowd == "exclude":
                continue
            got = _seg_to_rles(seg, h, w, issues, mask_utils)
            if got:
                rles.extend(got)
                n_obj += 1
        if rles:
            merged = mask_utils.merge(rles) if len(rles) > 1 else rles[0]
            fg = mask_utils.decode(merged)
        else:
            fg = np.zeros((h, w), dtype=np.uint8, order="F")
        return fg, None, n_obj, issues


def _seg_to_rles(seg, h, w, issues: Counter, mask_utils) -> list:
    """pycocotools RLEs of one segmentation, or [] with the reason counted in ``issues``.

    Nothing unchecked reaches pycocotools' C code: polygon coordinates must be finite
    numbers within one image size of the image (a NaN or 1e12 makes it crash or grow
    without bound), RLE counts non-negative integers that add up to the image's pixels.
    """
    if isinstance(seg, list):
        polys = []
        for p in seg:
            if not isinstance(p, (list, tuple)) or len(p) < 6 or len(p) % 2:
                issues["polygon with fewer than 3 points"] += 1
                continue
            if not all(_is_number(v) for v in p):
                issues["polygon with non-numeric coordinates"] += 1
                continue
            a = np.asarray(p, dtype=np.float64)
            with np.errstate(all="ignore"):
                ok = np.isfinite(a).all() and (a[0::2] >= -w).all() and (a[0::2] <= 2 * w).all() \
                    and (a[1::2] >= -h).all() and (a[1::2] <= 2 * h).all()
            if not ok:
                issues["polygon with NaN or far-out coordinates"] += 1
                continue
            polys.append(a.tolist())
        if not polys:
            return []
        return mask_utils.frPyObjects(polys, h, w)
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        size = seg["size"]
        if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(_is_int(v) for v in size):
            issues["RLE malformed"] += 1
            return []
        if list(size) != [h, w]:
            issues["mask size mismatch"] += 1
            return []
        counts = seg["counts"]
        if isinstance(counts, list):
            if not all(_is_int(v) and v >= 0 for v in counts) or sum(counts) != h * w:
                issues["RLE malformed"] += 1
                return []
            return [mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)]
        if isinstance(counts, str):
            if not _compressed_rle_ok(counts, h * w):
                issues["RLE malformed"] += 1
                return []
            return [{"size": [h, w], "counts": counts.encode("ascii")}]
        issues["RLE malformed"] += 1
        return []
    issues["segmentation malformed"] += 1
    return []


def _compressed_rle_ok(s: str, n_pixels: int) -> bool:
    """Decode COCO's compressed RLE string (as pycocotools' rleFrString does) and check
    that every run is non-negative and the runs cover exactly ``n_pixels``."""
    if not s.isascii() or len(s) > 8 * n_pixels + 16:
        return False
    counts: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n or k > 12:
                return False
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                return False
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        if x < 0 or x >= 1 << 32:
            return False
        counts.append(x)
    return sum(counts) == n_pixels
