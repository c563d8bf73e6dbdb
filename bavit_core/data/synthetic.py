"""Generated COCO / VOC datasets: textured backgrounds with shapes of several classes.

Each image is a crop of one of scikit-image's bundled photographs (grass, gravel, brick,
the moon, coffee, ...), tinted, with 1-6 filled shapes on it: triangles, rectangles,
ellipses, stars and hexagons, some touching or overlapping, some cut by the border. The
masks written to the annotations are exactly the pixels painted (both are rasterised
by pycocotools from the same polygon). COCO files get polygons, boxes and a few crowd
annotations stored as RLE (uncompressed like real COCO, and compressed); VOC gets XML
boxes (some ``difficult``), palette PNGs and a 255 "void" band along object outlines.
Every image depends only on (seed, index): the output is deterministic.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from xml.sax.saxutils import escape

import numpy as np

from ..runtime.errors import OptionError
from ..runtime.fileio import atomic_dir, atomic_path, atomic_write_text, check_output_writable
from ..runtime import workers as _workers

CLASS_NAMES = ("triangle", "rectangle", "ellipse", "star", "hexagon")  # category ids 1..5

TEXTURES = ("grass", "gravel", "brick", "moon", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")
FORMATS = ("coco", "voc")
SCENES = ("mixed", "simple")
_CROSS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)
_TEXTURE_CACHE: dict[str, np.ndarray] = {}


@dataclass
class SynthSummary:
    out: Path
    fmt: str
    splits: dict[str, int]
    objects: int
    crowd: int
    seconds: float


def _texture(name: str) -> np.ndarray:
    if name not in _TEXTURE_CACHE:
        import skimage.data

        a = getattr(skimage.data, name)()
        if a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        _TEXTURE_CACHE[name] = a[:, :, :3].astype(np.float32) / 255.0
    return _TEXTURE_CACHE[name]


def _taps(n_out: int, n_in: int):
    """Bilinear taps along one axis with pixel centres aligned (``(i + 0.5)·n_in/n_out −
    0.5``) and mirrored borders: the two source indices and their weights."""
    cc = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    start = np.floor(cc)
    frac = cc - start
    s = start.astype(np.int64)
    i0, i1 = np.abs(s), np.abs(s + 1)  # mirrored at 0: index -1 reads index 1
    last = n_in - 1
    i0 = np.where(i0 > last, 2 * last - i0, i0)
    i1 = np.where(i1 > last, 2 * last - i1, i1)
    return i0, i1, 1.0 - frac, frac


def _resize_bilinear(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """(H, W, 3) float32 → (h, w, 3) float32: the same interpolation as scikit-image's
    ``resize(order=1, anti_aliasing=False)`` (scipy's grid-mode zoom with mirrored
    borders), computed separably in float64 — equal to it up to a float32 rounding step
    in about one pixel value in 10⁴, and twice as fast."""
    y0, y1, wy0, wy1 = _taps(h, img.shape[0])
    x0, x1, wx0, wx1 = _taps(w, img.shape[1])
    a = img.astype(np.float64)
    cols = a[:, x0] * wx0[None, :, None] + a[:, x1] * wx1[None, :, None]
    out = (cols[y0] * wy0[:, None, None] + cols[y1] * wy1[:, None, None]).astype(np.float32)
    return np.clip(out, img.min(), img.max(), out=out)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    tex = _texture(TEXTURES[rng.integers(len(TEXTURES))])
    th, tw = tex.shape[:2]
    ch = int(rng.integers(max(16, th // 3), th + 1))
    cw = int(min(tw, max(16, round(ch * w / h * rng.uniform(0.8, 1.25)))))
    y = int(rng.integers(0, th - ch + 1))
    x = int(rng.integers(0, tw - cw + 1))
    crop = _resize_bilinear(tex[y:y + ch, x:x + cw], h, w)
    tint = rng.uniform(0.55, 1.15, size=3).astype(np.float32)
    return np.clip(crop * tint * rng.uniform(0.7, 1.1), 0, 1).astype(np.float32)


def _outline(kind: str, rng: np.random.Generator, cx, cy, r) -> np.ndarray:
    rot = rng.uniform(0, 2 * np.pi)
    if kind == "triangle":
        ang = rot + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.25, 0.25, 3)
        rad = np.full(3, r)
    elif kind == "rectangle":
        a = rng.uniform(0.35, 1.0)
        corners = np.array([[-1, -a], [1, -a], [1, a], [-1, a]]) * r * 0.8
        c, s = np.cos(rot), np.sin(rot)
        pts = corners @ np.array([[c, s], [-s, c]])
        return pts + [cx, cy]
    elif kind == "ellipse":
        n = 40
        ang = rot + np.linspace(0, 2 * np.pi, n, endpoint=False)
        ratio = rng.uniform(0.45, 1.0)
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        x, y = r * np.cos(t), r * ratio * np.sin(t)
        c, s = np.cos(rot), np.sin(rot)
        return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)
    elif kind == "star":
        ang = rot + np.linspace(0, 2 * np.pi, 10, endpoint=False)
        rad = np.where(np.arange(10) % 2 == 0, r, r * rng.uniform(0.38, 0.55))
    else:  # hexagon
        ang = rot + np.linspace(0, 2 * np.pi, 6, endpoint=False)
        rad = np.full(6, r)
    return np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], axis=1)


def _raster(poly: np.ndarray, h: int, w: int) -> np.ndarray:
    from pycocotools import mask as mask_utils

    rle = mask_utils.frPyObjects([poly.reshape(-1).tolist()], h, w)
    return mask_utils.decode(rle)[:, :, 0].astype(bool)


def rle_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts (column-major runs, starting with background)."""
    flat = np.asarray(mask, dtype=np.uint8).reshape(-1, order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.r_[0, change, flat.size]
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        runs = [0] + runs
    return [int(v) for v in runs]


def _colour(rng: np.random.Generator, cls: int) -> np.ndarray:
    base = np.array(
        [[0.95, 0.2, 0.15], [0.15, 0.45, 0.95], [0.98, 0.85, 0.1], [0.85, 0.2, 0.85], [0.1, 0.85, 0.4]],
        dtype=np.float32,
    )[cls]
    return np.clip(base + rng.normal(0, 0.08, 3), 0, 1).astype(np.float32)


def generate_image(seed: int, index: int, h: int, w: int, allow_crowd: bool, scenes: str = "mixed"):
    """One image and its objects: (rgb uint8, [object dicts]).

    ``scenes``: ``mixed`` (1-6 shapes, radius 7-26 % of the shorter side, some touching,
    overlapping or cut by the border, crowds) or ``simple`` (1-3 shapes, radius 12-26 %,
    apart from each other, inside the image, no crowds): a detection-friendly layout for
    training small detectors from scratch."""
    if scenes not in SCENES:
        raise OptionError(f"unknown --scenes {scenes!r}; choose one of {', '.join(SCENES)}")
    simple = scenes == "simple"
    rng = np.random.default_rng([seed, index])
    img = _background(rng, h, w)
    shade = 0.75 + 0.35 * img.mean(axis=2, keepdims=True)  # shapes are lit by the background's brightness
    objects = []
    occupied = np.zeros((h, w), dtype=bool)
    n = int(rng.integers(1, 4 if simple else 7))
    smin = min(h, w)
    for k in range(n):
        cls = int(rng.integers(len(CLASS_NAMES)))
        r = smin * rng.uniform(0.12 if simple else 0.07, 0.26)
        if simple:  # centre far enough from the border for the shape to lie inside (a rectangle
            m = 1.15 * r  # reaches 0.8·√2·r from its centre, the other shapes r)
            cx, cy = rng.uniform(m, w - m), rng.uniform(m, h - m)
        elif objects and rng.random() < 0.3:  # touch or overlap a previous shape
            prev = objects[int(rng.integers(len(objects)))]
            px0, py0, px1, py1 = prev["xyxy"]
            ang = rng.uniform(0, 2 * np.pi)
            dist = 0.5 * max(px1 - px0, py1 - py0) + r * rng.uniform(0.6, 1.05)
            cx, cy = (px0 + px1) / 2 + dist * np.cos(ang), (py0 + py1) / 2 + dist * np.sin(ang)
        elif rng.random() < 0.2:  # cut by the border
            side = rng.integers(4)
            cx = [0, w, rng.uniform(0, w), rng.uniform(0, w)][side] + rng.uniform(-0.3, 0.3) * r
            cy = [rng.uniform(0, h), rng.uniform(0, h), 0, h][side] + rng.uniform(-0.3, 0.3) * r
        else:
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        poly = _outline(CLASS_NAMES[cls], rng, cx, cy, r)
        poly[:, 0] = np.clip(poly[:, 0], 0, w)
        poly[:, 1] = np.clip(poly[:, 1], 0, h)
        mask = _raster(poly, h, w)
        area = int(mask.sum())
        if area < 30 or (occupied & mask).sum() > (0 if simple else 0.4 * area):
            continue
        img[mask] = np.clip(_colour(rng, cls)[None, :] * shade[mask], 0, 1)
        occupied |= mask
        ys, xs = np.nonzero(mask)
        objects.append(dict(
            category=cls, polygon=poly, mask=mask, crowd=False,
            xyxy=(float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)),
            truncated=bool(xs.min() == 0 or ys.min() == 0 or xs.max() == w - 1 or ys.max() == h - 1),
            difficult=bool(rng.random() < 0.05),
        ))
    if allow_crowd and not simple and rng.random() < 0.12:  # a crowd: a cluster of small same-class shapes
        cls = int(rng.integers(len(CLASS_NAMES)))
        ccx, ccy = rng.uniform(0.2 * w, 0.8 * w), rng.uniform(0.2 * h, 0.8 * h)
        crowd = np.zeros((h, w), dtype=bool)
        for _ in range(int(rng.integers(5, 9))):
            p = _outline(CLASS_NAMES[cls], rng, ccx + rng.normal(0, smin * 0.08), ccy + rng.normal(0, smin * 0.08),
                         smin * rng.uniform(0.02, 0.04))
            p[:, 0] = np.clip(p[:, 0], 0, w)
            p[:, 1] = np.clip(p[:, 1], 0, h)
            crowd |= _raster(p, h, w)
        if crowd.sum() >= 30:
            img[crowd] = np.clip(_colour(rng, cls)[None, :] * shade[crowd], 0, 1)
            ys, xs = np.nonzero(crowd)
            objects.append(dict(
                category=cls, polygon=None, mask=crowd, crowd=True,
                xyxy=(float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)),
                truncated=False, difficult=False,
            ))
    noise = rng.normal(0, 0.02, img.shape).astype(np.float32)
    rgb = (np.clip(img + noise, 0, 1) * 255 + 0.5).astype(np.uint8)
    return rgb, objects


