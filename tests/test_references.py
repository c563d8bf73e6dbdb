"""Behaviour checked against independent references (issue 21, section 4): transformers'
own post-processing, brute-force loops on tiny arrays, hand-computed values.

What each test imports from the training code (kept small so the training-engine rewrite
can keep them working): ``bavit_core.bavit.train`` ``acc_loss``, ``Split``, ``_batch``,
``TrainOptions``, ``train_bavit``; ``bavit_core.finetune.data`` ``FinetuneData``,
``make_batch``, ``label_map_for``, ``keep_selector``; ``bavit_core.finetune.loop``
``FinetuneOptions``, ``finetune``. The LR-schedule tests only watch the optimiser
(``torch.optim.Adam`` / ``torch.optim.AdamW``) that training builds.
"""
import math
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bavit_core.data import open_dataset
from bavit_core.data.grid import GridSpec, resample_grid

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def ref_input(img_u8):
    """(h, w, 3) uint8 → (3, h, w) float64, normalised by hand."""
    x = img_u8.astype(np.float64) / 255.0
    return ((x - np.array(MEAN)) / np.array(STD)).transpose(2, 0, 1)


def mirror(a):
    """Left-right mirror of the last axis by an explicit loop (the brute-force reference)."""
    out = np.empty_like(a)
    w = a.shape[-1]
    for c in range(w):
        out[..., c] = a[..., w - 1 - c]
    return out


# --------------------------------------------------------------------------- box conversion
def test_detections_are_transformers_post_processing_in_coco_xywh():
    """detections_from_outputs == YolosImageProcessor.post_process_object_detection on the
    same logits and boxes (original sizes as target sizes), its corner boxes turned into COCO
    [x, y, w, h] by hand. Catches swapped width/height, corners reported as xywh, the
    'no object' class counted as a label, scores from the wrong softmax."""
    from transformers import YolosImageProcessor
    from transformers.models.yolos.modeling_yolos import YolosObjectDetectionOutput

    from bavit_core.detection.cocoeval import detections_from_outputs

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 6, generator=g) * 3
    logits[0, 0, -1] = 20.0  # a token whose best class overall is "no object"
    boxes = torch.rand(2, 7, 4, generator=g) * 0.5 + 0.25
    ids, widths, heights = [17, 4], [160, 90], [120, 300]  # different and non-square sizes
    ours = detections_from_outputs(logits, boxes, ids, widths, heights)
    ref = YolosImageProcessor().post_process_object_detection(
        YolosObjectDetectionOutput(logits=logits, pred_boxes=boxes), threshold=-1.0,
        target_sizes=[(h, w) for w, h in zip(widths, heights)])
    assert len(ours) == 2 * 7
    for i, r in enumerate(ref):
        mine = [d for d in ours if d["image_id"] == ids[i]]
        assert len(mine) == 7
        x0, y0, x1, y1 = r["boxes"].double().unbind(-1)
        xywh = torch.stack([x0, y0, x1 - x0, y1 - y0], -1)
        np.testing.assert_allclose([d["bbox"] for d in mine], xywh.numpy(), rtol=0, atol=1e-3)
        np.testing.assert_allclose([d["score"] for d in mine], r["scores"].numpy(), rtol=0, atol=1e-6)
        assert [d["category_id"] for d in mine] == r["labels"].tolist()
    assert ours[0]["category_id"] != 5  # never the "no object" class


# --------------------------------------------------------------------------- flip augmentation
def _painted(h, w, boxes_px, rng):
    """A random image whose red channel is 0 outside, 255 inside each box (pixels)."""
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[..., 0] = 0
    for x0, y0, x1, y1 in boxes_px:
        img[y0:y1, x0:x1, 0] = 255
    return img


