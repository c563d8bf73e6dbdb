"""bavit export and --runtime onnx: ONNX Runtime equals PyTorch, the manifest tells the
truth, bad input is one line."""
import csv
import json
import sys

import numpy as np
import pytest
import torch
from transformers import YolosForObjectDetection

pytest.importorskip("onnxruntime")

from bavit_core.bavit.model import load_bavit  # noqa: E402
from bavit_core.data.synthetic import CLASS_NAMES  # noqa: E402
from bavit_core.detection.pruned import pruned_forward  # noqa: E402
from bavit_core.detection.yolos import init_new_yolos, load_detector, tiny_yolos_config  # noqa: E402
from bavit_core.detection.selection import kept_per_image as topk_count  # noqa: E402
from bavit_core.export.graphs import reference_keep  # noqa: E402
from bavit_core.export.onnx_export import state_sha256  # noqa: E402
from bavit_core.export.ort import ExportedModels, session  # noqa: E402
from bavit_core.runtime.fileio import sha256_file  # noqa: E402

from .cli_helpers import run_cli  # noqa: E402
from .random_models import make_bavit_run, spread  # noqa: E402

TOL = 1e-4


def make_detector(path, mid, image_size, seed):
    torch.manual_seed(seed)
    cfg = tiny_yolos_config("nano", num_labels=len(CLASS_NAMES) + 1, image_size=image_size,
                            use_mid_position_embeddings=mid,
                            id2label={0: "N/A", **{i + 1: n for i, n in enumerate(CLASS_NAMES)}})
    m = YolosForObjectDetection(cfg)
    init_new_yolos(m, seed)
    spread(m, seed)
    m.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("export_models")
    # the mid-layer model's tables are interpolated (48 → 64); the plain one's too (64 → 96x64)
    return {"mid": make_detector(d / "det_mid", True, (48, 48), 1),
            "plain": make_detector(d / "det_plain", False, (64, 64), 2),
            "run": make_bavit_run(d / "run", 3)}


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    d = tmp_path_factory.mktemp("exported")
    code, out, err = run_cli("export", "--detector", models["mid"], "--model", models["run"], "--out", d / "thr",
                             "--detector-size", "64", "--threshold", "0.5", "--dense")
    assert code == 0, err
    assert "Grids: BAViT 48x48/16 → 3x3 tokens, nearest-resampled to 4x4; detector 64x64/16 → 4x4 tokens" in out
    code, _, err = run_cli("export", "--detector", models["plain"], "--model", models["run"], "--out", d / "topk",
                           "--detector-size", "96x64", "--sparsity", "0.35", "--policy", "topk")
    assert code == 0, err
    return {"thr": d / "thr", "topk": d / "topk"}


