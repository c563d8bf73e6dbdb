"""Every command, with default options, on hub-faithful checkpoints (random weights, the hub's
configs, processors and file layouts; tests/hub_fixtures.py): label → train --pretrained
<timm save_for_hf dir> → predict → prune-eval → finetune → export → prune-eval --runtime onnx →
report, for yolos-tiny (no mid-layer position embeddings, image_size 800x1333), yolos-small
(mid-layer ones, 512x864) and yolos-base (800x1344). The detector bavit finetune writes is a
complete Hugging Face detector: transformers.pipeline loads it and finds our dense row's
detections.

Mistakes caught: a default size taken from the config's image_size (the three differ and
none is an input size), a processor file not written or not read, an export whose graphs
are fixed to another size than the detector was trained at, a manifest's normalisation that
is not the checkpoint's, a fine-tuned directory transformers cannot load."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from .cli_helpers import run_cli
from .hub_fixtures import HUB_NAMES, HUB_SHORTEST_EDGE, build_hub_yolos, build_timm_vit

pytest.importorskip("onnxruntime")

SMALL = dict(layers=2, hidden=48)


@pytest.fixture(scope="module")
def bavit_run(coco_named, tmp_path_factory):
    """label → train --pretrained <timm dir> → predict, once for every checkpoint."""
    d = tmp_path_factory.mktemp("hub_pipe")
    vit = build_timm_vit(d / "vit_tiny_patch16_384")
    for split in ("train2017", "val2017"):
        code, _, err = run_cli("label", "--root", coco_named, "--split", split, "--source", "masks",
                               "--input-size", "128", "--out", d / f"{split}.parquet")
        assert code == 0, err
    code, out, err = run_cli("train", "--labels", d / "train2017.parquet", "--val-labels", d / "val2017.parquet",
                             "--pretrained", vit, "--epochs", "1", "--batch-size", "16", "--device", "cpu",
                             "--out", d / "run")
    assert code == 0, err
    code, _, err = run_cli("predict", "--model", d / "run", "--labels", d / "val2017.parquet",
                           "--out", d / "preds.parquet", "--device", "cpu")
    assert code == 0, err
    return d


@pytest.mark.parametrize("name", HUB_NAMES)
def test_every_command_with_default_options_on_a_hub_checkpoint(name, bavit_run, coco_named, tmp_path):
    det = build_hub_yolos(name, tmp_path / name, **SMALL)
    s = HUB_SHORTEST_EDGE[name]
    common = ("--root", coco_named, "--split", "val2017", "--device", "cpu")

    # prune-eval, defaults: the checkpoint's own protocol (never its config's image_size)
    code, out, err = run_cli("prune-eval", "--detector", det, "--model", bavit_run / "run", "--labels",
                             bavit_run / "val2017.parquet", *common, "--max-images", "3", "--timing-images", "1",
                             "--timing-repeats", "1", "--out", tmp_path / "res")
    assert code == 0, err
    meta = json.loads((tmp_path / "res" / "meta.json").read_text())
    assert meta["input_protocol"]["description"] == f"checkpoint (shortest edge {s}, longest 1333)"
    w = s * 160 // 120  # coco_named's 160x120 images, aspect kept
    assert meta["detector_tokens"]["mean"] == (s // 16) * (w // 16)
    assert meta["detector_size"] is None
    assert f"input checkpoint (shortest edge {s}, longest 1333)" in " ".join(out.split())  # the table title

    # finetune, defaults: square at the processor's shortest edge, written as a processor file
    code, out, err = run_cli("finetune", "--detector", det, "--root", coco_named, "--split", "train2017",
                             "--val-split", "val2017", "--epochs", "1", "--max-images", "4", "--batch-size", "4",
                             "--device", "cpu", "--out", tmp_path / "F")
    assert code == 0, err
    f_dir = tmp_path / "F"
    for d in (f_dir, f_dir / "last"):
        proc = json.loads((d / "preprocessor_config.json").read_text())
        assert proc["size"] == {"height": s, "width": s} and proc["image_processor_type"] == "YolosImageProcessor"
        assert proc["image_mean"] == [0.485, 0.456, 0.406] and proc["image_std"] == [0.229, 0.224, 0.225]
    run_doc = json.loads((f_dir / "finetune.json").read_text())
    assert run_doc["options"]["detector_size"] == [s, s]
    assert run_doc["input_protocol"]["description"] == f"square {s}x{s}"
    # the position-embedding reference is kept: the stored embeddings still fit the config
    cfg = json.loads((f_dir / "config.json").read_text())
    assert cfg["image_size"] == json.loads((det / "config.json").read_text())["image_size"]

    # export, defaults: the fine-tuned detector's own square size, its normalisation
    code, out, err = run_cli("export", "--detector", f_dir, "--model", bavit_run / "run", "--out", tmp_path / "onnx")
    assert code == 0, err
    assert f"Input: square {s}x{s}" in out
    man = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert man["detector"]["input_size"] == [s, s]
    assert man["detector"]["normalisation"]["mean"] == [0.485, 0.456, 0.406]
    assert man["detector"]["input_protocol"]["source"].endswith("preprocessor_config.json")

    # prune-eval on the fine-tuned detector, PyTorch and ONNX Runtime: the same detections
    rows = {}
    for rt, extra in (("torch", ()), ("onnx", ("--runtime", "onnx", "--exported", tmp_path / "onnx"))):
        code, out, err = run_cli("prune-eval", "--detector", f_dir, "--model", bavit_run / "run", "--selectors",
                                 "bavit", "--thresholds", "0.5", *common, "--max-images", "3", "--timing-images", "0",
                                 *extra, "--out", tmp_path / f"res-{rt}")
        assert code == 0, (rt, err)
        meta = json.loads((tmp_path / f"res-{rt}" / "meta.json").read_text())
        assert meta["input_protocol"]["description"] == f"square {s}x{s}", rt
        rows[rt] = {p.name: json.loads(p.read_text()) for p in (tmp_path / f"res-{rt}" / "detections").glob("*.json")}
    assert sorted(rows["torch"]) == sorted(rows["onnx"]) == ["bavit_0.50.json"]
    a, b = rows["torch"]["bavit_0.50.json"], rows["onnx"]["bavit_0.50.json"]
    assert len(a) == len(b) == 3 * 100 and [d["category_id"] for d in a] == [d["category_id"] for d in b]
    np.testing.assert_allclose([d["score"] for d in a], [d["score"] for d in b], atol=1e-4)
    np.testing.assert_allclose([d["bbox"] for d in a], [d["bbox"] for d in b], atol=1e-2)

    code, out, err = run_cli("report", "--results", tmp_path / "res", "--model", bavit_run / "run",
                             "--pred", bavit_run / "preds.parquet", "--detector", f_dir, "--examples", "2",
                             "--out", tmp_path / "report")
    assert code == 0, err
    page = (tmp_path / "report" / "index.html").read_text()
    assert f"checkpoint (shortest edge {s}, longest 1333)" in page


def test_a_finetuned_detector_runs_in_transformers_pipeline_with_our_dense_detections(coco_named, tmp_path):
    """transformers.pipeline("object-detection", model=DIR) on bavit finetune's output: the
    detections our dense row writes for the same images (boxes 0.01 px, scores 1e-5)."""
    from PIL import Image
    from transformers import pipeline

    det = build_hub_yolos("yolos-small", tmp_path / "small", **SMALL)
    code, _, err = run_cli("finetune", "--detector", det, "--root", coco_named, "--split", "train2017",
                           "--val-fraction", "0", "--epochs", "1", "--max-images", "4", "--batch-size", "4",
                           "--detector-size", "96x128", "--device", "cpu", "--out", tmp_path / "F")
    assert code == 0, err
    code, _, err = run_cli("prune-eval", "--detector", tmp_path / "F", "--selectors", "dense",
                           "--root", coco_named, "--split", "val2017", "--max-images", "4", "--timing-images", "0",
                           "--device", "cpu", "--out", tmp_path / "res")
    assert code == 0, err
    ours = json.loads((tmp_path / "res" / "detections" / "dense.json").read_text())
    ann = json.loads((coco_named / "annotations" / "instances_val2017.json").read_text())
    files = {im["id"]: im["file_name"] for im in ann["images"]}
    id2label = {int(k): v for k, v in json.loads((tmp_path / "F" / "config.json").read_text())["id2label"].items()}
    ids = sorted({d["image_id"] for d in ours})
    assert len(ids) == 4

    pipe = pipeline("object-detection", model=str(tmp_path / "F"), device="cpu")
    for iid in ids:
        image = Image.open(coco_named / "val2017" / files[iid]).convert("RGB")
        theirs = sorted(pipe(image, threshold=0.0), key=lambda d: -d["score"])
        mine = sorted((d for d in ours if d["image_id"] == iid), key=lambda d: -d["score"])
        assert len(theirs) == len(mine) == 100  # every detection token (scores > 0)
        for a, b in zip(mine, theirs):
            assert abs(a["score"] - b["score"]) < 1e-5
            assert id2label[a["category_id"]] == b["label"]
            x, y, w, h = a["bbox"]
            got = np.array([x, y, x + w, y + h])
            box = b["box"]  # the pipeline truncates its boxes to whole pixels (int())
            want = np.array([box["xmin"], box["ymin"], box["xmax"], box["ymax"]])
            near = np.abs(got - np.round(got)) < 0.01  # within our tolerance of a pixel edge: either side
            assert np.all((np.trunc(got) == want) | (near & (np.abs(got - want) <= 1))), (got, want)


def test_dense_row_is_transformers_pipeline_on_real_coco_tiny(tmp_path):
    """examples/hf_equivalence.py on ../shared/data/coco_tiny (skipped without it): real
    photos of many sizes, yolos-small's processor (shortest edge 800) and mid-layer position
    embeddings, both protocols."""
    import importlib.util

    from .conftest import shared_data

    root = shared_data("coco_tiny")
    spec = importlib.util.spec_from_file_location("hf_equivalence", Path(__file__).parents[1] / "examples" /
                                                  "hf_equivalence.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    code = mod.main(["--root", str(root), "--checkpoints", "yolos-small", "--layers", "2", "--hidden", "48",
                     "--max-images", "4", "--json", str(tmp_path / "eq.json")])
    rows = json.loads((tmp_path / "eq.json").read_text())
    assert [r["protocol"] for r in rows] == ["checkpoint (shortest edge 800, longest 1333)", "square 512x512"]
    for r in rows:
        assert r["labels_equal"] and r["max_box_px"] < 0.01 and r["max_score"] < 1e-5, r
    assert rows[0]["tokens_mean"] > rows[1]["tokens_mean"] == 1024  # aspect kept at 800: more tokens
    assert code == 0
