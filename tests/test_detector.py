import numpy as np
import pytest
import torch
from transformers import YolosForObjectDetection

from bavit_core.detection.accounting import token_columns
from bavit_core.detection.pruned import masked_reference_forward, pruned_forward
from bavit_core.detection.yolos import load_detector, tiny_yolos_config
from bavit_core.runtime.errors import BavitError, InputFileError


def make(mid=False, size=(64, 96), labels=5):
    torch.manual_seed(0)
    cfg = tiny_yolos_config("nano", num_labels=labels, image_size=size, use_mid_position_embeddings=mid)
    return YolosForObjectDetection(cfg).eval()


@pytest.mark.parametrize("mid", [False, True])
def test_nothing_pruned_is_the_original_model(mid):
    m = make(mid)
    x = torch.randn(3, 3, 64, 96)
    with torch.no_grad():
        ref = m(pixel_values=x)
        for layout in ("pack", "pad"):
            out = pruned_forward(m, x, None, layout=layout, return_hidden=True)
            torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(out.pred_boxes, ref.pred_boxes, atol=1e-5, rtol=0)
            torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=0)
            all_kept = pruned_forward(m, x, torch.ones(3, 4, 6, dtype=torch.bool), layout=layout)
            torch.testing.assert_close(all_kept.logits, ref.logits, atol=1e-5, rtol=0)


def test_interpolated_positions_at_another_input_size():
    m = make(size=(64, 64))
    x = torch.randn(1, 3, 96, 128)  # YOLOS interpolates its position embeddings
    with torch.no_grad():
        torch.testing.assert_close(pruned_forward(m, x).logits, m(pixel_values=x).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mid", [False, True])
def test_pruned_equals_masked_reference_and_batches_equal_single_images(mid):
    m = make(mid)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 64, 96, generator=g)
    keep = torch.rand(4, 4, 6, generator=g) < torch.tensor([0.2, 0.5, 0.8, 1.0])[:, None, None]
    keep[0, 0, 0] = True
    with torch.no_grad():
        ref = masked_reference_forward(m, x, keep)
        pack = pruned_forward(m, x, keep, layout="pack", return_hidden=True)
        pad = pruned_forward(m, x, keep, layout="pad", return_hidden=True)
        for out in (pack, pad):
            torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(out.pred_boxes, ref.pred_boxes, atol=1e-5, rtol=0)
        for i in range(4):
            single = pruned_forward(m, x[i:i + 1], keep[i:i + 1])
            torch.testing.assert_close(pad.logits[i:i + 1], single.logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(pack.pred_boxes[i:i + 1], single.pred_boxes, atol=1e-5, rtol=0)
    # pruned patch tokens are never computed: their returned states are zeros
    patches = pack.last_hidden_state[:, 1:25].reshape(4, 4, 6, -1)
    assert (patches[~keep] == 0).all()
    assert (patches[keep].abs().sum(-1) > 0).all()
    assert pack.kept.tolist() == keep.reshape(4, -1).sum(1).tolist()


def test_pruned_forward_has_gradients_for_finetuning():
    m = make()
    m.train()
    x = torch.randn(2, 3, 64, 96)
    keep = torch.rand(2, 4, 6) < 0.6
    out = pruned_forward(m, x, keep)
    (out.logits.sum() + out.pred_boxes.sum()).backward()
    assert m.vit.encoder.layer[0].attention.attention.query.weight.grad is not None


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
