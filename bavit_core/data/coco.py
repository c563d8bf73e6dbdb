"""COCO instances JSON: images, boxes and masks (polygons, RLE compressed or not)."""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np

from ..runtime.errors import InputFileError
from ..runtime.fileio import require_dir, require_file
from .base import AnnotationSet

try:  # optional speed-up: orjson parses COCO-scale files ~3x faster
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None


def parse_json_file(path: Path):
    """Parse a JSON file; a syntax error names the file, line and column."""
    data = path.read_bytes()
    try:
        if _orjson is not None:
            return _orjson.loads(data)
        return json.loads(data)
    except ValueError as exc:
        pos = getattr(exc, "pos", None)
        if pos is None:
            raise InputFileError(path, f"malformed JSON ({exc})") from None
        line = data.count(b"\n", 0, pos) + 1
        col = pos - (data.rfind(b"\n", 0, pos) + 1) + 1
        msg = getattr(exc, "msg", str(exc)).split(":")[0]
        raise InputFileError(path, f"malformed JSON at line {line}, column {col}: {msg}") from None
    except UnicodeDecodeError as exc:
        raise InputFileError(path, f"not UTF-8 text ({exc.reason})") from None


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
        try:
            iid, name = entry["id"], entry["file_name"]
            w, h = int(entry["width"]), int(entry["height"])
        except (KeyError, TypeError, ValueError):
            skipped["image entry malformed"] += 1
            continue
        if iid in index:
            skipped["duplicate image id"] += 1
            continue
        if w <= 0 or h <= 0:
            skipped["image with non-positive size"] += 1
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

    raw_boxes, box_img, cats, crowd = [], [], [], []
    segs: list[list] = [[] for _ in range(n)]
    for ann in doc["annotations"]:
        try:
            i = index.get(ann["image_id"])
        except (KeyError, TypeError):
            skipped["annotation malformed"] += 1
            continue
        if i is None:
            skipped["annotation for unknown image"] += 1
            continue
        if i < 0:
            continue  # its image was skipped and counted already
        bbox = ann.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            skipped["annotation malformed"] += 1
            continue
        is_crowd = bool(ann.get("iscrowd", 0))
        raw_boxes.append(bbox)
        box_img.append(i)
        cats.append(ann.get("category_id", 0))
        crowd.append(is_crowd)
        seg = ann.get("segmentation")
        if seg:
            segs[i].append((seg, is_crowd))

    boxes, box_img, cats, crowd = _clean_boxes(raw_boxes, box_img, cats, crowd, widths, heights, skipped, notes)
    categories = {}
    for c in doc.get("categories") or []:
        if isinstance(c, dict) and "id" in c:
            categories[c["id"]] = str(c.get("name", c["id"]))

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
    return aset


def _clean_boxes(raw_boxes, box_img, cats, crowd, widths, heights, skipped, notes):
    """Vectorised validation of [x, y, w, h] boxes: drop empty ones, clamp the rest."""
    try:
        b = np.asarray(raw_boxes, dtype=np.float64).reshape(-1, 4)
    except (TypeError, ValueError):
        b = np.full((len(raw_boxes), 4), np.nan)
        for k, bb in enumerate(raw_boxes):
            try:
                b[k] = [float(v) for v in bb]
            except (TypeError, ValueError):
                pass
    box_img = np.asarray(box_img, dtype=np.int64)
    cats = np.asarray(cats, dtype=np.int64) if len(cats) else np.zeros(0, dtype=np.int64)
    crowd = np.asarray(crowd, dtype=bool)
    finite = np.isfinite(b).all(axis=1)
    skipped["annotation malformed"] += int((~finite).sum())
    empty = finite & ((b[:, 2] <= 0) | (b[:, 3] <= 0))
    skipped["box with zero or negative size"] += int(empty.sum())
    keep = finite & ~empty
    b, box_img, cats, crowd = b[keep], box_img[keep], cats[keep], crowd[keep]
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
    return clamped[keep], box_img[keep], cats[keep], crowd[keep]


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
    if isinstance(seg, list):
        polys = []
        for p in seg:
            if not isinstance(p, (list, tuple)) or len(p) < 6 or len(p) % 2:
                issues["polygon with fewer than 3 points"] += 1
                continue
            polys.append([float(v) for v in p])
        if not polys:
            return []
        return mask_utils.frPyObjects(polys, h, w)
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if list(seg["size"]) != [h, w]:
            issues["mask size mismatch"] += 1
            return []
        if isinstance(seg["counts"], list):
            return [mask_utils.frPyObjects(seg, h, w)]
        counts = seg["counts"]
        if isinstance(counts, str):
            counts = counts.encode("ascii")
        return [{"size": [h, w], "counts": counts}]
    issues["segmentation malformed"] += 1
    return []
