"""The bad-input corpus (#13): what a new user and an adversary feed every command.

Every case runs in-process through typer's CliRunner (``catch_exceptions=False``: a traceback
fails the test). The promise checked for every error case: exit 1, exactly one stderr line
``Error: ...`` naming the problem, no output written, no temporary file left, and the inputs
unchanged. Cases that are *accepted* (count-and-skip) check the skip is counted on screen and
nothing non-finite reaches the output. Classes follow the issue:

1 data loss · 2 wrong-content JSON · 3 native-code crashes · 4 output paths · 5 damaged files
of ours · 6 images · 7 options · 8 interruptions · 10 security/sharing · 11 noise
(9, resume exactness, lives in test_resume_exact.py.)
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from .cli_helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- fixtures
def _img(path: Path, h=48, w=64, value=120):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)


def png_bomb(path: Path, w=30000, h=30000):
    """A 300-byte PNG whose header claims 900 M pixels."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def env(tmp_path_factory, coco_synth):
    """Shared inputs: a tiny COCO set, its labels, a 1-epoch BAViT run, its predictions."""
    from bavit_core.bavit.train import TrainOptions, train_bavit

    d = tmp_path_factory.mktemp("bad_inputs")
    imgs = d / "imgs"
    _img(imgs / "a.jpg")
    _img(imgs / "b.jpg")
    ann = d / "ann.json"
    ann.write_text(json.dumps(_doc()))
    code, _, err = run_cli("label", "--ann", ann, "--images", imgs, "--input-size", "32", "--out", d / "labels.parquet")
    assert code == 0, err
    code, _, err = run_cli("label", "--root", coco_synth, "--split", "val2017", "--input-size", "32",
                           "--out", d / "val.parquet")
    assert code == 0, err
    train_bavit(TrainOptions(labels=str(d / "val.parquet"), epochs=1, depth=1, batch_size=8, val_fraction=0,
                             out=str(d / "run")))
    code, _, err = run_cli("predict", "--model", d / "run", "--labels", d / "val.parquet", "--out", d / "preds.parquet")
    assert code == 0, err
    res = d / "results"
    res.mkdir()
    (res / "results.csv").write_text(_results_csv())
    return {"d": d, "imgs": imgs, "ann": ann, "labels": d / "labels.parquet", "val": d / "val.parquet",
            "run": d / "run", "preds": d / "preds.parquet", "results": res, "coco": coco_synth}


