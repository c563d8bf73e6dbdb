"""YOLOS (Hugging Face transformers): loading, named configs, initialisation of new
detectors, and the detector's token grid."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..runtime.errors import BavitError, InputFileError, OptionError

IMAGE_MEAN = (0.485, 0.456, 0.406)  # YOLOS's input normalisation (ImageNet statistics)
IMAGE_STD = (0.229, 0.224, 0.225)



def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_detector(name_or_path: str, device="cpu"):
    """YolosForObjectDetection from a local HF directory or a hub name (needs a network).

    Checked before any work: the directory's config is a YOLOS (``model_type``) and its
    weights load with no missing or unexpected keys; a hub name that is not cached fails
    fast when the hub cannot be reached (no retry loop). transformers' load report is not
    printed."""
    import json

    from transformers import YolosForObjectDetection
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    p = Path(name_or_path)
    looks_local = p.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local:
        if not p.is_dir():
            raise InputFileError(p, "detector directory not found (expected a Hugging Face model directory)")
        if not (p / "config.json").is_file():
            raise InputFileError(p, "not a Hugging Face model directory (config.json missing)")
        try:
            mt = json.loads((p / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            raise InputFileError(p / "config.json", "unreadable config (not JSON)") from None
        if mt != "yolos":
            raise InputFileError(p, f"not a YOLOS detector (model_type {mt!r}); pass a YOLOS directory, "
                                    "e.g. one written by bavit finetune")
    kw = dict(attn_implementation="sdpa", output_loading_info=True)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        try:
            model, info = YolosForObjectDetection.from_pretrained(str(name_or_path), local_files_only=True, **kw)
        except OSError:
            if looks_local or not _hub_reachable():
                raise
            model, info = YolosForObjectDetection.from_pretrained(str(name_or_path), **kw)
    except OSError as exc:
        where = "local directory" if looks_local else "hub model (not cached, and the hub cannot be reached)"
        raise BavitError(
            f"cannot load detector {name_or_path!r} as a {where} ({str(exc).splitlines()[0][:160]}); "
            "without a network pass --detector PATH to a local Hugging Face YOLOS directory"
        ) from None
    except (ValueError, KeyError, RuntimeError) as exc:
        raise InputFileError(name_or_path, f"not a YOLOS detector ({str(exc).splitlines()[0][:160]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if model.config.model_type != "yolos":
        raise InputFileError(name_or_path, f"not a YOLOS detector (model_type {model.config.model_type!r})")
    bad = [(k, v) for k, v in (("missing", info.get("missing_keys")), ("unexpected", info.get("unexpected_keys")),
                                 ("mismatched", info.get("mismatched_keys"))) if v]
    if bad:
        kind, keys = bad[0]
        keys = sorted(str(k if isinstance(k, str) else k[0]) for k in keys)
        raise InputFileError(name_or_path, f"the weights do not fit a YOLOS detector: {len(keys)} {kind} keys "
                                           f"(e.g. {keys[0]})")
    return model.float().to(device).eval()  # weights may be stored in half precision


def detector_input_size(model) -> tuple[int, int]:
    """The input size (h, w) the detector is configured for (its config's ``image_size``)."""
    size = model.config.image_size
    return (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size))


def export_detector(src: str, dest: str | Path, half: bool = True) -> Path:
    """Copy a detector to ``dest`` in HF layout, in fp16 by default (half the size; it is
    loaded back as fp32)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    m = load_detector(src)
    if half:
        m = m.half()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    m.save_pretrained(dest)
    return dest


def detector_grid(model, size: tuple[int, int]) -> tuple[int, int]:
    """The detector's token grid at input ``size`` (h, w); the patch must divide it."""
    p = model.config.patch_size
    if size[0] % p or size[1] % p:
        raise OptionError(f"--detector-size {tuple(size)} is not divisible by the detector patch {p}")
    return size[0] // p, size[1] // p


