"""The pruned YOLOS forward: only CLS, detection tokens and kept patch tokens are computed.

The pruned forward is a small patch over transformers' own YOLOS: it uses the parameters
of YOLOS's embeddings, of every ``YolosLayer`` (LayerNorms, query/key/value, output,
intermediate), of the final layernorm and the two heads, YOLOS's own position-embedding
interpolation modules, and replaces only how the token sequence is assembled and how
attention is computed:

1. Only the *kept* patches are embedded (their pixels are unfolded and multiplied by the
   patch projection's weight); each gets the interpolated position embedding of its own
   grid cell, and CLS and the detection tokens theirs.
2. Per image, the sequence is [CLS, detection tokens, kept patch tokens (, pool token)].
3. Every encoder layer runs on that sequence (mid-layer position embeddings, for models
   that have them, are interpolated by YOLOS's own module and gathered the same way).
4. The final layernorm and the class/box heads run on the detection tokens as usual.

What happens to the pruned patch tokens is the ``treatment``:

* ``drop`` (the paper, default): never computed; their returned states are zeros.
* ``pool``: one extra token per image that has pruned tokens, the mean of the pruned
  tokens' input embeddings (patch embedding + position embedding; mid-layer position
  embeddings likewise averaged), processed by every layer like a kept token.
* ``preserve``: pruned tokens stay keys and values only, frozen at their input embedding:
  in every layer they are layer-normed and projected to K and V, but get no query, no
  attention output and no MLP. Their returned states are their input embeddings through
  the final layernorm (as for every other returned state).

With nothing pruned every treatment is the original model (tested to 1e-5). Images of a
batch keep different numbers of tokens; two layouts are offered:

* ``pack``: all images' tokens are concatenated into one (T, C) matrix for the Linear
  layers (no padding work at all); on CPU attention runs image by image on each image's own
  length (short ones with several threads: see ``CPU_PER_IMAGE_MIN_TOKENS``), on GPU in one
  padded call per layer; best on CPU.
* ``pad``: (B, L_max, C) with a key-padding mask through ``scaled_dot_product_attention``;
  one kernel call per layer, best on GPU.

(The attention helpers of both layouts live in ``detection/attention.py``.) Short sequences
on CPU take a third way: at inference (no autograd, eval mode, float32, ``drop`` or
``pool``) with every image's sequence at most ``NATIVE_MAX_TOKENS`` tokens (high sparsity;
in a batch, each at least ``NATIVE_MIN_TOKENS_BATCHED``), each encoder layer runs as torch's fused native pre-LN encoder layer
(``torch._transformer_encoder_layer_fwd``, what nn.TransformerEncoderLayer's inference fast
path calls) on one image's tokens at a time, whatever the layout: the same arithmetic (to
~1e-6) in one kernel instead of a dozen ops, whose fixed costs dominate at a few hundred
tokens. Never on CUDA, in training, with autograd, for ``preserve`` (frozen keys/values),
or under autocast, tracing (ONNX export) or ``torch.compile``.

Without autograd (evaluation, timing) the interpolated position embeddings and the fused
query/key/value weights are computed once and cached on the model until a parameter
changes (tracked by tensor versions), so a call's cost shrinks with the kept tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import attend_packed, attend_pad, attend_via_pad
from .treatments import TREATMENTS  # the registry: names, accounting, export

LAYOUTS = ("pack", "pad")


@dataclass
class PrunedOutput:
    logits: torch.Tensor  # (B, D, num_labels + 1)
    pred_boxes: torch.Tensor  # (B, D, 4) normalised cx, cy, w, h
    last_hidden_state: torch.Tensor | None = None  # (B, 1 + P + D, C); zeros at dropped/pooled patches
    kept: torch.Tensor | None = None  # (B,) kept patch tokens per image
    keep: list | None = None  # per image (P_i,) bool: the tokens a layered forward kept (layered.py)
    scores: list | None = None  # per image (P_i,): the attention scores it ranked them by


def _memo(model, name: str, params, extra, make):
    """``make()``, cached on the model while ``params`` are unchanged; recomputed whenever
    autograd is on (training needs the graph)."""
    if torch.is_grad_enabled():
        return make()
    key = (tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params), extra,
           torch.is_inference_mode_enabled())
    cache = model.__dict__.setdefault("_bavit_memo", {})
    hit = cache.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    val = make()
    cache[name] = (key, val)
    return val


def _layer_weights(model):
    """Per layer: the query/key/value weights and biases concatenated into one GEMM."""
    atts = [layer.attention.attention for layer in model.vit.encoder.layer]

    def make():
        out = []
        for a in atts:
            w = torch.cat([a.query.weight, a.key.weight, a.value.weight])
            b = None if a.query.bias is None else torch.cat([a.query.bias, a.key.bias, a.value.bias])
            out.append((w, b))
        return out

    params = [p for a in atts for p in (a.query.weight, a.key.weight, a.value.weight, a.query.bias)
              if p is not None]
    return _memo(model, "qkv", params, None, make)


def _positions(model, hw):
    """YOLOS's interpolated position embeddings at input size ``hw``: (1 + P + D, C) and
    the mid-layer ones (layers - 1, 1 + P + D, C) or None."""
    emb, enc = model.vit.embeddings, model.vit.encoder
    pos = _memo(model, "pos", [emb.position_embeddings], hw,
                lambda: emb.interpolation(emb.position_embeddings, hw)[0])
    mid = None
    if model.config.use_mid_position_embeddings:
        mid = _memo(model, "mid", [enc.interpolation.mid_position_embeddings], hw,
                    lambda: enc.interpolation(hw)[:, 0])
    return pos, mid


def _patches(x, ps: int, gh: int, gw: int):
    """View of the image as (B, gh, gw, 3·ps·ps)-shaped patches (no copy until indexed)."""
    b, c = x.shape[:2]
    return x[:, :, :gh * ps, :gw * ps].reshape(b, c, gh, ps, gw, ps).permute(0, 2, 4, 1, 3, 5)


# Longest sequence (1 + detection tokens + kept patches (+ pool token)) for which CPU
# inference runs every encoder layer as torch's fused native layer (``_encode_native``);
# 0 turns the path off. Picked from
#   python examples/benchmarks/ab_native_layer.py --lengths 203,280,360,420,520
# (YOLOS-tiny's encoder, one image; fused / loop time, medians of 7; 2-core x86 VM,
# torch 2.15, load average ~0.8, 2026-11-21):
#   2 threads: n=203 0.91, 280 0.93, 360 0.97, 420 0.99, 520 1.02
#   1 thread:  n=203 0.92, 280 0.94, 360 0.98, 420 1.06, 520 0.99
# (a second idle probe, 2 threads: n=203 0.86, 360 0.98, 612 ~1.1). The crossover is
# ~360-420 tokens; 320 keeps a margin at both thread counts. At 512 px YOLOS-tiny
# (1 + 100 + kept) stays under 320 from ~79 % sparsity up.
NATIVE_MAX_TOKENS = 320
# With several images it runs image by image, which pays only when each image's sequence
# is long enough for its own GEMMs; shorter ones go through the packed loop's larger GEMMs.
# `python examples/benchmarks/ab_native_batch.py` (batch 8, fused / loop with per-image
# attention; 2-core x86 VM, torch 2.15, idle, 2026-11-21):
#   demo detector at 128 px, 15-61 tokens per image: 1.33-2.33 (loop far better)
#   YOLOS-tiny at 512 px: 118-179 tokens 1.16, 171-247 tokens 0.95, 230-272 tokens 0.85
# A single image takes the fused layer at any length up to NATIVE_MAX_TOKENS (0.86-0.93).
NATIVE_MIN_TOKENS_BATCHED = 160

# How a packed batch attends on CPU with several threads: image by image on each image's
# own length when its attention is long enough (the longest computed sequence plus the
# longest run of frozen keys, ``preserve``, at least this many tokens), else in one padded
# call (the rows scattered into (B, L_max) slots, one masked SDPA call, gathered back; what
# GPUs always use). Per-image calls pad nothing but each pays a fixed cost (and, for
# ``preserve``, a key/value concatenation), which short sequences notice. With one thread
# the per-image calls are always taken (no thread wake-ups to save).
# `python examples/benchmarks/ab_pack_attention.py [--demo-detector] [--treatment T]`,
# batch 8, padded / per image, 2 threads, idle, 2026-11-21:
#   YOLOS-tiny at 512 px, drop, ms per image: 579-654 tokens 97.2 / 97.9, 311-392 tokens
#     46.7 / 43.2, 152-250 tokens 23.9 / 21.3
#   demo detector at 128 px (64 patches + 11), ms per batch: drop 66-71 tokens 39.6 / 39.7,
#     40-46 tokens 27.4 / 28.0, 18-22 tokens 18.4 / 21.1; preserve (75 keys each)
#     34.4 / 40.2, 26.4 / 31.0, 23.4 / 26.3
#   (1 thread, drop, demo detector: 65.1 / 62.2, 37.7 / 37.2, 20.7 / 21.8)
# In the whole benchmark (bench_prune.py, docs/performance.md) per-image attention took
# YOLOS-tiny at batch 8 from 0.64-0.84 of the FLOP ideal to 0.85-0.96 at 0.25-0.75
# sparsity (0.74-0.86 at 0.9). (Under a heavy load, load average 6+, the padded call was the
# faster one at 512 px too: fewer thread wake-ups.)
CPU_PER_IMAGE_MIN_TOKENS = 96


def _padded_on_cpu(keys: int) -> bool:
    """Whether a packed batch on CPU attends in one padded call: several threads and fewer
    than ``CPU_PER_IMAGE_MIN_TOKENS`` keys in its longest attention."""
    return torch.get_num_threads() > 1 and keys < CPU_PER_IMAGE_MIN_TOKENS


def _native_ok(model, treatment: str, lengths, dtype, dev) -> bool:
    """Whether ``pruned_forward`` runs the encoder as ``torch._transformer_encoder_layer_fwd``:
    inference (no autograd, eval mode: the fused layer has no backward and no dropout) on CPU
    in float32 (in bfloat16/float16 it computes the same but runs several times slower here),
    not under autocast, tracing or compiling (not exportable), not ``preserve`` (frozen
    key/value tokens), a pre-LN layer it can express (exact GELU, q/k/v biases, one eps) and
    every sequence at most ``NATIVE_MAX_TOKENS`` long (and, with several images, each at least
    ``NATIVE_MIN_TOKENS_BATCHED``). ``torch.backends.mha.set_fastpath_enabled(False)``
    turns it off, as it does nn.TransformerEncoderLayer's fast path."""
    cfg = model.config
    if not (max(lengths) <= NATIVE_MAX_TOKENS and (len(lengths) == 1 or min(lengths) >= NATIVE_MIN_TOKENS_BATCHED)
            and dev.type == "cpu" and dtype == torch.float32
            and treatment != "preserve" and not model.training and not torch.is_grad_enabled()):
        return False
    if (torch.is_autocast_enabled("cpu") or torch.jit.is_tracing() or torch.jit.is_scripting()
            or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()
            or not torch.backends.mha.get_fastpath_enabled()):
        return False
    return (cfg.hidden_act == "gelu" and bool(cfg.qkv_bias)
            and all(layer.layernorm_before.eps == layer.layernorm_after.eps for layer in model.vit.encoder.layer))


