"""Token accounting (paper eq. 4, Table 2) and analytic FLOPs."""
from __future__ import annotations

import numpy as np


def token_columns(sparsity: np.ndarray, det_patches: int, det_layers: int, bavit_tokens: int, bavit_layers: int,
                  with_bavit: bool) -> dict[str, float]:
    """Table 2 columns, averaged over images.

    YOLOS tokens Ty = layers × patch tokens (12 × 1024 = 12288); BAViT tokens
    Tb = depth × its patch tokens (2 × 576 = 1152) for rows that run BAViT, else 0;
    YOLOS pruned = Ty·(1 − s_i) for sparsity s_i; YOLOS+BAViT = pruned + Tb; reduction
    (eq. 4, with the paper's s read as the kept share, as Table 2's numbers require) =
    mean_i (Ty − (Tb + Ty·(1 − s_i))) / Ty.
    """
    ty = det_layers * det_patches
    tb = bavit_layers * bavit_tokens if with_bavit else 0
    pruned = ty * (1.0 - np.asarray(sparsity, dtype=np.float64))
    total = pruned + tb
    return {
        "bavit_tokens": float(tb),
        "yolos_tokens": float(ty),
        "yolos_pruned_tokens": float(pruned.mean()),
        "total_tokens": float(total.mean()),
        "token_reduction_pct": float(100.0 * (ty - total).mean() / ty),
    }


def detector_gflops(config, kept: np.ndarray, n_patches: int) -> float:
    """Mean GFLOPs (2 × MACs) per image of YOLOS keeping ``kept`` patch tokens: patch
    embedding (all patches), encoder on 1 + kept + detection tokens, the two 3-layer heads."""
    d, mlp, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    nd = config.num_detection_tokens
    p = config.patch_size
    n = 1 + np.asarray(kept, dtype=np.float64) + nd
    embed = n_patches * 3 * p * p * d
    heads = nd * (2 * (d * d) + d * (config.num_labels + 1) + 2 * (d * d) + d * 4)
    return float(np.mean(2 * (embed + yolos_macs(n, d, mlp, layers) + heads)) / 1e9)


def bavit_gflops(cfg) -> float:
    n = cfg.n_tokens
    d = cfg.embed_dim
    macs = n * 3 * cfg.patch ** 2 * d + yolos_macs(n, d, int(d * cfg.mlp_ratio), cfg.depth) + n * d * 2
    return 2 * macs / 1e9


def yolos_macs(n_tokens: float, hidden: int, mlp: int, layers: int) -> float:
    """Encoder MACs for n tokens: per layer 4·N·d² (qkv, proj) + 2·N·d·mlp + 2·N²·d (attention).
    With mlp = 4d this is the familiar 12·N·d² + 2·N²·d."""
    return layers * (4 * n_tokens * hidden ** 2 + 2 * n_tokens * hidden * mlp + 2 * n_tokens ** 2 * hidden)
