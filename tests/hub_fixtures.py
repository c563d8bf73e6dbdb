"""Random-weight stand-ins for the hub's hustvl/yolos-{tiny,small,base} checkpoints.

No weights are downloaded: a fixture directory holds the hub's *configuration* and *file
layout* with random weights, so the loaders meet what a user's cache or a copied hub
snapshot holds.

What is reproduced, and from where (see the report that came with this file):

* ``config.json``: the text transformers 4.19 (April/May 2022, when nielsr converted the
  checkpoints with ``convert_yolos_to_pytorch.py``) wrote: ``PretrainedConfig.to_json_string``,
  i.e. ``json.dumps(d, indent=2, sort_keys=True) + "\\n"`` with the YOLOS keys
  (``bbox_cost`` ..., ``torch_dtype``, ``transformers_version``), the architecture the script's
  ``get_yolos_config`` sets, and COCO's 91-entry ``id2label`` from huggingface/label-files
  (``label2id`` is its inverse, so the eleven ``"N/A"`` collapse to ``"N/A": 83``). At full
  size the text is 4,133 / 4,132 / 4,134 bytes, the hub's listed 4.13 kB for all three.
  ``transformers_version`` ``"4.19.0.dev0"`` is inferred from the dates, not read.
* ``preprocessor_config.json``: byte for byte the hub's files. ``processor="main"`` (default)
  is the files as they are on the hub today, after nielsr's 2024 edits replaced the
  deprecated ``max_size``: yolos-tiny and -small ``"image_processor_type":
  "YolosImageProcessor"`` with ``"size": {"shortest_edge": S, "longest_edge": 1333}`` (291
  bytes, no final newline); yolos-base still ``"feature_extractor_type":
  "YolosFeatureExtractor"`` with the new ``size`` (296 bytes, final newline).
  ``processor="2022"`` is what the conversion wrote first (and older caches still hold):
  ``YolosFeatureExtractor`` keys, ``"max_size": 1333``, ``"size": 512`` (tiny) or ``800``
  (275 bytes).
* weights: ``model.safetensors`` through ``save_pretrained`` (transformers 5 saves the
  hub's key names) or ``pytorch_model.bin`` (``torch.save`` of a state dict). The hub's
  files name the mid-layer position embeddings ``vit.encoder.mid_position_embeddings``;
  transformers 5 keeps them at ``vit.encoder.interpolation.mid_position_embeddings`` and
  renames on load (its ``conversion_mapping`` entry for ``yolos``). Both formats here carry
  the hub's name; no other YOLOS key differs. On the hub, yolos-tiny and -small carry both
  files and yolos-base only ``pytorch_model.bin`` (``fmt="both"`` writes both).

``layers``/``hidden`` shrink depth and width for test time; the number of heads, the
detection tokens, ``image_size``, the mid-layer position embeddings (at least 2 layers then:
layer 1 has none), the label table and the processor are kept.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

# COCO 2017 category ids 0..90 (huggingface/label-files coco-detection-id2label.json):
# the 80 classes at their original ids, "N/A" at the 11 unused ids (0, 12, 26, 29, 30, 45,
# 66, 68, 69, 71, 83).
COCO_ID2LABEL = [
    "N/A", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A",
    "N/A", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
    "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork", "knife",
    "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
    "donut", "cake", "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A",
    "toilet", "N/A", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "N/A", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
]
assert len(COCO_ID2LABEL) == 91 and COCO_ID2LABEL.count("N/A") == 11

# the architecture convert_yolos_to_pytorch.get_yolos_config gives each hub checkpoint
# (yolos-small is YolosConfig's defaults but width: image_size [512, 864], mid-layer
# position embeddings on)
HUB_ARCH = {
    "yolos-tiny": dict(hidden_size=192, intermediate_size=768, num_hidden_layers=12, num_attention_heads=3,
                       image_size=[800, 1333], use_mid_position_embeddings=False),
    "yolos-small": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                        image_size=[512, 864], use_mid_position_embeddings=True),
    "yolos-base": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=[800, 1344], use_mid_position_embeddings=True),
}
HUB_SHORTEST_EDGE = {"yolos-tiny": 512, "yolos-small": 800, "yolos-base": 800}
HUB_NAMES = tuple(HUB_ARCH)

_PROCESSOR_HEAD = ('{\n  "do_normalize": true,\n  "do_resize": true,\n  %s,\n  "format": "coco_detection",\n'
                   '  "image_mean": [\n    0.485,\n    0.456,\n    0.406\n  ],\n'
                   '  "image_std": [\n    0.229,\n    0.224,\n    0.225\n  ],\n  %s\n}')
_FEATURE_EXTRACTOR = '"feature_extractor_type": "YolosFeatureExtractor"'
_IMAGE_PROCESSOR = '"image_processor_type": "YolosImageProcessor"'


def hub_config(name: str, *, layers: int | None = None, hidden: int | None = None) -> dict:
    """The hub checkpoint's config.json as a dict (its text: ``config_text``)."""
    if name not in HUB_ARCH:
        raise ValueError(f"unknown hub YOLOS {name!r}; one of {', '.join(HUB_NAMES)}")
    arch = dict(HUB_ARCH[name])
    heads = arch["num_attention_heads"]
    if hidden is not None:
        if hidden <= 0 or hidden % heads:
            raise ValueError(f"hidden {hidden} must be a positive multiple of {name}'s {heads} heads")
        arch.update(hidden_size=hidden, intermediate_size=4 * hidden)  # the hub's MLP ratio 4
    if layers is not None:
        if layers < (2 if arch["use_mid_position_embeddings"] else 1):
            raise ValueError(f"{name} needs at least 2 layers to keep its mid-layer position embeddings")
        arch["num_hidden_layers"] = layers
    return dict(
        architectures=["YolosForObjectDetection"], attention_probs_dropout_prob=0.0, auxiliary_loss=False,
        bbox_cost=5, bbox_loss_coefficient=5, class_cost=1, eos_coefficient=0.1, giou_cost=2,
        giou_loss_coefficient=2, hidden_act="gelu", hidden_dropout_prob=0.0,
        id2label=dict(enumerate(COCO_ID2LABEL)), initializer_range=0.02,
        label2id={v: k for k, v in enumerate(COCO_ID2LABEL)}, layer_norm_eps=1e-12, model_type="yolos",
        num_channels=3, num_detection_tokens=100, patch_size=16, qkv_bias=True, torch_dtype="float32",
        transformers_version="4.19.0.dev0", **arch)


