"""bavit detect --gate and PrunedDetector.load(gate=True): the trained token gate beside a
detector (finetune --train-gate) chooses the tokens on the user's images. The same
numbers as prune-eval's gate row (pycocotools on detections.json, per-image kept tokens);
--threshold 1.0 is the dense detector; outputs, metadata and the resume journal as for
BAViT; bad options one line with nothing written."""
import csv
import json
import shutil

import numpy as np
import pytest
import torch

from bavit_core.demo import shipped_detector
from bavit_core.detect.outputs import read_detections, read_summary
from bavit_core.detect.run import DetectOptions, detect_images
from bavit_core.detection.gate import TokenGate, save_gate

from .cli_helpers import run_cli
from .test_detect import _coco_map, make_run

LAYER = 2


def gate_for(det_dir, seed=0, layer=LAYER):
    """A random gate for the shipped detector with a wide spread of logits around 0 (its
    own decision prunes a different share of each image), saved beside a copy of it."""
    torch.manual_seed(seed)
    g = TokenGate(192, 16, layer).eval()
    with torch.no_grad():
        g.fc2.weight.normal_(0, 3.0)
        g.fc2.bias.fill_(-1.0)
    save_gate(g, det_dir, {"target_sparsity": 0.5, "relaxation": "ste", "epoch": 1})
    return det_dir


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    """Scenes of the layout the shipped detector was trained on, a gated copy of it and a
    BAViT run (for the refusals)."""
    from bavit_core.data.synthetic import synth_dataset

    root = tmp_path_factory.mktemp("gate_scenes")
    synth_dataset(root, n_images=16, fmt="coco", seed=11, size=(120, 160), val_fraction=0.5, scenes="simple")
    det = root / "gated"
    shutil.copytree(shipped_detector(), det)
    gate_for(det)
    make_run(root / "run")
    return root


def _val(root):
    return root / "val2017"


POINTS = {  # detect's options → prune-eval's options (its gate row)
    "own decision": ((), ("--thresholds", "0.5")),
    "topk": (("--sparsity", "0.5"), ("--sparsities", "0.5", "--policy", "topk")),
    "threshold pool": (("--threshold", "0.6", "--pruned-tokens", "pool"),
                       ("--thresholds", "0.6", "--pruned-tokens", "pool")),
}


@pytest.mark.parametrize("point", list(POINTS))
def test_gate_detect_then_cocoeval_gives_prune_evals_gate_row(point, gated, tmp_path):
    """detect --gate at one operating point, its detections.json scored by pycocotools =
    prune-eval's gate row (mAP, mean sparsity, each image's kept tokens). Catches: the gate
    run at another layer or another threshold/target, the gate's drop probability read as
    its keep probability, the treatment ignored, kept tokens reshaped onto the wrong grid,
    detect's gated forward drifting from prune-eval's."""
    ours, theirs = POINTS[point]
    det = gated / "gated"
    ann = gated / "annotations" / "instances_val2017.json"
    code, out, err = run_cli("detect", _val(gated), "--detector", det, "--gate", *ours, "--score-threshold", "0",
                             "--no-overlays", "--batch-size", "3", "--device", "cpu", "--out", tmp_path / "d")
    assert code == 0, err
    assert "gate after layer 2" in out and f"{det}: after layer 2, trained for sparsity 0.5" in out
    code, _, err = run_cli("prune-eval", "--detector", det, "--root", gated, "--split", "val2017", "--selectors",
                           "dense,gate", *theirs, "--timing-images", "0", "--batch-size", "4", "--device", "cpu",
                           "--out", tmp_path / "pe")
    assert code == 0, err
    rows = list(csv.DictReader(open(tmp_path / "pe" / "results.csv")))
    [row] = [r for r in rows if r["selector"] == "gate"]
    [dense] = [r for r in rows if r["selector"] == "dense"]
    dets = read_detections(tmp_path / "d", ann=ann)
    assert len(dets) == 8 * 10  # every detection token of the 8 images (score threshold 0)
    assert _coco_map(ann, dets) == pytest.approx(float(row["map"]), abs=1e-6)
    assert float(row["map"]) > 0.1 and float(row["map"]) != pytest.approx(float(dense["map"]), abs=1e-3)
    summary = read_summary(tmp_path / "d")
    assert np.mean([r["sparsity"] for r in summary]) == pytest.approx(float(row["sparsity"]), abs=1e-6)
    meta = json.loads((tmp_path / "pe" / "meta.json").read_text())
    name = next(k for k in meta["per_image_sparsity"] if k.startswith("gate@2"))
    pe_kept = {i: round((1 - s) * 64) for i, s in zip(meta["image_ids"], meta["per_image_sparsity"][name])}
    assert {r["image_id"]: r["kept_tokens"] for r in summary} == pe_kept
    assert all(r["tokens"] == 64 and r["bavit_ms"] == 0 for r in summary)
    kept = sorted(pe_kept.values())
    if point == "topk":
        assert kept == [32] * 8
    else:  # the gate's threshold: each image its own share
        assert kept[0] < kept[-1] and 0 < kept[0] and kept[-1] < 64
    settings = json.loads((tmp_path / "d" / "detect.json").read_text())["settings"]
    assert settings["gate"]["layer"] == 2 and settings["gate"]["target_sparsity"] == 0.5
    assert settings["operating_point"]["selector"] == "gate" and settings["operating_point"]["gate_layer"] == 2
    assert settings["model"] is None


