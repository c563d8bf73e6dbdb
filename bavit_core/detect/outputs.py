"""``bavit detect``'s outputs: detections.json (COCO results plus file names), summary.csv
(one row per image), overlays/ (boxes, labels, scores, pruned patches dimmed), detect.json
(settings and counts), the resume journal (.parts/) and the readers of the two tables."""
from __future__ import annotations

import csv
import io
import json
import os
import uuid
from pathlib import Path

import numpy as np

from ..runtime.errors import InputFileError
from ..runtime.fileio import atomic_path, atomic_write_text, parse_json_file

FORMAT = "bavit-detect/1"
META = "detect.json"
PARTS = ".parts"
SUMMARY_COLUMNS = ("file_name", "image_id", "width", "height", "input_height", "input_width", "tokens", "kept_tokens",
                   "sparsity", "bavit_ms", "detector_ms", "detections")
DIM = 0.35  # brightness of the patches the detector never computed


# ---------------------------------------------------------------------------- records
def record(src, r, overlay: str | None) -> dict:
    """One image's entry in the journal: its name, sizes, tokens, timings, detections."""
    return {"path": str(src.path), "file_name": src.name, "width": int(r.size[1]), "height": int(r.size[0]),
            "input_height": int(r.input_size[0]), "input_width": int(r.input_size[1]), "tokens": r.tokens,
            "kept_tokens": r.kept, "sparsity": r.sparsity, "bavit_ms": r.bavit_ms, "detector_ms": r.detector_ms,
            "overlay": overlay,
            "detections": [{"category_id": int(c), "label": n, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                            "score": float(s)} for b, c, n, s in zip(r.boxes.tolist(), r.labels.tolist(), r.names,
                                                                      r.scores.tolist())]}


def write_part(out: Path, records: list[dict]) -> None:
    """One finished batch into the journal, atomically (a part is whole or absent)."""
    atomic_write_text(out / PARTS / f"part-{uuid.uuid4().hex[:12]}.json", json.dumps(records))


def read_parts(out: Path) -> list[dict]:
    """Every record the journal holds (the images a previous, maybe interrupted, run wrote)."""
    d = out / PARTS
    recs = []
    if not d.is_dir():
        return recs
    for p in sorted(d.glob("part-*.json")):
        try:
            recs += json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            raise InputFileError(p, f"unreadable journal part ({type(exc).__name__}); remove {d} to start over") from None
    return recs


def assign_ids(names: list[str]) -> tuple[dict[str, int], str]:
    """Image ids: the file names' numbers when every name is a number (COCO's 000000397133.jpg
    is image 397133), else 1..N in name order. Returns ({name: id}, the rule)."""
    stems = [Path(n).stem for n in names]
    if names and all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return {n: int(s) for n, s in zip(names, stems)}, "file name"
    return {n: k + 1 for k, n in enumerate(sorted(names))}, "name order"


def finish(out: Path, records: list[dict], meta: dict) -> dict:
    """Write detections.json and summary.csv from all ``records`` (each file atomically,
    the metadata last, marking the run complete). Returns the image-id rule."""
    records = sorted(records, key=lambda r: r["file_name"])
    ids, rule = assign_ids([r["file_name"] for r in records])
    dets = [{"image_id": ids[r["file_name"]], **d, "file_name": r["file_name"]} for r in records for d in r["detections"]]
    atomic_write_text(out / "detections.json", json.dumps(dets))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(SUMMARY_COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in records:
        row = dict(r, image_id=ids[r["file_name"]], detections=len(r["detections"]))
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(out / "summary.csv", buf.getvalue())
    write_meta(out, dict(meta, image_ids=rule, complete=True))
    return {"image_ids": rule, "detections": len(dets)}


def write_meta(out: Path, meta: dict) -> None:
    atomic_write_text(out / META, json.dumps(meta, indent=1, default=str))


def read_meta(out: Path) -> dict | None:
    p = out / META
    if not p.is_file():
        return None
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError):
        raise InputFileError(p, "unreadable detect.json (not JSON); name a new --out directory") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise InputFileError(p, f"not a bavit detect output (format {doc.get('format') if isinstance(doc, dict) else None!r})")
    return doc