def config_text(cfg: dict) -> str:
    """config.json text as transformers 4.x wrote it (int id2label keys sort numerically)."""
    return json.dumps(cfg, indent=2, sort_keys=True) + "\n"


def processor_text(name: str, processor: str = "main") -> str:
    """The hub's preprocessor_config.json, byte for byte (see the module docstring)."""
    s = HUB_SHORTEST_EDGE[name]
    if processor == "2022":
        return _PROCESSOR_HEAD % (_FEATURE_EXTRACTOR, f'"max_size": 1333,\n  "size": {s}') + "\n"
    if processor != "main":
        raise ValueError(f"processor must be 'main' or '2022', not {processor!r}")
    size = f'"size": {{"shortest_edge": {s}, "longest_edge": 1333}}'
    if name == "yolos-base":  # its type line was never updated; the file keeps its final newline
        return _PROCESSOR_HEAD % (_FEATURE_EXTRACTOR, size) + "\n"
    return _PROCESSOR_HEAD % (_IMAGE_PROCESSOR, size)


def hub_state_dict(model) -> dict:
    """The model's weights under the hub's key names (transformers 4.x module layout)."""
    new = "vit.encoder.interpolation.mid_position_embeddings"
    return {("vit.encoder.mid_position_embeddings" if k == new else k): v.detach().clone().contiguous()
            for k, v in model.state_dict().items()}


def build_hub_yolos(name: str, dest, *, fmt: str = "safetensors", layers: int | None = None,
                    hidden: int | None = None, seed: int = 0, processor: str = "main") -> Path:
    """Write a random-weight ``name`` checkpoint directory at ``dest`` (created) and return it.

    fmt: ``safetensors`` (model.safetensors), ``bin`` (pytorch_model.bin) or ``both``. The
    weights depend on ``seed`` only, so every fmt of one seed holds the same numbers."""
    from transformers import YolosConfig, YolosForObjectDetection
    from transformers.utils import logging as hf_logging

    if fmt not in ("safetensors", "bin", "both"):
        raise ValueError(f"fmt must be safetensors, bin or both, not {fmt!r}")
    cfg = hub_config(name, layers=layers, hidden=hidden)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    model = YolosForObjectDetection(YolosConfig.from_dict(dict(cfg))).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every tensor drawn from the seed, in name order (no zero tokens)
        for k, prm in sorted(model.named_parameters()):
            noise = torch.randn(prm.shape, generator=g) * 0.02
            prm.copy_(noise + 1 if ("layernorm" in k and k.endswith(".weight")) else noise)
    hf_logging.disable_progress_bar()
    if fmt in ("safetensors", "both"):
        model.save_pretrained(dest)  # writes transformers 5's config.json too: replaced below
    if fmt in ("bin", "both"):
        torch.save(hub_state_dict(model), dest / "pytorch_model.bin")
    (dest / "config.json").write_text(config_text(cfg))
    (dest / "preprocessor_config.json").write_text(processor_text(name, processor))
    return dest


def hub_processor(dest):
    """The image processor transformers builds from the fixture's preprocessor_config.json."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(str(dest))


# --------------------------------------------------------------------------- the local HF cache
TIMM_VIT = "vit_tiny_patch16_384.augreg_in21k_ft_in1k"  # the paper's BAViT init (docs/reproduce-paper.md)


def build_timm_vit(dest, *, seed: int = 1234) -> Path:
    """timm's ViT-tiny in the layout ``timm`` writes for the hub (``save_for_hf``:
    config.json with its pretrained_cfg, model.safetensors), random weights."""
    import timm
    from timm.models._hub import save_for_hf

    dest = Path(dest)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        save_for_hf(timm.create_model(TIMM_VIT, pretrained=False), str(dest), safe_serialization=True)
    return dest


def install_in_hub_cache(cache, repo: str, src) -> Path:
    """Copy a checkpoint directory into a Hugging Face hub cache (``HF_HUB_CACHE`` layout:
    ``models--owner--name/{refs/main, snapshots/<sha>/...}``) as ``repo``; returns the
    snapshot directory. With ``HF_HUB_OFFLINE`` set, transformers, timm and our loaders read
    ``repo`` from there as they would after a download."""
    import shutil

    sha = "0123456789abcdef0123456789abcdef01234567"
    top = Path(cache) / ("models--" + repo.replace("/", "--"))
    snap = top / "snapshots" / sha
    shutil.copytree(src, snap)
    (top / "refs").mkdir(parents=True, exist_ok=True)
    (top / "refs" / "main").write_text(sha)
    return snap


def use_hub_cache(monkeypatch, cache) -> None:
    """Point huggingface_hub at ``cache`` and keep it offline (nothing downloads)."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
