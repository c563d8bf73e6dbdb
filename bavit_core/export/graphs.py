"""Exportable torch modules: the pruned YOLOS at a fixed input size, BAViT's FG
probabilities, and the whole pipeline (BAViT → threshold or top-k → nearest grid
resampling → pruned YOLOS) as one graph.

They are built over transformers' own YOLOS modules (patch projection, the Linear and
LayerNorm modules of every ``YolosLayer``, the final layernorm, the two heads) and compute
what :func:`bavit_core.detection.pruned.pruned_forward` computes, written with the few
operators ONNX has for a dynamic token count (Gather, NonZero, TopK, MatMul, Softmax):

* the input size is fixed at export, so the interpolated position embeddings (and the
  mid-layer ones, for models with ``use_mid_position_embeddings``) are constants of the
  graph, computed by YOLOS's own interpolation modules at that size;
* the pruned detector takes one image and the indices (K,) of its kept patch tokens,
  0 ≤ K ≤ P, and runs the encoder on [CLS, detection tokens, kept patches] (the order
  ``pruned_forward`` uses); pruned tokens are never computed;
* query, key and value are one MatMul (their weights concatenated once, at export), with
  the attention scale 1/sqrt(head dim) folded into the query weights, so no elementwise
  pass runs over the (tokens × tokens) score matrix before its softmax.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..bavit.inference import fg_from_probs
from ..data.grid import nearest_flat_index, resample_grid
from ..detection.selection import POLICIES, topk_keep


def _constants(model, size):
    """Interpolated position embeddings at ``size``: (1 + P + D, C) and, when the model
    has them, the mid-layer ones (layers - 1, 1 + P + D, C)."""
    vit = model.vit
    with torch.no_grad():
        pos = vit.embeddings.interpolation(vit.embeddings.position_embeddings, tuple(size))[0]
        mid = None
        if model.config.use_mid_position_embeddings:
            mid = vit.encoder.interpolation(tuple(size))[:, 0]
    return pos.detach().clone(), None if mid is None else mid.detach().clone()


class _Encoder(nn.Module):
    """YOLOS's encoder layers, final layernorm and heads over a (B, T, C) token sequence."""

    def __init__(self, model):
        super().__init__()
        cfg = model.config
        self.model = model
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        for i, layer in enumerate(model.vit.encoder.layer):
            sa = layer.attention.attention
            s = sa.scaling
            w = torch.cat([sa.query.weight * s, sa.key.weight, sa.value.weight]).detach().t().contiguous()
            self.register_buffer(f"qkv_w{i}", w, persistent=False)
            if sa.query.bias is not None:
                b = torch.cat([sa.query.bias * s, sa.key.bias, sa.value.bias]).detach().clone()
                self.register_buffer(f"qkv_b{i}", b, persistent=False)

    def _attention(self, i: int, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        qkv = x @ getattr(self, f"qkv_w{i}")
        bias = getattr(self, f"qkv_b{i}", None)
        if bias is not None:
            qkv = qkv + bias
        qkv = qkv.reshape(b, -1, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, T, hd)
        a = torch.softmax(q @ k.transpose(-1, -2), dim=-1)  # q carries the scale
        return (a @ v).transpose(1, 2).reshape(b, -1, self.heads * self.head_dim)

    def forward(self, h: torch.Tensor, mid: torch.Tensor | None, det: slice):
        """h: (B, T, C); mid: (layers - 1, T, C) gathered like h, or None; det: where the
        detection tokens sit in the sequence. Returns logits (B, D, labels + 1), boxes (B, D, 4)."""
        layers = self.model.vit.encoder.layer
        for i, layer in enumerate(layers):
            x = layer.layernorm_before(h)
            h = layer.attention.output.dense(self._attention(i, x)) + h
            h = layer.output.dense(layer.intermediate(layer.layernorm_after(h))) + h
            if mid is not None and i < len(layers) - 1:
                h = h + mid[i]
        d = self.model.vit.layernorm(h[:, det])
        return self.model.class_labels_classifier(d), self.model.bbox_predictor(d).sigmoid()


class PrunedDetectorGraph(nn.Module):
    """``forward(pixel_values (1, 3, H, W), keep (K,) int64)`` → logits (1, D, labels + 1),
    boxes (1, D, 4): YOLOS computing CLS, detection tokens and the K kept patch tokens
    (row-major indices on the detector grid, ascending)."""

    def __init__(self, model, size: tuple[int, int]):
        super().__init__()
        cfg = model.config
        self.size = tuple(size)
        self.n_det = cfg.num_detection_tokens
        self.enc = _Encoder(model)
        self.proj = model.vit.embeddings.patch_embeddings.projection
        pos, mid = _constants(model, size)
        emb = model.vit.embeddings
        p = pos.shape[0] - 1 - self.n_det
        self.n_patches = p
        with torch.no_grad():
            prefix = torch.cat([emb.cls_token[0] + pos[:1], emb.detection_tokens[0] + pos[1 + p:]])
        self.register_buffer("prefix", prefix.detach().clone(), persistent=False)  # (1 + D, C)
        self.register_buffer("pos_patch", pos[1:1 + p].clone(), persistent=False)  # (P, C)
        self.has_mid = mid is not None
        if mid is not None:
            self.register_buffer("mid_prefix", torch.cat([mid[:, :1], mid[:, 1 + p:]], 1).clone(), persistent=False)
            self.register_buffer("mid_patch", mid[:, 1:1 + p].clone(), persistent=False)

    def patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values).flatten(2).transpose(1, 2)  # (B, P, C)

    def forward(self, pixel_values: torch.Tensor, keep: torch.Tensor):
        x = self.patches(pixel_values)[0].index_select(0, keep) + self.pos_patch.index_select(0, keep)
        h = torch.cat([self.prefix, x])[None]
        mid = None
        if self.has_mid:
            mid = torch.cat([self.mid_prefix, self.mid_patch.index_select(1, keep)], 1)
        return self.enc(h, mid, slice(1, 1 + self.n_det))