def tiny_yolos_config(name: str = "tiny", num_labels: int = 91, image_size=(512, 512), **over):
    """Named YOLOS configs: ``tiny`` is hustvl/yolos-tiny's shape; ``micro`` and ``nano``
    are small ones for generated datasets, tests and the demo."""
    from transformers import YolosConfig

    presets = {
        "tiny": dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
                     num_detection_tokens=100),
        "micro": dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768,
                      num_detection_tokens=20),
        "nano": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                     num_detection_tokens=10),
    }
    if name not in presets:
        raise BavitError(f"unknown detector config {name!r}; choose one of {', '.join(presets)}")
    kw = dict(presets[name], image_size=list(image_size), patch_size=16, num_labels=num_labels,
              use_mid_position_embeddings=False)
    kw.update(over)
    cfg = YolosConfig(**kw)
    cfg._attn_implementation = "sdpa"
    return cfg


def init_new_yolos(model, seed: int = 0) -> None:
    """Initialise what transformers leaves at zero in a YOLOS built from a config: the CLS
    token, the detection tokens and the (mid-layer) position embeddings. The original YOLOS
    draws them from a truncated normal (std 0.02); left at zero, patch tokens carry no
    position and all detection tokens start identical, and from-scratch training stalls
    (the class loss sat at its chance level for thousands of steps in our runs)."""
    g = torch.Generator().manual_seed(seed)
    emb = model.vit.embeddings
    params = [emb.cls_token, emb.detection_tokens, emb.position_embeddings]
    interp = getattr(model.vit.encoder, "interpolation", None)
    if interp is not None:
        params.append(interp.mid_position_embeddings)
    with torch.no_grad():
        for p in params:
            p.copy_((torch.randn(p.shape, generator=g) * 0.02).clamp_(-0.04, 0.04))


def init_encoder_from_bavit(model, bavit) -> int:
    """Copy a trained BAViT's patch embedding, patch position embeddings and encoder blocks
    into the first layers of a YOLOS of the same width and head count (timm's fused qkv is
    split into YOLOS's query/key/value). The detector then starts from features that
    already separate FG from BG. Returns the number of layers copied."""
    cfg, vit = model.config, bavit.vit
    d = vit.embed_dim
    if d != cfg.hidden_size or bavit.cfg.num_heads != cfg.num_attention_heads:
        raise BavitError(f"BAViT (width {d}, {bavit.cfg.num_heads} heads) does not match the detector "
                         f"(width {cfg.hidden_size}, {cfg.num_attention_heads} heads)")
    if bavit.cfg.patch != cfg.patch_size or len(vit.blocks) > cfg.num_hidden_layers:
        raise BavitError(f"BAViT (patch {bavit.cfg.patch}, {len(vit.blocks)} layers) does not fit the detector "
                         f"(patch {cfg.patch_size}, {cfg.num_hidden_layers} layers)")
    if vit.blocks[0].mlp.fc1.out_features != cfg.intermediate_size:
        raise BavitError("BAViT's MLP width differs from the detector's intermediate size")
    emb = model.vit.embeddings
    gh, gw = bavit.cfg.grid_shape
    dh, dw = detector_grid(model, cfg.image_size)
    pos = vit.pos_embed.detach().reshape(1, gh, gw, d).permute(0, 3, 1, 2)
    if (gh, gw) != (dh, dw):
        pos = F.interpolate(pos, size=(dh, dw), mode="bicubic", align_corners=False)
    with torch.no_grad():
        emb.patch_embeddings.projection.weight.copy_(vit.patch_embed.proj.weight)
        emb.patch_embeddings.projection.bias.copy_(vit.patch_embed.proj.bias)
        emb.position_embeddings[0, 1:1 + dh * dw] = pos.flatten(2).transpose(1, 2)[0]
        for blk, layer in zip(vit.blocks, model.vit.encoder.layer):
            q, k, v = blk.attn.qkv.weight.chunk(3, dim=0)
            qb, kb, vb = blk.attn.qkv.bias.chunk(3, dim=0)
            att = layer.attention.attention
            for lin, w, b in ((att.query, q, qb), (att.key, k, kb), (att.value, v, vb)):
                lin.weight.copy_(w)
                lin.bias.copy_(b)
            pairs = ((layer.attention.output.dense, blk.attn.proj), (layer.layernorm_before, blk.norm1),
                     (layer.layernorm_after, blk.norm2), (layer.intermediate.dense, blk.mlp.fc1),
                     (layer.output.dense, blk.mlp.fc2))
            for dst, src in pairs:
                dst.weight.copy_(src.weight)
                dst.bias.copy_(src.bias)
    return len(vit.blocks)