def _save_jpeg(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="JPEG", quality=92)


def voc_palette() -> list[int]:
    """The 256-entry VOC colour map (bit-interleaved class index → RGB), flattened."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def _save_palette_png(path: Path, index: np.ndarray) -> None:
    from PIL import Image

    im = Image.fromarray(index.astype(np.uint8), mode="P")
    im.putpalette(voc_palette())
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")


PARALLEL_FROM = 48  # images; below this, starting worker processes costs more than it saves


def _generate_all(seed: int, n: int, h: int, w: int, allow_crowd: bool, scenes: str):
    """``generate_image`` for indices 0..n-1, in order. Each image depends only on (seed,
    index), so with several cores and enough images they are generated by worker processes
    (spawned: safe whatever threads the caller runs) while this process writes."""
    cores = _workers.usable_cores()
    if cores < 2 or n < PARALLEL_FROM:
        for i in range(n):
            yield generate_image(seed, i, h, w, allow_crowd, scenes)
        return
    from functools import partial

    ex = _workers.spawn_pool(min(cores, 8))
    try:
        yield from ex.map(partial(generate_image, seed, h=h, w=w, allow_crowd=allow_crowd, scenes=scenes),
                          range(n), chunksize=4)
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def synth_dataset(
    out: str | Path,
    n_images: int = 200,
    fmt: str = "coco",
    seed: int = 0,
    size: tuple[int, int] = (240, 320),
    val_fraction: float = 0.2,
    progress: Callable[[int, int], None] | None = None,
    scenes: str = "mixed",
) -> SynthSummary:
    """Write a generated dataset in COCO or VOC layout under ``out``.

    Splits: ``train2017``/``val2017`` (COCO) or ``train``/``val`` (VOC); the last
    ``round(n_images * val_fraction)`` images form the val split.
    """
    if fmt not in FORMATS:
        raise OptionError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if scenes not in SCENES:
        raise OptionError(f"unknown --scenes {scenes!r}; choose one of {', '.join(SCENES)}")
    if n_images < 1:
        raise OptionError("--num-images must be at least 1")
    h, w = size
    if h < 32 or w < 32:
        raise OptionError(f"--image-size {h}x{w} is too small (at least 32x32)")
    if not 0.0 <= val_fraction < 1.0:
        raise OptionError("--val-fraction must be in [0, 1)")
    t0 = time.perf_counter()
    out = Path(out)
    check_output_writable(out)
    n_val = int(round(n_images * val_fraction))
    names = ("train2017", "val2017") if fmt == "coco" else ("train", "val")
    split_of = [names[1] if i >= n_images - n_val else names[0] for i in range(n_images)]
    n_obj = n_crowd = 0
    # built in a temporary sibling and renamed into place whole: a failure leaves no partial
    # dataset; an existing generated dataset (annotations/ or JPEGImages/) is replaced
    with atomic_dir(out, markers=("annotations", "JPEGImages")) as tmp:
        writer = _CocoWriter(tmp, names) if fmt == "coco" else _VocWriter(tmp, names)
        for i, (rgb, objects) in enumerate(_generate_all(seed, n_images, h, w, fmt == "coco", scenes)):
            writer.add(i, split_of[i], rgb, objects)
            n_obj += sum(not o["crowd"] for o in objects)
            n_crowd += sum(o["crowd"] for o in objects)
            if progress:
                progress(1, n_images)
        writer.close(seed=seed, size=size, scenes=scenes)
    counts = {s: split_of.count(s) for s in names if split_of.count(s)}
    return SynthSummary(out, fmt, counts, n_obj, n_crowd, time.perf_counter() - t0)


class _CocoWriter:
    def __init__(self, out: Path, splits):
        self.out = out
        self.docs = {s: {"images": [], "annotations": []} for s in splits}
        self.ann_id = 1
        self.crowd_seen = 0

    def add(self, i, split, rgb, objects):
        from pycocotools import mask as mask_utils

        h, w = rgb.shape[:2]
        name = f"{i + 1:012d}.jpg"
        _save_jpeg(self.out / split / name, rgb)
        doc = self.docs[split]
        doc["images"].append({"id": i + 1, "file_name": name, "width": w, "height": h})
        for o in objects:
            x0, y0, x1, y1 = o["xyxy"]
            ann = {"id": self.ann_id, "image_id": i + 1, "category_id": o["category"] + 1,
                   "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(o["mask"].sum()),
                   "iscrowd": int(o["crowd"])}
            if o["crowd"]:
                if self.crowd_seen % 2 == 0:  # uncompressed, as real COCO crowd annotations
                    ann["segmentation"] = {"size": [h, w], "counts": rle_counts(o["mask"])}
                else:
                    rle = mask_utils.encode(np.asfortranarray(o["mask"].astype(np.uint8)))
                    ann["segmentation"] = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
                self.crowd_seen += 1
            else:
                ann["segmentation"] = [[round(float(v), 2) for v in o["polygon"].reshape(-1)]]
            doc["annotations"].append(ann)
            self.ann_id += 1

    def close(self, seed, size, scenes):
        cats = [{"id": k + 1, "name": c, "supercategory": "shape"} for k, c in enumerate(CLASS_NAMES)]
        for split, doc in self.docs.items():
            if not doc["images"]:
                continue
            full = {"info": {"description": "bavit synthetic shapes", "seed": seed, "size": list(size),
                             "scenes": scenes},
                    "licenses": [], "images": doc["images"], "annotations": doc["annotations"],
                    "categories": cats}
            atomic_write_text(self.out / "annotations" / f"instances_{split}.json", json.dumps(full))


class _VocWriter:
    def __init__(self, out: Path, splits):
        self.out = out
        self.lists = {s: [] for s in splits}

    def add(self, i, split, rgb, objects):
        from scipy.ndimage import binary_dilation, binary_erosion

        h, w = rgb.shape[:2]
        stem = f"2026_{i + 1:06d}"
        _save_jpeg(self.out / "JPEGImages" / f"{stem}.jpg", rgb)
        cls_png = np.zeros((h, w), dtype=np.uint8)
        obj_png = np.zeros((h, w), dtype=np.uint8)
        border = np.zeros((h, w), dtype=bool)
        xml_objs = []
        for k, o in enumerate(objects):
            cls_png[o["mask"]] = o["category"] + 1
            obj_png[o["mask"]] = k + 1
            border |= binary_dilation(o["mask"], _CROSS) & ~binary_erosion(o["mask"], _CROSS)
            x0, y0, x1, y1 = o["xyxy"]
            xml_objs.append(
                f"  <object>\n    <name>{escape(CLASS_NAMES[o['category']])}</name>\n    <pose>Unspecified</pose>\n"
                f"    <truncated>{int(o['truncated'])}</truncated>\n    <difficult>{int(o['difficult'])}</difficult>\n"
                f"    <bndbox>\n      <xmin>{int(x0) + 1}</xmin>\n      <ymin>{int(y0) + 1}</ymin>\n"
                f"      <xmax>{int(x1)}</xmax>\n      <ymax>{int(y1)}</ymax>\n    </bndbox>\n  </object>\n"
            )
        cls_png[border] = 255
        obj_png[border] = 255
        _save_palette_png(self.out / "SegmentationClass" / f"{stem}.png", cls_png)
        _save_palette_png(self.out / "SegmentationObject" / f"{stem}.png", obj_png)
        xml = (
            f"<annotation>\n  <folder>VOC2012</folder>\n  <filename>{stem}.jpg</filename>\n"
            f"  <source><database>bavit synthetic shapes</database></source>\n"
            f"  <size>\n    <width>{w}</width>\n    <height>{h}</height>\n    <depth>3</depth>\n  </size>\n"
            f"  <segmented>1</segmented>\n" + "".join(xml_objs) + "</annotation>\n"
        )
        atomic_write_text(self.out / "Annotations" / f"{stem}.xml", xml)
        self.lists[split].append(stem)

    def close(self, seed, size, scenes):
        for split, stems in self.lists.items():
            if not stems:
                continue
            text = "".join(s + "\n" for s in stems)
            atomic_write_text(self.out / "ImageSets" / "Main" / f"{split}.txt", text)
            atomic_write_text(self.out / "ImageSets" / "Segmentation" / f"{split}.txt", text)