def test_gate_threshold_one_is_the_dense_detector(gated, tmp_path):
    """--gate --threshold 1.0 prunes no token (drop probability < 1 for every token): the
    dense detector's detections (bit for bit) and every token kept, under each treatment.
    Catches: the threshold read as a keep probability (1.0 would then prune everything),
    a treatment token added when nothing is pruned."""
    common = ("--score-threshold", "0", "--no-overlays", "--batch-size", "4", "--device", "cpu")
    det = gated / "gated"
    code, _, err = run_cli("detect", _val(gated), "--detector", det, *common, "--out", tmp_path / "dense")
    assert code == 0, err
    want = json.loads((tmp_path / "dense" / "detections.json").read_text())
    for treatment in ("drop", "pool", "preserve"):
        out = tmp_path / treatment
        code, _, err = run_cli("detect", _val(gated), "--detector", det, "--gate", "--threshold", "1.0",
                               "--pruned-tokens", treatment, *common, "--out", out)
        assert code == 0, err
        got = json.loads((out / "detections.json").read_text())
        assert len(got) == 8 * 10 and got == want  # bit for bit: the same encoder code on every token
        assert all(r["kept_tokens"] == r["tokens"] == 64 for r in read_summary(out))


def test_the_library_gives_what_the_cli_wrote_and_names_the_gate(gated, tmp_path):
    """PrunedDetector.load(detector=G, gate=True) on PIL images = detect --gate's files
    (kept tokens on the detector grid, boxes, scores); describe() names the gate (layer,
    target); bavit_ms is 0; overlays are written as for BAViT."""
    from PIL import Image

    from bavit_core import PrunedDetector

    det = gated / "gated"
    code, _, err = run_cli("detect", _val(gated), "--detector", det, "--gate", "--device", "cpu", "--batch-size", "5",
                           "--out", tmp_path / "d")
    assert code == 0, err
    lib = PrunedDetector.load(detector=str(det), gate=True, device="cpu")
    d = lib.describe()
    assert d["gate"]["layer"] == 2 and d["gate"]["target_sparsity"] == 0.5 and d["gate"]["detector"] == str(det)
    assert d["operating_point"]["description"] == \
        "gate after layer 2: drop-probability threshold 0.5 (its own decision)"
    files = sorted(_val(gated).iterdir())
    results = lib([Image.open(f) for f in files])
    summary = {r["file_name"]: r for r in read_summary(tmp_path / "d")}
    written = json.loads((tmp_path / "d" / "detections.json").read_text())
    for f, r in zip(files, results):
        assert r.keep.shape == (8, 8) and r.bavit_ms == 0 and r.detector_ms > 0
        assert r.kept == summary[f.name]["kept_tokens"]
        mine = [x for x in written if x["file_name"] == f.name]
        assert len(mine) == len(r.scores)
        np.testing.assert_allclose([x["score"] for x in mine], r.scores, atol=1e-6, rtol=0)
    assert len({r.kept for r in results}) > 1  # the gate's own decision: each image its own share
    assert sorted(p.name for p in (tmp_path / "d" / "overlays").iterdir()) == sorted(f"{f.name}.png" for f in files)
    # the same kept tokens as the gate's own scores on the layered forward, on the same grid
    from bavit_core.detect.sources import to_inputs
    from bavit_core.detection.batches import batch_inputs
    from bavit_core.detection.layered import layered_forward

    u8 = np.stack([to_inputs(f, lib.protocol.prepare, None)[0] for f in files[:2]])
    x, _ = batch_inputs(u8, None, slice(0, 2), lib.protocol, "cpu", torch.float32)
    with torch.no_grad():
        ref = layered_forward(lib.detector, x, 2, gate=lib.gate, threshold=0.5)
    for k, r in zip(ref.keep, results[:2]):
        assert np.array_equal(k.numpy().reshape(8, 8), r.keep)


