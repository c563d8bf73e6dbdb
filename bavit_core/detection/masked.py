"""YOLOS with a differentiable keep mask: the training-time twin of the pruned forward.

``masked_forward(model, x, keep, layer)`` computes every token, but from encoder layer
``layer`` on no token attends to a patch token whose ``keep`` is 0: attention weights are
``keep_j · exp(s_ij) / Σ_k keep_k · exp(s_ik)`` (CLS and the detection tokens always
kept). With a 0/1 ``keep`` the CLS, detection and kept tokens' states, hence the logits
and boxes, are those of the pruned forward that drops the other tokens at that layer
(``pruned_forward`` for layer 0, ``layered_forward`` with that keep for layer k; both
tested). The difference is the gradient: ``keep`` may carry one (a straight-through mask,
:func:`~.gate.relaxed_keep`), so a detection loss reaches whatever produced it: the gate
(``finetune --train-gate``) or BAViT's FG probabilities (``finetune --joint``).

Images of one size only (training batches are); costs as much as the dense forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .layered import dense_layers
from .pruned import PrunedOutput, _embed, _encode


def policy_attention(qkv: torch.Tensor, policy: torch.Tensor, heads: int, hd: int, scale: float,
                     p_drop: float = 0.0) -> torch.Tensor:
    """Attention of (B, N, 3C) queries/keys/values where key j counts with weight
    ``policy`` (B, N) (DynamicViT's masked softmax); (B, N, C)."""
    b, n, _ = qkv.shape
    q, k, v = qkv.view(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    e = torch.exp(s - s.amax(-1, keepdim=True).detach()) * policy[:, None, None, :].to(s.dtype)
    a = e / e.sum(-1, keepdim=True)
    if p_drop:
        a = F.dropout(a, p_drop, True)
    return torch.matmul(a, v).transpose(1, 2).reshape(b, n, heads * hd)


def masked_forward(model, pixel_values: torch.Tensor, keep: torch.Tensor | None = None, layer: int = 0,
                   scorer=None) -> PrunedOutput:
    """YOLOS on (B, 3, H, W) images where from encoder layer ``layer`` on only the patch
    tokens with ``keep`` (B, P) (values 0/1, may carry a gradient) are attended to.

    ``scorer`` instead of ``keep``: a function of the patch tokens' states after ``layer``
    layers, (B, P, C) → the keep mask (B, P) (a gate and its relaxation). The returned
    output's ``keep`` is the mask used, ``scores`` unset."""
    cfg = model.config
    n_layers, n_det, ps, c = cfg.num_hidden_layers, cfg.num_detection_tokens, cfg.patch_size, cfg.hidden_size
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer must lie in 0..{n_layers - 1}, got {layer}")
    if (keep is None) == (scorer is None):
        raise ValueError("give keep or scorer (one of them)")
    b, _, H, W = pixel_values.shape
    p = (H // ps) * (W // ps)
    dev = pixel_values.device
    tok = _embed(model, pixel_values, torch.ones(b, p, dtype=torch.bool, device=dev), "drop")
    n = 1 + n_det + p
    heads = cfg.num_attention_heads
    hd = c // heads
    scale = model.vit.encoder.layer[0].attention.attention.scaling
    p_drop = cfg.attention_probs_dropout_prob if model.training else 0.0
    h, mid = model.vit.embeddings.dropout(tok.h), tok.mid
    h = dense_layers(model, h, mid, [n] * b, layer)
    if scorer is not None:
        keep = scorer(h.view(b, n, c)[:, 1 + n_det:])
    keep = keep.reshape(b, p)
    if keep.shape[1] != p:
        raise ValueError(f"keep mask has {keep.shape[1]} tokens, the detector grid has {p}")
    policy = torch.cat([torch.ones(b, 1 + n_det, dtype=keep.dtype, device=dev), keep], 1)
    h = _encode(model, h, None, lambda qkv, kv: policy_attention(qkv.view(b, n, -1), policy, heads, hd, scale,
                                                                  p_drop).reshape(b * n, -1), mid, layer)
    ln = model.vit.layernorm
    det_out = F.layer_norm(h.view(b, n, c)[:, 1:1 + n_det], (c,), ln.weight, ln.bias, ln.eps)
    out = PrunedOutput(model.class_labels_classifier(det_out), model.bbox_predictor(det_out).sigmoid(), None,
                       keep.detach().sum(1))
    out.keep = keep
    return out
