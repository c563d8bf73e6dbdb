"""BAViT: a ViT-tiny without CLS token and with a 2-class head on every patch token.

Built on timm's ``VisionTransformer`` (``class_token=False, global_pool=''`` makes its head
act per token). Checkpoints are run directories holding ``config.json`` and safetensors
weights; nothing is unpickled when loading weights.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data.grid import GridSpec
from ..runtime.errors import BavitError, InputFileError, OptionError
from ..runtime.typed import FieldTypeError, typed_kwargs
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
    normalisation: str | None = None  # where mean/std came from (with --pretrained)

    def validate(self) -> None:
        """Ranges, so that a config (a run's config.json included) cannot ask for an
        absurd model: sides <= 16384 px (as ``--input-size``), depth <= 64, width <= 4096."""
        if not 1 <= self.depth <= 64:
            raise OptionError(f"--depth must be in [1, 64], got {self.depth}")
        GridSpec(self.input_h, self.input_w, self.patch)  # raises on sizes not divisible by the patch
        if max(self.input_h, self.input_w) > 16384:
            raise OptionError(f"input size {self.input_h}x{self.input_w} is more than 16384 pixels per side")
        if not (1 <= self.num_heads <= 64 and 1 <= self.embed_dim <= 4096):
            raise OptionError(f"embed_dim {self.embed_dim} and num_heads {self.num_heads} must be in [1, 4096] "
                              "and [1, 64]")
        if self.embed_dim % self.num_heads:
            raise OptionError("embed dim must be divisible by the number of heads")
        if not 0 < self.mlp_ratio <= 16:
            raise OptionError(f"mlp_ratio must be in (0, 16], got {self.mlp_ratio}")
        for k in ("mean", "std"):
            v = getattr(self, k)
            if len(v) != 3 or not all(type(x) in (int, float) for x in v) or (k == "std" and min(v) <= 0):
                raise OptionError(f"{k} must be 3 numbers (one per RGB channel){', all positive' if k == 'std' else ''}, "
                                  f"got {list(v)}")

    @property
    def grid_shape(self) -> tuple[int, int]:
        return GridSpec(self.input_h, self.input_w, self.patch).shape

    @property
    def n_tokens(self) -> int:
        gh, gw = self.grid_shape
        return gh * gw

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """From a run config's ``model`` section, every value type-checked (a string size
        raises :class:`~bavit_core.runtime.typed.FieldTypeError`, a TypeError, naming the key)."""
        return cls(**typed_kwargs(cls, d, "model"))


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
    """Build BAViT; ``pretrained`` is a timm model name, a local weights file or a directory as
    timm's ``save_for_hf``/``push_to_hf_hub`` writes it (``config.json`` + weights).

    The same seed gives the same model however the weights arrive: whatever random draws
    getting them takes (timm builds a whole model before loading a named checkpoint) happen
    on a forked random state, so BAViT's own initialisation (the per-token head) and every
    draw after it are those of a run without ``pretrained``."""
    cfg = ModelConfig(depth=depth, input_h=input_size[0], input_w=input_size[1], patch=patch, pretrained=pretrained)
    cfg.validate()
    if not pretrained:
        return BAViT(cfg)
    with _rng_untouched():
        state, mean, std, source, norm = _pretrained_state(pretrained)
    cfg.mean, cfg.std, cfg.normalisation = mean, std, norm
    model = BAViT(cfg)
    load_vit_weights(model, state, source=source)
    return model


WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# the weights files timm's save_for_hf / push_to_hf_hub write beside config.json, preferred first
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# timm modules whose models are VisionTransformer (deit's are too, with the same tensor names)
VIT_MODULES = ("vision_transformer", "deit")


@contextmanager
def _rng_untouched():
    """Run a block without moving torch's (CPU), numpy's or Python's global random state."""
    import random

    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _pretrained_state(name: str):
    """(state dict, mean, std, source) for ``--pretrained``; source is the weights file read,
    None for a timm name."""
    p = Path(name).expanduser()
    if p.is_dir():
        return _timm_dir_state(p)
    if p.suffix in WEIGHT_SUFFIXES or p.exists():
        if not p.is_file():
            raise InputFileError(p, "pretrained weights file not found")
        mean, std, norm = weights_normalisation(p)
        return read_state_dict(p), mean, std, p, norm
    import timm

    if not timm.is_model(name):
        raise OptionError(f"unknown timm model {name!r} (and no such local weights file or directory)")
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
    norm = f"timm's pretrained config {name}" if dc.get("mean") and dc.get("std") else "ImageNet's (assumed)"
    return (m.state_dict(), tuple(dc.get("mean", IMAGENET_MEAN)), tuple(dc.get("std", IMAGENET_STD)), None, norm)