def _encode_native(model, h, mid, spans, first_layer: int = 0):
    """YOLOS's encoder layers through torch's fused native pre-LN encoder layer (the one
    nn.TransformerEncoderLayer's inference fast path calls; one kernel per layer instead
    of ~12 ops), one image at a time: ``spans`` are the (start, length) of every image's
    rows in the packed ``h`` (T, C); mid-layer position embeddings ``mid`` (gathered like
    ``h``) are added after every layer but the last. Returns the packed (T, C) states."""
    cfg = model.config
    layers = model.vit.encoder.layer
    c, heads = cfg.hidden_size, cfg.num_attention_heads
    weights = _layer_weights(model)
    outs = []
    for s, n in spans:
        x = h[s:s + n][None]
        for li, (layer, (wqkv, bqkv)) in enumerate(zip(layers, weights)):
            if li < first_layer:
                continue
            ln1, ln2 = layer.layernorm_before, layer.layernorm_after
            x = torch._transformer_encoder_layer_fwd(
                x, c, heads, wqkv, bqkv, layer.attention.output.dense.weight, layer.attention.output.dense.bias,
                True, True, ln1.eps, ln1.weight, ln1.bias, ln2.weight, ln2.bias,  # exact GELU, pre-LN
                layer.intermediate.dense.weight, layer.intermediate.dense.bias,
                layer.output.dense.weight, layer.output.dense.bias, None, None)
            if mid is not None and li < len(layers) - 1:
                x = x + mid[li, s:s + n]
        outs.append(x[0])
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _encode(model, h, frozen, attend, mid, first_layer: int = 0, stop_layer: int | None = None):
    """YOLOS's encoder layers ``first_layer`` to ``stop_layer`` (exclusive; default all)
    over the computed tokens ``h`` (frozen key/value-only tokens ``frozen`` or None);
    mid-layer position embeddings ``mid`` are added after every layer but the last."""
    cfg = model.config
    layers = model.vit.encoder.layer
    c = cfg.hidden_size
    train = model.training
    p_hidden = cfg.hidden_dropout_prob if train else 0.0
    for li, (layer, (wqkv, bqkv)) in enumerate(zip(layers, _layer_weights(model))):
        if li < first_layer or (stop_layer is not None and li >= stop_layer):
            continue
        ln1, ln2 = layer.layernorm_before, layer.layernorm_after
        x = F.layer_norm(h, (c,), ln1.weight, ln1.bias, ln1.eps)
        qkv = F.linear(x, wqkv, bqkv)
        kv = None
        if frozen is not None:
            xf = F.layer_norm(frozen, (c,), ln1.weight, ln1.bias, ln1.eps)
            kv = F.linear(xf, wqkv[c:], None if bqkv is None else bqkv[c:])
        dense = layer.attention.output.dense
        a = F.linear(attend(qkv, kv), dense.weight, dense.bias)
        h = h + (F.dropout(a, p_hidden, True) if p_hidden else a)
        y = F.layer_norm(h, (c,), ln2.weight, ln2.bias, ln2.eps)
        y = layer.intermediate.intermediate_act_fn(F.linear(y, layer.intermediate.dense.weight,
                                                            layer.intermediate.dense.bias))
        y = F.linear(y, layer.output.dense.weight, layer.output.dense.bias)
        h = h + (F.dropout(y, p_hidden, True) if p_hidden else y)
        if mid is not None and li < len(layers) - 1:
            h = h + mid[li]
    return h