def _box_of_red(img):
    ys, xs = np.nonzero(img[..., 0] == 255)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_finetune_flip_moves_image_kept_tokens_and_boxes_together():
    """make_batch on a shuffled batch with some images flipped: each flipped image is its
    mirror (brute-force loop), its kept-token grid is mirrored, and its box is the box of the
    painted object found again in the flipped pixels; unflipped images are untouched, labels
    never change. Catches a box not flipped (or flipped as 1 - x0 instead of 1 - cx), flips
    looked up by batch position instead of sample index, the grid not flipped."""
    from bavit_core.finetune.data import FinetuneData, make_batch

    rng = np.random.default_rng(0)
    h, w = 8, 12
    px = [(1, 2, 4, 7), (6, 0, 12, 3), (0, 0, 5, 8), (2, 3, 3, 5)]  # one box per image (x0, y0, x1, y1)
    images = np.stack([_painted(h, w, [b], rng) for b in px])
    targets = [(np.array([k + 1]), np.array([[(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h]],
                                            dtype=np.float32)) for k, (x0, y0, x1, y1) in enumerate(px)]
    keep = rng.random((4, 2, 3)) < 0.5
    data = FinetuneData(images, targets, keep.copy(), np.arange(4), np.full(4, w), np.full(4, h), MEAN, STD, 1 / 255)
    flips = np.array([True, False, False, True])
    b = np.array([3, 1, 0])  # shuffled: batch position != sample index
    x, kb, tg = make_batch(data, b, flips, "cpu")
    for pos, i in enumerate(b):
        img = mirror(images[i].transpose(2, 0, 1)).transpose(1, 2, 0) if flips[i] else images[i]
        np.testing.assert_allclose(x[pos].double().numpy(), ref_input(img), atol=1e-5)
        assert np.array_equal(kb[pos].numpy(), mirror(keep[i]) if flips[i] else keep[i])
        x0, y0, x1, y1 = _box_of_red(img)
        want = [(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h]
        np.testing.assert_allclose(tg[pos]["boxes"].numpy()[0], want, atol=1e-6)
        assert tg[pos]["class_labels"].tolist() == [i + 1]
    np.testing.assert_array_equal(data.targets[0][1][0], targets[0][1][0])  # the stored targets stay as they were
    assert np.array_equal(data.keep, keep)


def test_bavit_training_flip_mirrors_image_and_label_grid_together():
    """train's batch builder: flipped samples (by sample index) have their image and FG grid
    mirrored together (brute-force loop); the others are untouched."""
    from bavit_core.bavit.train import Split, _batch

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, 8, 12, 3), dtype=np.uint8)
    grids = rng.random((4, 2, 3)) < 0.5
    split = Split(images, grids.copy(), np.arange(4))
    cfg = SimpleNamespace(mean=MEAN, std=STD)
    flips = np.array([False, True, True, False])
    b = np.array([2, 3, 1])
    x, y = _batch(split, b, flips, cfg, torch.device("cpu"))
    for pos, i in enumerate(b):
        ref = ref_input(images[i])
        np.testing.assert_allclose(x[pos].double().numpy(), mirror(ref) if flips[i] else ref, atol=1e-5)
        assert np.array_equal(y[pos].numpy(), mirror(grids[i]) if flips[i] else grids[i])
    assert np.array_equal(split.grids, grids)


# --------------------------------------------------------------------------- --fg-weight
def test_fg_weight_is_the_hand_computed_weighted_cross_entropy():
    """acc_loss with --fg-weight 3 on four tokens, computed by hand:
    CE_t = logsumexp(z_t) - z_t[y_t], loss = sum_t w(y_t) CE_t / sum_t w(y_t), w(BG)=1, w(FG)=3."""
    from bavit_core.bavit.train import acc_loss

    z = [[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 2.0]]  # (BG, FG) logits per token
    y = [0, 1, 1, 0]
    ce = [math.log(math.exp(a) + math.exp(b)) - (a, b)[t] for (a, b), t in zip(z, y)]
    wt = [1.0, 3.0, 3.0, 1.0]
    want = sum(w * c for w, c in zip(wt, ce)) / sum(wt)
    logits = torch.tensor(z).reshape(1, 2, 2, 2)
    target = torch.tensor(y).reshape(1, 2, 2)
    assert acc_loss(logits, target, 3.0).item() == pytest.approx(want, rel=1e-6)
    assert acc_loss(logits, target, 1.0).item() == pytest.approx(sum(ce) / 4, rel=1e-6)  # eq. 3: the plain mean


# --------------------------------------------------------------------------- LR schedules
class _Record:
    """Replaces an optimiser class with a subclass that logs the LR of every step."""

    def __init__(self, monkeypatch, name):
        base = getattr(torch.optim, name)
        lrs = self.lrs = []

        class Recording(base):
            def step(self, *a, **k):
                lrs.append(self.param_groups[0]["lr"])
                return super().step(*a, **k)

        monkeypatch.setattr(torch.optim, name, Recording)


@pytest.fixture(scope="module")
def small_labels(coco_synth, tmp_path_factory):
    from bavit_core.labels import LabelOptions, label_dataset

    d = tmp_path_factory.mktemp("lr")
    aset = open_dataset("coco", root=coco_synth, split="val2017", need_masks=True)
    label_dataset(aset, LabelOptions(source="masks", grid=GridSpec(32, 32, 16)), d / "l.parquet")
    return d / "l.parquet"


