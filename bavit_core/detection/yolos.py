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
    weights load with no missing, unexpected or mismatched keys; a hub name that is not cached
    fails fast when the hub cannot be reached (no retry loop). A damaged weights file (empty,
    truncated, not safetensors, a pickle that torch's weights-only loader refuses) is one
    InputFileError naming that file. transformers' load report is not printed."""
    import json
    import pickle

    from safetensors import SafetensorError
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
    # mismatched shapes are reported in the loading info (and refused below), not raised
    kw = dict(attn_implementation="sdpa", output_loading_info=True, ignore_mismatched_sizes=True)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with _quiet_unpickler():
            try:
                model, info = YolosForObjectDetection.from_pretrained(str(name_or_path), local_files_only=True, **kw)
            except OSError:
                if looks_local or not _hub_reachable():
                    raise
                model, info = YolosForObjectDetection.from_pretrained(str(name_or_path), **kw)
    except OSError as exc:
        _raise_damaged_weights(name_or_path, looks_local)
        where = "local directory" if looks_local else "hub model (not cached, and the hub cannot be reached)"
        raise BavitError(
            f"cannot load detector {name_or_path!r} as a {where} ({_first_line(exc)}); "
            "without a network pass --detector PATH to a local Hugging Face YOLOS directory"
        ) from None
    except (SafetensorError, pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError,
            RuntimeError) as exc:
        _raise_damaged_weights(name_or_path, looks_local)
        raise InputFileError(name_or_path, f"not a YOLOS detector ({_first_line(exc)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if model.config.model_type != "yolos":
        raise InputFileError(name_or_path, f"not a YOLOS detector (model_type {model.config.model_type!r})")
    bad = [(k, v) for k, v in (("missing", info.get("missing_keys")), ("unexpected", info.get("unexpected_keys")),
                                 ("mismatched", info.get("mismatched_keys"))) if v]
    if bad:
        kind, keys = bad[0]
        keys = sorted(keys, key=lambda k: str(k if isinstance(k, str) else k[0]))
        first = keys[0]
        example = str(first if isinstance(first, str) else first[0])
        if kind == "mismatched" and not isinstance(first, str) and len(first) == 3:
            example += f": {tuple(first[1])} in the weights, {tuple(first[2])} for its config.json"
        raise InputFileError(name_or_path, f"the weights do not fit a YOLOS detector: {len(keys)} {kind} keys "
                                           f"(e.g. {example})")
    return model.float().to(device).eval()  # weights may be stored in half precision


_WEIGHT_FILES = (("model.safetensors", "model.safetensors.index.json"),
                 ("pytorch_model.bin", "pytorch_model.bin.index.json"))


class _quiet_unpickler:
    """Hide torch's weights-only unpickler warning (a pickle protocol it did not expect) while
    loading: the refusal that follows is explained in one line instead."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\._weights_only_unpickler")
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _first_line(exc: BaseException, limit: int = 160) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]


def _weight_files(name_or_path: str, looks_local: bool) -> list[Path]:
    """The weights files transformers reads for a detector, in its order of preference
    (safetensors first): the single file, or the shards an index lists. A hub name is looked
    up in the local cache only."""
    import json

    if not looks_local:
        from huggingface_hub import try_to_load_from_cache

        for single, _ in _WEIGHT_FILES:
            try:
                hit = try_to_load_from_cache(name_or_path, single)
            except ValueError:  # huggingface_hub's HFValidationError: not a valid repo id
                return []
            if isinstance(hit, str):
                return [Path(hit)]
        return []
    d = Path(name_or_path)
    for single, index in _WEIGHT_FILES:
        if (d / single).is_file():
            return [d / single]
        if (d / index).is_file():
            try:
                shards = sorted(set(json.loads((d / index).read_text())["weight_map"].values()))
                return [d / s for s in shards]
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return [d / index]
    return []


def _raise_damaged_weights(name_or_path: str, looks_local: bool) -> None:
    """Raise one InputFileError naming the first weights file that cannot be read, if any."""
    for f in _weight_files(name_or_path, looks_local):
        problem = _weights_problem(f)
        if problem:
            raise InputFileError(f, problem) from None


def _weights_problem(f: Path) -> str | None:
    """What is wrong with one weights file (None: it reads)."""
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        return f"cannot read the weights ({exc.strerror or exc})"
    if size == 0:
        return "empty weights file (0 bytes)"
    if f.name.endswith(".index.json"):
        return "unreadable shard index (not a JSON weight_map)"
    if f.suffix == ".safetensors":
        return _safetensors_problem(f, size, head)
    return _torch_file_problem(f)


def _safetensors_problem(f: Path, size: int, head: bytes) -> str | None:
    import json

    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(f), "pt") as sf:
            sf.keys()
        return None
    except SafetensorError as exc:
        detail = _first_line(exc).replace("Error while deserializing header: ", "")
    if len(head) < 8:
        return f"truncated: {size} bytes, shorter than the 8-byte safetensors header"
    n = int.from_bytes(head, "little")
    if n < (1 << 27):  # a plausible header length (safetensors caps it at 100 MB)
        if 8 + n > size:
            return f"truncated: {size} bytes, but its header alone needs {8 + n}"
        try:
            with open(f, "rb") as fh:
                fh.seek(8)
                header = json.loads(fh.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
            end = None
        if end is not None and size < 8 + n + end:
            return f"truncated: {size} of {8 + n + end} bytes (the download or copy was cut short)"
    return f"not a readable safetensors file ({detail})"


def _torch_file_problem(f: Path) -> str | None:
    import pickle
    import re
    import zipfile
    from collections.abc import Mapping

    try:
        with _quiet_unpickler():
            obj = torch.load(str(f), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(f))
    except pickle.UnpicklingError as exc:
        text = str(exc)
        glob = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        op = re.search(r"Unsupported operand (\d+)", text)
        why = (f"it would import {glob.group(1)}" if glob else
               f"unsupported pickle operand {op.group(1)}" if op else _first_line(exc, 100))
        return (f"pickle refused: not a weights-only file ({why}); torch.load(weights_only=True) reads "
                "tensors and plain containers only")
    except EOFError:
        return "truncated: the pickle ends early"
    except RuntimeError as exc:
        return f"truncated or damaged PyTorch file ({_first_line(exc).split('. ')[0][:120]})"
    except Exception as exc:  # whatever else torch.load meets in a damaged file
        return f"not a PyTorch weights file ({type(exc).__name__}: {_first_line(exc, 100)})"
    if not isinstance(obj, Mapping):
        return f"not a PyTorch state dict (it holds a {type(obj).__name__})"
    return None


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
