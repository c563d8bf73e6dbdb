"""The pruned YOLOS forward: only CLS, detection tokens and kept patch tokens are computed.

The pruned forward is a small patch over transformers' own modules, in the spirit of
ToMe: it calls YOLOS's embeddings, the Linear/LayerNorm modules of every
``YolosLayer``, the final layernorm and the two heads, and replaces only how the token
sequence is assembled and how attention is computed:

1. ``vit.embeddings`` builds [CLS, patches, detection tokens] with their interpolated
   position embeddings, exactly as YOLOS does.
2. Per image, the CLS token, the detection tokens and the *kept* patch tokens are gathered
   (in that order); pruned patch tokens go no further.
3. Every encoder layer runs on that subset (mid-layer position embeddings, for models that
   have them, are interpolated by YOLOS's own module and gathered the same way).
4. Layernorm and the class/box heads run on the detection tokens as usual; the returned
   patch-token states are zeros where tokens were pruned.

With nothing pruned this is the original model (tested to 1e-5). Images of a batch keep
different numbers of tokens; two layouts are offered:

* ``pack``: all images' tokens are concatenated into one (T, C) matrix for the Linear
  layers (no padding work at all) and attention runs per image; best on CPU.
* ``pad``: (B, L_max, C) with a key-padding mask through ``scaled_dot_product_attention``;
  one kernel call per layer, best on GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

LAYOUTS = ("pack", "pad")


@dataclass
class PrunedOutput:
    logits: torch.Tensor  # (B, D, num_labels + 1)
    pred_boxes: torch.Tensor  # (B, D, 4) normalised cx, cy, w, h
    last_hidden_state: torch.Tensor | None = None  # (B, 1 + P + D, C), zeros at pruned patches
    kept: torch.Tensor | None = None  # (B,) kept patch tokens per image


def _token_index(keep: torch.Tensor, n_det: int):
    """Per image: sequence indices [CLS, det..., kept patches...] and lengths."""
    b, p = keep.shape
    det = torch.arange(1 + p, 1 + p + n_det, device=keep.device)
    out = []
    for i in range(b):
        kept = torch.nonzero(keep[i], as_tuple=False).flatten() + 1
        out.append(torch.cat([keep.new_zeros(1, dtype=torch.long), det, kept]))
    return out


def _qkv(attn, h):
    """Query, key and value in one GEMM (YOLOS keeps three Linear layers; their weights
    are concatenated on the fly, which costs a 3·d² copy and keeps autograd intact)."""
    w = torch.cat([attn.query.weight, attn.key.weight, attn.value.weight])
    b = None
    if attn.query.bias is not None:
        b = torch.cat([attn.query.bias, attn.key.bias, attn.value.bias])
    return F.linear(h, w, b)


def _attention_pack(attn, h, lengths, heads, hd):
    """Self-attention over packed tokens (T, C), one SDPA call per image."""
    t = h.shape[0]
    qkv = _qkv(attn, h).view(t, 3, heads, hd)
    if len(lengths) == 1:
        q, k, v = qkv.permute(1, 2, 0, 3)[:, None].unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, scale=attn.scaling)
        return o[0].transpose(0, 1).reshape(t, heads * hd)
    out = h.new_empty(t, heads * hd)
    start = 0
    for n in lengths:
        q, k, v = qkv[start:start + n].permute(1, 2, 0, 3)[:, None].unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, scale=attn.scaling)
        out[start:start + n] = o[0].transpose(0, 1).reshape(n, heads * hd)
        start += n
    return out


def _attention_pad(attn, h, mask, heads, hd):
    """Self-attention over padded tokens (B, L, C) with a key-padding mask (B, L) or None."""
    b, l, _ = h.shape
    q, k, v = _qkv(attn, h).view(b, l, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    am = None if mask is None else mask[:, None, None, :]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=am, scale=attn.scaling)
    return o.transpose(1, 2).reshape(b, l, heads * hd)


def _layer(layer, h, attend):
    """One YolosLayer (pre-norm, two residuals) with attention computed by ``attend``."""
    sa = layer.attention.attention
    x = layer.layernorm_before(h)
    a = layer.attention.output(attend(sa, x), x)
    h = a + h
    y = layer.intermediate(layer.layernorm_after(h))
    return layer.output(y, h)


def _encode(vit, h, attend, mid=None):
    """YOLOS's encoder layers and final layernorm over ``h`` (mid-layer position embeddings
    ``mid``, gathered like ``h``, are added after every layer but the last)."""
    n_layers = len(vit.encoder.layer)
    for li, layer in enumerate(vit.encoder.layer):
        h = _layer(layer, h, attend)
        if mid is not None and li < n_layers - 1:
            h = h + mid[li]
    return vit.layernorm(h)


def pruned_forward(model, pixel_values: torch.Tensor, keep: torch.Tensor | None = None,
                   layout: str = "pack", return_hidden: bool = False) -> PrunedOutput:
    """YOLOS computing only CLS, detection tokens and the patch tokens where ``keep`` is true.

    pixel_values: (B, 3, H, W); keep: (B, gh, gw) or (B, gh*gw) bool on the detector grid,
    or None for no pruning.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    cfg = model.config
    vit = model.vit
    b, _, H, W = pixel_values.shape
    emb = vit.embeddings(pixel_values)  # (B, 1 + P + D, C), position embeddings added
    n_det = cfg.num_detection_tokens
    p = emb.shape[1] - 1 - n_det
    if keep is None:
        keep = torch.ones(b, p, dtype=torch.bool, device=emb.device)
    keep = keep.reshape(b, -1).to(emb.device)
    if keep.shape[1] != p:
        raise ValueError(f"keep mask has {keep.shape[1]} tokens, the detector grid has {p}")
    heads = cfg.num_attention_heads
    hd = cfg.hidden_size // heads
    idx = _token_index(keep, n_det)
    lengths = [len(i) for i in idx]
    mid = None
    if cfg.use_mid_position_embeddings:
        mid = vit.encoder.interpolation((H, W))  # (layers - 1, 1, 1 + P + D, C)

    if layout == "pack" or b == 1:
        flat = torch.cat([emb[i, ix] for i, ix in enumerate(idx)])  # (T, C)
        mid_g = None
        if mid is not None:
            mid_g = torch.cat([mid[:, 0, ix] for ix in idx], dim=1)  # (layers - 1, T, C)
        attend = lambda sa, x: _attention_pack(sa, x, lengths, heads, hd)  # noqa: E731
        h = _encode(vit, flat, attend, mid_g)
        starts = np.cumsum([0] + lengths[:-1])
        det_out = torch.stack([h[s + 1:s + 1 + n_det] for s in starts])
        per_image = [h[s:s + n] for s, n in zip(starts, lengths)]
    else:
        L = max(lengths)
        gather = torch.zeros(b, L, dtype=torch.long, device=emb.device)
        valid = torch.zeros(b, L, dtype=torch.bool, device=emb.device)
        for i, ix in enumerate(idx):
            gather[i, : len(ix)] = ix
            valid[i, : len(ix)] = True
        h = torch.gather(emb, 1, gather[:, :, None].expand(-1, -1, emb.shape[-1]))
        mask = None if all(n == L for n in lengths) else valid
        mid_g = None
        if mid is not None:
            mid_g = mid[:, 0][:, gather]  # (layers - 1, B, L, C)
        attend = lambda sa, x: _attention_pad(sa, x, mask, heads, hd)  # noqa: E731
        h = _encode(vit, h, attend, mid_g)
        det_out = h[:, 1:1 + n_det]
        per_image = [h[i, :n] for i, n in enumerate(lengths)]

    logits = model.class_labels_classifier(det_out)
    boxes = model.bbox_predictor(det_out).sigmoid()
    hidden = None
    if return_hidden:
        hidden = emb.new_zeros(emb.shape)
        for i, ix in enumerate(idx):
            hidden[i, ix] = per_image[i]
    return PrunedOutput(logits, boxes, hidden, keep.sum(1))


def masked_reference_forward(model, pixel_values: torch.Tensor, keep: torch.Tensor) -> PrunedOutput:
    """Dense reference: the full sequence, with pruned patch tokens masked out as attention
    keys in every layer. Its detection outputs must equal :func:`pruned_forward`'s."""
    cfg = model.config
    vit = model.vit
    b, _, H, W = pixel_values.shape
    emb = vit.embeddings(pixel_values)
    n_det = cfg.num_detection_tokens
    keep = keep.reshape(b, -1)
    valid = torch.cat([keep.new_ones(b, 1), keep, keep.new_ones(b, n_det)], dim=1)
    heads = cfg.num_attention_heads
    hd = cfg.hidden_size // heads
    mid = vit.encoder.interpolation((H, W)) if cfg.use_mid_position_embeddings else None
    attend = lambda sa, x: _attention_pad(sa, x, valid, heads, hd)  # noqa: E731
    h = _encode(vit, emb, attend, mid)
    det = h[:, -n_det:]
    return PrunedOutput(model.class_labels_classifier(det), model.bbox_predictor(det).sigmoid(), h, keep.sum(1))
