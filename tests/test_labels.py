import json

import numpy as np
import pytest
from pycocotools.coco import COCO

from bavit_core import read_labels
from bavit_core.data import open_dataset
from bavit_core.data.grid import GridSpec
from bavit_core.labels import LabelOptions, label_dataset

from .conftest import shared_data


def brute_force_fractions(coco: COCO, image_id: int, gh: int, gw: int, crowd=True):
    info = coco.imgs[image_id]
    h, w = info["height"], info["width"]
    union = np.zeros((h, w), dtype=bool)
    for a in coco.imgToAnns[image_id]:
        if a.get("iscrowd") and not crowd:
            continue
        union |= coco.annToMask(a).astype(bool)
    counts = np.zeros((gh, gw))
    totals = np.zeros((gh, gw))
    ys = ((np.arange(h) + 0.5) * gh / h).astype(int)
    xs = ((np.arange(w) + 0.5) * gw / w).astype(int)
    np.add.at(counts, (ys[:, None].repeat(w, 1), xs[None, :].repeat(h, 0)), union)
    np.add.at(totals, (ys[:, None].repeat(w, 1), xs[None, :].repeat(h, 0)), 1)
    return counts / totals


def check_coco_masks_exact(ann_file, images_dir, grid, tmp_path, crowd="include"):
    aset = open_dataset("coco", ann=ann_file, images=images_dir)
    opts = LabelOptions(source="masks", grid=grid, crowd=crowd)
    label_dataset(aset, opts, tmp_path / "l.parquet")
    lab = read_labels(tmp_path / "l.parquet")
    coco = COCO(str(ann_file))
    gh, gw = grid.shape
    for k, iid in enumerate(lab.image_ids):
        ref = brute_force_fractions(coco, int(iid), gh, gw, crowd == "include")
        assert np.array_equal(lab.scores[k], ref), f"image {iid}"
        assert np.array_equal(lab.grids[k], ref > 0.10)
    return lab


@pytest.mark.parametrize("grid", [GridSpec(384, 384, 16), GridSpec(96, 160, 16)])
def test_mask_fractions_exact_on_generated_coco(coco_synth, tmp_path, grid):
    lab = check_coco_masks_exact(coco_synth / "annotations/instances_train2017.json", coco_synth / "train2017", grid, tmp_path)
    assert lab.grids.any() and not lab.grids.all()


def test_generated_coco_has_both_rle_kinds_and_crowd_exclusion_matters(coco_synth, tmp_path):
    doc = json.loads((coco_synth / "annotations/instances_train2017.json").read_text())
    crowd = [a for a in doc["annotations"] if a["iscrowd"]]
    assert {type(a["segmentation"]["counts"]) for a in crowd} == {list, str}
    inc = check_coco_masks_exact(coco_synth / "annotations/instances_train2017.json", coco_synth / "train2017",
                                 GridSpec(), tmp_path)
    exc = check_coco_masks_exact(coco_synth / "annotations/instances_train2017.json", coco_synth / "train2017",
                                 GridSpec(), tmp_path, crowd="exclude")
    assert inc.grids.sum() > exc.grids.sum()


def test_mask_fractions_exact_on_real_coco_tiny(tmp_path):
    root = shared_data("coco_tiny")
    check_coco_masks_exact(root / "annotations/instances_val2017.json", root / "val2017", GridSpec(), tmp_path)


def test_box_labels_follow_tau_and_criterion(coco_synth, tmp_path):
    aset = open_dataset("coco", root=coco_synth, split="train2017")
    label_dataset(aset, LabelOptions(source="boxes", tau=0.5), tmp_path / "cov.parquet")
    label_dataset(aset, LabelOptions(source="boxes", tau=0.5, criterion="jaccard"), tmp_path / "jac.parquet")
    cov, jac = read_labels(tmp_path / "cov.parquet"), read_labels(tmp_path / "jac.parquet")
    assert np.array_equal(cov.grids, cov.scores >= 0.5)
    assert (jac.scores <= cov.scores + 1e-12).all()  # |P∪B| >= |P|
    assert jac.grids.sum() < cov.grids.sum()
    # thresholds can be changed later from the stored scores
    re = read_labels(tmp_path / "cov.parquet", threshold=0.9)
    assert np.array_equal(re.grids, cov.scores >= 0.9)
    assert re.meta["threshold"] == 0.9