def _timm_dir_state(d: Path):
    """A directory in the layout timm writes for the Hugging Face hub (``save_for_hf``):
    ``config.json`` (``architecture``, ``pretrained_cfg`` with mean/std) beside
    ``model.safetensors`` and/or ``pytorch_model.bin`` (safetensors preferred)."""
    cfg_file = d / "config.json"
    weights = next((d / n for n in HF_WEIGHT_FILES if (d / n).is_file()), None)
    missing = ([] if cfg_file.is_file() else ["config.json"]) + ([] if weights else [" or ".join(HF_WEIGHT_FILES)])
    if missing:
        raise InputFileError(d, f"not a timm model directory (no {' and no '.join(missing)}); --pretrained takes a "
                                "directory as timm's save_for_hf / push_to_hf_hub write it: config.json beside "
                                "model.safetensors or pytorch_model.bin")
    try:
        doc = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputFileError(cfg_file, f"not valid JSON ({str(exc).splitlines()[0][:200]})") from None
    except OSError as exc:
        raise InputFileError(cfg_file, f"cannot read it ({exc.strerror or exc})") from None
    arch = doc.get("architecture") if isinstance(doc, dict) else None
    if not isinstance(arch, str) or not arch:
        hint = ""
        if isinstance(doc, dict) and "architectures" in doc:
            hint = " (it looks like a Hugging Face transformers config; convert the weights to timm's ViT first)"
        elif isinstance(doc, dict) and "model" in doc and "train" in doc:
            hint = " (it is a bavit run directory, not ImageNet ViT weights)"
        raise InputFileError(cfg_file, "not a timm model config: no 'architecture' (timm's save_for_hf writes "
                                       f"one, e.g. \"vit_tiny_patch16_384\"){hint}")
    from timm.models import is_model_in_modules

    if not is_model_in_modules(arch, list(VIT_MODULES)):
        raise InputFileError(cfg_file, f"architecture {arch!r} is not a timm ViT (vision_transformer); BAViT "
                                       "starts from ViT-tiny weights such as vit_tiny_patch16_384")
    mean, std, norm = weights_normalisation(weights)
    return read_state_dict(weights), mean, std, weights, norm


def _norm(v) -> tuple | None:
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            return None
    if isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v):
        return tuple(float(x) for x in v)
    return None


