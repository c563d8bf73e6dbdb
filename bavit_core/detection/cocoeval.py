"""Ground truth in COCO form, detections from YOLOS outputs, and pycocotools COCOeval."""
from __future__ import annotations

import contextlib
import io
from typing import TYPE_CHECKING

from ..data import AnnotationSet
from ..runtime.errors import BavitError
from ..runtime import workers as _workers

if TYPE_CHECKING:
    import torch

STAT_NAMES = ("map", "map50", "map75", "map_s", "map_m", "map_l")


def coco_ground_truth(aset: AnnotationSet, image_ids, category_map: dict[int, int] | None = None):
    """A pycocotools COCO object for ``image_ids``.

    COCO datasets use their own file (segmentation areas, crowd flags as published); VOC
    boxes become COCO annotations with area = box area, ``difficult`` objects marked
    ``iscrowd`` so COCOeval ignores them, as the VOC protocol does. ``category_map`` maps
    the dataset's category ids to the detector's label ids.
    """
    from pycocotools.coco import COCO

    wanted = set(int(i) for i in image_ids)
    if aset.kind == "coco":
        doc = aset.coco_gt  # validated by the loader (no NaN/negative boxes, integer ids)
        images = [im for im in doc["images"] if im.get("id") in wanted]
        anns = [a for a in doc["annotations"] if a.get("image_id") in wanted and isinstance(a.get("bbox"), list)]
        cats = doc.get("categories") or [{"id": c} for c in sorted({a["category_id"] for a in anns})]
        if category_map is not None:  # onto the detector's label ids; unmatched classes are left out
            anns = [dict(a, category_id=category_map.get(a.get("category_id"), -1)) for a in anns]
            cats = [dict(c, id=category_map[c["id"]]) for c in cats if c.get("id") in category_map]
    else:
        pos = {int(iid): k for k, iid in enumerate(aset.image_ids)}
        images = [{"id": int(i), "file_name": aset.file_names[pos[int(i)]], "width": int(aset.widths[pos[int(i)]]),
                   "height": int(aset.heights[pos[int(i)]])} for i in sorted(wanted)]
        anns = []
        for k in range(len(aset.boxes)):
            iid = int(aset.image_ids[aset.box_image[k]])
            if iid not in wanted:
                continue
            x0, y0, x1, y1 = aset.boxes[k].tolist()
            cat = int(aset.box_category[k])
            anns.append({"id": len(anns) + 1, "image_id": iid, "bbox": [x0, y0, x1 - x0, y1 - y0],
                         "area": (x1 - x0) * (y1 - y0), "iscrowd": int(aset.box_difficult[k]),
                         "category_id": category_map.get(cat, -1) if category_map else cat})
        ids = sorted({a["category_id"] for a in anns} | set((category_map or {}).values()))
        cats = [{"id": c, "name": str(c)} for c in ids if c >= 0]
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": cats}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def detections_from_outputs(logits: "torch.Tensor", boxes: "torch.Tensor", image_ids, widths, heights) -> list[dict]:
    """COCO result dicts: every detection token's best non-"no object" class (the detector's
    label id, which is the COCO category id; VOC ground truth is mapped onto those ids) and its box,
    scaled from the normalised (cx, cy, w, h) of the stretched input to original pixels."""
    prob = logits.float().softmax(-1)[..., :-1]
    scores, labels = prob.max(-1)
    b = boxes.float()
    out = []
    sc, lb, bx = scores.cpu().numpy(), labels.cpu().numpy(), b.cpu().numpy()
    for i, iid in enumerate(image_ids):
        W, H = float(widths[i]), float(heights[i])
        cx, cy, w, h = bx[i, :, 0] * W, bx[i, :, 1] * H, bx[i, :, 2] * W, bx[i, :, 3] * H
        for d in range(len(sc[i])):
            out.append({"image_id": int(iid), "category_id": int(lb[i, d]),
                        "bbox": [float(cx[d] - w[d] / 2), float(cy[d] - h[d] / 2), float(w[d]), float(h[d])],
                        "score": float(sc[i, d])})
    return out