def test_parquet_metadata_and_reader(coco_synth, tmp_path):
    aset = open_dataset("coco", root=coco_synth, split="val2017")
    s = label_dataset(aset, LabelOptions(source="masks", grid=GridSpec(96, 128, 16)), tmp_path / "l.parquet")
    lab = read_labels(tmp_path / "l.parquet")
    assert lab.grids.shape == (10, 6, 8) and lab.grids.dtype == bool
    assert lab.scores.shape == (10, 6, 8) and lab.scores.dtype == np.float64
    assert lab.image_ids.tolist() == sorted(lab.image_ids.tolist())
    assert lab.file_names[0].endswith(".jpg")
    m = lab.meta
    assert m["options"]["source"] == "masks" and m["options"]["grid"] == {"input_h": 96, "input_w": 128, "patch": 16}
    assert m["bavit_version"] and len(m["source_sha256"]) == 64
    import hashlib
    assert m["source_sha256"] == hashlib.sha256((coco_synth / "annotations/instances_val2017.json").read_bytes()).hexdigest()
    assert s.images_labelled == 10
    assert abs(s.fg_fraction_mean - lab.fg_fraction.mean()) < 1e-6


def test_voc_masks_void_modes_and_difficult(voc_synth, tmp_path):
    from PIL import Image

    res = {}
    for void in ("bg", "fg", "ignore"):
        aset = open_dataset("voc", root=voc_synth, split="val", need_masks=True, void=void)
        label_dataset(aset, LabelOptions(source="masks", void=void), tmp_path / f"{void}.parquet")
        res[void] = read_labels(tmp_path / f"{void}.parquet")
    assert (res["fg"].scores >= res["bg"].scores).all()
    assert (res["fg"].scores > res["bg"].scores).any()
    # brute force for the 'ignore' mode on one image
    lab = res["ignore"]
    stem = lab.file_names[0][:-4]
    a = np.asarray(Image.open(voc_synth / "SegmentationObject" / f"{stem}.png"))
    h, w = a.shape
    ys = ((np.arange(h) + 0.5) * 24 / h).astype(int)
    xs = ((np.arange(w) + 0.5) * 24 / w).astype(int)
    num = np.zeros((24, 24))
    den = np.zeros((24, 24))
    for y in range(h):
        for x in range(w):
            if a[y, x] != 255:
                den[ys[y], xs[x]] += 1
                num[ys[y], xs[x]] += a[y, x] != 0
    ref = np.where(den > 0, num / np.maximum(den, 1), 0)
    assert np.array_equal(lab.scores[0], ref)


def test_voc_boxes_are_one_based_inclusive(voc_synth, tmp_path):
    aset = open_dataset("voc", root=voc_synth, split="train")
    import xml.etree.ElementTree as ET
    stem = aset.file_names[0][:-4]
    obj = ET.parse(voc_synth / "Annotations" / f"{stem}.xml").getroot().find("object/bndbox")
    xmin, ymin, xmax, ymax = (int(obj.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
    assert aset.boxes[0].tolist() == [xmin - 1, ymin - 1, xmax, ymax]


def test_real_voc_sample(tmp_path):
    root = shared_data("voc_sample")
    aset = open_dataset("voc", root=root, split="val", need_masks=True)
    assert aset.n_images == 1  # only 2007_000063 has masks
    label_dataset(aset, LabelOptions(source="masks"), tmp_path / "v.parquet")
    lab = read_labels(tmp_path / "v.parquet")
    from PIL import Image
    a = np.asarray(Image.open(root / "SegmentationObject" / "2007_000063.png"))
    fg = (a != 0) & (a != 255)
    h, w = a.shape
    ys = ((np.arange(h) + 0.5) * 24 / h).astype(int)
    xs = ((np.arange(w) + 0.5) * 24 / w).astype(int)
    num = np.zeros((24, 24)); den = np.zeros((24, 24))
    np.add.at(num, (ys[:, None].repeat(w, 1), xs[None, :].repeat(h, 0)), fg)
    np.add.at(den, (ys[:, None].repeat(w, 1), xs[None, :].repeat(h, 0)), 1)
    assert np.array_equal(lab.scores[0], num / den)
    boxes = open_dataset("voc", root=root, split="val")
    assert boxes.n_images == 2