def _doc(images=None, annotations=None):
    return {
        "images": images if images is not None else [
            {"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
            {"id": 2, "file_name": "b.jpg", "width": 64, "height": 48}],
        "annotations": annotations if annotations is not None else [
            {"id": 1, "image_id": 1, "bbox": [4, 4, 30, 20], "category_id": 1, "iscrowd": 0,
             "segmentation": [[4, 4, 34, 4, 34, 24, 4, 24]]}],
        "categories": [{"id": 1, "name": "thing"}],
    }


def _digest(root: Path) -> dict:
    """name → sha256 of every file under root (inputs must be unchanged by a failed command)."""
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_clean_error(code, out, err, expect: str, *, exit_code=1):
    lines = err.strip().splitlines()
    assert code == exit_code, (code, out, err)
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert lines[0].startswith("Error: "), err
    assert expect in lines[0], (expect, lines[0])


def no_temp_files(*dirs: Path):
    for d in dirs:
        if d.is_dir():
            left = [p.name for p in d.iterdir() if p.name.startswith(".") and (".tmp" in p.name or p.name.endswith(".old"))]
            assert not left, f"temporary files left in {d}: {left}"


# --------------------------------------------------------------------------- class 1: data loss
DATA_LOSS = {
    "label --ann X --out X": (lambda e, t: ["label", "--ann", e["ann"], "--images", e["imgs"], "--out", e["ann"]], "ann"),
    "label --root R --out R's annotations": (
        lambda e, t: ["label", "--root", e["coco"], "--out", e["coco"] / "annotations" / "instances_val2017.json"], "coco"),
    "label --out the image directory": (lambda e, t: ["label", "--ann", e["ann"], "--images", e["imgs"], "--out", e["imgs"]], "imgs"),
    "predict --labels L --out L": (lambda e, t: ["predict", "--model", e["run"], "--labels", e["val"], "--out", e["val"]], "val"),
    "predict --out the model weights": (
        lambda e, t: ["predict", "--model", e["run"], "--labels", e["val"], "--out", e["run"] / "model.safetensors"], "run"),
    "postprocess --pred P --out P": (lambda e, t: ["postprocess", "--pred", e["preds"], "--out", e["preds"]], "preds"),
    "train --out the folder holding its labels": (lambda e, t: ["train", "--labels", e["val"], "--out", e["d"]], "val"),
    "train --out the image folder": (lambda e, t: ["train", "--labels", e["val"], "--images", e["imgs"], "--out", e["imgs"]], "imgs"),
    "report --results R --out R": (lambda e, t: ["report", "--results", e["results"], "--out", e["results"]], "results"),
    "report --model R --out R": (lambda e, t: ["report", "--model", e["run"], "--out", e["run"]], "run"),
    "report --out the folder holding --pred": (lambda e, t: ["report", "--pred", e["preds"], "--out", e["d"]], "preds"),
    "prune-eval --out the folder holding --labels": (
        lambda e, t: ["prune-eval", "--detector", str(t / "d"), "--ann", e["ann"], "--images", e["imgs"], "--labels", e["labels"],
                      "--out", e["d"]], "labels"),
    "finetune --out the folder holding --labels": (
        lambda e, t: ["finetune", "--from-scratch", "--ann", e["ann"], "--images", e["imgs"], "--selector", "oracle",
                      "--labels", e["labels"], "--out", e["d"]], "labels"),
}


@pytest.mark.parametrize("case", list(DATA_LOSS), ids=list(DATA_LOSS))
def test_class1_an_output_over_an_input_is_refused_and_the_input_kept(env, tmp_path, case):
    build, key = DATA_LOSS[case]
    before = _digest(env[key])
    code, out, err = run_cli(*build(env, tmp_path))
    assert_clean_error(code, out, err, "would overwrite the input")
    assert _digest(env[key]) == before


# --------------------------------------------------------------------------- classes 2, 3: JSON content
def _ann(**over):
    a = {"id": 1, "image_id": 1, "bbox": [4, 4, 30, 20], "category_id": 1, "iscrowd": 0,
         "segmentation": [[4, 4, 34, 4, 34, 24, 4, 24]]}
    a.update(over)
    return a


# (images override or None, annotations, skip reason shown on screen); the good image 2 keeps the file usable
SKIPPED = {
    "image id a dict": ([{"id": {"a": 1}, "file_name": "a.jpg", "width": 64, "height": 48}], "image entry malformed"),
    "image id a list": ([{"id": [1], "file_name": "a.jpg", "width": 64, "height": 48}], "image entry malformed"),
    "image id a string": ([{"id": "1", "file_name": "a.jpg", "width": 64, "height": 48}], "image entry malformed"),
    "image id true": ([{"id": True, "file_name": "a.jpg", "width": 64, "height": 48}], "image entry malformed"),
    "image id null": ([{"id": None, "file_name": "a.jpg", "width": 64, "height": 48}], "image entry malformed"),
    "image id a float": ([{"id": 1.5, "file_name": "a.jpg", "width": 64, "height": 48}], "image entry malformed"),
    "image id beyond int64": ([{"id": 2**70, "file_name": "a.jpg", "width": 64, "height": 48}], "image entry malformed"),
    "file_name a number": ([{"id": 1, "file_name": 7, "width": 64, "height": 48}], "image entry malformed"),
    "file_name null": ([{"id": 1, "file_name": None, "width": 64, "height": 48}], "image entry malformed"),
    "width a string": ([{"id": 1, "file_name": "a.jpg", "width": "64", "height": 48}], "image entry malformed"),
    "width NaN": ([{"id": 1, "file_name": "a.jpg", "width": float("nan"), "height": 48}], "image entry malformed"),
    "width Infinity": ([{"id": 1, "file_name": "a.jpg", "width": float("inf"), "height": 48}], "image entry malformed"),
    "width 1e300": ([{"id": 1, "file_name": "a.jpg", "width": 1e300, "height": 48}], "image entry malformed"),
    "width 10 million": ([{"id": 1, "file_name": "a.jpg", "width": 10**7, "height": 48}], "image with absurd size"),
    "height negative": ([{"id": 1, "file_name": "a.jpg", "width": 64, "height": -48}], "image with non-positive size"),
    "image entry a list": ([[1, "a.jpg", 64, 48]], "image entry malformed"),
    "image entry a string": (["a.jpg"], "image entry malformed"),
    "duplicate image id": ([{"id": 2, "file_name": "a.jpg", "width": 64, "height": 48}], "duplicate image id"),
}
ANN_SKIPPED = {
    "annotation a list": ([[1, 1, [0, 0, 1, 1]]], "annotation malformed"),
    "image_id a dict": ([_ann(image_id={"id": 1})], "annotation malformed"),
    "image_id a list": ([_ann(image_id=[1])], "annotation malformed"),
    "image_id a string": ([_ann(image_id="1")], "annotation malformed"),
    "image_id unknown": ([_ann(image_id=77)], "annotation for unknown image"),
    "category_id a string": ([_ann(category_id="1")], "annotation with non-integer category_id"),
    "category_id null": ([_ann(category_id=None)], "annotation with non-integer category_id"),
    "category_id a list": ([_ann(category_id=[1])], "annotation with non-integer category_id"),
    "category_id a float": ([_ann(category_id=1.5)], "annotation with non-integer category_id"),
    "category_id 2**80": ([_ann(category_id=2**80)], "annotation with category_id outside [0, 100000]"),
    "iscrowd a string": ([_ann(iscrowd="1")], "annotation with iscrowd not 0 or 1"),
    "iscrowd 2": ([_ann(iscrowd=2)], "annotation with iscrowd not 0 or 1"),
    "bbox strings": ([_ann(bbox=["4", "4", "30", "20"])], "annotation malformed"),
    "bbox null": ([_ann(bbox=None)], "annotation malformed"),
    "bbox three numbers": ([_ann(bbox=[1, 2, 3])], "annotation malformed"),
    "bbox nested": ([_ann(bbox=[[1, 2], [3, 4], 5, 6])], "annotation malformed"),
    "bbox booleans": ([_ann(bbox=[True, True, True, True])], "annotation malformed"),
    "bbox NaN": ([_ann(bbox=[float("nan"), 4, 30, 20])], "annotation malformed"),
    "bbox Infinity": ([_ann(bbox=[4, 4, float("inf"), 20])], "annotation malformed"),
    "bbox 1e400 (overflows to inf)": ([_ann(bbox=[4, 4, 30, 20])], None),  # replaced below by raw text
    "bbox negative size": ([_ann(bbox=[4, 4, -30, 20])], "box with zero or negative size"),
    "bbox far outside": ([_ann(bbox=[1e12, 1e12, 5, 5])], "box outside image"),
    "bbox huge int": ([_ann(bbox=[0, 0, 10**400, 20])], "annotation malformed"),
}
MASK_SKIPPED = {
    "polygon coordinates strings": (_ann(segmentation=[["4", "4", "34", "4", "34", "24"]]), "polygon with non-numeric coordinates"),
    "polygon coordinate null": (_ann(segmentation=[[4, 4, None, 4, 34, 24]]), "polygon with non-numeric coordinates"),
    "polygon coordinate NaN": (_ann(segmentation=[[4, 4, float("nan"), 4, 34, 24]]), "polygon with NaN or far-out coordinates"),
    "polygon coordinate Infinity": (_ann(segmentation=[[4, 4, float("inf"), 4, 34, 24]]), "polygon with NaN or far-out coordinates"),
    "polygon coordinate 1e12": (_ann(segmentation=[[4, 4, 1e12, 4, 34, 24]]), "polygon with NaN or far-out coordinates"),
    "polygon coordinate -1e12": (_ann(segmentation=[[4, 4, -1e12, 4, 34, 24]]), "polygon with NaN or far-out coordinates"),
    "polygon coordinate 1e308": (_ann(segmentation=[[4, 4, 1e308, 1e308, 34, 24]]), "polygon with NaN or far-out coordinates"),
    "polygon two points": (_ann(segmentation=[[4, 4, 34, 4]]), "polygon with fewer than 3 points"),
    "polygon odd length": (_ann(segmentation=[[4, 4, 34, 4, 34, 24, 9]]), "polygon with fewer than 3 points"),
    "polygon a dict of numbers": (_ann(segmentation=[{"x": 1}]), "polygon with fewer than 3 points"),
    "segmentation a number": (_ann(segmentation=5), "segmentation malformed"),
    "segmentation a string": (_ann(segmentation="poly"), "segmentation malformed"),
    "RLE counts garbage string": (_ann(iscrowd=1, segmentation={"size": [48, 64], "counts": "\x01\x02garbage~~"}), "RLE malformed"),
    "RLE counts non-ASCII": (_ann(iscrowd=1, segmentation={"size": [48, 64], "counts": "ééé"}), "RLE malformed"),
    "RLE counts truncated string": (_ann(iscrowd=1, segmentation={"size": [48, 64], "counts": "0" + "o"}), "RLE malformed"),
    "RLE counts negative list": (_ann(iscrowd=1, segmentation={"size": [48, 64], "counts": [-5, 3077]}), "RLE malformed"),
    "RLE counts wrong sum": (_ann(iscrowd=1, segmentation={"size": [48, 64], "counts": [10, 10]}), "RLE malformed"),
    "RLE counts huge": (_ann(iscrowd=1, segmentation={"size": [48, 64], "counts": [2**40, 5]}), "RLE malformed"),
    "RLE counts strings in a list": (_ann(iscrowd=1, segmentation={"size": [48, 64], "counts": ["3072"]}), "RLE malformed"),
    "RLE counts null": (_ann(iscrowd=1, segmentation={"size": [48, 64], "counts": None}), "RLE malformed"),
    "RLE size a string": (_ann(iscrowd=1, segmentation={"size": "48x64", "counts": [3072]}), "RLE malformed"),
    "RLE size wrong": (_ann(iscrowd=1, segmentation={"size": [4, 6], "counts": [24]}), "mask size mismatch"),
}


def _label(env, tmp_path, doc_or_text, *extra):
    ann = tmp_path / "ann.json"
    ann.write_text(doc_or_text if isinstance(doc_or_text, str) else json.dumps(doc_or_text))
    out = tmp_path / "l.parquet"
    code, stdout, err = run_cli("label", "--ann", ann, "--images", env["imgs"], "--input-size", "32", *extra,
                                "--out", out)
    return code, stdout, err, out


def _finite_labels(out: Path):
    from bavit_core import read_labels

    lab = read_labels(out)
    assert np.isfinite(lab.scores).all() and ((lab.scores >= 0) & (lab.scores <= 1)).all()
    return lab


@pytest.mark.parametrize("case", list(SKIPPED), ids=list(SKIPPED))
def test_class2_bad_image_entries_are_counted_and_skipped(env, tmp_path, case):
    bad, reason = SKIPPED[case]
    doc = _doc(images=bad + [{"id": 2, "file_name": "b.jpg", "width": 64, "height": 48}], annotations=[])
    code, stdout, err, out = _label(env, tmp_path, doc)
    assert code == 0, err
    assert f"skipped: {reason}" in stdout
    assert _finite_labels(out).image_ids.tolist() == [2]


@pytest.mark.parametrize("case", list(ANN_SKIPPED), ids=list(ANN_SKIPPED))
def test_class2_bad_annotations_are_counted_and_skipped(env, tmp_path, case):
    anns, reason = ANN_SKIPPED[case]
    text = json.dumps(_doc(annotations=anns + [_ann(image_id=2)]))
    if reason is None:  # a literal 1e400 in the file: Python's json reads it as inf
        text = text.replace("[4, 4, 30, 20]", "[4, 4, 1e400, 20]", 1)
        reason = "annotation malformed"
    code, stdout, err, out = _label(env, tmp_path, text)
    assert code == 0, err
    assert f"skipped: {reason}" in stdout
    lab = _finite_labels(out)
    assert lab.n_objects.tolist() == [0, 1]


@pytest.mark.parametrize("case", list(MASK_SKIPPED), ids=list(MASK_SKIPPED))
def test_class3_nothing_unchecked_reaches_pycocotools(env, tmp_path, case):
    ann, reason = MASK_SKIPPED[case]
    code, stdout, err, out = _label(env, tmp_path, _doc(annotations=[ann, _ann(image_id=2)]), "--source", "masks")
    assert code == 0, err
    assert reason in stdout
    _finite_labels(out)


def test_class3_a_valid_compressed_rle_is_still_read(env, tmp_path):
    from pycocotools import mask as mask_utils

    m = np.zeros((48, 64), np.uint8, order="F")
    m[:24, :32] = 1
    rle = mask_utils.encode(m)
    seg = {"size": [48, 64], "counts": rle["counts"].decode()}
    code, stdout, err, out = _label(env, tmp_path, _doc(annotations=[_ann(iscrowd=1, segmentation=seg)]), "--source", "masks")
    assert code == 0, err
    assert "RLE malformed" not in stdout
    assert _finite_labels(out).grids[0].astype(int).tolist() == [[1, 0], [0, 0]]


def test_class3_ground_truth_for_cocoeval_is_the_validated_set(env, tmp_path):
    """prune-eval and finetune evaluate against the loader's boxes: NaN and negative-size boxes
    that label skips never reach COCOeval."""
    from bavit_core.data import open_dataset
    from bavit_core.detection.cocoeval import coco_ground_truth

    text = json.dumps(_doc(annotations=[_ann(), _ann(id=2, bbox=[1, 1, -5, 5]), _ann(id=3, category_id="x"),
                                        _ann(id=4, image_id=2, bbox=[2, 2, 8, 8])]))
    text = text.replace("[4, 4, 30, 20]", "[NaN, 4, 30, 20]", 1)
    (tmp_path / "a.json").write_text(text)
    aset = open_dataset("coco", ann=tmp_path / "a.json", images=env["imgs"])
    gt = coco_ground_truth(aset, aset.image_ids)
    boxes = [a["bbox"] for a in gt.dataset["annotations"]]
    assert boxes == [[2.0, 2.0, 8.0, 8.0]]


# --------------------------------------------------------------------------- class 2: file-level JSON
FILE_ERRORS = {
    "empty file": ("", "malformed JSON"),
    "top level a list": ("[]", "not a COCO instances file"),
    "top level a number": ("3", "not a COCO instances file"),
    "no images list": ('{"annotations": []}', "no 'images' list"),
    "images a dict": ('{"images": {}, "annotations": []}', "no 'images' list"),
    "annotations null": ('{"images": [], "annotations": null}', "no 'annotations' list"),
    "truncated": ('{"images": [{"id": 1', "malformed JSON"),
    "binary": ("\udc80\udc81\udc82", "not UTF-8"),
    "every image bad": (json.dumps(_doc(images=[{"id": "x"}])), "no usable images"),
}


@pytest.mark.parametrize("case", list(FILE_ERRORS), ids=list(FILE_ERRORS))
def test_class2_unusable_annotation_files_are_one_clean_line(env, tmp_path, case):
    text, expect = FILE_ERRORS[case]
    ann = tmp_path / "ann.json"
    ann.write_bytes(text.encode("utf-8", "surrogateescape"))
    code, out, err = run_cli("label", "--ann", ann, "--images", env["imgs"], "--out", tmp_path / "l.parquet")
    assert_clean_error(code, out, err, expect)
    assert not (tmp_path / "l.parquet").exists()
    no_temp_files(tmp_path)


# --------------------------------------------------------------------------- class 4: output paths
def _file_in_the_way(t):
    (t / "f").write_text("x")
    return t / "f"


OUTPUT_PATHS = {
    "label --out an existing directory": (lambda e, t: ["label", "--ann", e["ann"], "--images", e["imgs"], "--out", t],
                                          "is a directory, expected a file path"),
    "label --out under a file": (lambda e, t: ["label", "--ann", e["ann"], "--images", e["imgs"], "--out",
                                               _file_in_the_way(t) / "l.parquet"], "cannot create output directory"),
    "predict --out an existing directory": (lambda e, t: ["predict", "--model", e["run"], "--labels", e["val"], "--out", t],
                                            "is a directory, expected a file path"),
    "predict --out under a file": (lambda e, t: ["predict", "--model", e["run"], "--labels", e["val"], "--out",
                                                 _file_in_the_way(t) / "p.parquet"], "cannot create output directory"),
    "postprocess --out an existing directory": (lambda e, t: ["postprocess", "--pred", e["preds"], "--out", t],
                                                "is a directory, expected a file path"),
    "postprocess --out under a file": (lambda e, t: ["postprocess", "--pred", e["preds"], "--out",
                                                     _file_in_the_way(t) / "r.parquet"], "cannot create output directory"),
    "train --out an existing file": (lambda e, t: ["train", "--labels", e["val"], "--out", _file_in_the_way(t)],
                                     "is a file, expected a run directory path"),
    "report --out an existing file": (lambda e, t: ["report", "--results", e["results"], "--out", _file_in_the_way(t)],
                                      "is a file, expected a directory path"),
    "report --out a folder of other files": (lambda e, t: ["report", "--results", e["results"], "--out",
                                                           _file_in_the_way(t).parent], "refusing to replace it"),
    "report --out under a file": (lambda e, t: ["report", "--results", e["results"], "--out",
                                                _file_in_the_way(t) / "rep"], "cannot create output directory"),
    "synth --out an existing file": (lambda e, t: ["synth", "--out", _file_in_the_way(t), "--num-images", "2"],
                                     "is a file, expected a directory path"),
    "synth --out a folder of other files": (lambda e, t: ["synth", "--out", _file_in_the_way(t).parent, "--num-images", "2"],
                                            "refusing to replace it"),
    "finetune --out an existing file": (lambda e, t: ["finetune", "--from-scratch", "--ann", e["ann"], "--images", e["imgs"],
                                                      "--out", _file_in_the_way(t)], "is a file, expected a run directory path"),
    "finetune --out an existing run": (lambda e, t: ["finetune", "--from-scratch", "--ann", e["ann"], "--images", e["imgs"],
                                                     "--out", _file_in_the_way(t).parent], "already holds files"),
    "train --out an existing run": (lambda e, t: ["train", "--labels", e["val"], "--out", e["run"]], "already holds files"),
}


@pytest.mark.parametrize("case", list(OUTPUT_PATHS), ids=list(OUTPUT_PATHS))
def test_class4_impossible_output_paths_are_one_clean_line(env, tmp_path, case):
    build, expect = OUTPUT_PATHS[case]
    args = build(env, tmp_path)
    before = _digest(tmp_path)
    run_before = _digest(env["run"])
    code, out, err = run_cli(*args)
    assert_clean_error(code, out, err, expect)
    assert _digest(tmp_path) == before
    assert _digest(env["run"]) == run_before
    no_temp_files(tmp_path, env["d"])


@pytest.mark.parametrize("errno_name", ["ENOSPC", "EROFS", "EACCES", "EDQUOT"])
def test_class4_disk_full_or_read_only_while_writing_is_clean_and_leaves_nothing(env, tmp_path, monkeypatch, errno_name):
    import errno

    import pyarrow.parquet as pq

    def full(table, where, **kw):
        Path(where).write_bytes(b"partial")
        raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)))

    monkeypatch.setattr(pq, "write_table", full)
    code, out, err = run_cli("label", "--ann", env["ann"], "--images", env["imgs"], "--out", tmp_path / "l.parquet")
    assert_clean_error(code, out, err, f"{tmp_path / 'l.parquet'}: cannot write (")
    assert list(tmp_path.iterdir()) == []


