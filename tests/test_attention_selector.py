"""The attention selector (issue 24): YOLOS ranks its own patch tokens by the attention CLS
and the detection tokens pay them in layer k and runs the later layers on the kept ones."""
import csv
import json
import math

import numpy as np
import pytest
import torch
from transformers import YolosForObjectDetection

import bavit_core.detection.pruned as pruned_mod
from bavit_core.detection.accounting import detector_gflops, token_columns
from bavit_core.detection.layered import layered_forward
from bavit_core.detection.pruned import TREATMENTS, pruned_forward
from bavit_core.detection.yolos import init_new_yolos, tiny_yolos_config

from .cli_helpers import run_cli


def make(mid=False, size=(64, 96), seed=0):
    """A nano YOLOS (4 layers) with large random CLS/detection tokens and positions and
    scaled-up attention and residual weights, so a misplaced token or position shows."""
    torch.manual_seed(seed)
    cfg = tiny_yolos_config("nano", num_labels=5, image_size=size, use_mid_position_embeddings=mid, num_hidden_layers=4)
    m = YolosForObjectDetection(cfg).eval()
    init_new_yolos(m, seed)
    with torch.no_grad():
        for t in (m.vit.embeddings.position_embeddings, m.vit.embeddings.cls_token, m.vit.embeddings.detection_tokens):
            t.mul_(25)
        if mid:
            m.vit.encoder.interpolation.mid_position_embeddings.mul_(25)
        for lyr in m.vit.encoder.layer:  # sharper attention, larger updates: which tokens a layer sees shows
            for lin in (lyr.attention.attention.query, lyr.attention.attention.key, lyr.attention.attention.value,
                        lyr.attention.output.dense, lyr.output.dense):
                lin.weight.mul_(8)
    return m


@pytest.fixture(params=["native", "loop"])
def encoder_path(request, monkeypatch):
    """Both ways the later layers run on CPU: torch's fused native layer, or our loop."""
    monkeypatch.setattr(pruned_mod, "NATIVE_MAX_TOKENS", 10 ** 6 if request.param == "native" else 0)
    monkeypatch.setattr(pruned_mod, "NATIVE_MIN_TOKENS_BATCHED", 0)
    return request.param


@pytest.mark.parametrize("treatment", TREATMENTS)
@pytest.mark.parametrize("mid", [False, True])
def test_nothing_pruned_is_the_dense_model(mid, treatment, encoder_path):
    m = make(mid)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = m(pixel_values=x)
        for layer in (0, 1, 3):
            for layout in ("pack", "pad"):
                out = layered_forward(m, x, layer, sparsity=0.0, layout=layout, treatment=treatment)
                assert all(bool(k.all()) for k in out.keep)
                torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
                torch.testing.assert_close(out.pred_boxes, ref.pred_boxes, atol=1e-5, rtol=0)


@pytest.mark.parametrize("treatment", TREATMENTS)
@pytest.mark.parametrize("mid", [False, True])
def test_layer_zero_is_the_pruned_forward(mid, treatment):
    m = make(mid)
    x = torch.randn(3, 3, 64, 96)
    keep = torch.rand(3, 24, generator=torch.Generator().manual_seed(1)) < torch.tensor([[0.3], [0.6], [1.0]])
    keep[:, 5] = True
    with torch.no_grad():
        ref = pruned_forward(m, x, keep, treatment=treatment)
        out = layered_forward(m, x, 0, keep=keep, treatment=treatment)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.pred_boxes, ref.pred_boxes, atol=1e-5, rtol=0)
    assert out.kept.tolist() == keep.sum(1).tolist()