def weights_normalisation(path: Path) -> tuple[tuple, tuple, str]:
    """The input mean/std a local weights file was trained with and where they came from:
    (in order) a timm/HF ``config.json`` beside it (``pretrained_cfg`` mean/std), the
    safetensors metadata (``mean``/``std``), or a timm pretrained tag in its file name
    (``vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors`` → mean = std = 0.5). When
    none says, ImageNet's, and the source says so: the run's config records it and
    ``bavit train`` prints it, since a wrong normalisation trains without any error."""
    side = path.parent / "config.json"
    if side.is_file():
        try:
            doc = json.loads(side.read_text())
        except (ValueError, OSError) as exc:
            raise InputFileError(side, f"unreadable config beside the weights {path.name} "
                                       f"({type(exc).__name__}); it would say their input normalisation") from None
        pc = doc.get("pretrained_cfg", doc) if isinstance(doc, dict) else {}
        pc = pc if isinstance(pc, dict) else {}
        mean, std = _norm(pc.get("mean")), _norm(pc.get("std"))
        if mean and std:
            return mean, std, f"{side}"
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                md = f.metadata() or {}
        except (SafetensorError, OSError, ValueError):
            md = {}  # unreadable: read_state_dict reports the file itself next
        mean, std = _norm(md.get("mean")), _norm(md.get("std"))
        if mean and std:
            return mean, std, f"{path.name} metadata"
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    if "." in stem:
        from timm.models import get_pretrained_cfg

        try:
            pc = get_pretrained_cfg(stem)
        except (RuntimeError, ValueError, KeyError):  # not a timm model.tag name
            pc = None
        if pc is not None and pc.mean and pc.std:
            return tuple(pc.mean), tuple(pc.std), f"timm's pretrained config {stem}"
    return IMAGENET_MEAN, IMAGENET_STD, "ImageNet's (assumed: nothing beside or in the weights says)"


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
    except (ImportError, ValueError, OSError, RuntimeError, KeyError):  # no cache hit to be found: try the network
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
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputFileError(path, f"cannot read weights ({exc.strerror or exc})") from None
    if size == 0:
        raise InputFileError(path, "cannot read weights: the file is empty (0 bytes)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputFileError(path, f"cannot read weights: {_read_problem(path, exc)}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if not isinstance(sd, dict):
        raise InputFileError(path, f"weights file does not hold a state dict (it holds a {type(sd).__name__}, "
                                   "not a mapping of names to tensors)")
    return sd


def _read_problem(path: Path, exc: Exception) -> str:
    """Why a weights file could not be read, in plain words."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "").split(". ")[0][:200]
    detail = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    if "Weights only load failed" in text:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        what = f" (it refers to {found.group(1)})" if found else ""
        return (f"it is a pickle holding Python objects besides tensors{what}; bavit loads weights with "
                "torch.load(weights_only=True), which refuses to unpickle those because unpickling can run "
                "arbitrary code. Re-save just the tensors (torch.save(model.state_dict(), path) or "
                "safetensors.torch.save_file) and pass that file")
    if path.suffix == ".safetensors":
        return f"not a valid safetensors file (truncated or damaged?) ({detail})"
    if isinstance(exc, EOFError) or "PytorchStreamReader" in text or "central directory" in text:
        return f"the PyTorch file is truncated or damaged ({detail})"
    return f"not a PyTorch weights file ({detail})"


def load_vit_weights(model: BAViT, state: dict, source: str | Path | None = None) -> list[str]:
    """Copy ImageNet ViT weights into BAViT: patch embedding, position embeddings
    (CLS entry dropped, grid resampled), the first ``depth`` blocks and the final norm.
    The per-token head stays freshly initialised. Returns the names loaded.

    Weights that do not fit BAViT's ViT-tiny are refused naming ``source`` (the file they
    came from, as a Path; a timm name otherwise)."""
    from timm.layers import resample_abs_pos_embed

    def unfit(problem: str) -> BavitError:
        if isinstance(source, Path):
            return InputFileError(source, problem)
        return BavitError(f"pretrained weights {source!r}: {problem}" if source else f"pretrained weights: {problem}")

    vit = model.vit
    own = vit.state_dict()
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "vit."):
        state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    pe = state.get("patch_embed.proj.weight")
    if pe is None:
        named = [k for k in state if k.endswith(".weight")] or list(state)
        some = ", ".join(repr(k) for k in named[:3])
        raise unfit(f"not ViT weights: no patch embedding ('patch_embed.proj.weight') among its {len(state)} "
                    f"tensors{' (' + some + ', ...)' if some else ''}; BAViT starts from a timm ViT-tiny such "
                    "as vit_tiny_patch16_384")
    need = own["patch_embed.proj.weight"].shape
    if pe.shape != need:
        def patch(shape) -> str:
            return str(shape[0]) if shape[0] == shape[1] else f"{shape[0]}x{shape[1]}"

        got = (f"a ViT with embed dim {pe.shape[0]} and patch {patch(pe.shape[2:])}" if pe.dim() == 4
               else f"a patch embedding of shape {tuple(pe.shape)}")
        raise unfit(f"weights of {got}; BAViT needs embed dim {need[0]} and patch {patch(need[2:])} "
                    "(a ViT-tiny such as vit_tiny_patch16_384)")
    new, misfit = {}, []
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
        if k in own and not k.startswith("head"):
            if own[k].shape == v.shape:
                new[k] = v
            else:
                misfit.append(f"{k} is {tuple(v.shape)}, BAViT needs {tuple(own[k].shape)}")
    if misfit:
        raise unfit(f"weights do not fit BAViT's ViT-tiny: {misfit[0]}"
                    + (f" (and {len(misfit) - 1} more)" if len(misfit) > 1 else ""))
    if not any(k.startswith("blocks.0.") for k in new):
        raise unfit("no transformer block weights ('blocks.0.*'); BAViT starts from a timm ViT-tiny such as "
                    "vit_tiny_patch16_384")
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
    cfg_doc = None
    try:
        cfg_doc = json.loads(cfg_path.read_text())
        cfg = ModelConfig.from_dict(cfg_doc["model"])
        cfg.validate()
    except FieldTypeError as exc:
        raise InputFileError(cfg_path, f"unreadable run config: {exc}") from None
    except BavitError as exc:
        raise InputFileError(cfg_path, f"unreadable run config: 'model' section: {exc}") from None
    except (ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, KeyError) and isinstance(cfg_doc, dict) and "model_type" in cfg_doc:
            raise InputFileError(cfg_path, f"a {cfg_doc['model_type']} detector's config, not a BAViT run's "
                                           "(give a run directory from bavit train)") from None
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