def test_class4_a_failed_report_leaves_no_partial_report_and_keeps_the_old_one(env, tmp_path, monkeypatch):
    import bavit_core.report.build as B

    rep = tmp_path / "rep"
    code, _, err = run_cli("report", "--model", env["run"], "--out", rep)
    assert code == 0, err
    before = _digest(rep)

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(B, "_write_index", boom)
    code, out, err = run_cli("report", "--model", env["run"], "--out", rep)
    assert_clean_error(code, out, err, "no space left on the device")
    assert _digest(rep) == before
    no_temp_files(tmp_path)


def test_class4_a_failed_synth_leaves_no_partial_dataset(tmp_path, monkeypatch):
    import bavit_core.data.synthetic as S

    real, n = S.generate_image, []

    def gen(*a, **k):
        n.append(1)
        if len(n) == 3:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(S, "generate_image", gen)
    code, out, err = run_cli("synth", "--out", tmp_path / "ds", "--num-images", "4", "--image-size", "32")
    assert_clean_error(code, out, err, "no space left on the device")
    assert list(tmp_path.iterdir()) == []


def test_class4_train_that_fails_before_its_first_epoch_leaves_no_run(env, tmp_path, monkeypatch):
    import bavit_core.bavit.train as T

    monkeypatch.setattr(T, "acc_loss", lambda logits, y, w: (logits * float("nan")).mean())
    code, out, err = run_cli("train", "--labels", env["val"], "--depth", "1", "--out", tmp_path / "run")
    assert_clean_error(code, out, err, "the loss became nan")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- class 5: our files, damaged
def _parquet_without(src: Path, dst: Path, column: str):
    import pyarrow.parquet as pq

    t = pq.read_table(src)
    pq.write_table(t.drop([column]).replace_schema_metadata(t.schema.metadata), dst)


def _parquet_meta(src: Path, dst: Path, meta: bytes | None):
    import pyarrow.parquet as pq

    t = pq.read_table(src)
    md = dict(t.schema.metadata or {})
    if meta is None:
        md.pop(b"bavit", None)
    else:
        md[b"bavit"] = meta
    pq.write_table(t.replace_schema_metadata(md), dst)


def _meta_edit(src: Path, dst: Path, **over):
    import pyarrow.parquet as pq

    t = pq.read_table(src)
    md = json.loads(t.schema.metadata[b"bavit"])
    md.update(over)
    _parquet_meta(src, dst, json.dumps(md).encode())


LABEL_COLUMNS = ["image_id", "file_name", "width", "height", "fg", "scores", "n_objects"]
PRED_COLUMNS = ["image_id", "file_name", "width", "height", "probs", "fg"]