class DenseDetector(PrunedDetectorGraph):
    """``forward(pixel_values (N, 3, H, W))`` → logits (N, D, labels + 1), boxes (N, D, 4):
    the unpruned YOLOS at the export size, for side-by-side comparison."""

    def forward(self, pixel_values: torch.Tensor):  # type: ignore[override]
        x = self.patches(pixel_values) + self.pos_patch
        b = x.shape[0]
        pre = self.prefix[None].expand(b, -1, -1)
        h = torch.cat([pre[:, :1], x, pre[:, 1:]], 1)
        mid = None
        if self.has_mid:
            mid = torch.cat([self.mid_prefix[:, :1], self.mid_patch, self.mid_prefix[:, 1:]], 1)
        return self.enc(h, mid, slice(h.shape[1] - self.n_det, None))


class BavitProbs(nn.Module):
    """``forward(image (N, 3, h, w) normalised)`` → FG probability per token (N, gh, gw)."""

    def __init__(self, bavit):
        super().__init__()
        self.bavit = bavit

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.bavit.fg_prob(image)


def reference_keep(probs: np.ndarray, grid: tuple[int, int], policy: str, threshold: float | None = None,
                   k: int | None = None) -> np.ndarray:
    """What :class:`Pipeline` keeps, in numpy: BAViT probabilities (N, bh, bw) → kept tokens
    (N, gh, gw) on the detector grid (nearest resampling; ``threshold`` as ``fg_from_probs``;
    ``topk`` by a stable descending sort, so ties keep the lower row-major index)."""
    p = resample_grid(np.asarray(probs), grid, "nearest")
    if policy == "threshold":
        return fg_from_probs(p, threshold)
    return topk_keep(p, k)


class Pipeline(nn.Module):
    """``forward(pixel_values (1, 3, H, W), bavit_pixel_values (1, 3, h, w))`` → logits,
    boxes and the kept indices (K,): BAViT, the token decision, the nearest resampling of
    BAViT's grid to the detector's and the pruned YOLOS in one graph.

    ``threshold``: a token is kept when 1 - p_fg < threshold (in float64, as
    ``fg_from_probs``). ``topk``: the ``k`` tokens of highest FG probability on the
    detector grid (ties: the lower row-major index first, as ONNX's TopK)."""

    def __init__(self, bavit, detector: PrunedDetectorGraph, det_grid: tuple[int, int], policy: str,
                 threshold: float | None = None, k: int | None = None):
        super().__init__()
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}")
        self.probs = BavitProbs(bavit)
        self.det = detector
        self.policy = policy
        self.threshold = float(threshold) if threshold is not None else 0.0
        self.k = int(k or 0)
        bh, bw = bavit.cfg.grid_shape
        flat = torch.as_tensor(nearest_flat_index((bh, bw), det_grid), dtype=torch.long)
        self.register_buffer("resample_index", flat, persistent=False)  # (P,) into BAViT's grid

    def select(self, bavit_pixel_values: torch.Tensor) -> torch.Tensor:
        p = self.probs(bavit_pixel_values)[0].reshape(-1).index_select(0, self.resample_index)
        if self.policy == "threshold":
            keep = (1.0 - p.double()) < self.threshold
        else:
            top = torch.topk(p, self.k).indices
            keep = torch.zeros_like(p).scatter(0, top, torch.ones(top.shape, dtype=p.dtype)) > 0
        return torch.nonzero(keep).reshape(-1)

    def forward(self, pixel_values: torch.Tensor, bavit_pixel_values: torch.Tensor):
        keep = self.select(bavit_pixel_values)
        logits, boxes = self.det(pixel_values, keep)
        return logits, boxes, keep