def test_an_interrupted_gated_run_resumes_and_another_gate_is_refused(gated, tmp_path):
    """The journal works for gated rows: stopped after its first batch, the rerun writes what
    one uninterrupted run writes. A directory made with another gate (retrained weights),
    or with BAViT, is refused."""
    det = tmp_path / "gated"  # a copy: its gate is retrained below
    shutil.copytree(gated / "gated", det)
    common = dict(detector=str(det), gate=True, sparsity=0.25, device="cpu", batch_size=3, score_threshold=0.0,
                  overlays=False)
    val = str(_val(gated))
    whole = detect_images(DetectOptions(images=[val], out=str(tmp_path / "whole"), **common))
    assert whole["new_images"] == 8 and whole["gate"]["layer"] == 2

    def stop_after_first_batch(advance, total):
        if advance:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        detect_images(DetectOptions(images=[val], out=str(tmp_path / "d"), **common), stop_after_first_batch)
    again = detect_images(DetectOptions(images=[val], out=str(tmp_path / "d"), **common))
    assert (again["resumed_images"], again["new_images"], again["n_images"]) == (3, 5, 8)
    strip = lambda p: [{k: v for k, v in r.items() if not k.endswith("_ms")} for r in read_summary(p)]  # noqa: E731
    assert strip(tmp_path / "d") == strip(tmp_path / "whole")
    assert all(r["kept_tokens"] == 48 for r in read_summary(tmp_path / "d"))
    assert (tmp_path / "d" / "detections.json").read_text() == (tmp_path / "whole" / "detections.json").read_text()

    cli = ("--gate", "--sparsity", "0.25", "--score-threshold", "0", "--no-overlays", "--device", "cpu")
    code, out, err = run_cli("detect", val, "--detector", det, *cli, "--out", tmp_path / "d")
    assert code == 0 and "8 (0 new, 8 from an earlier run)" in out, err  # the same settings: nothing new
    gate_for(det, seed=1)  # retrain the gate in place: same directory, other weights
    code, _, err = run_cli("detect", val, "--detector", det, *cli, "--out", tmp_path / "d")
    assert code == 1 and err == (f"Error: --out {tmp_path / 'd'} holds detections made with another gate; "
                                 "name a new --out directory (or remove it) to run with these settings\n")
    code, _, err = run_cli("detect", val, "--detector", det, "--model", gated / "run", *cli[1:],
                           "--out", tmp_path / "d")
    assert code == 1 and err.startswith(f"Error: --out {tmp_path / 'd'} holds detections made with another model;")


@pytest.mark.parametrize("args, message", [
    (("--detector", "PLAIN", "--gate"),
     "Error: --gate uses the gate beside --detector, and PLAIN has none (no gate.json); "
     "train one with bavit finetune --train-gate"),
    (("--gate", "--model", "RUN"),
     "Error: --gate and --model are two token selectors: give one (the gate beside --detector, or a BAViT run)"),
    (("--gate", "--runtime", "onnx", "--exported", "RUN"),
     "Error: --runtime onnx runs exported graphs, and bavit export writes no gate graph: run --gate with "
     "--runtime torch"),
    (("--gate", "--sparsity", "0.5", "--policy", "threshold"),
     "Error: --gate reaches a --sparsity in every image (--policy topk) only: drop --policy threshold and "
     "--calibrate-on, or give --threshold T"),
    (("--gate", "--sparsity", "0.5", "--calibrate-on", "VAL"),
     "Error: --gate reaches a --sparsity in every image (--policy topk) only: drop --policy threshold and "
     "--calibrate-on, or give --threshold T"),
    (("--gate", "--threshold", "1.5"), "Error: --threshold must lie in [0, 1]; got 1.5"),
    (("--gate", "--sparsity", "1.0"), "Error: --sparsity must lie in [0, 1); got 1.0"),
    (("--gate", "--pruned-tokens", "keep"), "Error: unknown --pruned-tokens 'keep'; choose drop, pool, preserve"),
    (("--gate", "--threshold", "0.5", "--policy", "topk"), "Error: --policy topk needs --sparsity"),
])
def test_bad_gate_options_are_one_line_and_write_nothing(args, message, gated, tmp_path):
    subst = {"RUN": str(gated / "run"), "VAL": str(_val(gated)), "PLAIN": str(shipped_detector())}
    args = tuple(subst.get(a, a) for a in args)
    det = () if "--detector" in args else ("--detector", gated / "gated")
    code, _, err = run_cli("detect", _val(gated), *det, *args, "--device", "cpu", "--out", tmp_path / "d")
    assert (code, err) == (1, message.replace("PLAIN", str(shipped_detector())) + "\n")
    assert not (tmp_path / "d").exists()