def _damaged_labels(e, t, how):
    p = t / "bad.parquet"
    if how.startswith("no column "):
        _parquet_without(e["val"], p, how[len("no column "):])
    elif how == "no metadata":
        _parquet_meta(e["val"], p, None)
    elif how == "metadata not JSON":
        _parquet_meta(e["val"], p, b"{not json")
    elif how == "metadata a list":
        _parquet_meta(e["val"], p, b"[1, 2]")
    elif how == "grid_shape missing":
        _meta_edit(e["val"], p, grid_shape=None)
    elif how == "grid_shape strings":
        _meta_edit(e["val"], p, grid_shape=["2", "2"])
    elif how == "grid_shape wrong":
        _meta_edit(e["val"], p, grid_shape=[3, 5])
    elif how == "format other":
        _meta_edit(e["val"], p, format="something/1")
    elif how == "random bytes":
        p.write_bytes(os.urandom(300))
    elif how == "empty":
        p.write_bytes(b"")
    elif how == "truncated":
        p.write_bytes(e["val"].read_bytes()[:-200])
    return p


LABEL_DAMAGE = [f"no column {c}" for c in LABEL_COLUMNS] + [
    "no metadata", "metadata not JSON", "metadata a list", "grid_shape missing", "grid_shape strings", "grid_shape wrong",
    "format other", "random bytes", "empty", "truncated"]
LABEL_DAMAGE_MSG = {"no metadata": "no bavit metadata", "metadata not JSON": "not a JSON object",
                    "metadata a list": "not a JSON object", "grid_shape missing": "grid_shape",
                    "grid_shape strings": "grid_shape", "grid_shape wrong": "damaged labels file",
                    "format other": "not a labels file", "random bytes": "not a readable parquet file",
                    "empty": "not a readable parquet file", "truncated": "not a readable parquet file"}


@pytest.mark.parametrize("how", LABEL_DAMAGE)
def test_class5_damaged_labels_file_is_one_clean_line(env, tmp_path, how):
    bad = _damaged_labels(env, tmp_path, how)
    code, out, err = run_cli("train", "--labels", bad, "--depth", "1", "--out", tmp_path / "run")
    assert_clean_error(code, out, err, LABEL_DAMAGE_MSG.get(how, "missing"))
    assert not (tmp_path / "run").exists()


def _damaged_preds(e, t, how):
    p = t / "bad.parquet"
    if how.startswith("no column "):
        _parquet_without(e["preds"], p, how[len("no column "):])
    elif how == "no metadata":
        _parquet_meta(e["preds"], p, None)
    elif how == "grid_shape wrong":
        _meta_edit(e["preds"], p, grid_shape=[7, 7])
    elif how == "grid_shape negative":
        _meta_edit(e["preds"], p, grid_shape=[-1, 4])
    elif how == "format other":
        _meta_edit(e["preds"], p, format="bavit-labels/1")
    elif how == "a labels file":
        shutil.copy(e["val"], p)
    return p


PRED_DAMAGE = [f"no column {c}" for c in PRED_COLUMNS] + ["no metadata", "grid_shape wrong", "grid_shape negative",
                                                          "format other", "a labels file"]
PRED_DAMAGE_MSG = {"no metadata": "no bavit metadata", "grid_shape wrong": "damaged predictions file",
                   "grid_shape negative": "grid_shape", "format other": "not a predictions file",
                   "a labels file": "not a predictions file"}


@pytest.mark.parametrize("how", PRED_DAMAGE)
def test_class5_damaged_predictions_file_is_one_clean_line(env, tmp_path, how):
    bad = _damaged_preds(env, tmp_path, how)
    code, out, err = run_cli("postprocess", "--pred", bad, "--out", tmp_path / "r.parquet")
    assert_clean_error(code, out, err, PRED_DAMAGE_MSG.get(how, "missing"))
    assert not (tmp_path / "r.parquet").exists()


def _damaged_run(e, t, how):
    r = t / "run"
    shutil.copytree(e["run"], r)
    if how == "config.json garbage":
        (r / "config.json").write_text("{garbage")
    elif how == "config.json without model":
        (r / "config.json").write_text('{"train": {}}')
    elif how == "config.json missing":
        (r / "config.json").unlink()
    elif how == "weights truncated":
        (r / "model.safetensors").write_bytes((r / "model.safetensors").read_bytes()[:500])
    elif how == "weights missing":
        (r / "model.safetensors").unlink()
    elif how == "weights are a pickle":
        import pickle

        (r / "model.safetensors").write_bytes(pickle.dumps({"a": 1}))
    elif how == "weights of another shape":
        from safetensors.torch import save_file
        import torch

        save_file({"x": torch.zeros(3)}, str(r / "model.safetensors"))
    return r


RUN_DAMAGE = {"config.json garbage": "unreadable run config", "config.json without model": "unreadable run config",
              "config.json missing": "config.json missing", "weights truncated": "cannot read weights",
              "weights missing": "model weights not found", "weights are a pickle": "cannot read weights",
              "weights of another shape": "weights do not match the config"}


@pytest.mark.parametrize("how", list(RUN_DAMAGE))
def test_class5_damaged_run_directory_is_one_clean_line(env, tmp_path, how):
    r = _damaged_run(env, tmp_path, how)
    code, out, err = run_cli("predict", "--model", r, "--labels", env["val"], "--out", tmp_path / "p.parquet")
    assert_clean_error(code, out, err, RUN_DAMAGE[how])
    assert not (tmp_path / "p.parquet").exists()


STATE_DAMAGE = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:300]),
    "empty": lambda p: p.write_bytes(b""),
    "a pickle with code": lambda p: p.write_bytes(
        b"\x80\x04\x95\x1d\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94\x8c\x04true\x94\x85\x94R\x94."),
    "a plain dict": lambda p: __import__("torch").save({"epoch": 0}, p),
    "config.json garbage": lambda p: (p.parent / "config.json").write_text("nope"),
}


@pytest.mark.parametrize("how", list(STATE_DAMAGE))
def test_class5_damaged_training_state_refuses_resume_cleanly(env, tmp_path, how):
    r = tmp_path / "run"
    shutil.copytree(env["run"], r)
    STATE_DAMAGE[how](r / "state.pt")
    code, out, err = run_cli("train", "--resume", "--out", r, "--epochs", "2")
    expect = "unreadable run config" if "config" in how else ("unreadable training state" if how != "a plain dict"
                                                                 else "training state without")
    assert_clean_error(code, out, err, expect)


def _results_csv(drop=(), row=None, extra=""):
    """A results.csv as prune-eval writes it (one dense row), less the columns ``drop``,
    with ``row``'s values instead of the dense row's, ``extra`` appended to its line."""
    from bavit_core.evaluate.results import CSV_COLUMNS, TEXT_COLUMNS

    vals = {c: ("dense" if c == "selector" else "drop" if c == "treatment" else "cpu" if c == "device"
                else "float32" if c == "dtype" else "threshold" if c == "policy" else "False" if c == "timing_noisy"
                else "0.5") for c in CSV_COLUMNS}
    assert set(TEXT_COLUMNS) <= set(vals)
    vals.update(row or {})
    cols = [c for c in CSV_COLUMNS if c not in drop]
    return ",".join(cols) + "\n" + ",".join(vals[c] for c in cols) + extra + "\n"


REPORT_DAMAGE = {
    "results.csv without columns": (lambda e, t: _results(t, "a,b\n1,2\n"), "results.csv without column(s)"),
    "results.csv without one column": (lambda e, t: _results(t, _results_csv(drop=["bavit_tokens"])),
                                       "results.csv without column(s) bavit_tokens"),
    "results.csv text in a number column": (lambda e, t: _results(t, _results_csv(row={"map": "high"})),
                                            "line 2: map is 'high', not a number"),
    "results.csv text as the target": (lambda e, t: _results(t, _results_csv(row={"target": "abc"})),
                                       "line 2: target is 'abc', not a number"),
    "results.csv a row longer than its header": (lambda e, t: _results(t, _results_csv(extra=",7")),
                                                 "line 2 has more fields than the header"),
    "finetuned results.csv without columns": (lambda e, t: ["--results", e["results"], "--finetuned-results",
                                                            _results(t, "a,b\n1,2\n")[1]], "results.csv without"),
    "results.csv empty": (lambda e, t: _results(t, ""), "results.csv"),
    "results.csv binary": (lambda e, t: _results(t, "\x00\x01\x02"), "results.csv"),
    "meta.json unreadable": (lambda e, t: _results(t, _results_csv(), meta="{x"), "meta.json"),
    "metrics.jsonl unreadable": (lambda e, t: _run_metrics(e, t, "{not json\n"), "metrics.jsonl"),
    "metrics.jsonl rows not objects": (lambda e, t: _run_metrics(e, t, "[1]\n"), "metrics.jsonl"),
    "a detector run as --model": (lambda e, t: _detector_run(t), "not a BAViT run from bavit train"),
}


def _results(t, csv_text, meta=None):
    r = t / "res"
    r.mkdir()
    (r / "results.csv").write_text(csv_text)
    if meta is not None:
        (r / "meta.json").write_text(meta)
    return ["--results", r]


def _run_metrics(e, t, text):
    r = t / "run"
    shutil.copytree(e["run"], r)
    (r / "metrics.jsonl").write_text(text)
    return ["--model", r]