@dataclass
class _Tokens:
    """The packed input sequence of a batch: every image's [CLS, detection tokens, kept
    patch tokens (, pool token)] one after the other."""
    h: torch.Tensor  # (T, C) input embeddings
    mid: torch.Tensor | None  # (layers - 1, T, C) gathered mid-layer position embeddings
    frozen: torch.Tensor | None  # (T', C) preserve's frozen key/value tokens, per image contiguous
    lengths: list  # tokens per image
    fr_lengths: list | None  # frozen tokens per image
    counts: torch.Tensor  # (B,) kept patch tokens
    hidden_info: tuple | None = None  # what return_hidden needs (one input size only)


def _embed(model, pixel_values: torch.Tensor, keep: torch.Tensor, treatment: str) -> _Tokens:
    """The packed token sequence of images of one size: (B, 3, H, W) pixels, (B, P) keep."""
    cfg = model.config
    emb_mod = model.vit.embeddings
    b, _, H, W = pixel_values.shape
    ps, n_det, c = cfg.patch_size, cfg.num_detection_tokens, cfg.hidden_size
    gh, gw = H // ps, W // ps
    p = gh * gw
    dev = pixel_values.device
    pos, mid = _positions(model, (H, W))
    proj = emb_mod.patch_embeddings.projection
    w_patch = proj.weight.reshape(c, -1)

    counts = keep.sum(1)
    counts_l = counts.tolist()
    pool = [treatment == "pool" and k < p for k in counts_l]
    lengths = [1 + n_det + k + int(q) for k, q in zip(counts_l, pool)]
    total = sum(lengths)
    lens_t = torch.tensor(lengths, device=dev)
    starts = torch.cumsum(lens_t, 0) - lens_t

    # kept patches: batch index, patch index, rank within the image, place in the sequence
    bi, pi = torch.nonzero(keep, as_tuple=True)
    first = torch.cumsum(counts, 0) - counts
    dest_kept = starts[bi] + 1 + n_det + (torch.arange(bi.shape[0], device=dev) - first[bi])
    spec_src = torch.cat([torch.zeros(1, dtype=torch.long, device=dev),
                          torch.arange(1 + p, 1 + p + n_det, device=dev)])  # CLS, det in YOLOS's sequence
    dest_spec = (starts[:, None] + torch.arange(1 + n_det, device=dev)).reshape(-1)

    patches = _patches(pixel_values, ps, gh, gw)
    all_emb = None
    if treatment == "preserve":  # every patch is needed: the projection as YOLOS runs it
        all_emb = proj(pixel_values).flatten(2).transpose(1, 2) + pos[1:1 + p]  # (B, P, C)
        kept_emb = all_emb[bi, pi]
    else:
        rows = patches[bi, pi // gw, pi % gw].reshape(bi.shape[0], w_patch.shape[1])  # (kept, 3·ps·ps) pixels
        kept_emb = F.linear(rows, w_patch, proj.bias) + pos[1 + pi]
    spec = torch.cat([emb_mod.cls_token[0], emb_mod.detection_tokens[0]]) + pos[spec_src]  # (1 + D, C)

    h = kept_emb.new_zeros(total, c)
    h = h.index_put((dest_spec,), spec.repeat(b, 1)).index_put((dest_kept,), kept_emb)
    mid_g = None
    if mid is not None:
        mid_g = mid.new_zeros(mid.shape[0], total, c)
        mid_g[:, dest_spec] = mid[:, spec_src].repeat(1, b, 1)
        mid_g[:, dest_kept] = mid[:, 1 + pi]
    if any(pool):
        pi_img = torch.tensor([i for i, q in enumerate(pool) if q], device=dev)
        dest_pool = starts[pi_img] + lens_t[pi_img] - 1
        pruned_w = (~keep[pi_img]).to(h.dtype)
        n_pruned = pruned_w.sum(1, keepdim=True)
        pruned_w = pruned_w / n_pruned  # (n_pool, P) mean weights
        # the embedding is affine: the mean of the pruned patches' embeddings is the embedding
        # of their mean pixels (all pixels' sum minus the kept patches' sum)
        pix = patches.sum((1, 2)).reshape(b, -1) - rows.new_zeros(b, rows.shape[1]).index_add(0, bi, rows)
        pooled = F.linear(pix[pi_img] / n_pruned, w_patch, proj.bias) + pruned_w @ pos[1:1 + p]
        h = h.index_put((dest_pool,), pooled)
        if mid_g is not None:
            mid_g[:, dest_pool] = torch.einsum("np,lpc->lnc", pruned_w, mid[:, 1:1 + p])

    frozen = fr_lengths = None
    if treatment == "preserve" and any(k < p for k in counts_l):
        fr_lengths = [p - k for k in counts_l]
        fb, fp = torch.nonzero(~keep, as_tuple=True)
        frozen = all_emb[fb, fp]  # (T', C) packed, per image contiguous
    return _Tokens(h, mid_g, frozen, lengths, fr_lengths, counts,
                   (p, spec_src, dest_spec, bi, pi, dest_kept, all_emb, keep))


def _embed_mixed(model, images: list, keeps: list, treatment: str) -> _Tokens:
    """The packed sequence of images of different sizes: each size's images embedded
    together (their own grids and interpolated position embeddings), then laid out in
    image order."""
    groups: dict = {}
    for i, x in enumerate(images):
        groups.setdefault(tuple(x.shape[-2:]), []).append(i)
    n = len(images)
    parts: list = [None] * n  # per image: (h rows, mid rows, frozen rows, length, frozen length, count)
    for idx in groups.values():
        t = _embed(model, torch.stack([images[i] for i in idx]), torch.stack([keeps[i] for i in idx]), treatment)
        s = f = 0
        for k, i in enumerate(idx):
            ln = t.lengths[k]
            fl = t.fr_lengths[k] if t.fr_lengths else 0
            parts[i] = (t.h[s:s + ln], None if t.mid is None else t.mid[:, s:s + ln],
                        None if t.frozen is None else t.frozen[f:f + fl], ln, fl, t.counts[k])
            s += ln
            f += fl
    h = torch.cat([q[0] for q in parts])
    mid = None if parts[0][1] is None else torch.cat([q[1] for q in parts], 1)
    fr = [q[2] for q in parts if q[2] is not None and q[4]]
    fr_lengths = [q[4] for q in parts] if fr else None
    frozen = torch.cat(fr) if fr else None
    return _Tokens(h, mid, frozen, [q[3] for q in parts], fr_lengths, torch.stack([q[5] for q in parts]))


def pruned_forward(model, pixel_values, keep=None, layout: str = "pack", return_hidden: bool = False,
                   treatment: str = "drop") -> PrunedOutput:
    """YOLOS computing only CLS, detection tokens and the patch tokens where ``keep`` is
    true; the pruned patch tokens are treated as ``treatment`` says (module docstring).

    pixel_values: (B, 3, H, W), or a list of B (3, H_i, W_i) images of different sizes
    (each on its own grid: the checkpoint's input protocol); keep: (B, gh, gw) or
    (B, gh*gw) bool on the detector grid (a list of per-image masks for a list of images),
    or None for no pruning. ``return_hidden`` needs images of one size.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    if treatment not in TREATMENTS:
        raise ValueError(f"treatment must be one of {TREATMENTS}")
    ps = model.config.patch_size
    if isinstance(pixel_values, (list, tuple)):
        images = list(pixel_values)
        dev = images[0].device
        keeps = [torch.ones((x.shape[-2] // ps) * (x.shape[-1] // ps), dtype=torch.bool, device=dev)
                 for x in images] if keep is None else [torch.as_tensor(k, device=dev).reshape(-1) for k in keep]
        if len(keeps) != len(images):
            raise ValueError(f"{len(keeps)} keep masks for {len(images)} images")
        for x, k in zip(images, keeps):
            if k.shape[0] != (x.shape[-2] // ps) * (x.shape[-1] // ps):
                raise ValueError(f"keep mask has {k.shape[0]} tokens, the detector grid of a "
                                 f"{x.shape[-2]}x{x.shape[-1]} image has {(x.shape[-2] // ps) * (x.shape[-1] // ps)}")
        if len({tuple(x.shape[-2:]) for x in images}) == 1:
            pixel_values, keep = torch.stack(images), torch.stack(keeps)
        else:
            if return_hidden:
                raise ValueError("return_hidden needs images of one size")
            tok = _embed_mixed(model, images, keeps, treatment)
    if not isinstance(pixel_values, (list, tuple)):
        b, _, H, W = pixel_values.shape
        p = (H // ps) * (W // ps)
        dev = pixel_values.device
        if keep is None:
            keep = torch.ones(b, p, dtype=torch.bool, device=dev)
        keep = keep.reshape(b, -1).to(dev)
        if keep.shape[1] != p:
            raise ValueError(f"keep mask has {keep.shape[1]} tokens, the detector grid has {p}")
        tok = _embed(model, pixel_values, keep, treatment)
    return _forward_tokens(model, tok, dev, layout, treatment, return_hidden)


def _forward_tokens(model, tok: _Tokens, dev, layout: str, treatment: str, return_hidden: bool = False,
                    first_layer: int = 0) -> PrunedOutput:
    """The encoder layers from ``first_layer`` on and the heads over a packed sequence
    ``tok`` (input embeddings, or the states after ``first_layer`` layers: ``layered.py``)."""
    cfg = model.config
    vit = model.vit
    n_det, c = cfg.num_detection_tokens, cfg.hidden_size
    b = len(tok.lengths)
    lengths, fr_lengths = tok.lengths, tok.fr_lengths
    native = _native_ok(model, treatment, lengths, vit.embeddings.patch_embeddings.projection.weight.dtype, dev)
    pad = layout == "pad" and b > 1 and not native
    L = max(lengths)
    lens_t = torch.tensor(lengths, device=dev)
    starts = torch.cumsum(lens_t, 0) - lens_t  # packed
    h, mid_g, frozen = tok.h if first_layer else vit.embeddings.dropout(tok.h), tok.mid, tok.frozen
    remap = None
    if pad:  # packed rows → (B, L) slots
        img = torch.repeat_interleave(torch.arange(b, device=dev), lens_t)
        remap = img * L + torch.arange(h.shape[0], device=dev) - starts[img]
        h = h.new_zeros(b * L, c).index_put((remap,), h)
        if mid_g is not None:
            mid_g = _scatter_mid(mid_g, remap, b * L)
        starts = torch.arange(b, device=dev) * L
        if frozen is not None:
            lp = max(fr_lengths)
            fl_t = torch.tensor(fr_lengths, device=dev)
            fimg = torch.repeat_interleave(torch.arange(b, device=dev), fl_t)
            fdest = fimg * lp + torch.arange(frozen.shape[0], device=dev) - (torch.cumsum(fl_t, 0) - fl_t)[fimg]
            frozen = frozen.new_zeros(b * lp, c).index_put((fdest,), frozen).view(b, lp, c)
    total = h.shape[0]

    heads = cfg.num_attention_heads
    hd = c // heads
    scale = vit.encoder.layer[0].attention.attention.scaling
    p_drop = cfg.attention_probs_dropout_prob if model.training else 0.0
    if native:  # short sequences, CPU inference: fused layers image by image (layout is moot)
        h = _encode_native(model, h, mid_g, list(zip(starts.tolist(), lengths)), first_layer)
    elif pad:
        h = h.view(b, L, c)
        if mid_g is not None:
            mid_g = mid_g.view(mid_g.shape[0], b, L, c)
        ar = torch.arange(L, device=dev)
        mask = ar[None] < lens_t[:, None]
        if frozen is not None:
            mask = torch.cat([mask, torch.arange(frozen.shape[1], device=dev)[None] <
                              torch.tensor(fr_lengths, device=dev)[:, None]], 1)
        if bool(mask.all()):
            mask = None
        attend = lambda qkv, kv: attend_pad(qkv, kv, mask, heads, hd, scale, p_drop)  # noqa: E731
    elif b > 1 and (dev.type != "cpu" or _padded_on_cpu(L + max(fr_lengths or [0]))):
        # packed Linear layers, one padded attention call per layer
        img = torch.repeat_interleave(torch.arange(b, device=dev), lens_t)
        dest = img * L + torch.arange(total, device=dev) - starts[img]
        mask = torch.arange(L, device=dev)[None] < lens_t[:, None]
        fdest, lf = None, 0
        if frozen is not None:
            fl_t = torch.tensor(fr_lengths, device=dev)
            lf = max(fr_lengths)
            fimg = torch.repeat_interleave(torch.arange(b, device=dev), fl_t)
            fdest = fimg * lf + torch.arange(frozen.shape[0], device=dev) - (torch.cumsum(fl_t, 0) - fl_t)[fimg]
            mask = torch.cat([mask, torch.arange(lf, device=dev)[None] < fl_t[:, None]], 1)
        if bool(mask.all()):
            mask = None
        attend = lambda qkv, kv: attend_via_pad(qkv, kv, dest, fdest, b, L, lf, mask, heads, hd,  # noqa: E731
                                                 scale, p_drop)
    else:  # one image, or a batch on CPU: per-image calls pad nothing
        attend = lambda qkv, kv: attend_packed(qkv, kv, lengths, fr_lengths, heads, hd, scale, p_drop)  # noqa: E731
    if not native:
        h = _encode(model, h, frozen, attend, mid_g, first_layer).reshape(total, c)

    ln = vit.layernorm
    det_idx = starts[:, None] + 1 + torch.arange(n_det, device=dev)
    det_out = F.layer_norm(h[det_idx], (c,), ln.weight, ln.bias, ln.eps)
    logits = model.class_labels_classifier(det_out)
    boxes = model.bbox_predictor(det_out).sigmoid()
    hidden = None
    if return_hidden:
        p, spec_src, dest_spec, bi, pi, dest_kept, all_emb, keep = tok.hidden_info
        if remap is not None:
            dest_spec, dest_kept = remap[dest_spec], remap[dest_kept]
        s = 1 + p + n_det
        hidden = h.new_zeros(b * s, c)
        hn = F.layer_norm(h, (c,), ln.weight, ln.bias, ln.eps)
        hidden = hidden.index_put((torch.arange(b, device=dev).repeat_interleave(1 + n_det) * s + spec_src.repeat(b),),
                                  hn[dest_spec])
        hidden = hidden.index_put((bi * s + 1 + pi,), hn[dest_kept])
        if treatment == "preserve" and tok.frozen is not None:
            fb, fp = torch.nonzero(~keep, as_tuple=True)
            hidden = hidden.index_put((fb * s + 1 + fp,),
                                      F.layer_norm(all_emb[fb, fp], (c,), ln.weight, ln.bias, ln.eps))
        hidden = hidden.view(b, s, c)
    return PrunedOutput(logits, boxes, hidden, tok.counts)


def _scatter_mid(mid, remap, total):
    out = mid.new_zeros(mid.shape[0], total, mid.shape[2])
    out[:, remap] = mid
    return out
