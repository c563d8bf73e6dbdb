"""BAViT: a ViT-tiny without CLS token and with a 2-class head on every patch token.

Built on timm's ``VisionTransformer`` (``class_token=False, global_pool=''`` makes its head
act per token). Checkpoints are run directories holding ``config.json`` and safetensors
weights; nothing is unpickled when loading weights.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data.grid import GridSpec
from ..runtime.errors import BavitError, InputFileError, OptionError
# the run directory's file names and config reader (they live in the torch-free runfiles)
from .runfiles import CONFIG_FILE, LAST_FILE, MODEL_FILE, read_run_config  # noqa: F401 - re-exported

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelConfig:
    depth: int = 2
    input_h: int = 384
    input_w: int = 384
    patch: int = 16
    embed_dim: int = 192
    num_heads: int = 3
    mlp_ratio: float = 4.0
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    pretrained: str | None = None

    def validate(self) -> None:
        if self.depth < 1:
            raise OptionError(f"--depth must be at least 1, got {self.depth}")
        GridSpec(self.input_h, self.input_w, self.patch)  # raises on sizes not divisible by the patch
        if self.embed_dim % self.num_heads:
            raise OptionError("embed dim must be divisible by the number of heads")

    @property
    def grid_shape(self) -> tuple[int, int]:
        return GridSpec(self.input_h, self.input_w, self.patch).shape

    @property
    def n_tokens(self) -> int:
        gh, gw = self.grid_shape
        return gh * gw

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("mean", "std"):
            if k in known:
                known[k] = tuple(known[k])
        return cls(**known)


class BAViT(nn.Module):
    """Per-token FG/BG classifier. ``forward(x)`` → logits (B, gh*gw, 2); class 1 is FG."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        cfg.validate()
        self.cfg = cfg
        self.vit = VisionTransformer(
            img_size=(cfg.input_h, cfg.input_w), patch_size=cfg.patch, embed_dim=cfg.embed_dim,
            depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, num_classes=2,
            class_token=False, global_pool="",
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)

    def fg_prob(self, x: torch.Tensor) -> torch.Tensor:
        """FG probability per token, (B, gh, gw)."""
        gh, gw = self.cfg.grid_shape
        return self.forward(x).float().softmax(-1)[..., 1].reshape(x.shape[0], gh, gw)


def create_bavit(depth: int = 2, input_size: tuple[int, int] = (384, 384), patch: int = 16,
                 pretrained: str | None = None) -> BAViT:
    """Build BAViT; ``pretrained`` is a timm model name or a local weights file."""
    cfg = ModelConfig(depth=depth, input_h=input_size[0], input_w=input_size[1], patch=patch, pretrained=pretrained)
    if pretrained:
        state, mean, std = _pretrained_state(pretrained)
        cfg.mean, cfg.std = mean, std
        model = BAViT(cfg)
        load_vit_weights(model, state)
        return model
    return BAViT(cfg)


def _pretrained_state(name: str):
    p = Path(name)
    if p.suffix in (".safetensors", ".pth", ".pt", ".bin") or p.exists():
        if not p.is_file():
            raise InputFileError(p, "pretrained weights file not found")
        mean, std = weights_normalisation(p)
        return read_state_dict(p), mean, std
    import timm

    if not timm.is_model(name):
        raise OptionError(f"unknown timm model {name!r} (and no such local weights file)")
    _require_hub_reachable(name)
    try:
        m = timm.create_model(name, pretrained=True, num_classes=0)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise OptionError(f"unknown timm model {name!r}") from None
        raise BavitError(f"cannot load timm weights {name!r}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # network errors come in many types
        raise BavitError(
            f"cannot download timm weights {name!r} (no network?): {type(exc).__name__}; "
            "pass a local weights file to --pretrained instead"
        ) from None
    dc = m.pretrained_cfg
    return m.state_dict(), tuple(dc.get("mean", IMAGENET_MEAN)), tuple(dc.get("std", IMAGENET_STD))


def _norm(v) -> tuple | None:
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            return None
    if isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v):
        return tuple(float(x) for x in v)
    return None