REPORT_TOLERATED = {
    "an empty number cell": lambda: _results_csv(row={"map": "", "speedup": "", "target": ""}),
    "a short row": lambda: _results_csv().rstrip("\n").rsplit(",", 6)[0] + "\n",
    "a byte-order mark": lambda: "\ufeff" + _results_csv(),
    "a column prune-eval does not write": lambda: _results_csv().replace("\n", ",note\n", 1).rstrip("\n") + ",hi\n",
}


@pytest.mark.parametrize("how", list(REPORT_TOLERATED))
def test_class5_results_csv_a_user_may_have_touched_still_reports(env, tmp_path, how):
    """Empty cells are NaN (a traceback before), a BOM is not part of the first column's
    name, and extra columns are left alone."""
    code, out, err = run_cli("report", *_results(tmp_path, REPORT_TOLERATED[how]()), "--out", tmp_path / "rep")
    assert code == 0, err
    assert (tmp_path / "rep" / "index.html").is_file() and (tmp_path / "rep" / "table2.csv").is_file()


def test_class5_results_csv_errors_name_the_file_line(env, tmp_path):
    """The line counts blank lines, which the CSV reader skips."""
    text = _results_csv()
    head, row = text.splitlines()
    code, out, err = run_cli("report", *_results(tmp_path, f"{head}\n\n{row}\n{row.replace('0.5', 'x', 1)}\n"),
                             "--out", tmp_path / "rep")
    assert_clean_error(code, out, err, "line 4: threshold is 'x', not a number")


def _detector_run(t):
    """What bavit finetune leaves: an HF config and loss/mAP metrics (a KeyError traceback before)."""
    r = t / "yolos-f"
    r.mkdir()
    (r / "config.json").write_text(json.dumps({"model_type": "yolos", "hidden_size": 192}))
    (r / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "train_loss": 1.5, "val_map": 0.1}) + "\n")
    return ["--model", r]


@pytest.mark.parametrize("how", list(REPORT_DAMAGE))
def test_class5_damaged_report_inputs_are_one_clean_line(env, tmp_path, how):
    build, expect = REPORT_DAMAGE[how]
    code, out, err = run_cli("report", *build(env, tmp_path), "--out", tmp_path / "rep")
    assert_clean_error(code, out, err, expect)
    assert not (tmp_path / "rep").exists()
    no_temp_files(tmp_path)


# --------------------------------------------------------------------------- class 6: images
def _image_folder(t, kind):
    from PIL import Image

    d = t / "imgs"
    d.mkdir()
    if kind == "decompression bomb":
        png_bomb(d / "x.png")
    elif kind == "text named .jpg":
        (d / "x.jpg").write_text("hello")
    elif kind == "zero bytes":
        (d / "x.png").write_bytes(b"")
    elif kind == "truncated JPEG":
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(d / "y.jpg")
        (d / "x.jpg").write_bytes((d / "y.jpg").read_bytes()[:100])
        (d / "y.jpg").unlink()
    elif kind == "bomb-sized header in a JPEG name":
        png_bomb(d / "x.jpg", 100000, 100000)
    return d


IMAGE_CASES = {"decompression bomb": "image too large to decode safely", "text named .jpg": "unreadable image",
               "zero bytes": "unreadable image", "truncated JPEG": "unreadable image",
               "bomb-sized header in a JPEG name": "image too large to decode safely"}


@pytest.mark.parametrize("kind", list(IMAGE_CASES))
def test_class6_bad_images_are_one_clean_line(env, tmp_path, kind):
    d = _image_folder(tmp_path, kind)
    code, out, err = run_cli("predict", "--model", env["run"], "--images", d, "--out", tmp_path / "p.parquet")
    assert_clean_error(code, out, err, IMAGE_CASES[kind])
    assert not (tmp_path / "p.parquet").exists()


@pytest.mark.parametrize("mode,value,expect", [
    ("I;16", 104 * 257, 104), ("I;16", 65535, 255), ("I;16", 0, 0), ("I", 200 * 257, 200), ("L", 77, 77),
    ("LA", 90, 90), ("RGBA", 33, 33), ("1", 1, 255), ("F", 12.4, 12), ("P", 3, 3)])
def test_class6_every_png_mode_decodes_to_the_right_grey(tmp_path, mode, value, expect):
    """A 16-bit grey PNG of mean 104 decodes to 104, not 255 (PIL's convert clips it)."""
    from PIL import Image

    from bavit_core.data.images import load_image

    p = tmp_path / "x.png"
    if mode == "I;16":
        Image.fromarray(np.full((8, 10), value, np.uint16)).save(p)
        assert Image.open(p).mode.startswith("I")
    elif mode == "I":
        p = tmp_path / "x.tiff"
        Image.fromarray(np.full((8, 10), value, np.int32)).save(p)
    elif mode == "F":
        Image.fromarray(np.full((8, 10), value, np.float32), "F").save(tmp_path / "x.tiff")
        p = tmp_path / "x.tiff"
    elif mode == "LA":
        Image.fromarray(np.stack([np.full((8, 10), value, np.uint8), np.full((8, 10), 255, np.uint8)], -1), "LA").save(p)
    elif mode == "RGBA":
        Image.fromarray(np.full((8, 10, 4), value, np.uint8), "RGBA").save(p)
    elif mode == "1":
        Image.fromarray(np.ones((8, 10), bool)).save(p)
    elif mode == "P":
        im = Image.fromarray(np.zeros((8, 10), np.uint8), "P")
        im.putpalette([value, value, value] * 256)
        im.save(p)
    else:
        Image.fromarray(np.full((8, 10), value, np.uint8), mode).save(p)
    a = load_image(p)
    assert a.shape == (8, 10, 3) and a.dtype == np.uint8
    assert int(round(a.mean())) == expect


# --------------------------------------------------------------------------- class 7: options
def _label_opts(*o):
    return lambda e, t: ["label", "--ann", e["ann"], "--images", e["imgs"], *o, "--out", t / "out.parquet"]


def _train_opts(*o):
    return lambda e, t: ["train", "--labels", e["val"], "--depth", "1", *o, "--out", t / "out"]


def _predict_opts(*o):
    return lambda e, t: ["predict", "--model", e["run"], "--labels", e["val"], *o, "--out", t / "out.parquet"]


def _post_opts(*o):
    return lambda e, t: ["postprocess", "--pred", e["preds"], *o, "--out", t / "out.parquet"]


def _ft_opts(*o):
    return lambda e, t: ["finetune", "--from-scratch", "--ann", e["ann"], "--images", e["imgs"], *o, "--out", t / "out"]


def _synth_opts(*o):
    return lambda e, t: ["synth", *o, "--out", t / "out"]


def _pe_opts(*o):
    return lambda e, t: ["prune-eval", "--detector", str(t / "no-detector"), "--ann", e["ann"], "--images", e["imgs"],
                         *o, "--out", t / "out"]


def _report_opts(*o):
    return lambda e, t: ["report", "--model", e["run"], *o, "--out", t / "out"]


