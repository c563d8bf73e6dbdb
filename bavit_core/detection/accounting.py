"""Token accounting (paper eq. 4, Table 2) and analytic FLOPs."""
from __future__ import annotations

import numpy as np

from .treatments import get_treatment


def token_columns(sparsity: np.ndarray, det_patches: int, det_layers: int, bavit_tokens: int, bavit_layers: int,
                  with_bavit: bool, treatment: str = "drop", dense_layers: int = 0) -> dict:
    """Table 2 columns, averaged over images, for one treatment of the pruned tokens.

    YOLOS tokens Ty = layers × patch tokens (12 × 1024 = 12288); BAViT tokens
    Tb = depth × its patch tokens (2 × 576 = 1152) for rows that run BAViT, else 0;
    YOLOS pruned = the patch tokens the layers compute: Ty·(1 − s_i) for sparsity s_i, plus
    one pool token per layer for ``pool`` (images with anything pruned); YOLOS+BAViT =
    pruned + Tb; reduction (eq. 4, with the paper's s read as the kept share, as Table 2's
    numbers require) = mean_i (Ty − (Tb + pruned_i)) / Ty. Eq. 4 counts computed tokens
    only: ``kv_only_tokens`` = layers × pruned tokens that ``preserve`` keeps as keys and
    values (0 for drop and pool), so nothing is hidden. ``det_patches`` is one count, or
    one per image (the checkpoint's protocol: each image its own grid); the columns are
    then means over images of each image's own counts.

    ``dense_layers`` = k generalises eq. 4 to selection inside the detector (the attention
    selector, ``--prune-at-layer k``): the first k layers compute every patch token, the
    other layers − k the kept ones: pruned_i = k·P + (layers − k)·P·(1 − s_i) (pool's token
    and preserve's key/value-only tokens in those layers − k only).
    """
    t = get_treatment(treatment)
    s = np.asarray(sparsity, dtype=np.float64)
    ty = det_layers * np.broadcast_to(np.asarray(det_patches, dtype=np.float64), s.shape)
    tb = bavit_layers * bavit_tokens if with_bavit else 0
    later = (det_layers - dense_layers) / det_layers  # the share of layers on the kept tokens only
    pruned = ty * (1.0 - later * s)
    kv_only = np.zeros_like(s)
    if t.summary_token:
        pruned = pruned + (det_layers - dense_layers) * (s > 0)
    if t.keys_values:
        kv_only = ty * later * s
    total = pruned + tb
    return {
        "treatment": treatment,
        "bavit_tokens": float(tb),
        "yolos_tokens": float(ty.mean()),
        "yolos_pruned_tokens": float(pruned.mean()),
        "kv_only_tokens": float(kv_only.mean()),
        "total_tokens": float(total.mean()),
        "token_reduction_pct": float(100.0 * ((ty - total) / ty).mean()),
    }


def detector_gflops(config, kept: np.ndarray, n_patches: int, treatment: str = "drop",
                    dense_layers: int | None = None, score_macs=None) -> float:
    """Mean GFLOPs (2 × MACs) per image of YOLOS keeping ``kept`` patch tokens, as the
    pruned forward computes them: the patch embedding of the kept patches (all patches for
    ``preserve``), the encoder on 1 + kept + detection tokens (+ the pool token for
    ``pool``; + key/value projections of the frozen pruned tokens and attention over them
    for ``preserve``), the two 3-layer heads.

    ``dense_layers`` = k (an int; None: tokens chosen before the detector): the detector
    selects itself after k layers (detection/layered.py): every patch embedded, k layers on
    1 + P + detection tokens, the scores of layer k (keys of those P + 1 + D tokens, queries
    of CLS and the D detection tokens, their products: (P + 1 + D)·d² + (1 + D)·d² +
    (1 + D)·(P + 1 + D)·d MACs), the other layers − k as above (pool's token and
    preserve's frozen states taken at layer k, so no extra embedding). ``score_macs``
    (per image) replaces the attention scores' cost when something else ranks the tokens
    (a trained gate: P · its MACs per token)."""
    t = get_treatment(treatment)
    d, mlp, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    nd = config.num_detection_tokens
    p = config.patch_size
    kept = np.asarray(kept, dtype=np.float64)
    pruned = n_patches - kept
    n = 1 + kept + nd
    embedded = kept
    kv_only = 0.0
    if t.summary_token:
        n = n + (pruned > 0)
        embedded = kept + (pruned > 0)  # the pool token: one projection of the mean pixels
    if t.keys_values:
        embedded = np.full_like(kept, n_patches)
        kv_only = pruned
    heads = nd * (2 * (d * d) + d * (config.num_labels + 1) + 2 * (d * d) + d * 4)
    if dense_layers is None:
        encoder = yolos_macs(n, d, mlp, layers, kv_only)
    else:
        embedded = np.full_like(kept, n_patches)
        n_all = 1 + np.full_like(kept, n_patches) + nd
        scores = (n_all * d * d + (1 + nd) * d * d + (1 + nd) * n_all * d if score_macs is None
                  else np.asarray(score_macs, dtype=np.float64))
        encoder = (yolos_macs(n_all, d, mlp, dense_layers) + scores
                   + yolos_macs(n, d, mlp, layers - dense_layers, kv_only))
    embed = embedded * 3 * p * p * d
    return float(np.mean(2 * (embed + encoder + heads)) / 1e9)


def bavit_gflops(cfg) -> float:
    n = cfg.n_tokens
    d = cfg.embed_dim
    macs = n * 3 * cfg.patch ** 2 * d + yolos_macs(n, d, int(d * cfg.mlp_ratio), cfg.depth) + n * d * 2
    return 2 * macs / 1e9


def yolos_macs(n_tokens, hidden: int, mlp: int, layers: int, kv_only=0.0):
    """Encoder MACs for N computed tokens and Np key/value-only tokens: per layer
    4·N·d² (qkv, proj) + 2·N·d·mlp + 2·N·(N + Np)·d (attention) + 2·Np·d² (their K, V).
    With mlp = 4d and Np = 0 this is the familiar 12·N·d² + 2·N²·d."""
    n, npk = n_tokens, kv_only
    return layers * (4 * n * hidden ** 2 + 2 * n * hidden * mlp + 2 * n * (n + npk) * hidden + 2 * npk * hidden ** 2)
