import csv
import json

import numpy as np
import pytest
import torch
from transformers import YolosForObjectDetection

from bavit_core.bavit.train import TrainOptions, train_bavit
from bavit_core.data import open_dataset
from bavit_core.data.grid import GridSpec
from bavit_core.data.synthetic import CLASS_NAMES
from bavit_core.detection.protocol import write_processor
from bavit_core.detection.yolos import tiny_yolos_config
from bavit_core.evaluate.sweep import CSV_COLUMNS, parse_thresholds
from bavit_core.labels import LabelOptions, label_dataset
from bavit_core.runtime.errors import OptionError

from .cli_helpers import run_cli

DENSE_MAP = 0.7987  # the shipped demo detector on 12 unseen generated scenes (seed 11), pinned from a run
ORACLE_MAPS = [0.7480, 0.5530, 0.3179]  # oracle at sparsity 0.3, 0.6, 0.9


@pytest.fixture(scope="module")
def setup(coco_synth, tmp_path_factory):
    d = tmp_path_factory.mktemp("pe")
    aset = open_dataset("coco", root=coco_synth, split="val2017", need_masks=True)
    label_dataset(aset, LabelOptions(source="masks", grid=GridSpec(64, 64, 16)), d / "val.parquet")
    aset = open_dataset("coco", root=coco_synth, split="train2017", need_masks=True)
    label_dataset(aset, LabelOptions(source="masks", grid=GridSpec(64, 64, 16)), d / "train.parquet")
    train_bavit(TrainOptions(labels=str(d / "train.parquet"), epochs=2, batch_size=8, out=str(d / "run")))
    torch.manual_seed(0)
    cfg = tiny_yolos_config("nano", num_labels=len(CLASS_NAMES) + 1, image_size=(64, 64),
                            id2label={0: "N/A", **{i + 1: n for i, n in enumerate(CLASS_NAMES)}})
    YolosForObjectDetection(cfg).save_pretrained(d / "det")
    return d


def run_pe(setup, coco_synth, out, *extra):
    return run_cli("prune-eval", "--detector", setup / "det", "--model", setup / "run", "--root", coco_synth,
                   "--split", "val2017", "--labels", setup / "val.parquet", "--detector-size", "64",
                   "--timing-images", "2", "--timing-repeats", "1", "--out", out, *extra)