OPTIONS = {
    "label --tau nan": (_label_opts("--tau", "nan"), "--tau must be in [0, 1]"),
    "label --tau -1": (_label_opts("--tau", "-1"), "--tau must be in [0, 1]"),
    "label --tau 2": (_label_opts("--tau", "2"), "--tau must be in [0, 1]"),
    "label --mask-threshold 1": (_label_opts("--mask-threshold", "1"), "--mask-threshold must be in [0, 1)"),
    "label --mask-threshold nan": (_label_opts("--mask-threshold", "nan"), "--mask-threshold must be in [0, 1)"),
    "label --source polygons": (_label_opts("--source", "polygons"), "unknown --source"),
    "label --criterion iou": (_label_opts("--criterion", "iou"), "unknown --criterion"),
    "label --crowd maybe": (_label_opts("--crowd", "maybe"), "--crowd must be include or exclude"),
    "label --difficult x": (_label_opts("--difficult", "x"), "--difficult must be include or exclude"),
    "label --void purple (COCO)": (_label_opts("--void", "purple"), "unknown --void 'purple'"),
    "label --voc-mask x": (_label_opts("--voc-mask", "x"), "unknown --voc-mask"),
    "label --workers -3": (_label_opts("--workers", "-3"), "--workers must be >= 0 (0 = automatic), got -3"),
    "label --input-size 0": (_label_opts("--input-size", "0"), "must be positive"),
    "label --input-size -32": (_label_opts("--input-size", "-32"), "must be positive"),
    "label --input-size abc": (_label_opts("--input-size", "abc"), "cannot read size"),
    "label --input-size 33": (_label_opts("--input-size", "33"), "not divisible by patch size"),
    "label --input-size 99999": (_label_opts("--input-size", "99999"), "at most 16384"),
    "label --patch-size 0": (_label_opts("--patch-size", "0"), "must be positive"),
    "label --dataset kitti": (_label_opts("--dataset", "kitti"), "unknown dataset 'kitti'"),
    "label --dataset voc with --ann": (_label_opts("--dataset", "voc"), "VOC needs --root"),
    "train --batch-size 0": (_train_opts("--batch-size", "0"), "--batch-size must be at least 1"),
    "train --batch-size -1": (_train_opts("--batch-size", "-1"), "--batch-size must be at least 1"),
    "train --epochs 0": (_train_opts("--epochs", "0"), "--epochs must be at least 1"),
    "train --epochs -2": (_train_opts("--epochs", "-2"), "--epochs must be at least 1"),
    "train --lr 0": (_train_opts("--lr", "0"), "--lr must be a positive number"),
    "train --lr nan": (_train_opts("--lr", "nan"), "--lr must be a positive number"),
    "train --lr inf": (_train_opts("--lr", "inf"), "--lr must be a positive number"),
    "train --gamma -1": (_train_opts("--gamma", "-1"), "--gamma must be a positive number"),
    "train --gamma 0": (_train_opts("--gamma", "0"), "--gamma must be a positive number"),
    "train --step-size 0": (_train_opts("--step-size", "0"), "--step-size must be at least 1"),
    "train --val-fraction 1": (_train_opts("--val-fraction", "1"), "--val-fraction must be in [0, 1)"),
    "train --val-fraction -0.1": (_train_opts("--val-fraction", "-0.1"), "--val-fraction must be in [0, 1)"),
    "train --fg-weight 0": (_train_opts("--fg-weight", "0"), "--fg-weight must be a positive number"),
    "train --fg-weight nan": (_train_opts("--fg-weight", "nan"), "--fg-weight must be a positive number"),
    "train --clip-grad -1": (_train_opts("--clip-grad", "-1"), "--clip-grad must be >= 0"),
    "train --weight-decay -1": (_train_opts("--weight-decay", "-1"), "--weight-decay must be >= 0"),
    "train --label-threshold 2": (_train_opts("--label-threshold", "2"), "--label-threshold must be in [0, 1]"),
    "train --depth 0": (_train_opts("--depth", "0"), "--depth must be in [1, 64]"),
    "train --workers -3": (_train_opts("--workers", "-3"), "--workers must be >= 0"),
    "train --device tpu": (_train_opts("--device", "tpu"), "unknown --device 'tpu'"),
    "train --device gpu0": (_train_opts("--device", "gpu0"), "unknown --device 'gpu0'"),
    "train --device npu": (_train_opts("--device", "npu"), "unknown --device 'npu'"),
    "train --device cuda:x": (_train_opts("--device", "cuda:x"), "unknown --device 'cuda:x'"),
    "train --resume --overwrite": (_train_opts("--resume", "--overwrite"), "contradict each other"),
    "train --pretrained unknown name": (_train_opts("--pretrained", "no_such_vit_at_all"), "unknown timm model"),
    "train --pretrained missing file": (_train_opts("--pretrained", "/nonexistent/w.safetensors"), "pretrained weights file not found"),
    "predict --batch-size 0": (_predict_opts("--batch-size", "0"), "--batch-size must be at least 1"),
    "predict --threshold 2": (_predict_opts("--threshold", "2"), "--threshold must be in [0, 1]"),
    "predict --threshold nan": (_predict_opts("--threshold", "nan"), "--threshold must be in [0, 1]"),
    "predict --device tpu": (_predict_opts("--device", "tpu"), "unknown --device 'tpu'"),
    "predict --device gpu0": (_predict_opts("--device", "gpu0"), "unknown --device 'gpu0'"),
    "postprocess --postprocess-steps -2": (_post_opts("--postprocess-steps", "-2"), "--postprocess-steps must be >= 0"),
    "postprocess --min-fg -1": (_post_opts("--min-fg", "-1"), "--min-fg must be in [0, 7]"),
    "postprocess --min-fg 9": (_post_opts("--min-fg", "9"), "--min-fg must be in [0, 7]"),
    "postprocess --kernel 4 --min-fg 4": (_post_opts("--kernel", "4", "--min-fg", "4"), "--min-fg must be in [0, 3]"),
    "postprocess --kernel 6": (_post_opts("--kernel", "6"), "unknown --kernel '6'"),
    "finetune --warmup-epochs -5": (_ft_opts("--warmup-epochs", "-5"), "--warmup-epochs must be >= 0"),
    "finetune --max-images 0": (_ft_opts("--max-images", "0"), "--max-images must be at least 1"),
    "finetune --max-images -1": (_ft_opts("--max-images", "-1"), "--max-images must be at least 1"),
    "finetune --detector-size 0": (_ft_opts("--detector-size", "0"), "must be positive"),
    "finetune --device tpu": (_ft_opts("--device", "tpu"), "unknown --device 'tpu'"),
    "finetune --batch-size 0": (_ft_opts("--batch-size", "0"), "must be positive"),
    "finetune --epochs -1": (_ft_opts("--epochs", "-1"), "must be positive"),
    "finetune --lr nan": (_ft_opts("--lr", "nan"), "must be positive"),
    "finetune --val-fraction 1": (_ft_opts("--val-fraction", "1"), "--val-fraction must be in [0, 1)"),
    "finetune --clip-grad -1": (_ft_opts("--clip-grad", "-1"), "--clip-grad must be >= 0"),
    "finetune --det-tokens 0": (_ft_opts("--det-tokens", "0"), "--det-tokens must be at least 1"),
    "finetune --detector-config huge": (_ft_opts("--detector-config", "huge"), "unknown --detector-config"),
    "finetune --dense-aux -1": (_ft_opts("--dense-aux", "-1"), "--dense-aux must be >= 0"),
    "finetune --selector magic": (_ft_opts("--selector", "magic"), "unknown --selector"),
    "finetune --schedule linear": (_ft_opts("--schedule", "linear"), "--schedule must be cosine or step"),
    "finetune --dataset kitti": (_ft_opts("--dataset", "kitti"), "unknown --dataset"),
    "finetune --resume --overwrite": (_ft_opts("--resume", "--overwrite"), "contradict each other"),
    "synth --num-images 0": (_synth_opts("--num-images", "0"), "--num-images must be at least 1"),
    "synth --image-size 0": (_synth_opts("--image-size", "0"), "must be positive"),
    "synth --image-size 16": (_synth_opts("--image-size", "16"), "too small"),
    "synth --format yolo": (_synth_opts("--format", "yolo"), "unknown format"),
    "synth --val-fraction 1": (_synth_opts("--val-fraction", "1"), "--val-fraction must be in [0, 1)"),
    "synth --scenes busy": (_synth_opts("--scenes", "busy"), "unknown --scenes"),
    "report --examples 0": (_report_opts("--examples", "0"), "--examples must be at least 1"),
    "report --examples -3": (_report_opts("--examples", "-3"), "--examples must be at least 1"),
    "report nothing to report": (lambda e, t: ["report", "--out", t / "out"], "nothing to report"),
    "prune-eval --device tpu": (_pe_opts("--device", "tpu"), "unknown --device 'tpu'"),
    "prune-eval --device npu": (_pe_opts("--device", "npu"), "unknown --device 'npu'"),
    "prune-eval --batch-size 0": (_pe_opts("--batch-size", "0"), "--batch-size must be at least 1"),
    "prune-eval --max-images 0": (_pe_opts("--max-images", "0"), "--max-images must be at least 1"),
    "prune-eval --max-images -1": (_pe_opts("--max-images", "-1"), "--max-images must be at least 1"),
    "prune-eval --resample bogus": (_pe_opts("--resample", "bogus"), "unknown --resample 'bogus'"),
    "prune-eval --layout diagonal": (_pe_opts("--layout", "diagonal"), "unknown --layout 'diagonal'"),
    "prune-eval --timing-repeats 0": (_pe_opts("--timing-repeats", "0"), "--timing-repeats must be at least 1"),
    "prune-eval --timing-images -1": (_pe_opts("--timing-images", "-1"), "--timing-images must be at least 0"),
    "prune-eval --postprocess-steps -1": (_pe_opts("--postprocess-steps", "-1"), "--postprocess-steps must be at least 0"),
    "prune-eval --detector-size 0": (_pe_opts("--detector-size", "0"), "must be positive"),
    "prune-eval --thresholds 2": (_pe_opts("--thresholds", "2"), "--thresholds must lie in [0, 1]"),
    "demo --device tpu": (lambda e, t: ["demo", "--device", "tpu", "--out", t / "out"], "unknown --device 'tpu'"),
    "demo --device gpu0": (lambda e, t: ["demo", "--device", "gpu0", "--out", t / "out"], "unknown --device 'gpu0'"),
}


@pytest.mark.parametrize("case", list(OPTIONS), ids=list(OPTIONS))
def test_class7_bad_options_fail_before_any_work(env, tmp_path, case):
    build, expect = OPTIONS[case]
    code, out, err = run_cli(*build(env, tmp_path))
    assert_clean_error(code, out, err, expect)
    assert list(tmp_path.iterdir()) == [], "a refused option must write nothing"