def weights_normalisation(path: Path) -> tuple[tuple, tuple]:
    """The input mean/std a local weights file was trained with, from (in order) a timm/HF
    ``config.json`` beside it (``pretrained_cfg`` mean/std), the safetensors metadata
    (``mean``/``std``), or a timm pretrained tag in its file name
    (``vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors`` → mean = std = 0.5); ImageNet's
    otherwise."""
    side = path.parent / "config.json"
    if side.is_file():
        try:
            doc = json.loads(side.read_text())
            pc = doc.get("pretrained_cfg", doc) if isinstance(doc, dict) else {}
            mean, std = _norm(pc.get("mean")), _norm(pc.get("std"))
            if mean and std:
                return mean, std
        except (ValueError, OSError, AttributeError):
            pass
    if path.suffix == ".safetensors":
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                md = f.metadata() or {}
            mean, std = _norm(md.get("mean")), _norm(md.get("std"))
            if mean and std:
                return mean, std
        except Exception:  # unreadable files are reported by read_state_dict
            pass
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    try:
        from timm.models import get_pretrained_cfg

        pc = get_pretrained_cfg(stem) if "." in stem else None
        if pc is not None and pc.mean and pc.std:
            return tuple(pc.mean), tuple(pc.std)
    except Exception:
        pass
    return IMAGENET_MEAN, IMAGENET_STD


def _require_hub_reachable(name: str, timeout: float = 3.0) -> None:
    """Fail in seconds, not after a minute of hub retries, when timm weights are neither
    cached nor downloadable."""
    import os
    import socket

    try:
        from huggingface_hub import try_to_load_from_cache
        from timm.models import get_pretrained_cfg

        pc = get_pretrained_cfg(name)
        repo = getattr(pc, "hf_hub_id", None)
        if repo:
            for fname in ("model.safetensors", "pytorch_model.bin"):
                hit = try_to_load_from_cache(repo, fname)
                if isinstance(hit, str):
                    return
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        raise BavitError(f"cannot download timm weights {name!r}: not cached and HF_HUB_OFFLINE is set; "
                         "pass a local weights file to --pretrained instead")
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
    except OSError:
        raise BavitError(f"cannot download timm weights {name!r}: huggingface.co is unreachable (no network?); "
                         "pass a local weights file to --pretrained instead") from None


def read_state_dict(path: Path) -> dict:
    """Read weights without unpickling: safetensors, or torch files with weights_only=True."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputFileError(path, f"cannot read weights ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if not isinstance(sd, dict):
        raise InputFileError(path, "weights file does not hold a state dict")
    return sd


def load_vit_weights(model: BAViT, state: dict) -> list[str]:
    """Copy ImageNet ViT weights into BAViT: patch embedding, position embeddings
    (CLS entry dropped, grid resampled), the first ``depth`` blocks and the final norm.
    The per-token head stays freshly initialised. Returns the names loaded."""
    from timm.layers import resample_abs_pos_embed

    vit = model.vit
    own = vit.state_dict()
    state = {k[len("vit."):] if k.startswith("vit.") else k: v for k, v in state.items()}
    new = {}
    for k, v in state.items():
        if k.startswith("blocks."):
            if int(k.split(".")[1]) >= model.cfg.depth:
                continue
        if k == "pos_embed":
            n_src = v.shape[1]
            gs = int(round(n_src ** 0.5))
            prefix = n_src - gs * gs
            if prefix:
                v = v[:, prefix:]
            v = resample_abs_pos_embed(v, list(model.cfg.grid_shape), old_size=[gs, gs], num_prefix_tokens=0)
        if k in own and own[k].shape == v.shape and not k.startswith("head"):
            new[k] = v
    if "patch_embed.proj.weight" not in new or not any(k.startswith("blocks.0.") for k in new):
        raise BavitError("pretrained weights do not fit a ViT with embed dim "
                         f"{model.cfg.embed_dim} and patch {model.cfg.patch} (is it a ViT-tiny?)")
    vit.load_state_dict(new, strict=False)
    return sorted(new)


# --------------------------------------------------------------------------- run dirs
def save_weights(model: BAViT, path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    from ..runtime.fileio import atomic_path

    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_bavit(run: str | Path, which: str = "best", device: str | torch.device = "cpu") -> BAViT:
    """Load BAViT from a run directory (or a .safetensors file with config.json beside it)."""
    run = Path(run)
    wfile = run if run.is_file() else run / (MODEL_FILE if which == "best" else LAST_FILE)
    rdir = run.parent if run.is_file() else run
    cfg_path = rdir / CONFIG_FILE
    if not rdir.exists():
        raise InputFileError(rdir, "model run directory not found")
    if not cfg_path.is_file():
        raise InputFileError(cfg_path, "not a bavit run directory (config.json missing)")
    try:
        cfg_doc = json.loads(cfg_path.read_text())
        cfg = ModelConfig.from_dict(cfg_doc["model"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InputFileError(cfg_path, f"unreadable run config ({exc})") from None
    if not wfile.is_file():
        raise InputFileError(wfile, "model weights not found")
    cfg.pretrained = None
    model = BAViT(cfg)
    sd = read_state_dict(wfile)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise InputFileError(wfile, f"weights do not match the config (missing {len(missing)}, unexpected {len(unexpected)})")
    model.cfg = ModelConfig.from_dict(cfg_doc["model"])
    return model.to(device).eval()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
