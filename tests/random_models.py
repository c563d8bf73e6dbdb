"""Random-weight models whose outputs are O(1), for comparisons that must be able to fail."""
import json
import math
from dataclasses import asdict

import torch

from bavit_core.bavit.model import create_bavit, save_weights


def spread(model, seed):
    """Weights large enough that outputs are O(1) (at init they are ~1e-3, where a 1e-4
    comparison proves nothing, BAViT's probabilities all sit near 0.5 and YOLOS's detection
    tokens all predict nearly the same box and score): unit-variance embeddings and position
    tables, 1/sqrt(fan_in) matrices, noisy norms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("position_embeddings", "pos_embed", "cls_token", "detection_tokens")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def make_bavit_run(path, seed, size=(48, 48)):
    """A random-weight (spread) 1-layer BAViT run directory at input ``size``."""
    torch.manual_seed(seed)
    b = spread(create_bavit(depth=1, input_size=size), seed)
    path.mkdir(parents=True)
    save_weights(b, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({"model": asdict(b.cfg)}))
    return path