# --------------------------------------------------------------------------- class 8: interruptions
def test_class8_sigterm_cleans_up_like_ctrl_c(env, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    real = pq.write_table

    def write_then_term(table, where, **kw):
        real(table, where, **kw)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(pq, "write_table", write_then_term)
    out = tmp_path / "l.parquet"
    code, _, err = run_cli("label", "--ann", env["ann"], "--images", env["imgs"], "--out", out)
    assert code == 143
    assert err.strip() == "Terminated; no output was left half-written."
    assert list(tmp_path.iterdir()) == []


def test_class8_a_killed_runs_temp_files_are_removed_by_the_next_run(env, tmp_path):
    dead = 2**22 + 12345  # above any pid_max default: never a live process
    for name in (f".l.parquet.{dead}.abc.tmp", f".l.parquet.{os.getpid()}.live.tmp"):
        (tmp_path / name).write_bytes(b"x" * 1000)
    code, _, err = run_cli("label", "--ann", env["ann"], "--images", env["imgs"], "--out", tmp_path / "l.parquet")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".l.parquet.{os.getpid()}.live.tmp", "l.parquet"])


def test_class8_ctrl_c_in_predict_leaves_nothing_and_says_so(env, tmp_path, monkeypatch):
    import bavit_core.bavit.predict as P

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(P, "infer_probs", interrupt)
    code, _, err = run_cli("predict", "--model", env["run"], "--labels", env["val"], "--out", tmp_path / "p.parquet")
    assert code == 130 and err.strip() == "Interrupted; no output was left half-written."
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- class 10: security and sharing
def test_class10_report_escapes_folder_names_in_html_attributes(env, tmp_path):
    evil = tmp_path / "x' onerror='alert(1)"
    shutil.copytree(env["run"], evil)
    code, _, err = run_cli("report", "--model", evil, "--out", tmp_path / "rep")
    assert code == 0, err
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "onerror='alert" not in page
    assert "x&#x27; onerror=&#x27;alert(1)" in page


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_class10_outputs_respect_the_umask(env, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        code, _, err = run_cli("label", "--ann", env["ann"], "--images", env["imgs"], "--out", tmp_path / "l.parquet")
        code2, _, err2 = run_cli("report", "--model", env["run"], "--out", tmp_path / "rep")
    finally:
        os.umask(old)
    assert code == 0 and code2 == 0, err + err2
    assert stat.S_IMODE((tmp_path / "l.parquet").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "rep" / "index.html").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "rep").stat().st_mode) == mode | ((mode & 0o444) >> 2)


def test_class10_torch_floor_is_past_the_weights_only_bypass():
    """CVE-2025-32434: torch.load(weights_only=True) can be bypassed up to 2.5.1. The torch
    requirement, parsed as pip reads it, refuses every release up to 2.5.1 and accepts the
    first fixed one and the torch installed here."""
    import tomllib

    import torch
    from packaging.requirements import Requirement
    from packaging.version import Version

    deps = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    spec = next(r.specifier for r in deps if r.name == "torch")
    for bad in ("2.5.1", "2.5.0", "2.4.1", "1.13.1", "2.5.1+cpu"):
        assert not spec.contains(bad, prereleases=True), bad
    assert spec.contains("2.6.0") and spec.contains(Version(torch.__version__).base_version)


# --------------------------------------------------------------------------- class 11: noise
def test_class11_warnings_never_come_before_the_error_line(env, tmp_path, monkeypatch):
    import warnings

    import bavit_core.data.coco as C

    real = C.load_coco

    def noisy(*a, **k):
        warnings.warn("some library chatter", UserWarning)
        np.float32(1e38) * np.float32(1e38)  # numpy overflow warning
        return real(*a, **k)

    monkeypatch.setattr(C, "load_coco", noisy)
    import bavit_core.data as D

    monkeypatch.setattr(D, "load_coco", noisy)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(_doc(images=[{"id": "x"}])))
    code, out, err = run_cli("label", "--ann", ann, "--images", env["imgs"], "--out", tmp_path / "l.parquet")
    assert_clean_error(code, out, err, "no usable images")