@pytest.mark.parametrize("which,size", [("thr", (64, 64)), ("topk", (96, 64))])
def test_detector_graph_equals_pruned_forward_for_any_k(models, exported, which, size):
    det = load_detector(str(models["mid" if which == "thr" else "plain"]))
    ort = ExportedModels(exported[which], det, size)
    p = ort.n_patches
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, *size, generator=g)
    with torch.no_grad():
        dense = det(pixel_values=x)
    assert dense.logits.abs().max() > 1  # outputs are O(1): the comparison below means something
    for k in (p, 0, 1, p // 3, p - 1):
        keep = torch.zeros(1, p, dtype=torch.bool)
        keep[0, torch.randperm(p, generator=g)[:k]] = True
        with torch.no_grad():
            ref = pruned_forward(det, x, keep)
        logits, boxes = ort.detect(x, keep)
        assert logits.shape == ref.logits.shape and boxes.shape == ref.pred_boxes.shape
        np.testing.assert_allclose(boxes.numpy(), ref.pred_boxes.numpy(), atol=TOL, rtol=0)
        np.testing.assert_allclose(logits.softmax(-1).numpy(), ref.logits.softmax(-1).numpy(), atol=TOL, rtol=0)
        np.testing.assert_allclose(logits.numpy(), ref.logits.numpy(), atol=TOL, rtol=0)
        if k == p:  # keeping every token is the original model
            np.testing.assert_allclose(boxes.numpy(), dense.pred_boxes.numpy(), atol=TOL, rtol=0)


def test_dense_graph_serves_a_batch_like_the_hf_model(models, exported):
    det = load_detector(str(models["mid"]))
    ort = ExportedModels(exported["thr"], det, (64, 64))
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = det(pixel_values=x)
    for logits, boxes in (ort.detect(x, None), ort.detect(x, torch.ones(3, 4, 4, dtype=torch.bool))):
        np.testing.assert_allclose(logits.numpy(), ref.logits.numpy(), atol=TOL, rtol=0)
        np.testing.assert_allclose(boxes.numpy(), ref.pred_boxes.numpy(), atol=TOL, rtol=0)


@pytest.mark.parametrize("which", ["thr", "topk"])
def test_pipeline_equals_bavit_selection_and_pruned_forward(models, exported, which):
    det = load_detector(str(models["mid" if which == "thr" else "plain"]))
    bavit = load_bavit(models["run"])
    m = json.loads((exported[which] / "manifest.json").read_text())
    size, grid = tuple(m["detector"]["input_size"]), tuple(m["detector"]["grid"])
    sel = m["selection"]
    pipe = session(exported[which] / "pipeline.onnx")
    g = torch.Generator().manual_seed(5)
    kept_counts, straddled = set(), 0
    for _ in range(4):
        x = torch.randn(1, 3, *size, generator=g)
        xb = torch.randn(1, 3, 48, 48, generator=g)
        with torch.no_grad():
            probs = bavit.fg_prob(xb).numpy()
        if which == "thr":  # no probability at the decision boundary, where 1e-7 could flip it
            assert np.abs((1 - probs) - sel["threshold"]).min() > 1e-5
        keep = reference_keep(probs, grid, sel["policy"], sel["threshold"], sel["k"])
        if which == "topk":  # nearest upsampling repeats values: ties at the k-th place test the tie rule
            p = np.sort(_resampled(probs, grid))[::-1]
            straddled += int(p[sel["k"] - 1] == p[sel["k"]])
        with torch.no_grad():
            ref = pruned_forward(det, x, torch.as_tensor(keep))
        logits, boxes, kept = pipe.run(None, {"pixel_values": x.numpy(), "bavit_pixel_values": xb.numpy()})
        assert kept.tolist() == np.flatnonzero(keep[0]).tolist()
        np.testing.assert_allclose(boxes, ref.pred_boxes.numpy(), atol=TOL, rtol=0)
        np.testing.assert_allclose(logits, ref.logits.numpy(), atol=TOL, rtol=0)
        kept_counts.add(len(kept))
    if which == "topk":  # every image keeps ceil((1 - 0.35) * 24) = 16 tokens
        assert kept_counts == {16} == {topk_count(0.35, 24)}
        assert straddled > 0
    else:
        assert len(kept_counts) > 1  # the threshold's K depends on the image


def _resampled(probs, grid):
    from bavit_core.data.grid import resample_grid

    return resample_grid(probs, grid).reshape(-1)


def test_topk_ties_keep_the_lower_index():
    probs = np.array([[[0.9, 0.5], [0.5, 0.1]]])  # 2x2 → 4x4: every value four times
    keep = reference_keep(probs, (4, 4), "topk", k=6)
    # the four 0.9s (0, 1, 4, 5), then of the eight 0.5s the two first in row-major order (2, 3)
    assert np.flatnonzero(keep[0]).tolist() == [0, 1, 2, 3, 4, 5]


def test_manifest_describes_the_graphs(models, exported):
    d = exported["thr"]
    m = json.loads((d / "manifest.json").read_text())
    assert m["format"] == "bavit-export/1" and m["opset"] == 17 and m["pruned_tokens"] == "drop"
    assert sorted(m["graphs"]) == ["bavit", "detector", "detector_dense", "pipeline"]
    for name, gdoc in m["graphs"].items():
        assert gdoc["sha256"] == sha256_file(d / gdoc["file"])
        s = session(d / gdoc["file"])
        assert [i.name for i in s.get_inputs()] == [i["name"] for i in gdoc["inputs"]]
        assert [o.name for o in s.get_outputs()] == [o["name"] for o in gdoc["outputs"]]
        for got, doc in zip(s.get_inputs(), gdoc["inputs"]):
            assert [v if isinstance(v, int) else "dyn" for v in got.shape] == \
                   [v if isinstance(v, int) else "dyn" for v in doc["shape"]]
            assert got.type == f"tensor({doc['dtype'].replace('float32', 'float')})"
        assert max(m["verified"]["max_abs_diff"][name].values()) <= TOL
    assert m["graphs"]["detector"]["inputs"][1] == {"name": "keep", "shape": ["K"], "dtype": "int64"}
    det = m["detector"]
    assert det["weights_sha256"] == state_sha256(load_detector(str(models["mid"])))
    assert (det["input_size"], det["grid"], det["n_patches"], det["patch"]) == ([64, 64], [4, 4], 16, 16)
    assert det["use_mid_position_embeddings"] is True and det["id2label"]["1"] == CLASS_NAMES[0]
    assert det["normalisation"] == {"scale": "1/255", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                    "layout": "RGB, NCHW"}
    b = m["bavit"]
    assert b["weights_sha256"] == state_sha256(load_bavit(models["run"])) and b["grid"] == [3, 3]
    assert b["input_size"] == [48, 48]
    assert m["selection"]["policy"] == "threshold" and m["selection"]["threshold"] == 0.5
    assert m["selection"]["resample"] == "nearest"
    topk = json.loads((exported["topk"] / "manifest.json").read_text())
    assert topk["selection"]["k"] == 16 and topk["selection"]["sparsity"] == 0.35
    assert "detector_dense" not in topk["graphs"] and not (exported["topk"] / "detector_dense.onnx").exists()


def test_export_without_model_writes_the_detector_only(models, tmp_path):
    code, out, err = run_cli("export", "--detector", models["plain"], "--out", tmp_path / "e", "--detector-size", "64")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["detector.onnx", "manifest.json"]
    m = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert m["bavit"] is None and m["selection"] is None


def test_export_bad_input(models, tmp_path, monkeypatch):
    det, run = models["mid"], models["run"]

    def err_of(*args):
        code, _, err = run_cli("export", "--detector", det, "--out", tmp_path / "x", *args)
        assert code == 1 and err.startswith("Error: ") and err.count("\n") == 1, err
        return err.strip()[len("Error: "):]

    def err_of_det(path):
        code, _, err = run_cli("export", "--detector", path, "--out", tmp_path / "x")
        assert code == 1 and err.count("\n") == 1, err
        return err.strip()[len("Error: "):]

    assert err_of("--detector-size", "100") == "--detector-size 100x100 is not divisible by the detector patch 16"
    assert err_of("--opset", "21") == "--opset 21 is outside what the exporter supports (7..20)"
    assert err_of("--model", run, "--detector-size", "64", "--opset", "13").startswith(
        "cannot export bavit.onnx at opset 13: Exporting the operator 'aten::scaled_dot_product_attention'")
    assert err_of("--pruned-tokens", "pool") == ("--pruned-tokens pool is not exported yet (only drop); "
                                                 "pool and preserve run in prune-eval's PyTorch forward")
    assert err_of("--model", run, "--sparsity", "0.3", "--policy", "threshold").startswith(
        "--sparsity with --policy threshold needs a calibration set")
    assert err_of("--model", run, "--policy", "topk") == "--policy topk needs --sparsity"
    assert err_of("--threshold", "0.4") == ("--threshold, --sparsity and --policy set pipeline.onnx's token "
                                            "decision: they need --model")
    (tmp_path / "notdet").mkdir()
    (tmp_path / "notdet" / "weights.bin").write_bytes(b"x")
    assert err_of_det(tmp_path / "notdet") == f"{tmp_path / 'notdet'}: not a Hugging Face model directory (config.json missing)"
    assert not (tmp_path / "x").exists()  # nothing is left behind by a failed export
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert err_of() == ("ONNX export and --runtime onnx need the [onnx] extra (onnxruntime is missing): "
                        "pip install -e \".[onnx]\" in a clone, or pip install 'bavit[onnx]' (onnx and onnxruntime)")


@pytest.fixture(scope="module")
def labelled(coco_synth, tmp_path_factory):
    from bavit_core.data import open_dataset
    from bavit_core.data.grid import GridSpec
    from bavit_core.labels import LabelOptions, label_dataset

    d = tmp_path_factory.mktemp("onnx_pe")
    aset = open_dataset("coco", root=coco_synth, split="val2017", need_masks=True)
    label_dataset(aset, LabelOptions(source="masks", grid=GridSpec(64, 64, 16)), d / "val.parquet")
    return d / "val.parquet"


def test_prune_eval_onnx_runtime_gives_the_torch_rows(models, exported, labelled, coco_synth, tmp_path):
    common = ["prune-eval", "--detector", models["mid"], "--model", models["run"], "--root", coco_synth,
              "--split", "val2017", "--labels", labelled, "--detector-size", "64", "--thresholds", "0.3,0.6",
              "--batch-size", "3", "--timing-images", "2", "--timing-repeats", "1"]
    code, _, err = run_cli(*common, "--out", tmp_path / "torch")
    assert code == 0, err
    code, _, err = run_cli(*common, "--out", tmp_path / "onnx", "--runtime", "onnx", "--exported", exported["thr"])
    assert code == 0, err
    rows = {k: list(csv.DictReader(open(tmp_path / k / "results.csv"))) for k in ("torch", "onnx")}
    assert [(r["selector"], r["threshold"]) for r in rows["onnx"]] == \
           [(r["selector"], r["threshold"]) for r in rows["torch"]] == [
        ("dense", "nan"), ("bavit", "0.3"), ("bavit", "0.6"), ("oracle", "nan"), ("random", "0.3"), ("random", "0.6")]
    exact = ("sparsity", "bavit_tokens", "yolos_tokens", "yolos_pruned_tokens", "total_tokens",
             "token_reduction_pct", "gflops", "flop_speedup", "n_images")
    for t, o in zip(rows["torch"], rows["onnx"]):
        for c in exact:
            assert o[c] == t[c], (t["selector"], c)
        for c in ("map", "map50", "map75"):
            assert abs(float(o[c]) - float(t[c])) <= 1e-4, (t["selector"], c)
        assert o["latency_ms"] == "nan" and t["latency_ms"] != "nan"  # ORT speed: bench_onnx.py
    assert 0 < float(rows["torch"][1]["sparsity"]) < 1 and rows["torch"][1]["sparsity"] != rows["torch"][2]["sparsity"]
    for name in ("dense", "bavit_0.30", "oracle", "random_0.60"):
        a = json.loads((tmp_path / "torch" / "detections" / f"{name}.json").read_text())
        b = json.loads((tmp_path / "onnx" / "detections" / f"{name}.json").read_text())
        assert [(x["image_id"], x["category_id"]) for x in a] == [(y["image_id"], y["category_id"]) for y in b]
        np.testing.assert_allclose([x["score"] for x in a], [y["score"] for y in b], atol=TOL, rtol=0)
        # boxes are in pixels of the original image (160 px wide): 1e-4 of it
        np.testing.assert_allclose([x["bbox"] for x in a], [y["bbox"] for y in b], atol=TOL * 160, rtol=0)
    meta = json.loads((tmp_path / "onnx" / "meta.json").read_text())
    assert meta["options"]["runtime"] == "onnx" and meta["options"]["exported"] == str(exported["thr"])


def test_prune_eval_onnx_checks_the_export_against_its_inputs(models, exported, coco_synth, tmp_path):
    base = ["prune-eval", "--root", coco_synth, "--split", "val2017", "--timing-images", "0", "--out", tmp_path / "r"]

    def err_of(*args):
        code, _, err = run_cli(*base, *args)
        assert code == 1 and err.count("\n") == 1, err
        return err.strip()

    thr = exported["thr"]
    assert err_of("--detector", models["mid"], "--detector-size", "96", "--runtime", "onnx", "--exported", thr) == \
        "Error: --detector-size 96x96 differs from the exported graphs' 64x64"
    assert err_of("--detector", models["plain"], "--detector-size", "64", "--runtime", "onnx", "--exported", thr) == \
        f"Error: --exported {thr} was made from another detector (its weights differ from --detector)"
    assert err_of("--detector", models["mid"], "--detector-size", "64", "--runtime", "onnx") == \
        "Error: --runtime onnx needs --exported DIR (from bavit export)"
    assert err_of("--detector", models["mid"], "--detector-size", "64", "--exported", thr) == \
        "Error: --exported goes with --runtime onnx"
    assert err_of("--detector", models["mid"], "--detector-size", "64", "--runtime", "onnx", "--exported",
                  models["run"]) == f"Error: {models['run']}: not a bavit export directory (manifest.json missing)"
    assert not (tmp_path / "r").exists()


def test_shipped_demo_detector_in_onnx_runtime_equals_pytorch(coco_synth, tmp_path):
    from bavit_core.data.images import load_image, to_input
    from bavit_core.demo import shipped_detector
    from bavit_core.detection.yolos import IMAGE_MEAN, IMAGE_STD

    det_dir = shipped_detector()
    size = (128, 128)  # its preprocessor_config.json: the default export size
    code, _, err = run_cli("export", "--detector", det_dir, "--out", tmp_path / "demo")
    assert code == 0, err
    assert json.loads((tmp_path / "demo" / "manifest.json").read_text())["detector"]["input_size"] == [128, 128]
    det = load_detector(str(det_dir))
    ort = ExportedModels(tmp_path / "demo", det, size)
    files = sorted((coco_synth / "val2017").iterdir())[:3]
    x = to_input(np.stack([load_image(f, size) for f in files]), IMAGE_MEAN, IMAGE_STD)
    p = ort.n_patches
    g = torch.Generator().manual_seed(0)
    for k in (p, 0, p // 5, p // 2):
        keep = torch.zeros(3, p, dtype=torch.bool)
        for i in range(3):
            keep[i, torch.randperm(p, generator=g)[:k]] = True
        with torch.no_grad():
            ref = pruned_forward(det, x, keep)
        logits, boxes = ort.detect(x, keep)
        np.testing.assert_allclose(boxes.numpy(), ref.pred_boxes.numpy(), atol=TOL, rtol=0)
        np.testing.assert_allclose(logits.softmax(-1).numpy(), ref.logits.softmax(-1).numpy(), atol=TOL, rtol=0)