def brute_force_scores(m, x, layer):
    """The attention CLS and the detection tokens pay each patch in ``layer``, from the
    layer's own input in transformers' forward (a pre-hook: its recorded hidden states
    leave out the mid-layer position embeddings) and its LayerNorm, query and key modules."""
    cfg = m.config
    nd, heads = cfg.num_detection_tokens, cfg.num_attention_heads
    lyr = m.vit.encoder.layer[layer]
    seen = []
    hook = lyr.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        m(pixel_values=x)
        hook.remove()
        hs = seen[0]  # [CLS, patches, det]
        y = lyr.layernorm_before(hs)
        att = lyr.attention.attention
        b, n, c = y.shape
        q = att.query(y).view(b, n, heads, -1)
        k = att.key(y).view(b, n, heads, -1)
        probs = torch.einsum("bqhd,bkhd->bhqk", q, k).div(math.sqrt(c // heads)).softmax(-1)
        queries = torch.tensor([0, *range(n - nd, n)])
        return probs[:, :, queries, 1:n - nd].mean((1, 2))  # (B, P)


@pytest.mark.parametrize("layer", [0, 2])
def test_ranking_is_the_layers_attention(layer):
    m = make(mid=True)
    x = torch.randn(2, 3, 64, 96)
    ref = brute_force_scores(m, x, layer)
    with torch.no_grad():
        out = layered_forward(m, x, layer, sparsity=0.5)
    torch.testing.assert_close(torch.stack(out.scores), ref, atol=1e-6, rtol=1e-5)
    for i in range(2):  # the kept half are the highest-scored 12 of 24 tokens
        assert out.keep[i].sum() == 12
        assert set(torch.nonzero(out.keep[i])[:, 0].tolist()) == set(torch.argsort(-ref[i])[:12].tolist())
    # images of different sizes (the checkpoint's protocol) each rank their own grid
    xs = [torch.randn(3, 64, 96), torch.randn(3, 48, 64)]
    with torch.no_grad():
        mixed = layered_forward(m, xs, layer, sparsity=0.5)
        for xi, ki, si, logits in zip(xs, mixed.keep, mixed.scores, mixed.logits):
            one = layered_forward(m, xi[None], layer, sparsity=0.5)
            assert torch.equal(one.keep[0], ki)
            torch.testing.assert_close(one.scores[0], si, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(one.logits[0], logits, atol=1e-5, rtol=0)


def test_bad_layer():
    m = make()
    with pytest.raises(ValueError, match=r"layer must lie in 0..3"):
        layered_forward(m, torch.randn(1, 3, 64, 96), 4, sparsity=0.5)


def test_accounting_counts_the_dense_layers():
    """Worked on paper for a 4-layer nano YOLOS (d 64, MLP 128, 10 detection tokens, 5
    labels) on a 64x96 image (24 patches) keeping 12 after k = 1 dense layer."""
    cfg = make().config
    cols = token_columns(np.array([0.5]), 24, 4, 0, 0, False, "drop", dense_layers=1)
    # YOLOS 4 x 24 = 96; computed 1 x 24 + 3 x 12 = 60; reduction 36 / 96
    assert (cols["yolos_tokens"], cols["yolos_pruned_tokens"], cols["token_reduction_pct"]) == (96, 60, 37.5)
    pool = token_columns(np.array([0.5]), 24, 4, 0, 0, False, "pool", dense_layers=1)
    assert pool["yolos_pruned_tokens"] == 63  # + one pool token in each of the 3 later layers
    pres = token_columns(np.array([0.5]), 24, 4, 0, 0, False, "preserve", dense_layers=1)
    assert (pres["yolos_pruned_tokens"], pres["kv_only_tokens"]) == (60, 36)  # 3 layers x 12 frozen
    # k = 0 is today's eq. 4
    assert token_columns(np.array([0.5]), 24, 4, 0, 0, False, dense_layers=0) == \
        token_columns(np.array([0.5]), 24, 4, 0, 0, False)
    # MACs: embedding 24 x 768 x 64 = 1 179 648; one dense layer on 35 tokens
    # 4·35·64² + 2·35·64·128 + 2·35²·64 = 1 303 680; scores 35·64² + 11·64² + 11·35·64 = 213 056;
    # three layers on 23 tokens 3 x (4·23·64² + 2·23·64·128 + 2·23²·64) = 2 464 128;
    # heads 10 x (2·64² + 64·6 + 2·64² + 64·4) = 170 240; total 5 330 752 MACs
    assert detector_gflops(cfg, np.array([12.0]), 24, "drop", dense_layers=1) == pytest.approx(2 * 5330752 / 1e9,
                                                                                              rel=1e-12)
    # with nothing pruned after layer 0 it costs dense + the embedding is the same + the scores
    dense = detector_gflops(cfg, np.array([24.0]), 24)
    assert detector_gflops(cfg, np.array([24.0]), 24, dense_layers=0) == pytest.approx(
        dense + 2 * (35 * 64 * 64 + 11 * 64 * 64 + 11 * 35 * 64) / 1e9, rel=1e-12)


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory):
    return build_synth_detector(tmp_path_factory.mktemp("att") / "det")


def build_synth_detector(d):
    """A nano YOLOS (3 layers) over the synthetic classes at 64 px, saved in ``d``."""
    from bavit_core.data.synthetic import CLASS_NAMES

    torch.manual_seed(0)
    cfg = tiny_yolos_config("nano", num_labels=len(CLASS_NAMES) + 1, image_size=(64, 64), num_hidden_layers=3,
                            id2label={0: "N/A", **{i + 1: n for i, n in enumerate(CLASS_NAMES)}})
    m = YolosForObjectDetection(cfg)
    init_new_yolos(m, 0)
    m.save_pretrained(d)
    return d


def run_att(detector_dir, coco_synth, out, *extra):
    return run_cli("prune-eval", "--detector", detector_dir, "--root", coco_synth, "--split", "val2017",
                   "--detector-size", "64", "--timing-images", "2", "--timing-repeats", "1", "--out", out, *extra)


def test_prune_eval_attention_rows(detector_dir, coco_synth, tmp_path):
    code, out, err = run_att(detector_dir, coco_synth, tmp_path / "res", "--selectors", "dense,attention",
                             "--sparsities", "0,0.5", "--prune-at-layer", "1")
    assert code == 0, err
    rows = list(csv.DictReader(open(tmp_path / "res" / "results.csv")))
    assert [(r["selector"], r["target"], r["policy"], r["prune_layer"]) for r in rows] == [
        ("dense", "nan", "threshold", "nan"), ("attention", "0", "topk", "1"), ("attention", "0.5", "topk", "1")]
    meta = json.loads((tmp_path / "res" / "meta.json").read_text())
    assert meta["rows"] == ["dense", "attention@1_topk_s0.00", "attention@1_topk_s0.50"]
    assert meta["per_image_sparsity"]["attention@1_topk_s0.50"] == [0.5] * 10
    half = rows[2]
    # 64 px: 4 x 4 = 16 patches, 3 layers: 48 tokens; 1 x 16 + 2 x 8 = 32 computed
    assert (float(half["yolos_tokens"]), float(half["yolos_pruned_tokens"]), float(half["sparsity"])) == (48, 32, 0.5)
    assert float(half["token_reduction_pct"]) == pytest.approx(100 / 3, abs=1e-4)  # 6 significant digits
    assert float(half["latency_ms"]) > 0 and float(rows[1]["token_reduction_pct"]) == 0
    # nothing pruned: the layer-1 forward's detections are the dense model's
    dense = json.loads((tmp_path / "res" / "detections" / "dense.json").read_text())
    same = json.loads((tmp_path / "res" / "detections" / "attention@1_topk_s0.00.json").read_text())
    assert [(d["image_id"], d["category_id"]) for d in dense] == [(d["image_id"], d["category_id"]) for d in same]
    np.testing.assert_allclose([d["score"] for d in same], [d["score"] for d in dense], atol=1e-5)
    assert "attention@1" in out  # the summary table names the layer
    # the row's detections are the layer-1 forward's, computed here for the first image
    from bavit_core.data import open_dataset
    from bavit_core.detect.predictor import PrunedDetector
    from bavit_core.detect.sources import to_inputs
    from bavit_core.detection.batches import batch_inputs
    from bavit_core.detection.cocoeval import detections_from_outputs

    engine = PrunedDetector.load(detector=str(detector_dir), detector_size=(64, 64), device="cpu")
    aset = open_dataset("coco", root=coco_synth, split="val2017")
    first = meta["image_ids"][0]
    i = list(aset.image_ids).index(first)
    u8, _, (h, w) = to_inputs(aset.images_dir / aset.file_names[i], engine.protocol.prepare, None)
    x, _ = batch_inputs(u8[None], None, slice(0, 1), engine.protocol, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        r = layered_forward(engine.detector, x, 1, sparsity=0.5)
    mine = detections_from_outputs(r.logits, r.pred_boxes, [first], [w], [h])
    row = [d for d in json.loads((tmp_path / "res" / "detections" / "attention@1_topk_s0.50.json").read_text())
           if d["image_id"] == first]
    assert [d["category_id"] for d in row] == [d["category_id"] for d in mine]
    np.testing.assert_allclose([d["score"] for d in row], [d["score"] for d in mine], atol=1e-5)


@pytest.mark.parametrize("extra, message", [
    (("--prune-at-layer", "-1", "--sparsities", "0.5"), "Error: --prune-at-layer must be at least 0; got -1"),
    (("--prune-at-layer", "3", "--sparsities", "0.5"), "Error: --prune-at-layer 3: the detector has 3 layers; "
                                                       "give 0 to 2"),
    (("--thresholds", "0.5",), "Error: the attention selector keeps a top share of the detector's tokens: "
                               "give --sparsities (it has no BG-probability thresholds)"),
])
def test_prune_eval_attention_bad_options(detector_dir, coco_synth, tmp_path, extra, message):
    code, _, err = run_att(detector_dir, coco_synth, tmp_path / "res", "--selectors", "dense,attention", *extra)
    assert (code, err.strip()) == (1, message)


def test_attention_is_not_a_default_selector(detector_dir, coco_synth, tmp_path):
    from bavit_core.evaluate.selectors import selectors_available

    assert selectors_available({"--model": True, "--labels": True}, None) == ["dense", "bavit", "oracle", "random"]
    assert selectors_available({}, ["attention"]) == ["attention"]


def test_an_attention_row_is_timed_apart_from_bavit():
    """Same kept counts, but the attention row's work (k dense layers and the scores) differs."""
    from bavit_core.evaluate.speed import _workload_key
    from bavit_core.evaluate.sweep import Row

    keep = np.zeros((3, 4, 4), bool)
    keep[:, :2] = True
    attention = Row("attention", math.nan, keep, prune_layer=0)
    assert _workload_key(Row("bavit", 0.5, keep), 3) != _workload_key(attention, 3)
    assert _workload_key(Row("attention", math.nan, keep, prune_layer=1), 3) != \
        _workload_key(Row("attention", math.nan, keep, prune_layer=2), 3)