def test_class11_help_label_postprocess_report_do_not_import_torch(env, tmp_path):
    """Commands that need no model load no torch (3-4 s of a 2-core machine's start-up):
    catches a module-level torch import creeping into their path."""
    code = ("import sys; from typer.testing import CliRunner; from bavit_cli.main import app; "
            "r = CliRunner().invoke(app, sys.argv[1:]); assert r.exit_code == 0, (r.output, repr(r.exception)); "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    envv = dict(os.environ, PYTHONPATH=str(ROOT))
    for args in (["--help"], ["label", "--ann", str(env["ann"]), "--images", str(env["imgs"]),
                              "--out", str(tmp_path / "l.parquet")],
                 ["postprocess", "--pred", str(env["preds"]), "--out", str(tmp_path / "r.parquet")],
                 ["report", "--results", str(env["results"]), "--model", str(env["run"]),
                  "--pred", str(env["preds"]), "--out", str(tmp_path / "rep")]):
        r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=envv, timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["False", "False"], args


# --------------------------------------------------------------------------- round two (#21)
@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A directory nothing can be written to. Mode bits do not stop root (CI runs as root),
    so there the kernel's answer is stood in for: ``access(W_OK)`` says no for it, as on a
    read-only mount. The directory really is writable then, so a command that does not
    check before working writes into it and the test sees that."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    real = os.access

    def access(path, mode, **kw):
        if mode & os.W_OK and Path(path).resolve() == d.resolve():
            return False
        return real(path, mode, **kw)

    monkeypatch.setattr(os, "access", access)
    yield d


READ_ONLY = {
    "synth": lambda e, o: ["synth", "--num-images", "2", "--image-size", "32", "--out", o],
    "label": lambda e, o: ["label", "--ann", e["ann"], "--images", e["imgs"], "--out", o],
    "train": lambda e, o: ["train", "--labels", e["val"], "--depth", "1", "--epochs", "1", "--out", o],
    "predict": lambda e, o: ["predict", "--model", e["run"], "--labels", e["val"], "--out", o],
    "postprocess": lambda e, o: ["postprocess", "--pred", e["preds"], "--out", o],
    "prune-eval": lambda e, o: ["prune-eval", "--detector", e["d"] / "no-detector", "--ann", e["ann"], "--images",
                                e["imgs"], "--out", o],
    "finetune": lambda e, o: ["finetune", "--from-scratch", "--ann", e["ann"], "--images", e["imgs"], "--epochs", "1",
                              "--out", o],
    "report": lambda e, o: ["report", "--model", e["run"], "--out", o],
    "demo": lambda e, o: ["demo", "--quick", "--out", o],
}


@pytest.mark.parametrize("cmd", list(READ_ONLY))
def test_round2_a_read_only_output_folder_is_refused_before_any_work(env, read_only, cmd):
    """train used to train every epoch and then die in a traceback at its first save."""
    out = read_only / "out"
    code, stdout, err = run_cli(*READ_ONLY[cmd](env, out))
    assert_clean_error(code, stdout, err, f"Error: {out}: cannot write the output here (permission denied)")
    assert list(read_only.iterdir()) == []


def test_round2_a_read_only_folder_deeper_up_is_named(env, read_only):
    out = read_only / "a" / "b" / "run"
    code, stdout, err = run_cli("train", "--labels", env["val"], "--depth", "1", "--out", out)
    assert_clean_error(code, stdout, err, f"cannot write the output here (permission denied in {read_only})")
    assert list(read_only.iterdir()) == []


NO_DEVICE = {
    "train": lambda e, t, d: ["train", "--labels", e["val"], "--depth", "1", "--device", d, "--out", t / "out"],
    "predict": lambda e, t, d: ["predict", "--model", e["run"], "--labels", e["val"], "--device", d, "--out", t / "p.parquet"],
    "finetune": lambda e, t, d: ["finetune", "--from-scratch", "--ann", e["ann"], "--images", e["imgs"], "--device", d,
                                 "--out", t / "out"],
    "prune-eval": lambda e, t, d: ["prune-eval", "--detector", e["d"] / "no-detector", "--ann", e["ann"], "--images",
                                   e["imgs"], "--device", d, "--out", t / "out"],
    "demo": lambda e, t, d: ["demo", "--quick", "--device", d, "--out", t / "out"],
}


@pytest.mark.parametrize("cmd", list(NO_DEVICE))
def test_round2_a_device_this_machine_lacks_is_refused_before_anything_is_written(env, tmp_path, cmd):
    """demo --device cuda used to generate its 120-image dataset before refusing."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, out, err = run_cli(*NO_DEVICE[cmd](env, tmp_path, "cuda"))
    assert_clean_error(code, out, err, "Error: --device cuda asked for, but CUDA is not available")
    assert list(tmp_path.iterdir()) == []


def test_round2_mps_off_apple_gpus_is_refused_before_any_work(env, tmp_path):
    import torch

    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    code, out, err = run_cli(*NO_DEVICE["demo"](env, tmp_path, "mps"))
    assert_clean_error(code, out, err, "Error: --device mps asked for, but MPS is not available")
    assert list(tmp_path.iterdir()) == []


def _run_with_config(e, t, section, **over):
    r = t / "run"
    shutil.copytree(e["run"], r)
    doc = json.loads((r / "config.json").read_text())
    doc[section].update(over)
    (r / "config.json").write_text(json.dumps(doc))
    return r


RUN_CONFIG_TYPES = {
    "sizes strings": (dict(input_h="32", input_w="32"), "'model.input_h' is '32' (a string), expected an integer"),
    "depth a float": (dict(depth=1.5), "'model.depth' is 1.5 (a number), expected an integer"),
    "depth true": (dict(depth=True), "'model.depth' is True (a boolean), expected an integer"),
    "mean a string": (dict(mean="imagenet"), "'model.mean' is 'imagenet' (a string), expected a list"),
    "patch null": (dict(patch=None), "'model.patch' is None (null), expected an integer"),
    "mlp_ratio a string": (dict(mlp_ratio="4"), "'model.mlp_ratio' is '4' (a string), expected a number"),
    "input_h a billion": (dict(input_h=10**9), "input size 1000000000x32 is more than 16384 pixels per side"),
    "depth a million": (dict(depth=10**6), "--depth must be in [1, 64]"),
    "embed_dim a million": (dict(embed_dim=10**6, num_heads=1), "must be in [1, 4096]"),
    "std two numbers": (dict(std=[0.2, 0.2]), "std must be 3 numbers"),
}


@pytest.mark.parametrize("how", list(RUN_CONFIG_TYPES))
def test_round2_wrong_types_in_a_run_config_name_the_file_and_key(env, tmp_path, how):
    over, expect = RUN_CONFIG_TYPES[how]
    r = _run_with_config(env, tmp_path, "model", **over)
    out = tmp_path / "p.parquet"
    code, stdout, err = run_cli("predict", "--model", r, "--labels", env["val"], "--out", out)
    assert_clean_error(code, stdout, err, f"Error: {r / 'config.json'}: unreadable run config")
    assert expect in err
    assert not out.exists()


def test_round2_a_string_in_metrics_jsonl_names_its_line_and_key(env, tmp_path):
    r = tmp_path / "run"
    shutil.copytree(env["run"], r)
    rows = (r / "metrics.jsonl").read_text().splitlines()
    row = json.loads(rows[-1])
    row["train_accuracy"] = str(row["train_accuracy"])
    (r / "metrics.jsonl").write_text("\n".join(rows[:-1] + [json.dumps(row)]) + "\n")
    code, stdout, err = run_cli("report", "--model", r, "--out", tmp_path / "rep")
    assert_clean_error(code, stdout, err, f"Error: {r / 'metrics.jsonl'}: line {len(rows)}: 'train_accuracy' is "
                                          f"'{row['train_accuracy']}' (a string), expected a number")
    assert not (tmp_path / "rep").exists()


def test_round2_typed_reader_names_the_key_for_every_options_dataclass():
    """The reader the trainers' resume paths use for their saved options (train's
    config.json "train", finetune's finetune.json "options")."""
    from bavit_core.bavit.train import TrainOptions
    from bavit_core.finetune.options import FinetuneOptions
    from bavit_core.runtime.errors import InputFileError
    from bavit_core.runtime.typed import load_typed

    assert load_typed(FinetuneOptions, {"detector_size": [64, 64], "epochs": None}, "f.json", "options").detector_size \
        == (64, 64)
    assert load_typed(TrainOptions, {"labels": "l.parquet", "epochs": 3}, "c.json", "train").epochs == 3
    for cls, section, doc, expect in (
            (TrainOptions, "train", {"epochs": 3}, "'train.labels' is missing"),
            (TrainOptions, "train", {"labels": "l", "batch_size": "64"}, "'train.batch_size' is '64' (a string), expected an integer"),
            (TrainOptions, "train", {"labels": "l", "lr": float("nan")}, "'train.lr' is nan (a number), expected a number"),
            (TrainOptions, "train", {"labels": "l", "flip": "yes"}, "'train.flip' is 'yes' (a string), expected true or false"),
            (FinetuneOptions, "options", {"detector_size": "64"}, "'options.detector_size' is '64' (a string), "
                                                                   "expected a list or null"),
            (FinetuneOptions, "options", {"epochs": 1.0}, "'options.epochs' is 1.0 (a number), expected an integer or null"),
            (FinetuneOptions, "options", [1], "'options' is [1] (a list), expected an object")):
        with pytest.raises(InputFileError) as exc:
            load_typed(cls, doc, "x.json", section)
        assert str(exc.value) == f"x.json: wrong value in the file: {expect}"


@pytest.fixture(scope="module")
def tiny_detector(tmp_path_factory):
    from transformers import YolosForObjectDetection

    from bavit_core.detection.yolos import tiny_yolos_config

    d = tmp_path_factory.mktemp("det") / "det"
    cfg = tiny_yolos_config("nano", num_labels=2, image_size=(32, 32), id2label={0: "N/A", 1: "thing"})
    YolosForObjectDetection(cfg).save_pretrained(d)
    return d


DETECTOR_DAMAGE = {
    "model.safetensors truncated": ("the download or copy was cut short", "truncated"),
    "pytorch_model.bin a pickle with code": ("pickle refused: not a weights-only file", "pickle"),
}


@pytest.mark.parametrize("cmd", ["prune-eval", "finetune"])
@pytest.mark.parametrize("how", list(DETECTOR_DAMAGE))
def test_round2_a_damaged_detector_is_one_clean_line(env, tiny_detector, tmp_path, cmd, how):
    expect, kind = DETECTOR_DAMAGE[how]
    det = tmp_path / "det"
    shutil.copytree(tiny_detector, det)
    w = det / "model.safetensors"
    if kind == "truncated":
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    else:
        w.unlink()
        (det / "pytorch_model.bin").write_bytes(STATE_DAMAGE_PICKLE)
    args = {"prune-eval": ["prune-eval", "--detector", det, "--ann", env["ann"], "--images", env["imgs"],
                           "--detector-size", "32"],
            "finetune": ["finetune", "--detector", det, "--ann", env["ann"], "--images", env["imgs"],
                         "--detector-size", "32", "--epochs", "1"]}[cmd]
    code, out, err = run_cli(*args, "--out", tmp_path / "out")
    assert_clean_error(code, out, err, f"Error: {det / ('model.safetensors' if kind == 'truncated' else 'pytorch_model.bin')}: ")
    assert expect in err
    assert not (tmp_path / "out").exists()


# os.system("true") as a pickle: torch's weights-only loader must refuse it
STATE_DAMAGE_PICKLE = (b"\x80\x04\x95\x1d\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94\x8c\x04"
                       b"true\x94\x85\x94R\x94.")


def test_round2_an_image_declaring_60000_squared_pixels_is_refused_for_masks(env, tmp_path):
    """label --source masks used to try to allocate 27 GiB for it."""
    doc = _doc(images=[{"id": 1, "file_name": "a.jpg", "width": 60000, "height": 60000},
                       {"id": 2, "file_name": "b.jpg", "width": 64, "height": 48}])
    code, stdout, err, out = _label(env, tmp_path, doc, "--source", "masks")
    assert_clean_error(code, stdout, err, f"Error: {tmp_path / 'ann.json'}: image 1 (a.jpg) declares 60000x60000 "
                                          "pixels, too large to rasterise its masks")
    assert not out.exists()
    code, stdout, err, out = _label(env, tmp_path, doc)  # boxes need no pixel arrays: labelled
    assert code == 0, err


@pytest.mark.parametrize("cat,reason", [(10**12, "annotation with category_id outside [0, 100000]"),
                                        (-1, "annotation with category_id outside [0, 100000]"),
                                        ("1", "annotation with non-integer category_id")])
def test_round2_absurd_category_ids_are_skipped_and_said(env, tmp_path, cat, reason):
    code, stdout, err, out = _label(env, tmp_path, _doc(annotations=[_ann(category_id=cat), _ann(image_id=2)]))
    assert code == 0, err
    assert f"skipped: {reason}" in stdout
    assert _finite_labels(out).n_objects.tolist() == [0, 1]


def test_round2_a_category_id_of_10_to_the_12_does_not_size_the_detector(env, tmp_path):
    """finetune --from-scratch sized its head by the largest id: MemoryError."""
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(_doc(annotations=[_ann(category_id=10**12), _ann(image_id=2)],
                                   ) | {"categories": [{"id": 10**12, "name": "huge"}, {"id": 1, "name": "thing"}]}))
    code, out, err = run_cli("finetune", "--from-scratch", "--detector-config", "nano", "--ann", ann, "--images",
                             env["imgs"], "--detector-size", "32", "--epochs", "1", "--val-fraction", "0",
                             "--out", tmp_path / "ft")
    assert code == 0, err
    cfg = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert cfg["id2label"] == {"0": "N/A", "1": "thing"}