def test_bavit_step_schedule_rates_per_epoch(small_labels, tmp_path, monkeypatch):
    """Adam + step LR: epoch e trains at lr · gamma^(e // step_size). 10 images, batch 5:
    2 steps per epoch; lr 1e-3, step 2, gamma 0.5 → 1e-3, 1e-3, 5e-4, 5e-4 per epoch
    (hand-computed). Catches the decay applied per step, one epoch early, or not at all."""
    from bavit_core.bavit.train import TrainOptions, train_bavit

    rec = _Record(monkeypatch, "Adam")
    train_bavit(TrainOptions(labels=str(small_labels), epochs=4, batch_size=5, lr=1e-3, step_size=2, gamma=0.5,
                             val_fraction=0.0, out=str(tmp_path / "run"), device="cpu"))
    want = [1e-3] * 2 + [1e-3] * 2 + [5e-4] * 2 + [5e-4] * 2
    np.testing.assert_allclose(rec.lrs, want, rtol=1e-12)


@pytest.mark.parametrize("schedule,want_factors", [
    # warm-up 1 epoch = 2 steps: (k+1)/2; then step: gamma^(epoch // 2) with gamma 0.1
    ("step", [0.5, 1.0, 1.0, 1.0, 0.1, 0.1]),
    # warm-up 2 steps, then cosine over the remaining 4: 0.5 (1 + cos(pi t)), t = (k - 2) / 4
    ("cosine", [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]),
])
def test_finetune_schedule_rates_per_step(coco_synth, tmp_path, monkeypatch, schedule, want_factors):
    """finetune's LR at every optimiser step, hand-computed: 6 images, batch 3 → 2 steps per
    epoch, 3 epochs, 1 warm-up epoch (linear (k+1)/warm-up steps), lr 1e-3, then the step
    schedule (step size 2 epochs, gamma 0.1) or cosine to 0 over the steps after warm-up.
    Catches warm-up counted in epochs instead of steps, decay from the wrong epoch, cosine
    over the whole run instead of after warm-up."""
    from bavit_core.finetune.loop import FinetuneOptions, finetune

    rec = _Record(monkeypatch, "AdamW")
    finetune(FinetuneOptions(root=str(coco_synth), split="val2017", from_scratch=True, detector_config="nano",
                             detector_size=(32, 32), epochs=3, batch_size=3, lr=1e-3, max_images=6, val_fraction=0.0,
                             warmup_epochs=1.0, schedule=schedule, step_size=2, gamma=0.1, device="cpu",
                             out=str(tmp_path / "det")))
    np.testing.assert_allclose(rec.lrs, [1e-3 * f for f in want_factors], rtol=1e-9)


# --------------------------------------------------------------------------- --resample any
def brute_any(grid, shape):
    """A target cell is FG when its rectangle overlaps (with positive area) a FG source
    cell's rectangle, both grids spanning the same unit square. In units of 1/(gh·th) a
    target row ti spans [ti·gh, (ti+1)·gh) and a source row si [si·th, (si+1)·th) (columns
    alike): exact integer comparisons."""
    gh, gw = grid.shape
    th, tw = shape
    out = np.zeros(shape, dtype=bool)
    for si, sj in zip(*np.nonzero(grid)):
        for ti in range(th):
            if min((ti + 1) * gh, (si + 1) * th) <= max(ti * gh, si * th):
                continue
            for tj in range(tw):
                if min((tj + 1) * gw, (sj + 1) * tw) > max(tj * gw, sj * tw):
                    out[ti, tj] = True
    return out


@pytest.mark.parametrize("src,dst", [((3, 4), (5, 7)), ((6, 6), (4, 4)), ((5, 3), (2, 7)), ((24, 24), (32, 32))])
def test_resample_any_is_the_brute_force_overlap(src, dst):
    rng = np.random.default_rng(sum(src) + sum(dst))
    grids = rng.random((3,) + src) < 0.25
    got = resample_grid(grids, dst, "any")
    for k in range(3):
        assert np.array_equal(got[k], brute_any(grids[k], dst)), k


def test_finetune_resample_any_reaches_the_oracle_tokens(coco_synth, tmp_path):
    """finetune --selector oracle --resample any: the kept tokens on the detector grid are the
    brute-force overlap of each image's labels grid (4x4 at 64 px) onto the detector's 5x5;
    nearest gives another selection on these grids."""
    from bavit_core.finetune.data import keep_selector
    from bavit_core.finetune.options import FinetuneOptions
    from bavit_core.labels import LabelOptions, label_dataset, read_labels

    aset = open_dataset("coco", root=coco_synth, split="val2017", need_masks=True)
    label_dataset(aset, LabelOptions(source="masks", grid=GridSpec(64, 64, 16)), tmp_path / "l.parquet")
    lab = read_labels(tmp_path / "l.parquet")
    idx = np.arange(aset.n_images)
    src = lab.grids_for(aset.image_ids[idx], tmp_path / "l.parquet")
    kept = {}
    for mode in ("any", "nearest"):
        opts = FinetuneOptions(selector="oracle", labels=str(tmp_path / "l.parquet"), resample=mode)
        fn, size = keep_selector(opts, aset, (5, 5), "cpu", str(tmp_path / "l.parquet"))
        assert size is None
        kept[mode] = fn(idx, None)
    for k in idx:
        assert np.array_equal(kept["any"][k], brute_any(src[k], (5, 5))), k
    assert not np.array_equal(kept["any"], kept["nearest"])