def evaluate_detections(gt, detections: list[dict], image_ids) -> dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl from pycocotools COCOeval (bbox), as fractions."""
    from pycocotools.cocoeval import COCOeval

    if not detections:
        return {k: 0.0 for k in STAT_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(detections)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds = sorted(int(i) for i in image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [max(float(v), 0.0) if v != -1 else float("nan") for v in ev.stats[:6]]
    return dict(zip(STAT_NAMES, stats))


PARALLEL_FROM = 3  # rows; fewer are evaluated in this process (a worker costs ~0.5 s to start)
_WORKER_GT = None


def _worker_init(dataset: dict) -> None:
    """A COCOeval worker: the ground truth is indexed once per process, not per row."""
    from pycocotools.coco import COCO

    global _WORKER_GT
    _WORKER_GT = COCO()
    _WORKER_GT.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        _WORKER_GT.createIndex()


def _worker_eval(detections: list[dict], image_ids) -> dict[str, float]:
    return evaluate_detections(_WORKER_GT, detections, image_ids)


def evaluate_many(gt, detections: list[list[dict]], image_ids, on_done=None) -> list[dict[str, float]]:
    """``evaluate_detections`` for several rows' detections against one ground truth, in
    order. COCOeval is single-threaded Python: with several cores and at least
    ``PARALLEL_FROM`` rows the rows are evaluated by worker processes (spawned: no torch in
    them, safe whatever threads this process runs), each computing exactly what this process
    would. ``on_done()`` is called as each row finishes."""
    def collect(results) -> list[dict[str, float]]:
        out = []
        for r in results:
            out.append(r)
            if on_done:
                on_done()
        return out

    workers = min(_workers.usable_cores(), len(detections), 8)
    if workers < 2 or len(detections) < PARALLEL_FROM:
        return collect(evaluate_detections(gt, d, image_ids) for d in detections)
    ids = [int(i) for i in image_ids]
    with _workers.spawn_pool(workers, _worker_init, (gt.dataset,)) as ex:
        futures = [ex.submit(_worker_eval, d, ids) for d in detections]
        return collect(f.result() for f in futures)


def read_category_map(path) -> dict[str, str]:
    """``--category-map FILE``: a JSON object {dataset class name: detector class name}."""
    import json
    from pathlib import Path

    from ..runtime.errors import InputFileError

    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except OSError as exc:
        raise InputFileError(p, f"cannot read the category map ({exc.strerror or exc})") from None
    except ValueError:
        raise InputFileError(p, "the category map is not JSON") from None
    if not isinstance(doc, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in doc.items()):
        raise InputFileError(p, 'the category map must be a JSON object {"dataset class": "detector class", ...}')
    return doc


def _names(names, k: int = 6) -> str:
    names = list(names)
    return ", ".join(names[:k]) + (", …" if len(names) > k else "")


def category_map_for(aset: AnnotationSet, id2label: dict, names: dict[str, str] | None = None) -> dict[int, int]:
    """Map the dataset's category ids to the detector's label ids by class name
    (case-insensitive; ``names`` renames dataset classes first). Fewer than half of the
    dataset's categories found among the detector's classes is an error naming both."""
    renamed = {str(k).lower(): str(v).lower() for k, v in (names or {}).items()}
    by_name = {str(v).lower(): int(k) for k, v in id2label.items()}
    out = {}
    for cid, name in aset.categories.items():
        key = renamed.get(str(name).lower(), str(name).lower())
        if key in by_name:
            out[int(cid)] = by_name[key]
    if not aset.categories or 2 * len(out) < len(aset.categories):
        det_names = [str(v) for k, v in sorted(id2label.items(), key=lambda kv: int(kv[0])) if str(v) != "N/A"]
        raise BavitError(
            f"detector classes {_names(det_names)} do not match the dataset's {_names(aset.categories.values())} "
            f"({len(out)} of {len(aset.categories)} found by name); pass --category-map FILE "
            '(JSON {"dataset class": "detector class"}) or a detector trained on these classes')
    return out


def voc_category_map(aset: AnnotationSet, id2label: dict) -> dict[int, int]:
    """Map VOC class ids (by name) to the detector's label ids."""
    return category_map_for(aset, id2label)