def test_a_damaged_gate_is_one_error_line(gated, tmp_path):
    det = tmp_path / "det"
    shutil.copytree(gated / "gated", det)
    (det / "gate.safetensors").write_bytes(b"not a safetensors file")
    code, _, err = run_cli("detect", _val(gated), "--detector", det, "--gate", "--device", "cpu",
                           "--out", tmp_path / "d")
    assert (code, err) == (1, f"Error: {det / 'gate.safetensors'}: unreadable gate weights (SafetensorError)\n")
    assert not (tmp_path / "d").exists()
    (det / "gate.json").write_text(json.dumps({"layer": 9, "hidden": 16, "hidden_size": 192}))
    code, _, err = run_cli("detect", _val(gated), "--detector", det, "--gate", "--device", "cpu",
                           "--out", tmp_path / "d")
    assert (code, err) == (1, f"Error: {det / 'gate.json'}: the gate reads layer 9, the detector has 6 (layers 0 to 5)\n")
    assert not (tmp_path / "d").exists()


def test_gate_under_the_checkpoints_own_protocol_keeps_each_images_grid(tmp_path):
    """A hub-style yolos-tiny processor (shortest edge, here 128, aspect kept): a landscape
    and a portrait image in one batch get the gate's kept tokens on their own grids (8x10
    and 10x8), exactly the layered forward's choice on that batch. Catches kept tokens
    reshaped onto another image's grid, or onto (gw, gh)."""
    from bavit_core import PrunedDetector
    from bavit_core.detect.sources import to_inputs
    from bavit_core.detection.batches import batch_inputs
    from bavit_core.detection.layered import layered_forward

    from .hub_fixtures import build_hub_yolos

    det = build_hub_yolos("yolos-tiny", tmp_path / "tiny", layers=2, hidden=48)
    proc = det / "preprocessor_config.json"
    proc.write_text(proc.read_text().replace('"shortest_edge": 512', '"shortest_edge": 128'))
    torch.manual_seed(0)
    g = TokenGate(48, 12, 1).eval()
    with torch.no_grad():
        g.fc2.weight.normal_(0, 3.0)
        g.fc2.bias.zero_()
    save_gate(g, det, {"target_sparsity": 0.3})
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (120, 160, 3), dtype=np.uint8), rng.integers(0, 255, (160, 120, 3), dtype=np.uint8)]
    for kw in ({}, {"sparsity": 0.3}):
        lib = PrunedDetector.load(detector=str(det), gate=True, device="cpu", **kw)
        results = lib(images)
        assert [r.keep.shape for r in results] == [(8, 10), (10, 8)]
        u8 = [to_inputs(im, lib.protocol.prepare, None)[0] for im in images]
        x, _ = batch_inputs(u8, None, slice(0, 2), lib.protocol, "cpu", torch.float32)
        with torch.no_grad():
            ref = layered_forward(lib.detector, x, 1, gate=lib.gate, **(kw or {"threshold": 0.5}))
        for k, r in zip(ref.keep, results):
            assert np.array_equal(k.numpy().reshape(r.keep.shape), r.keep) and 0 < r.kept < r.tokens
        if kw:
            assert [r.kept for r in results] == [56, 56]  # ceil(0.7 * 80)