# --------------------------------------------------------------------------- VOC label maps
def _xml_objects(root, stem):
    """(name, [x0, y0, x1, y1] in 0-based pixel edges) of each object of a VOC annotation."""
    out = []
    for obj in ET.parse(root / "Annotations" / f"{stem}.xml").getroot().iter("object"):
        bb = obj.find("bndbox")
        xmin, ymin, xmax, ymax = (int(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        out.append((obj.findtext("name"), [xmin - 1, ymin - 1, xmax, ymax]))
    return out


def test_finetune_voc_label_map_puts_each_object_in_its_class(voc_synth):
    """finetune's VOC label map, read against the XML files: from scratch, labels are the
    class names in alphabetical order from 1 (the id2label finetune writes); onto an existing
    detector, by name whatever its label order. Every object of every image lands in the
    label whose name is the object's <name>."""
    from bavit_core.finetune.data import label_map_for

    aset = open_dataset("voc", root=voc_synth, split="train")
    names = sorted({n for i in range(aset.n_images) for n, _ in _xml_objects(voc_synth, aset.file_names[i][:-4])})
    assert len(names) >= 3
    scratch = {0: "N/A", **{k + 1: n for k, n in enumerate(names)}}
    shuffled = {0: "N/A", **{k + 1: n for k, n in enumerate(reversed(names))}, len(names) + 1: "unused"}
    maps = {"scratch": (label_map_for(aset), scratch),
            "detector": (label_map_for(aset, SimpleNamespace(id2label=shuffled)), shuffled)}
    checked = 0
    for i in range(aset.n_images):
        objs = _xml_objects(voc_synth, aset.file_names[i][:-4])
        rows = np.flatnonzero(aset.box_image == i)
        assert len(rows) == len(objs)
        for name, box in objs:
            k = next(r for r in rows if aset.boxes[r].tolist() == box)  # this object's row
            for lm, id2label in maps.values():
                assert id2label[lm[int(aset.box_category[k])]] == name
            checked += 1
    assert checked >= aset.n_images


def test_finetune_voc_label_maps_agree_between_splits(voc_synth, tmp_path, monkeypatch):
    """From scratch with a --val-split, the same class name gets the same label in the
    training targets and in the validation ground truth, even when the validation split
    lacks a class (here: its objects of the first class removed). It did not: each split
    was numbered by its own alphabetical class list."""
    import shutil

    import bavit_core.finetune.loop as L

    root = tmp_path / "voc"
    shutil.copytree(voc_synth, root)
    train = open_dataset("voc", root=root, split="train")
    first = sorted(train.categories.values())[0]
    for stem in (root / "ImageSets" / "Main" / "val.txt").read_text().split():
        path = root / "Annotations" / f"{stem}.xml"
        tree = ET.parse(path)
        for obj in list(tree.getroot().iter("object")):
            if obj.findtext("name") == first:
                tree.getroot().remove(obj)
        tree.write(path)
    val = open_dataset("voc", root=root, split="val")
    assert first not in val.categories.values()
    seen = {}
    real_prepare, real_gt = L.prepare, L.coco_ground_truth

    def prepare(aset, idx, proto, label_map, *a, **k):
        seen.setdefault("train", (aset, label_map))  # the training split is prepared first
        return real_prepare(aset, idx, proto, label_map, *a, **k)

    def ground_truth(aset, ids, label_map=None):
        seen["val"] = (aset, label_map)
        return real_gt(aset, ids, label_map)

    monkeypatch.setattr(L, "prepare", prepare)
    monkeypatch.setattr(L, "coco_ground_truth", ground_truth)
    L.finetune(L.FinetuneOptions(dataset="voc", root=str(root), split="train", val_split="val", from_scratch=True,
                                 detector_config="nano", detector_size=(64, 64), epochs=1, batch_size=8,
                                 max_images=8, out=str(tmp_path / "det")))
    taset, tmap = seen["train"]
    vaset, vmap = seen["val"]
    by_name = {taset.categories[c]: lab for c, lab in tmap.items()}
    assert len(vmap) == len(vaset.categories) >= 2
    for c, lab in vmap.items():
        assert lab == by_name[vaset.categories[c]], vaset.categories[c]
