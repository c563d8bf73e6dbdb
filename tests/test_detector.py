import numpy as np
import pytest
import torch
from transformers import YolosForObjectDetection

from bavit_core.detection.accounting import detector_gflops, token_columns
import bavit_core.detection.pruned as pruned_mod
from bavit_core.detection.pruned import LAYOUTS, TREATMENTS, pruned_forward
from bavit_core.detection.yolos import init_new_yolos, load_detector, tiny_yolos_config
from bavit_core.runtime.errors import BavitError, InputFileError, OptionError


def make(mid=False, size=(64, 96), labels=5, seed=0):
    """A nano YOLOS with random CLS/detection tokens and (mid-layer) position embeddings:
    with transformers' zero defaults a forward that loses or misplaces positions would
    still pass."""
    torch.manual_seed(seed)
    cfg = tiny_yolos_config("nano", num_labels=labels, image_size=size, use_mid_position_embeddings=mid)
    m = YolosForObjectDetection(cfg).eval()
    init_new_yolos(m, seed)
    with torch.no_grad():  # larger than init_new_yolos's std 0.02, so positions matter to 1e-5
        for t in (m.vit.embeddings.position_embeddings, m.vit.embeddings.cls_token, m.vit.embeddings.detection_tokens):
            t.mul_(25)
        if mid:
            m.vit.encoder.interpolation.mid_position_embeddings.mul_(25)
    return m


def hf_reference(m, x, keep, treatment):
    """Independent reference built from transformers' own modules (YolosEmbeddings,
    YolosLayer, the mid-position interpolation, the final layernorm and heads), one image
    at a time, on the sequence each treatment defines:
    drop = the sequence with pruned tokens removed; pool = that plus one token, the mean of
    the pruned tokens' input embeddings (and mid-layer position embeddings); preserve = the
    full sequence where pruned positions are reset to their input embedding after every
    layer. Returns logits, boxes and the final states of [CLS, kept patches, det]."""
    vit, cfg = m.vit, m.config
    nd = cfg.num_detection_tokens
    H, W = x.shape[-2:]
    logits, boxes, states = [], [], []
    for i in range(x.shape[0]):
        e = vit.embeddings(x[i:i + 1])  # (1, 1 + P + D, C): HF adds the position embeddings
        p = e.shape[1] - 1 - nd
        k = keep[i].reshape(-1)
        kept = torch.nonzero(k).flatten() + 1
        pruned = torch.nonzero(~k).flatten() + 1
        mid = vit.encoder.interpolation((H, W)) if cfg.use_mid_position_embeddings else None
        reset = None
        if treatment == "preserve":
            idx = torch.arange(e.shape[1])
            reset = torch.zeros(1, e.shape[1], 1, dtype=torch.bool)
            reset[0, pruned] = True
        else:
            idx = torch.cat([torch.zeros(1, dtype=torch.long), kept, torch.arange(1 + p, 1 + p + nd)])
        h = e[:, idx]
        mids = None if mid is None else mid[:, :, idx]
        if treatment == "pool" and len(pruned):
            h = torch.cat([h, e[:, pruned].mean(1, keepdim=True)], 1)
            if mid is not None:
                mids = torch.cat([mids, mid[:, :, pruned].mean(2, keepdim=True)], 2)
        for li, layer in enumerate(vit.encoder.layer):
            h = layer(h)
            h = h[0] if isinstance(h, tuple) else h
            if mids is not None and li < cfg.num_hidden_layers - 1:
                h = h + mids[li]
            if reset is not None:
                h = torch.where(reset, e, h)
        h = vit.layernorm(h)
        det = h[:, len(idx) - nd:len(idx)]
        logits.append(m.class_labels_classifier(det))
        boxes.append(m.bbox_predictor(det).sigmoid())
        states.append(h[0, :len(idx)] if treatment != "preserve" else h[0])
    return torch.cat(logits), torch.cat(boxes), states


@pytest.fixture(params=["native", "loop"])
def encoder_path(request, monkeypatch):
    """Both ways the encoder runs at inference on CPU: torch's fused native layer taken
    wherever it applies, whatever the sequence length, or never (our per-op loop)."""
    monkeypatch.setattr(pruned_mod, "NATIVE_MAX_TOKENS", 10 ** 6 if request.param == "native" else 0)
    monkeypatch.setattr(pruned_mod, "NATIVE_MIN_TOKENS_BATCHED", 0)
    return request.param