# ---------------------------------------------------------------------------- readers
def read_detections(path, ann: str | os.PathLike | None = None) -> list[dict]:
    """detections.json's entries. With ``ann`` (a COCO instances JSON) their image ids are
    the annotation file's, matched by file name (the base name), and detections of images
    it does not list are left out: ready for ``COCO.loadRes`` and COCOeval."""
    p = Path(path)
    if p.is_dir():
        p = p / "detections.json"
    try:
        dets = parse_json_file(p)
    except OSError as exc:
        raise InputFileError(p, f"cannot read detections ({exc.strerror or exc})") from None
    if not isinstance(dets, list) or any(not isinstance(d, dict) or not {"image_id", "bbox", "score", "category_id",
                                                                          "file_name"} <= set(d) for d in dets):
        raise InputFileError(p, "not a bavit detect detections.json (a list of COCO results with file_name)")
    if ann is None:
        return dets
    try:
        images = json.loads(Path(ann).read_text())["images"]
        by_name = {Path(im["file_name"]).name: int(im["id"]) for im in images}
    except (OSError, ValueError, KeyError, TypeError):
        raise InputFileError(ann, "not a COCO annotation file (no images with file_name and id)") from None
    return [dict(d, image_id=by_name[Path(d["file_name"]).name]) for d in dets if Path(d["file_name"]).name in by_name]


def read_summary(path) -> list[dict]:
    """summary.csv's rows, numbers as numbers (file_name as text)."""
    p = Path(path)
    if p.is_dir():
        p = p / "summary.csv"
    try:
        with open(p, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise InputFileError(p, f"cannot read the summary ({exc.strerror or exc})") from None
    out = []
    for k, r in enumerate(rows):
        try:
            out.append({c: (v if c == "file_name" else (int(v) if c in ("image_id", "width", "height", "input_height",
                                                                             "input_width", "tokens", "kept_tokens",
                                                                             "detections") else float(v)))
                        for c, v in r.items()})
        except (TypeError, ValueError):
            raise InputFileError(p, f"line {k + 2}: not a bavit detect summary row") from None
    return out


# ---------------------------------------------------------------------------- overlays
def overlay_name(name: str) -> str:
    """overlays/<the image's name>.png (the name keeps its suffix: a.jpg and a.png differ)."""
    return f"overlays/{name}.png"


def _palette(k: int) -> tuple[int, int, int]:
    golden = (k * 0.618034) % 1.0
    import colorsys

    r, g, b = colorsys.hsv_to_rgb(golden, 0.85, 1.0)
    return int(255 * r), int(255 * g), int(255 * b)


def draw_overlay(image, r, dim_pruned: bool = True):
    """The image (PIL, original size) with ``r``'s boxes, labels and scores drawn and the
    patches the detector did not compute dimmed (each detector-grid cell mapped back onto
    the original pixels)."""
    from PIL import Image, ImageDraw, ImageFont

    a = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    h, w = a.shape[:2]
    gh, gw = r.keep.shape
    H, W = r.input_size
    ps = r.patch
    cy = ((np.arange(h) + 0.5) * H / h // ps).astype(int)  # the grid cell each original pixel falls in
    cx = ((np.arange(w) + 0.5) * W / w // ps).astype(int)
    inside = (cy[:, None] < gh) & (cx[None, :] < gw)
    if dim_pruned and not r.keep.all():
        kept = r.keep[np.minimum(cy, gh - 1)[:, None], np.minimum(cx, gw - 1)[None, :]]
        a[inside & ~kept] *= DIM
    im = Image.fromarray(a.astype(np.uint8))
    draw = ImageDraw.Draw(im)
    lw = max(1, round(min(h, w) / 200))
    try:
        font = ImageFont.load_default(size=max(10, round(min(h, w) / 40)))
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    for (x0, y0, x1, y1), c, name, s in sorted(zip(r.boxes.tolist(), r.labels.tolist(), r.names, r.scores.tolist()),
                                               key=lambda t: t[3]):
        col = _palette(int(c))
        draw.rectangle([x0, y0, x1, y1], outline=col, width=lw)
        text = f"{name} {s:.2f}"
        tb = draw.textbbox((x0, y0), text, font=font)
        ty = y0 - (tb[3] - tb[1]) - 2 if y0 - (tb[3] - tb[1]) - 2 >= 0 else y0
        tb = draw.textbbox((x0, ty), text, font=font)
        draw.rectangle([tb[0] - 1, tb[1] - 1, tb[2] + 1, tb[3] + 1], fill=col)
        draw.text((x0, ty), text, fill=(0, 0, 0), font=font)
    return im


def write_overlay(out: Path, name: str, image, r) -> str:
    rel = overlay_name(name)
    with atomic_path(out / rel) as tmp:
        draw_overlay(image, r).save(tmp, format="PNG")
    return rel