def test_thresholds_parse():
    assert parse_thresholds("0.3:0.9") == [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert parse_thresholds("0.2:0.6:0.2") == [0.2, 0.4, 0.6]
    assert parse_thresholds("0.5,0.3") == [0.3, 0.5]
    with pytest.raises(OptionError, match="is an empty range"):
        parse_thresholds("0.9:0.3")
    with pytest.raises(OptionError, match=r"must lie in \[0, 1\]; got 1.2"):
        parse_thresholds("0.5,1.2")
    with pytest.raises(OptionError, match="cannot read --thresholds"):
        parse_thresholds("low")


def test_prune_eval_rows_columns_and_invariants(setup, coco_synth, tmp_path):
    code, out, err = run_pe(setup, coco_synth, tmp_path / "res", "--thresholds", "0.3,0.7", "--batch-size", "3")
    assert code == 0, err
    rows = list(csv.DictReader(open(tmp_path / "res" / "results.csv")))
    assert list(rows[0].keys()) == list(CSV_COLUMNS)
    assert [(r["selector"], r["threshold"]) for r in rows] == [
        ("dense", "nan"), ("bavit", "0.3"), ("bavit", "0.7"), ("oracle", "nan"), ("random", "0.3"), ("random", "0.7")]
    dense = rows[0]
    assert float(dense["sparsity"]) == 0 and float(dense["speedup"]) == 1 and float(dense["token_reduction_pct"]) == 0
    meta = json.loads((tmp_path / "res" / "meta.json").read_text())
    ps = meta["per_image_sparsity"]
    # random keeps exactly as many tokens per image as bavit at the same threshold
    assert ps["random_0.30"] == ps["bavit_0.30"] and ps["random_0.70"] == ps["bavit_0.70"]
    # a higher BG threshold prunes less
    assert float(rows[2]["sparsity"]) <= float(rows[1]["sparsity"])
    for r in rows:
        assert 0 <= float(r["map"]) <= 1 and int(r["n_images"]) == 10 and r["batch_size"] == "3"
        assert (tmp_path / "res" / "detections").is_dir()
    dets = json.loads((tmp_path / "res" / "detections" / "dense.json").read_text())
    assert len(dets) == 10 * 10 and {"image_id", "category_id", "bbox", "score"} <= set(dets[0])
    assert float(rows[1]["bavit_tokens"]) == 2 * 16 and float(rows[3]["bavit_tokens"]) == 0


def test_dense_detections_equal_the_hf_model_and_batching_does_not_change_results(setup, coco_synth, tmp_path):
    code, _, err = run_pe(setup, coco_synth, tmp_path / "b1", "--thresholds", "0.5", "--batch-size", "1",
                          "--selectors", "dense,bavit")
    assert code == 0, err
    code, _, err = run_pe(setup, coco_synth, tmp_path / "b4", "--thresholds", "0.5", "--batch-size", "4",
                          "--selectors", "dense,bavit")
    assert code == 0, err
    for name in ("dense.json", "bavit_0.50.json"):
        a = json.loads((tmp_path / "b1" / "detections" / name).read_text())
        b = json.loads((tmp_path / "b4" / "detections" / name).read_text())
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert x["category_id"] == y["category_id"]
            np.testing.assert_allclose(x["bbox"] + [x["score"]], y["bbox"] + [y["score"]], atol=1e-4)
    from bavit_core.data.images import load_image, to_input
    from bavit_core.detection.yolos import IMAGE_MEAN, IMAGE_STD, load_detector
    det = load_detector(str(setup / "det"))
    first = json.loads((tmp_path / "b1" / "detections" / "dense.json").read_text())[:10]
    doc = json.loads((coco_synth / "annotations/instances_val2017.json").read_text())
    im = next(i for i in doc["images"] if i["id"] == first[0]["image_id"])
    x = to_input(load_image(coco_synth / "val2017" / im["file_name"], (64, 64))[None], IMAGE_MEAN, IMAGE_STD)
    with torch.no_grad():
        ref = det(pixel_values=x)
    score = ref.logits.softmax(-1)[0, :, :-1].max(-1).values
    np.testing.assert_allclose([d["score"] for d in first], score.numpy(), atol=1e-4)


def test_voc_prune_eval_maps_classes_by_name(setup, voc_synth, tmp_path):
    code, out, err = run_cli("prune-eval", "--detector", setup / "det", "--dataset", "voc", "--root", voc_synth,
                             "--split", "val", "--selectors", "dense", "--detector-size", "64",
                             "--timing-images", "0", "--out", tmp_path / "voc")
    assert code == 0, err
    rows = list(csv.DictReader(open(tmp_path / "voc" / "results.csv")))
    assert rows[0]["selector"] == "dense" and int(rows[0]["n_images"]) == 8


def test_voc_ground_truth_puts_each_object_in_the_detector_class_of_its_name(voc_synth):
    """What prune-eval scores VOC against (category_map_for + coco_ground_truth, as the sweep
    calls them), read against the XML files, for a detector whose label order is not VOC's
    first-seen order: every object's annotation carries the detector id named like its
    <name>; detections that are the objects themselves, under those ids, score AP 1, and
    under the VOC ids they would get with an identity map, less. Catches classes matched by
    id instead of name, an off-by-one label, objects dropped or assigned to another image."""
    import xml.etree.ElementTree as ET

    from bavit_core.detection.cocoeval import category_map_for, coco_ground_truth, evaluate_detections

    aset = open_dataset("voc", root=voc_synth, split="val")
    names = sorted(set(aset.categories.values()), reverse=True)
    id2label = {0: "N/A", **{k + 1: n.upper() for k, n in enumerate(names)}}  # case-insensitive match
    label_of = {n: k + 1 for k, n in enumerate(names)}
    gt = coco_ground_truth(aset, aset.image_ids, category_map_for(aset, id2label))
    dets, known = [], 0
    for i, iid in enumerate(aset.image_ids):
        anns = gt.loadAnns(gt.getAnnIds(imgIds=[int(iid)]))
        root = ET.parse(voc_synth / "Annotations" / f"{aset.file_names[i][:-4]}.xml").getroot()
        objs = list(root.iter("object"))
        assert len(anns) == len(objs)
        for obj in objs:
            bb = obj.find("bndbox")
            xmin, ymin, xmax, ymax = (int(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            box = [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]
            a = next(a for a in anns if np.allclose(a["bbox"], box))
            assert a["category_id"] == label_of[obj.findtext("name")]
            known += 1
            if obj.findtext("difficult") != "1":
                dets.append({"image_id": int(iid), "category_id": a["category_id"], "bbox": box, "score": 0.9})
    assert known >= len(aset.image_ids)
    assert evaluate_detections(gt, dets, aset.image_ids)["map"] == pytest.approx(1.0)
    by_voc_id = {v: k for k, v in aset.categories.items()}
    wrong = [dict(d, category_id=by_voc_id[names[d["category_id"] - 1]]) for d in dets]
    assert evaluate_detections(gt, wrong, aset.image_ids)["map"] < 0.9


def brute_refine(g, steps):
    """The paper's clean-up by explicit loops: a BG token turns FG when more than 2 of its 8
    neighbours are FG, all tokens updated together, ``steps`` times."""
    g = g.copy()
    h, w = g.shape
    for _ in range(steps):
        new = g.copy()
        for r in range(h):
            for c in range(w):
                fg = sum(g[rr, cc] for rr in range(r - 1, r + 2) for cc in range(c - 1, c + 2)
                         if (rr, cc) != (r, c) and 0 <= rr < h and 0 <= cc < w)
                new[r, c] = g[r, c] or fg > 2
        g = new
    return g


def test_postprocess_steps_refine_bavits_grids_before_selection(setup, coco_synth, tmp_path):
    """prune-eval --thresholds with --postprocess-steps 0 (default) and 1: each image's
    sparsity in the bavit row is that of BAViT's FG grid (from `bavit predict` on the same
    images: FG where 1 - p < threshold) cleaned up by the brute-force loop above (4x4 BAViT
    grid = 4x4 detector grid at 64 px). Catches the option not reaching the selection, or
    steps applied after the resampling or with another rule."""
    from bavit_core.bavit.predict import read_predictions

    code, _, err = run_cli("predict", "--model", setup / "run", "--labels", setup / "val.parquet",
                           "--out", tmp_path / "p.parquet")
    assert code == 0, err
    pred = read_predictions(tmp_path / "p.parquet")
    t = 0.6
    changed = False
    for steps in (0, 1):
        out = tmp_path / f"s{steps}"
        code, _, err = run_pe(setup, coco_synth, out, "--thresholds", str(t), "--selectors", "bavit",
                              "--postprocess-steps", str(steps), "--timing-images", "0")
        assert code == 0, err
        meta = json.loads((out / "meta.json").read_text())
        got = dict(zip(meta["image_ids"], meta["per_image_sparsity"][f"bavit_{t:.2f}"]))
        for iid, probs in zip(pred.image_ids, pred.probs):
            fg = (1.0 - probs.astype(np.float64)) < t
            ref = brute_refine(fg, steps)
            changed |= bool((ref != fg).any())
            assert got[int(iid)] == pytest.approx(1.0 - ref.mean()), (steps, iid)
    assert changed  # the clean-up had something to do on these images


def test_prune_eval_bad_input(setup, coco_synth, tmp_path):
    code, _, err = run_pe(setup, coco_synth, tmp_path / "x", "--thresholds", "0.9:0.1")
    assert (code, err.strip()) == (1, "Error: --thresholds '0.9:0.1' is an empty range")
    code, _, err = run_cli("prune-eval", "--detector", setup / "det", "--root", coco_synth, "--split", "val2017",
                           "--selectors", "bavit", "--out", tmp_path / "y")
    assert (code, err.strip()) == (1, "Error: selector 'bavit' needs --model")
    code, _, err = run_pe(setup, coco_synth, tmp_path / "z", "--split", "train2017", "--selectors", "oracle")
    assert code == 1 and "has no labels for 30 of the 30 images" in err
    code, _, err = run_cli("prune-eval", "--detector", tmp_path / "nodet", "--root", coco_synth, "--out", tmp_path / "w")
    assert (code, err.strip()) == (1, f"Error: {tmp_path / 'nodet'}: detector directory not found "
                                      "(expected a Hugging Face model directory)")
    assert not (tmp_path / "w").exists()


def test_timed_path_resamples_like_the_evaluated_path():
    """The exported pipeline resamples BAViT's grid on the device with one gather; it must
    keep what prune-eval's resample_grid keeps."""
    from bavit_core.data.grid import nearest_flat_index, resample_grid

    def _resample_torch(g, shape):
        return g.reshape(len(g), -1)[:, torch.as_tensor(nearest_flat_index(g.shape[1:], shape))].reshape(
            (len(g),) + shape)

    g = np.random.default_rng(0).random((3, 24, 24)) < 0.4
    for shape in ((32, 32), (12, 12), (24, 24), (20, 30)):
        assert np.array_equal(_resample_torch(torch.as_tensor(g), shape).numpy(), resample_grid(g, shape))


def _meta(d):
    return json.loads((d / "meta.json").read_text())


def test_target_sparsities_reach_their_targets_with_every_selector(setup, coco_synth, tmp_path):
    code, out, err = run_pe(setup, coco_synth, tmp_path / "s", "--sparsities", "0.2,0.5,0.8", "--batch-size", "4",
                            "--timing-repeats", "2")
    assert code == 0, err
    rows = list(csv.DictReader(open(tmp_path / "s" / "results.csv")))
    assert [(r["selector"], r["target"]) for r in rows] == [("dense", "nan")] + [
        (s, t) for s in ("bavit", "oracle", "random") for t in ("0.2", "0.5", "0.8")]
    meta = _meta(tmp_path / "s")
    ps = meta["per_image_sparsity"]
    assert list(ps) == ["dense"] + [f"{s}_s{t}" for s in ("bavit", "oracle", "random") for t in ("0.20", "0.50", "0.80")]
    for r in rows[1:]:
        # the mean within one token per image (16 tokens on the 4x4 detector grid)
        assert r["policy"] == "threshold" and abs(float(r["sparsity"]) - float(r["target"])) <= 1 / 16
        assert float(r["sparsity_p10"]) <= float(r["sparsity"]) <= float(r["sparsity_p90"])
    for t in ("0.20", "0.50", "0.80"):  # random keeps bavit's count in every image
        assert ps[f"random_s{t}"] == ps[f"bavit_s{t}"]
    # a bavit row records the BG-probability threshold it reached; oracle and random none
    assert 0 <= float(rows[1]["threshold"]) <= 1 and rows[4]["threshold"] == "nan"
    # dense YOLOS is timed once per run: the same reference in every row, with its spread
    assert len({r["dense_latency_ms"] for r in rows}) == 1 and len({r["dense_spread"] for r in rows}) == 1
    for r in rows:
        assert r["timing_noisy"] in ("True", "False") and float(r["latency_spread"]) >= 0
        assert float(r["peak_mem_mb"]) > 0  # measured on CPU too
    assert {"load_start", "load_end", "stage_seconds", "dense_drift", "detector_size"} <= set(meta)
    assert set(meta["stage_seconds"]) == {"loading", "decoding", "BAViT", "detecting", "timing", "COCOeval"}
    assert meta["load_start"]["cpus"] >= 1


def test_topk_policy_keeps_the_same_share_in_every_image(setup, coco_synth, tmp_path):
    code, _, err = run_pe(setup, coco_synth, tmp_path / "k", "--sparsities", "0.3,0.7", "--policy", "topk",
                          "--selectors", "bavit,random", "--timing-images", "0")
    assert code == 0, err
    rows = list(csv.DictReader(open(tmp_path / "k" / "results.csv")))
    for r, kept in zip(rows, (12, 5, 12, 5)):  # ceil((1 - s) * 16)
        assert r["policy"] == "topk" and r["threshold"] == "nan"
        assert float(r["sparsity"]) == float(r["sparsity_p10"]) == float(r["sparsity_p90"]) == 1 - kept / 16
        assert r["latency_ms"] == "nan" and r["timing_noisy"] == "False"
    assert sorted(_meta(tmp_path / "k")["per_image_sparsity"]) == ["bavit_topk_s0.30", "bavit_topk_s0.70",
                                                                   "random_topk_s0.30", "random_topk_s0.70"]


def test_input_size_comes_from_the_processor_file_never_the_config(setup, coco_synth, tmp_path):
    """No --detector-size: the checkpoint's preprocessor_config.json decides; a detector
    without one is refused with one line (its config's image_size is a position-embedding
    reference, not an input size), and nothing is written."""
    import shutil

    from bavit_core.detection.protocol import write_processor

    args = ("--root", coco_synth, "--split", "val2017", "--selectors", "dense", "--timing-images", "0")
    code, _, err = run_cli("prune-eval", "--detector", setup / "det", *args, "--out", tmp_path / "none")
    assert code == 1
    assert err.strip() == (f"Error: detector '{setup / 'det'}' has no preprocessor_config.json, so its input size "
                           "is unknown: pass --detector-size (e.g. 512 for the paper's square protocol)")
    assert not (tmp_path / "none").exists()
    det = tmp_path / "det48"
    shutil.copytree(setup / "det", det)  # config image_size stays 64x64
    write_processor(det, (48, 80))
    code, _, err = run_cli("prune-eval", "--detector", det, *args, "--out", tmp_path / "d")
    assert code == 0, err
    meta = _meta(tmp_path / "d")
    assert meta["detector_size"] == [48, 80]
    assert meta["input_protocol"]["description"] == "square 48x80"
    assert meta["input_protocol"]["source"] == str(det / "preprocessor_config.json")
    assert meta["detector_tokens"] == {"mean": 15.0, "min": 15, "max": 15}


def test_plain_progress_lines_off_a_terminal(setup, coco_synth, tmp_path):
    import re

    code, _, err = run_pe(setup, coco_synth, tmp_path / "p", "--sparsities", "0.5", "--batch-size", "5")
    assert code == 0, err
    lines = [x for x in err.splitlines() if x.startswith("stage ")]
    assert [re.sub(r"\d+:\d\d elapsed", "T elapsed", x) for x in lines] == [
        "stage 1/6 loading, T elapsed",
        "stage 2/6 decoding: 10/10 images, T elapsed",
        "stage 3/6 BAViT: 10/10 images, T elapsed",
        "stage 4/6 detecting: 40/40 image passes, T elapsed",
        # (dense, BAViT, bavit and oracle rows; random shares bavit's kept counts, so its timing) x
        # (1 warm-up + 1 repeat + memory)
        "stage 5/6 timing: 12/12 timed calls, T elapsed",
        "stage 6/6 COCOeval: 4/4 rows, T elapsed",
    ]


def test_progress_prints_a_line_at_least_every_interval(capsys):
    import time

    from bavit_cli.common import progress_bar

    with progress_bar("label", 10, interval=0.2) as bar:
        bar(3)
        time.sleep(0.7)
        bar(7)
    err = capsys.readouterr().err.splitlines()
    assert len(err) >= 3 and err[0].startswith("stage 1/1 label: 3/10 images, 0:00 elapsed")
    assert err[-1].startswith("stage 1/1 label: 10/10 images")


def test_wrong_detectors_are_refused_before_any_work(setup, coco_synth, tmp_path):
    code, out, err = run_cli("prune-eval", "--detector", setup / "run", "--root", coco_synth, "--out", tmp_path / "a")
    assert (code, err.strip()) == (1, f"Error: {setup / 'run'}: not a YOLOS detector (model_type None); pass a YOLOS "
                                      "directory, e.g. one written by bavit finetune")
    # a YOLOS config whose weights belong to another shape: missing keys, no transformers report
    cfg = json.loads((setup / "det" / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=3)))
    (bad / "model.safetensors").write_bytes((setup / "det" / "model.safetensors").read_bytes())
    code, out, err = run_cli("prune-eval", "--detector", bad, "--root", coco_synth, "--out", tmp_path / "b")
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"Error: {bad}: the weights do not fit a YOLOS detector: ") and "missing keys" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_hub_name_without_a_network_fails_fast(coco_synth, tmp_path):
    code, _, err = run_cli("prune-eval", "--detector", "hustvl/yolos-tiny", "--root", coco_synth,
                           "--out", tmp_path / "h")
    assert code == 1 and err.startswith("Error: cannot load detector 'hustvl/yolos-tiny' as a hub model") and \
        err.count("\n") == 1, err


def test_label_spaces_are_matched_by_name(setup, coco_synth, tmp_path):
    coco_names = ("person", "bicycle", "car", "motorcycle", "airplane")
    det = tmp_path / "cocodet"
    cfg = tiny_yolos_config("nano", num_labels=6, image_size=(64, 64),
                            id2label={0: "N/A", **{i + 1: n for i, n in enumerate(coco_names)}})
    torch.manual_seed(0)
    YolosForObjectDetection(cfg).save_pretrained(det)
    write_processor(det, (64, 64))
    code, _, err = run_cli("prune-eval", "--detector", det, "--root", coco_synth, "--split", "val2017",
                           "--selectors", "dense", "--timing-images", "0", "--out", tmp_path / "x")
    assert (code, err.strip()) == (1, "Error: detector classes person, bicycle, car, motorcycle, airplane do not "
                                      "match the dataset's triangle, rectangle, ellipse, star, hexagon (0 of 5 found by "
                                      'name); pass --category-map FILE (JSON {"dataset class": "detector class"}) or a '
                                      "detector trained on these classes")
    cmap = tmp_path / "map.json"
    cmap.write_text(json.dumps(dict(zip(CLASS_NAMES, coco_names))))
    code, _, err = run_cli("prune-eval", "--detector", det, "--root", coco_synth, "--split", "val2017",
                           "--selectors", "dense", "--timing-images", "0", "--category-map", cmap, "--out", tmp_path / "y")
    assert code == 0, err
    # the detector's ids are the mapped names': GT "triangle" (1) is detector "person" (1) here
    cmap.write_text(json.dumps({"triangle": "car", "rectangle": "person"}))
    code, _, err = run_cli("prune-eval", "--detector", det, "--root", coco_synth, "--split", "val2017",
                           "--selectors", "dense", "--timing-images", "0", "--category-map", cmap, "--out", tmp_path / "z")
    assert code == 1 and "(2 of 5 found by name)" in err


def test_category_map_moves_ground_truth_onto_detector_ids(coco_synth):
    from bavit_core.detection.cocoeval import category_map_for, coco_ground_truth

    aset = open_dataset("coco", root=coco_synth, split="val2017")
    id2label = {0: "N/A", 1: "Hexagon", 2: "star", 3: "ellipse", 4: "rectangle", 5: "triangle"}
    m = category_map_for(aset, id2label)
    assert m == {1: 5, 2: 4, 3: 3, 4: 2, 5: 1}
    gt = coco_ground_truth(aset, aset.image_ids, m)
    doc = json.loads((coco_synth / "annotations/instances_val2017.json").read_text())
    n_tri = sum(a["category_id"] == 1 for a in doc["annotations"])
    assert len(gt.getAnnIds(catIds=[5])) == n_tri and {c["name"] for c in gt.loadCats([5])} == {"triangle"}


def test_prune_eval_rows_per_pruned_token_treatment(setup, coco_synth, tmp_path):
    code, _, err = run_pe(setup, coco_synth, tmp_path / "res", "--thresholds", "0.5", "--selectors", "dense,bavit,oracle",
                          "--pruned-tokens", "drop,pool,preserve")
    assert code == 0, err
    rows = list(csv.DictReader(open(tmp_path / "res" / "results.csv")))
    assert [(r["selector"], r["treatment"]) for r in rows] == [
        ("dense", "drop"), ("bavit", "drop"), ("bavit", "pool"), ("bavit", "preserve"),
        ("oracle", "drop"), ("oracle", "pool"), ("oracle", "preserve")]
    meta = json.loads((tmp_path / "res" / "meta.json").read_text())
    assert meta["rows"] == ["dense", "bavit_0.50", "bavit_0.50_pool", "bavit_0.50_preserve",
                            "oracle", "oracle_pool", "oracle_preserve"]
    for name in meta["rows"]:
        assert (tmp_path / "res" / "detections" / f"{name}.json").is_file()
    layers = 2  # the nano detector; 4x4 = 16 patch tokens
    for sel in ("bavit", "oracle"):
        drop, pool, keep = [r for r in rows if r["selector"] == sel]
        s = float(drop["sparsity"])
        assert 0 < s < 1 and pool["sparsity"] == drop["sparsity"] == keep["sparsity"]
        # eq. 4 counts computed tokens: pool adds one per layer in images with pruned tokens,
        # preserve's frozen tokens are listed apart as key/value-only
        with_pruned = np.mean(np.array(meta["per_image_sparsity"][meta["rows"][1 if sel == "bavit" else 4]]) > 0)
        assert float(drop["kv_only_tokens"]) == float(pool["kv_only_tokens"]) == 0
        assert float(keep["kv_only_tokens"]) == pytest.approx(layers * 16 * s, abs=1e-3)
        assert float(keep["yolos_pruned_tokens"]) == float(drop["yolos_pruned_tokens"])
        assert float(pool["yolos_pruned_tokens"]) == pytest.approx(float(drop["yolos_pruned_tokens"]) + layers * with_pruned,
                                                                abs=1e-3)
        assert float(drop["gflops"]) < float(pool["gflops"]) < float(keep["gflops"])
        assert float(drop["flop_speedup"]) > float(keep["flop_speedup"])
    code, _, err = run_pe(setup, coco_synth, tmp_path / "bad", "--pruned-tokens", "drop,merge")
    assert (code, err.strip()) == (1, "Error: unknown --pruned-tokens 'merge'; choose one of drop, pool, preserve")
    assert not (tmp_path / "bad").exists()


def test_treatments_for_limits_the_sweep_to_some_selectors(setup, coco_synth, tmp_path):
    """--treatments-for bavit: only BAViT rows are swept over the treatments (what the demo
    uses to show preserve beside drop without doubling the baselines); the others get the
    first treatment, and their rows are the ones a plain run gives."""
    code, _, err = run_pe(setup, coco_synth, tmp_path / "res", "--thresholds", "0.5", "--selectors", "dense,bavit,oracle",
                          "--pruned-tokens", "drop,preserve", "--treatments-for", "bavit", "--timing-images", "0")
    assert code == 0, err
    rows = list(csv.DictReader(open(tmp_path / "res" / "results.csv")))
    assert [(r["selector"], r["treatment"]) for r in rows] == [
        ("dense", "drop"), ("bavit", "drop"), ("bavit", "preserve"), ("oracle", "drop")]
    code, _, err = run_pe(setup, coco_synth, tmp_path / "plain", "--thresholds", "0.5", "--selectors", "oracle",
                          "--timing-images", "0")
    assert code == 0, err
    plain = list(csv.DictReader(open(tmp_path / "plain" / "results.csv")))
    assert [plain[-1][k] for k in ("map", "sparsity")] == [rows[-1][k] for k in ("map", "sparsity")]
    for bad, msg in (("dense", "'dense'"), ("bavit,merge", "'merge'")):
        code, _, err = run_pe(setup, coco_synth, tmp_path / "bad", "--pruned-tokens", "drop,pool", "--treatments-for", bad)
        assert (code, err.strip()) == (1, f"Error: unknown --treatments-for selector {msg}; choose one of bavit, oracle, random, attention, gate")
        assert not (tmp_path / "bad").exists()
    code, _, err = run_pe(setup, coco_synth, tmp_path / "bad", "--pruned-tokens", "drop,pool", "--treatments-for", ",")
    assert (code, err.strip()) == (1, "Error: --treatments-for is empty; name selectors (e.g. bavit) or leave it out")
    assert not (tmp_path / "bad").exists()


def test_peak_memory_of_a_pruned_forward_is_below_the_dense_one():
    """peak_mem_mb is meaningful on CPU: at 80 % sparsity the pruned forward's own peak is
    well below dense YOLOS's (on a grid big enough for activations to dominate; prune-eval
    probes after warm-up, under inference mode, as here)."""
    from bavit_core.detection.pruned import pruned_forward
    from bavit_core.detection.yolos import init_new_yolos
    from bavit_core.evaluate.timing import peak_memory_mb

    cfg = tiny_yolos_config("nano", num_labels=6, image_size=(128, 128))
    det = YolosForObjectDetection(cfg).eval()
    init_new_yolos(det, 0)
    x = torch.randn(4, 3, 128, 128)
    keep = torch.zeros(4, 64, dtype=torch.bool)
    for i in range(4):
        keep[i, torch.randperm(64, generator=torch.Generator().manual_seed(i))[:13]] = True
    cpu = torch.device("cpu")
    with torch.inference_mode():
        det(pixel_values=x), pruned_forward(det, x, keep)  # warm-up: caches exist before the probes
        dense = peak_memory_mb(lambda: det(pixel_values=x), cpu)
        pruned = peak_memory_mb(lambda: pruned_forward(det, x, keep), cpu)
    assert 0 < pruned < 0.6 * dense


@pytest.fixture(scope="module")
def simple_scenes(tmp_path_factory):
    """Generated scenes of the layout the shipped demo detector was trained on (unseen seed)."""
    from bavit_core.data.synthetic import synth_dataset

    root = tmp_path_factory.mktemp("simple")
    synth_dataset(root, n_images=48, fmt="coco", seed=11, size=(240, 320), val_fraction=0.25, scenes="simple")
    aset = open_dataset("coco", root=root, split="val2017", need_masks=True)
    label_dataset(aset, LabelOptions(source="masks", grid=GridSpec(128, 128, 16)), root / "val.parquet")
    return root


def test_shipped_demo_detector_real_map_values(simple_scenes, tmp_path):
    """Real mAP of the shipped detector through the whole prune-eval path (decode, pruned
    forward, detections, name-matched categories, COCOeval): values pinned from a run, and
    the oracle's ordering over sparsity."""
    from bavit_core.demo import shipped_detector

    code, out, err = run_cli("prune-eval", "--detector", shipped_detector(), "--root", simple_scenes, "--split",
                             "val2017", "--labels", simple_scenes / "val.parquet", "--sparsities", "0.3,0.6,0.9",
                             "--timing-images", "0", "--batch-size", "6", "--out", tmp_path / "r")
    assert code == 0, err
    rows = {(r["selector"], r["target"]): float(r["map"]) for r in csv.DictReader(open(tmp_path / "r" / "results.csv"))}
    assert _meta(tmp_path / "r")["detector_size"] == [128, 128]  # its own input size, not 512
    assert rows[("dense", "nan")] == pytest.approx(DENSE_MAP, abs=2e-3)
    oracle = [rows[("oracle", t)] for t in ("0.3", "0.6", "0.9")]
    assert oracle == pytest.approx(ORACLE_MAPS, abs=2e-3)
    assert rows[("dense", "nan")] > oracle[0] > oracle[1] > oracle[2]


def test_sparsities_without_a_selector_that_prunes_is_refused_not_silently_dense(setup, coco_synth, tmp_path):
    code, _, err = run_cli("prune-eval", "--detector", setup / "det", "--root", coco_synth, "--split", "val2017",
                           "--detector-size", "64", "--sparsities", "0.5", "--out", tmp_path / "o")
    assert (code, err.strip()) == (1, "Error: --sparsities needs a selector that prunes: give --model (BAViT, random) "
                                      "or --labels (oracle); with neither, only the dense row is evaluated")
    assert not (tmp_path / "o").exists()
