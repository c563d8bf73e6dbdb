"""Attention over the pruned forward's token sequences (``detection/pruned.py``): images of
a batch keep different numbers of tokens, so their sequences are packed (one (T, ·) matrix,
image after image) or padded ((B, L, ·) with a key mask). Every function takes the fused
query/key/value rows (and optionally key/value rows of frozen tokens, the ``preserve``
treatment) and returns the attention output in the same layout, through
``F.scaled_dot_product_attention``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attend_packed(qkv, kv_extra, lengths, extra_lengths, heads, hd, scale, p_drop):
    """Packed attention, one SDPA call per image: queries, keys and values of the computed
    tokens (T, 3C), and keys/values of frozen tokens (T', 2C) appended per image or None.
    Each image's output is written into one (T, C) result (no concatenation afterwards)."""
    t = qkv.shape[0]
    qkv = qkv.view(t, 3, heads, hd)
    if kv_extra is not None:
        kv_extra = kv_extra.view(-1, 2, heads, hd)
    out = qkv.new_empty(t, heads, hd)
    s = se = 0
    for n, m in zip(lengths, extra_lengths or [0] * len(lengths)):
        q, k, v = qkv[s:s + n].permute(1, 2, 0, 3).unbind(0)  # (heads, n, hd) each
        if m:
            ke, ve = kv_extra[se:se + m].permute(1, 2, 0, 3).unbind(0)
            k, v = torch.cat([k, ke], 1), torch.cat([v, ve], 1)
        o = F.scaled_dot_product_attention(q[None], k[None], v[None], dropout_p=p_drop, scale=scale)
        out[s:s + n].copy_(o[0].transpose(0, 1))
        s, se = s + n, se + m
    return out.view(t, heads * hd)


def attend_pad(qkv, kv_extra, mask, heads, hd, scale, p_drop):
    """Padded attention (B, L, 3C) [+ frozen keys/values (B, L', 2C)], key mask (B, L + L') or None."""
    b, l, _ = qkv.shape
    q, k, v = qkv.view(b, l, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    if kv_extra is not None:
        ke, ve = kv_extra.view(b, kv_extra.shape[1], 2, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        k, v = torch.cat([k, ke], 2), torch.cat([v, ve], 2)
    am = None if mask is None else mask[:, None, None, :]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=am, dropout_p=p_drop, scale=scale)
    return o.transpose(1, 2).reshape(b, l, heads * hd)


def attend_via_pad(qkv, kv_extra, dest, fdest, b, lq, lf, mask, heads, hd, scale, p_drop):
    """Packed attention in one padded SDPA call: the packed rows are scattered into (B, L)
    slots (``dest``; frozen keys/values into (B, L') slots ``fdest``), attended with a key
    mask and gathered back. One kernel call per layer instead of one per image: on CPU
    with several threads every call pays a thread wake-up that does not shrink with the
    tokens."""
    buf = qkv.new_zeros(b * lq, qkv.shape[1]).index_put((dest,), qkv).view(b, lq, -1)
    kvb = None
    if kv_extra is not None:
        kvb = kv_extra.new_zeros(b * lf, kv_extra.shape[1]).index_put((fdest,), kv_extra).view(b, lf, -1)
    return attend_pad(buf, kvb, mask, heads, hd, scale, p_drop).reshape(b * lq, -1)[dest]
