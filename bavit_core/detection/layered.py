"""In-detector token selection: YOLOS prunes its own patch tokens after layer k.

``layered_forward`` runs the detector's first ``layer`` encoder layers on every token
(CLS, detection tokens and all patch tokens), ranks the patch tokens by the attention
that CLS and the detection tokens pay them in the next layer (EViT-style, training-free:
``attention_scores``), keeps the top share (or the ``keep`` given) and runs the remaining
layers on CLS, the detection tokens and the kept patch tokens only, through
:mod:`.pruned`'s own encoder and heads (every layout and CPU path). The pruned tokens'
``treatment``, at layer k: ``drop`` (no longer computed), ``pool`` (one token, the mean
of their states after layer k, computed from there on) or ``preserve`` (their states
after layer k stay as frozen keys/values).

The ranking can instead come from a trained token gate (``gate=``, :mod:`.gate`, SViT-
style): its keep probabilities σ(z) of the patch tokens' states after layer k, ranked for
a target or decided by a threshold on the drop probability 1 − σ(z).

Exactness: with nothing pruned it is the dense model; with ``layer=0`` and a given
``keep`` it is :func:`~.pruned.pruned_forward` on that keep (both tested).

Layer indices are 0-based: ``layer=k`` means k layers run dense, the scores come from
encoder layer index k's attention (its own LayerNorm and query/key weights on the states
after k layers; the same probabilities transformers' attention computes, which SDPA does
not return), and layers k..L-1 run on the kept tokens.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .attention import attend_packed, attend_pad
from .pruned import PrunedOutput, _embed, _embed_mixed, _encode, _forward_tokens, _layer_weights, _Tokens
from .treatments import TREATMENTS


def _kept_count(sparsity: float, n: int) -> int:
    """topk: tokens an image keeps at target sparsity (as selection.kept_per_image)."""
    return max(1, min(n, math.ceil((1.0 - sparsity) * n - 1e-9)))


def attention_scores(model, h: torch.Tensor, lengths: list, layer: int) -> list:
    """Per image, the mean attention (over heads and over the CLS and detection-token
    queries) that encoder layer ``layer`` pays each patch token, from the packed states
    ``h`` (T, C) of sequences [CLS, detection tokens, patches] of ``lengths``: a list of
    (P_i,) tensors. Only the keys of every token and the queries of CLS and the detection
    tokens are projected."""
    cfg = model.config
    c, heads, nq = cfg.hidden_size, cfg.num_attention_heads, 1 + cfg.num_detection_tokens
    hd = c // heads
    lyr = model.vit.encoder.layer[layer]
    scale = lyr.attention.attention.scaling
    wqkv, bqkv = _layer_weights(model)[layer]
    ln = lyr.layernorm_before
    x = F.layer_norm(h, (c,), ln.weight, ln.bias, ln.eps)
    k = F.linear(x, wqkv[c:2 * c], None if bqkv is None else bqkv[c:2 * c])  # (T, C)
    out, s = [], 0
    if len(set(lengths)) == 1:  # one batched product
        n = lengths[0]
        xb = x.view(-1, n, c)
        q = F.linear(xb[:, :nq], wqkv[:c], None if bqkv is None else bqkv[:c]).view(-1, nq, heads, hd)
        a = torch.einsum("bqhd,bkhd->bhqk", q, k.view(-1, n, heads, hd)).mul(scale).softmax(-1)
        return list(a[..., nq:].mean((1, 2)).unbind(0))
    for n in lengths:
        q = F.linear(x[s:s + nq], wqkv[:c], None if bqkv is None else bqkv[:c]).view(nq, heads, hd)
        a = torch.einsum("qhd,khd->hqk", q, k[s:s + n].view(n, heads, hd)).mul(scale).softmax(-1)
        out.append(a[..., nq:].mean((0, 1)))
        s += n
    return out


def gate_scores(gate, h: torch.Tensor, lengths: list, n_det: int) -> list:
    """Per image, the gate's keep probabilities σ(z) (P_i,) of its patch tokens, from the
    packed states ``h`` (T, C) of sequences [CLS, detection tokens, patches] of ``lengths``."""
    if len(set(lengths)) == 1:
        n = lengths[0]
        return list(torch.sigmoid(gate(h.view(-1, n, h.shape[-1])[:, 1 + n_det:]).float()).unbind(0))
    out, s = [], 0
    for n in lengths:
        out.append(torch.sigmoid(gate(h[s + 1 + n_det:s + n]).float()))
        s += n
    return out


def dense_layers(model, h: torch.Tensor, mid, lengths: list, stop_layer: int) -> torch.Tensor:
    """The detector's first ``stop_layer`` encoder layers on every token of the packed
    sequences ``h`` (T, C) of ``lengths`` (images of one size: one padded attention call
    per layer, else one per image)."""
    if not stop_layer:
        return h
    cfg = model.config
    heads = cfg.num_attention_heads
    hd = cfg.hidden_size // heads
    scale = model.vit.encoder.layer[0].attention.attention.scaling
    p_drop = cfg.attention_probs_dropout_prob if model.training else 0.0
    if len(set(lengths)) == 1:
        b, n = len(lengths), lengths[0]
        attend = lambda qkv, kv: attend_pad(qkv.view(b, n, -1), None, None, heads, hd,  # noqa: E731
                                            scale, p_drop).reshape(b * n, -1)
    else:
        attend = lambda qkv, kv: attend_packed(qkv, None, lengths, None, heads, hd, scale, p_drop)  # noqa: E731
    return _encode(model, h, None, attend, mid, 0, stop_layer)


def layered_forward(model, pixel_values, layer: int, keep=None, sparsity: float | None = None,
                    layout: str = "pack", treatment: str = "drop", gate=None,
                    threshold: float | None = None) -> PrunedOutput:
    """YOLOS selecting its own tokens after ``layer`` dense layers (module docstring).

    pixel_values: (B, 3, H, W) or a list of (3, H_i, W_i) images; ``keep`` (B, gh, gw) /
    (B, P) bool (a list for a list of images) overrides the ranking, else every image keeps
    ceil((1 − ``sparsity``)·P) of its highest-scored patch tokens (ties to the lower
    index). The scores are the layer's attention, or with ``gate`` (a
    :class:`~.gate.TokenGate` trained for this ``layer``) its keep probabilities; a gate
    also decides by ``threshold``: a token is pruned when its drop probability 1 − σ(z) is
    at least the threshold (0.5: the gate's own hard decision). Returns the outputs with
    ``keep`` (one (P_i,) bool tensor per image) and ``scores`` (one (P_i,) tensor per
    image) set."""
    if treatment not in TREATMENTS:
        raise ValueError(f"treatment must be one of {TREATMENTS}")
    cfg = model.config
    n_layers, n_det, ps = cfg.num_hidden_layers, cfg.num_detection_tokens, cfg.patch_size
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer must lie in 0..{n_layers - 1} (the detector has {n_layers} layers), got {layer}")
    if gate is not None and gate.layer != layer:
        raise ValueError(f"the gate was trained after layer {gate.layer}, not {layer}")
    if threshold is not None and gate is None:
        raise ValueError("a threshold decides with a gate's probabilities: give gate")
    if sum(v is not None for v in (keep, sparsity, threshold)) != 1:
        raise ValueError("give keep, sparsity or threshold (one of them)")
    images = list(pixel_values) if isinstance(pixel_values, (list, tuple)) else None
    if images is not None and len({tuple(x.shape[-2:]) for x in images}) == 1:
        pixel_values, images = torch.stack(images), None
    if images is None:
        b, _, H, W = pixel_values.shape
        p = (H // ps) * (W // ps)
        dev = pixel_values.device
        tok = _embed(model, pixel_values, torch.ones(b, p, dtype=torch.bool, device=dev), "drop")
        n_patches = [p] * b
    else:
        dev = images[0].device
        n_patches = [(x.shape[-2] // ps) * (x.shape[-1] // ps) for x in images]
        tok = _embed_mixed(model, images, [torch.ones(n, dtype=torch.bool, device=dev) for n in n_patches], "drop")
    lengths = tok.lengths
    h, mid = model.vit.embeddings.dropout(tok.h), tok.mid
    h = dense_layers(model, h, mid, lengths, layer)
    scores = attention_scores(model, h, lengths, layer) if gate is None else gate_scores(gate, h, lengths, n_det)
    if threshold is not None:
        keeps = [(1.0 - sc) < threshold for sc in scores]
    elif keep is not None:
        keeps = [torch.as_tensor(k, device=dev).reshape(-1).bool() for k in keep]
        if len(keeps) != len(n_patches) or any(k.shape[0] != n for k, n in zip(keeps, n_patches)):
            raise ValueError("keep masks do not match the images' detector grids")
    else:
        keeps = []
        for sc, n in zip(scores, n_patches):
            k = torch.zeros(n, dtype=torch.bool, device=dev)
            k[torch.argsort(-sc, stable=True)[:_kept_count(sparsity, n)]] = True
            keeps.append(k)
    out = _forward_tokens(model, _tail_tokens(h, mid, lengths, keeps, n_det, treatment), dev, layout, treatment,
                          first_layer=layer)
    out.keep, out.scores = keeps, scores
    return out


def _tail_tokens(h, mid, lengths, keeps, n_det: int, treatment: str) -> _Tokens:
    """The packed sequence the remaining layers run on: per image [CLS, detection tokens,
    kept patches (, pool token)] of the states ``h`` (mid-layer position embeddings
    gathered alike), and ``preserve``'s frozen pruned states."""
    rows, pools, fr_rows, new_lengths, fr_lengths, counts = [], [], [], [], [], []
    s = 0
    dev = h.device
    for n, k in zip(lengths, keeps):
        spec = torch.arange(s, s + 1 + n_det, device=dev)
        patch = s + 1 + n_det + torch.arange(k.shape[0], device=dev)
        kept, pruned = patch[k], patch[~k]
        rows.append(torch.cat([spec, kept]))
        pooled = treatment == "pool" and pruned.numel() > 0
        pools.append(pruned if pooled else None)
        if treatment == "preserve" and pruned.numel():
            fr_rows.append(pruned)
        new_lengths.append(rows[-1].numel() + int(pooled))
        fr_lengths.append(pruned.numel())
        counts.append(int(k.sum()))
        s += n
    parts, mid_parts = [], []
    for r, q in zip(rows, pools):
        parts.append(h[r])
        if mid is not None:
            mid_parts.append(mid[:, r])
        if q is not None:
            parts.append(h[q].mean(0, keepdim=True))
            if mid is not None:
                mid_parts.append(mid[:, q].mean(1, keepdim=True))
    frozen = h[torch.cat(fr_rows)] if fr_rows else None
    return _Tokens(torch.cat(parts), None if mid is None else torch.cat(mid_parts, 1), frozen, new_lengths,
                   fr_lengths if fr_rows else None, torch.tensor(counts, device=dev))