def ragged_keep(g, b=4, shares=(0.2, 0.5, 0.8, 1.0)):
    keep = torch.rand(b, 4, 6, generator=g) < torch.tensor(shares[:b])[:, None, None]
    keep[0, 0, 0] = True
    keep[0, 1:, :] = False  # image 0: few kept tokens, one of them not among the first patches
    keep[0, 2, 3] = True
    return keep


@pytest.mark.parametrize("treatment", TREATMENTS)
@pytest.mark.parametrize("mid", [False, True])
def test_nothing_pruned_is_the_original_model(mid, treatment, encoder_path):
    m = make(mid)
    x = torch.randn(3, 3, 64, 96)
    with torch.no_grad():
        ref = m(pixel_values=x)
        for layout in ("pack", "pad"):
            out = pruned_forward(m, x, None, layout=layout, return_hidden=True, treatment=treatment)
            torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(out.pred_boxes, ref.pred_boxes, atol=1e-5, rtol=0)
            torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=0)
            all_kept = pruned_forward(m, x, torch.ones(3, 4, 6, dtype=torch.bool), layout=layout, treatment=treatment)
            torch.testing.assert_close(all_kept.logits, ref.logits, atol=1e-5, rtol=0)


def test_interpolated_positions_at_another_input_size(encoder_path):
    m = make(mid=True, size=(64, 64))
    x = torch.randn(2, 3, 96, 128)  # YOLOS interpolates its (mid-layer) position embeddings
    keep = ragged_keep(torch.Generator().manual_seed(5), b=2, shares=(0.5, 0.7)).repeat(1, 2, 2)[:, :6, :8]
    with torch.no_grad():
        torch.testing.assert_close(pruned_forward(m, x).logits, m(pixel_values=x).logits, atol=1e-5, rtol=0)
        for t in TREATMENTS:
            ref_logits, ref_boxes, _ = hf_reference(m, x, keep, t)
            out = pruned_forward(m, x, keep, treatment=t)
            torch.testing.assert_close(out.logits, ref_logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(out.pred_boxes, ref_boxes, atol=1e-5, rtol=0)


@pytest.mark.parametrize("treatment", TREATMENTS)
@pytest.mark.parametrize("mid", [False, True])
def test_pruned_forward_equals_transformers_reference(mid, treatment, encoder_path):
    """Catches a forward that drops the (mid-layer) position embeddings when pruning or
    gives kept tokens the positions of other patches: the reference takes HF's own
    embeddings and gathers them at the kept positions."""
    m = make(mid)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 64, 96, generator=g)
    keep = ragged_keep(g)
    nd = m.config.num_detection_tokens
    with torch.no_grad():
        ref_logits, ref_boxes, ref_states = hf_reference(m, x, keep, treatment)
        pack = pruned_forward(m, x, keep, layout="pack", return_hidden=True, treatment=treatment)
        pad = pruned_forward(m, x, keep, layout="pad", return_hidden=True, treatment=treatment)
        route = pruned_mod._padded_on_cpu
        pruned_mod._padded_on_cpu = lambda keys: not route(keys)  # pack's other way to attend
        try:
            pack1 = pruned_forward(m, x, keep, layout="pack", return_hidden=True, treatment=treatment)
        finally:
            pruned_mod._padded_on_cpu = route
        for out in (pack, pad, pack1):
            torch.testing.assert_close(out.logits, ref_logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(out.pred_boxes, ref_boxes, atol=1e-5, rtol=0)
            torch.testing.assert_close(out.last_hidden_state, pack.last_hidden_state, atol=1e-5, rtol=0)
        for i in range(4):
            single = pruned_forward(m, x[i:i + 1], keep[i:i + 1], treatment=treatment)
            torch.testing.assert_close(pad.logits[i:i + 1], single.logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(pack.pred_boxes[i:i + 1], single.pred_boxes, atol=1e-5, rtol=0)
            # returned states: CLS, kept patches and detection tokens as in the reference
            k = keep[i].reshape(-1)
            hid = pack.last_hidden_state[i]
            if treatment == "preserve":
                torch.testing.assert_close(hid, ref_states[i], atol=1e-5, rtol=0)
            else:
                ours = torch.cat([hid[:1], hid[1:25][k], hid[25:]])
                torch.testing.assert_close(ours, torch.cat([ref_states[i][:1 + int(k.sum())],
                                                            ref_states[i][-nd:]]), atol=1e-5, rtol=0)
    patches = pack.last_hidden_state[:, 1:25].reshape(4, 4, 6, -1)
    if treatment == "preserve":  # frozen: the final layernorm of their input embeddings
        emb = m.vit.embeddings(x)[:, 1:25].reshape(4, 4, 6, -1)
        torch.testing.assert_close(patches[~keep], m.vit.layernorm(emb)[~keep], atol=1e-5, rtol=0)
    else:  # pruned patch tokens are never computed: their returned states are zeros
        assert (patches[~keep] == 0).all()
    assert (patches[keep].abs().sum(-1) > 0).all()
    assert pack.kept.tolist() == keep.reshape(4, -1).sum(1).tolist()


@pytest.mark.parametrize("treatment", TREATMENTS)
def test_images_with_no_kept_patch(treatment, encoder_path):
    m = make(mid=True)
    x = torch.randn(2, 3, 64, 96)
    for keep in (torch.zeros(2, 4, 6, dtype=torch.bool), torch.stack([torch.zeros(4, 6, dtype=torch.bool),
                                                                      torch.ones(4, 6, dtype=torch.bool)])):
        with torch.no_grad():
            ref_logits, ref_boxes, _ = hf_reference(m, x, keep, treatment)
            for layout in ("pack", "pad"):
                out = pruned_forward(m, x, keep, layout=layout, treatment=treatment)
                torch.testing.assert_close(out.logits, ref_logits, atol=1e-5, rtol=0)
                torch.testing.assert_close(out.pred_boxes, ref_boxes, atol=1e-5, rtol=0)


def test_treatments_differ_when_tokens_are_pruned():
    m = make(mid=True)
    x = torch.randn(2, 3, 64, 96)
    keep = ragged_keep(torch.Generator().manual_seed(4), b=2)
    with torch.no_grad():
        outs = {t: pruned_forward(m, x, keep, return_hidden=True, treatment=t).last_hidden_state[:, 25:]
                for t in TREATMENTS}  # detection tokens' final states (layer-normed, order 1)
    for a, b in (("drop", "pool"), ("drop", "preserve"), ("pool", "preserve")):
        assert (outs[a] - outs[b]).abs().max() > 1e-3, (a, b)
    with pytest.raises(ValueError, match="treatment must be one of"):
        pruned_forward(m, x, keep, treatment="merge")


def test_cached_weights_follow_parameter_updates(encoder_path):
    """Positions and fused q/k/v are cached without autograd: an in-place update (optimizer
    step, load_state_dict) must be seen by the next call."""
    m = make(mid=True)
    x = torch.randn(1, 3, 64, 96)
    keep = torch.rand(1, 4, 6) < 0.5
    with torch.inference_mode():
        pruned_forward(m, x, keep)
    with torch.no_grad():
        m.vit.embeddings.position_embeddings.add_(0.5)
        m.vit.encoder.layer[0].attention.attention.key.weight.mul_(1.5)
        m.vit.encoder.interpolation.mid_position_embeddings.add_(0.5)
    with torch.inference_mode():
        out = pruned_forward(m, x, keep)
    with torch.no_grad():
        ref_logits, _, _ = hf_reference(m, x, keep, "drop")
    torch.testing.assert_close(out.logits, ref_logits, atol=1e-5, rtol=0)


def test_native_encoder_layer_taken_only_at_cpu_inference_on_short_sequences(monkeypatch):
    """The fused native layer runs once per image and layer on that image's tokens when it
    applies, and never for preserve, with autograd, in training, in another dtype, under
    ONNX export, with the fast path switched off or when one image's sequence is too long."""
    seen = []
    native = torch._transformer_encoder_layer_fwd

    def counting(src, *args):
        seen.append(src.shape[1])
        return native(src, *args)

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", counting)
    monkeypatch.setattr(pruned_mod, "NATIVE_MIN_TOKENS_BATCHED", 0)
    m = make(mid=True)
    x = torch.randn(3, 3, 64, 96)
    keep = ragged_keep(torch.Generator().manual_seed(6), b=3)
    kept = keep.reshape(3, -1).sum(1).tolist()
    assert 0 < min(kept) and max(kept) < 24  # every image has pruned tokens (a pool token)
    nd, layers = m.config.num_detection_tokens, m.config.num_hidden_layers

    def calls(x=x, **kw):
        seen.clear()
        out = pruned_forward(m, x, keep, **kw)
        return list(seen), out

    with torch.no_grad():
        ref = {t: hf_reference(m, x, keep, t)[0] for t in ("drop", "pool")}
        for layout in LAYOUTS:
            for t in ("drop", "pool"):
                got, out = calls(layout=layout, treatment=t)
                assert got == [1 + nd + k + (t == "pool") for k in kept for _ in range(layers)], (layout, t)
                torch.testing.assert_close(out.logits, ref[t], atol=1e-5, rtol=0)
        assert calls(treatment="preserve")[0] == []
        longest = 1 + nd + max(kept)
        monkeypatch.setattr(pruned_mod, "NATIVE_MAX_TOKENS", longest - 1)  # one image too long: the loop for all
        assert calls()[0] == []
        monkeypatch.setattr(pruned_mod, "NATIVE_MAX_TOKENS", longest)
        assert len(calls()[0]) == 3 * layers
        shortest = 1 + nd + min(kept)
        monkeypatch.setattr(pruned_mod, "NATIVE_MIN_TOKENS_BATCHED", shortest + 1)  # one image too short:
        assert calls()[0] == []  # the packed loop for the batch
        seen.clear()
        pruned_forward(m, x[kept.index(min(kept))][None], keep[kept.index(min(kept))][None])
        assert seen == [shortest] * layers  # ... but a single image has no minimum
        monkeypatch.setattr(pruned_mod, "NATIVE_MIN_TOKENS_BATCHED", shortest)
        assert len(calls()[0]) == 3 * layers
        m.train()
        assert calls()[0] == []
        m.eval()
        with monkeypatch.context() as mp:
            mp.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
            assert calls()[0] == []
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            assert calls()[0] == []
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
        m.to(torch.float64)
        try:
            got, out = calls(x.double())
            assert got == [] and out.logits.dtype == torch.float64
        finally:
            m.float()
    with torch.inference_mode():
        assert len(calls()[0]) == 3 * layers
    got, out = calls()  # autograd on (fine-tuning in eval mode): the loop, with gradients
    assert got == [] and out.logits.requires_grad


@pytest.mark.parametrize("route", ["per_image", "padded"])
@pytest.mark.parametrize("treatment", TREATMENTS)
def test_pruned_forward_has_gradients_for_finetuning(treatment, route, monkeypatch):
    """Gradients through both ways a CPU batch attends equal those of transformers' own
    layers run on the reference sequence (catches an attention output written into its
    buffer without autograd seeing it)."""
    monkeypatch.setattr(pruned_mod, "_padded_on_cpu", lambda keys: route == "padded")
    m = make(mid=True)
    m.train()
    m.config.hidden_dropout_prob = m.config.attention_probs_dropout_prob = 0.0  # deterministic
    for mod in m.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 64, 96, generator=g)
    keep = torch.rand(2, 4, 6, generator=g) < torch.tensor([0.4, 0.8])[:, None, None]
    out = pruned_forward(m, x, keep, treatment=treatment)
    (out.logits.sum() + out.pred_boxes.sum()).backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    assert m.vit.encoder.layer[0].attention.attention.query.weight.grad is not None
    assert m.vit.embeddings.patch_embeddings.projection.weight.grad is not None
    assert m.vit.encoder.interpolation.mid_position_embeddings.grad.abs().sum() > 0
    m.zero_grad()
    ref_logits, ref_boxes, _ = hf_reference(m, x, keep, treatment)
    (ref_logits.sum() + ref_boxes.sum()).backward()
    for n, p in m.named_parameters():
        if n in got:
            torch.testing.assert_close(got[n], p.grad, atol=1e-4, rtol=1e-4, msg=n)


def test_load_detector_local_and_errors(tmp_path, monkeypatch):
    m = make()
    m.save_pretrained(tmp_path / "det")
    d = load_detector(str(tmp_path / "det"))
    assert d.config.model_type == "yolos" and not d.training
    with pytest.raises(InputFileError, match="detector directory not found"):
        load_detector(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputFileError, match="config.json missing"):
        load_detector(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BavitError, match="pass --detector PATH"):
        load_detector("hustvl/yolos-tiny")


def test_token_columns_reproduce_table_2():
    # paper Table 2, 35 % sparsity: 1152 / 12288 / 7987 / 9139 / 25.63 %
    c = token_columns(np.full(10, 0.35), 1024, 12, 576, 2, with_bavit=True)
    assert c["bavit_tokens"] == 1152 and c["yolos_tokens"] == 12288
    assert round(c["yolos_pruned_tokens"]) == 7987 and round(c["total_tokens"]) == 9139
    assert c["token_reduction_pct"] == pytest.approx(25.625)
    c0 = token_columns(np.zeros(3), 1024, 12, 576, 2, with_bavit=True)
    assert c0["token_reduction_pct"] == pytest.approx(-9.375)  # Table 2's 0 % row: -9.40 %


def test_encoder_initialised_from_bavit_computes_bavits_layers():
    from bavit_core.bavit.model import BAViT, ModelConfig
    from bavit_core.detection.yolos import init_encoder_from_bavit

    torch.manual_seed(1)
    bavit = BAViT(ModelConfig(depth=2, input_h=32, input_w=48, embed_dim=64, num_heads=2, mlp_ratio=2.0)).eval()
    with torch.no_grad():
        for p in bavit.parameters():  # away from timm's init (zero biases, unit norms)
            p.add_(torch.randn_like(p) * 0.05)
    m = make()  # nano: width 64, 2 heads, MLP 128, 2 layers, 64x96 input (grid 4x6 vs BAViT's 2x3)
    assert init_encoder_from_bavit(m, bavit) == 2
    x = torch.randn(2, 3, 32, 48)
    h = torch.randn(2, 7, 64)
    with torch.no_grad():
        patches = m.vit.embeddings.patch_embeddings.projection(x).flatten(2).transpose(1, 2)
        torch.testing.assert_close(patches, bavit.vit.patch_embed(x), atol=1e-6, rtol=0)
        for blk, layer in zip(bavit.vit.blocks, m.vit.encoder.layer):
            ours = layer(h)
            ours = ours[0] if isinstance(ours, tuple) else ours
            torch.testing.assert_close(ours, blk(h), atol=1e-5, rtol=0)
        pos = m.vit.embeddings.position_embeddings[0, 1:25].reshape(4, 6, 64)
        ref = torch.nn.functional.interpolate(bavit.vit.pos_embed.reshape(1, 2, 3, 64).permute(0, 3, 1, 2),
                                              size=(4, 6), mode="bicubic", align_corners=False)
        torch.testing.assert_close(pos, ref[0].permute(1, 2, 0), atol=1e-6, rtol=0)
    wide = BAViT(ModelConfig(depth=1, input_h=32, input_w=48, embed_dim=96, num_heads=2))
    with pytest.raises(BavitError, match="does not match the detector"):
        init_encoder_from_bavit(make(), wide)


def yolos_tiny_gflops_by_hand(kept: int, treatment: str) -> float:
    """GFLOPs (2 × MACs) of YOLOS-tiny at 512² (1024 patches) keeping ``kept`` patch tokens,
    written out op by op from the architecture (d 192, MLP 768, 12 layers, 100 detection
    tokens, 91 + 1 classes, 16 px patches), not with the accounting module:
    patch embedding 3·16·16·d per embedded patch; per layer Q, K, V and output projections
    d² each per computed token, Q·Kᵀ and attention·V N·(N + Np)·d each, MLP 2·d·768 per
    token, and d² each for the K, V of the Np frozen tokens (preserve); heads: class MLP
    d→d→d→92 and box MLP d→d→d→4 on the detection tokens."""
    d, mlp, layers, nd, classes, patch = 192, 768, 12, 100, 92, 16
    pruned = 1024 - kept
    n = 1 + kept + nd  # CLS + kept patches + detection tokens
    embedded, frozen = kept, 0
    if treatment == "pool" and pruned:
        n, embedded = n + 1, kept + 1  # the pool token: one projection of the mean pixels
    if treatment == "preserve":
        embedded, frozen = 1024, pruned
    embed = embedded * 3 * patch * patch * d
    q = k = v = o = n * d * d
    scores = n * (n + frozen) * d
    mix = n * (n + frozen) * d
    mlp_macs = n * d * mlp + n * mlp * d
    frozen_kv = 2 * frozen * d * d
    layer = q + k + v + o + scores + mix + mlp_macs + frozen_kv
    heads = nd * (d * d + d * d + d * classes) + nd * (d * d + d * d + d * 4)
    return 2 * (embed + layers * layer + heads) / 1e9


@pytest.mark.parametrize("treatment", TREATMENTS)
def test_flops_equal_what_torch_counts_on_the_pruned_forward(treatment, monkeypatch):
    """detector_gflops against torch's own FLOP counter on the pruned forward it describes
    (nano YOLOS, one image, per-op encoder route, attention as plain matmuls so the counter
    sees it). Catches the accounting drifting from the forward: a treatment's extra tokens
    or frozen keys/values forgotten, the heads or the embedding miscounted. Left out by the
    accounting, and so by this comparison: ``pool``'s average over the pruned patches (one
    (1 × P) @ (P × d) product, a reduction rather than a layer)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.setattr(pruned_mod, "NATIVE_MAX_TOKENS", 0)  # torch's fused layer is one opaque op
    m = make()
    x = torch.randn(1, 3, 64, 96)
    for kept in (24, 10, 3):
        keep = torch.zeros(1, 24, dtype=torch.bool)
        keep[0, torch.randperm(24, generator=torch.Generator().manual_seed(kept))[:kept]] = True
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc, torch.no_grad():
            pruned_forward(m, x, keep.reshape(1, 4, 6), treatment=treatment)
        counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
        pooling = counts.pop("aten.mm", 0) if treatment == "pool" else 0
        assert pooling <= 2 * 24 * 64  # at most one (1 × P) @ (P × d) average
        assert set(counts) <= {"aten.addmm", "aten.bmm", "aten.convolution", "aten.mm"}, counts
        assert sum(counts.values()) / 1e9 == pytest.approx(detector_gflops(m.config, np.array([kept]), 24, treatment),
                                                           rel=1e-12), kept


def test_flops_and_token_columns_per_treatment():
    cfg = tiny_yolos_config("tiny")
    # dense YOLOS-tiny at 512², worked out on paper: N = 1125 tokens, per layer
    # 12·N·d² + 2·N²·d = 497 664 000 + 486 000 000 MACs, × 12 layers = 11 803 968 000;
    # embedding 1024·768·192 = 150 994 944; heads 100·165 888 = 16 588 800 → 23.943 GFLOPs
    assert detector_gflops(cfg, np.array([1024]), 1024) == pytest.approx(2 * 11_971_551_744 / 1e9, rel=1e-12)
    for t in TREATMENTS:  # nothing pruned: every treatment is the dense model
        assert detector_gflops(cfg, np.array([1024]), 1024, t) == pytest.approx(yolos_tiny_gflops_by_hand(1024, t))
        for k in (1, 100, 700):
            assert detector_gflops(cfg, np.array([k]), 1024, t) == pytest.approx(yolos_tiny_gflops_by_hand(k, t),
                                                                                  rel=1e-12), (t, k)
        # the mean over images is the mean of each image's own count
        both = detector_gflops(cfg, np.array([100, 1024]), 1024, t)
        assert both == pytest.approx((yolos_tiny_gflops_by_hand(100, t) + yolos_tiny_gflops_by_hand(1024, t)) / 2)
    kept = np.array([100.0, 1024.0])
    s = np.array([0.5, 0.0])
    cols = {t: token_columns(s, 1024, 12, 576, 2, with_bavit=False, treatment=t) for t in TREATMENTS}
    assert cols["drop"]["treatment"] == "drop" and cols["drop"]["kv_only_tokens"] == 0
    assert cols["pool"]["yolos_pruned_tokens"] == cols["drop"]["yolos_pruned_tokens"] + 12 / 2
    assert cols["preserve"]["yolos_pruned_tokens"] == cols["drop"]["yolos_pruned_tokens"]
    assert cols["preserve"]["kv_only_tokens"] == 12 * 1024 * 0.25
    assert cols["preserve"]["token_reduction_pct"] == cols["drop"]["token_reduction_pct"]  # eq. 4: computed tokens
    with pytest.raises(OptionError, match="unknown --pruned-tokens 'merge'; choose one of drop, pool, preserve"):
        detector_gflops(cfg, kept, 1024, "merge")
