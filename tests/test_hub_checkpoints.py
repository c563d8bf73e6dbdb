"""Hub-faithful YOLOS checkpoints (random weights; see tests/hub_fixtures.py) load through
load_detector and plain transformers, and a damaged checkpoint is one clean error."""
from __future__ import annotations

import argparse
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bavit_core.detection.yolos import load_detector
from bavit_core.runtime.errors import InputFileError

from .cli_helpers import run_cli
from .hub_fixtures import (COCO_ID2LABEL, HUB_ARCH, HUB_NAMES, HUB_SHORTEST_EDGE, build_hub_yolos, config_text,
                           hub_config, hub_processor, processor_text)

SMALL = dict(layers=2, hidden=48)  # 2 layers: yolos-small/-base keep a mid-layer position embedding


@pytest.fixture(scope="module")
def hub_dirs(tmp_path_factory):
    """Each hub name, shrunk, as safetensors and as pytorch_model.bin (same seed)."""
    root = tmp_path_factory.mktemp("hub")
    return {(n, fmt): build_hub_yolos(n, root / f"{n}-{fmt}", fmt=fmt, **SMALL)
            for n in HUB_NAMES for fmt in ("safetensors", "bin")}


# --------------------------------------------------------------------------- the hub's files
def test_hub_file_texts_match_the_hub():
    """Sizes the hub lists: config.json 4.13 kB; preprocessor_config.json 291/291/296 bytes
    today, 275 as first converted."""
    assert [len(config_text(hub_config(n)).encode()) for n in HUB_NAMES] == [4133, 4132, 4134]
    assert [len(processor_text(n).encode()) for n in HUB_NAMES] == [291, 291, 296]
    assert {len(processor_text(n, "2022").encode()) for n in HUB_NAMES} == {275}
    tiny, base = json.loads(processor_text("yolos-tiny")), json.loads(processor_text("yolos-base"))
    assert tiny["image_processor_type"] == "YolosImageProcessor" and "feature_extractor_type" not in tiny
    assert tiny["size"] == {"shortest_edge": 512, "longest_edge": 1333} and tiny["format"] == "coco_detection"
    assert base["feature_extractor_type"] == "YolosFeatureExtractor" and base["size"]["shortest_edge"] == 800
    old = json.loads(processor_text("yolos-tiny", "2022"))
    assert (old["size"], old["max_size"], old["feature_extractor_type"]) == (512, 1333, "YolosFeatureExtractor")
    cfg = json.loads(config_text(hub_config("yolos-tiny")))
    assert list(cfg["id2label"])[:3] == ["0", "1", "2"] and cfg["id2label"]["12"] == "N/A"
    assert cfg["label2id"]["N/A"] == 83 and len(cfg["label2id"]) == 81


@pytest.mark.parametrize("name", HUB_NAMES)
def test_full_size_hub_config_reads_as_the_hub_architecture(name, tmp_path):
    from transformers import AutoConfig

    (tmp_path / "config.json").write_text(config_text(hub_config(name)))
    cfg = AutoConfig.from_pretrained(str(tmp_path))
    arch = HUB_ARCH[name]
    assert type(cfg).__name__ == "YolosConfig"
    for k, v in arch.items():
        assert getattr(cfg, k) == v, k
    assert (cfg.num_detection_tokens, cfg.patch_size, cfg.num_labels) == (100, 16, 91)
    assert [cfg.id2label[i] for i in range(91)] == COCO_ID2LABEL


def test_full_size_yolos_tiny_loads(tmp_path):
    d = build_hub_yolos("yolos-tiny", tmp_path / "t")
    m = load_detector(str(d))
    assert (m.config.hidden_size, m.config.num_hidden_layers, m.config.intermediate_size) == (192, 12, 768)
    assert sum(p.numel() for p in m.parameters()) == pytest.approx(6.5e6, rel=0.02)  # the hub's 26 MB fp32


@pytest.mark.parametrize("name", HUB_NAMES)
def test_fixture_loads_with_the_hubs_properties(hub_dirs, name):
    from transformers import YolosForObjectDetection

    d = hub_dirs[name, "safetensors"]
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert (d / "preprocessor_config.json").read_text() == processor_text(name)
    for model in (load_detector(str(d)), YolosForObjectDetection.from_pretrained(str(d))):
        c = model.config
        assert list(c.image_size) == HUB_ARCH[name]["image_size"]
        assert c.use_mid_position_embeddings is HUB_ARCH[name]["use_mid_position_embeddings"]
        assert c.num_attention_heads == HUB_ARCH[name]["num_attention_heads"]
        assert (c.num_detection_tokens, c.patch_size, c.num_labels, c.model_type) == (100, 16, 91, "yolos")
        assert (c.hidden_size, c.num_hidden_layers, c.intermediate_size) == (48, 2, 192)
        assert [c.id2label[i] for i in range(91)] == COCO_ID2LABEL
        h, w = HUB_ARCH[name]["image_size"]
        tokens = 1 + (h // 16) * (w // 16) + 100
        assert tuple(model.vit.embeddings.position_embeddings.shape) == (1, tokens, 48)
        interp = model.vit.encoder.interpolation
        if c.use_mid_position_embeddings:  # loaded from the hub's key name, not left at init
            assert tuple(interp.mid_position_embeddings.shape) == (1, 1, tokens, 48)
            assert interp.mid_position_embeddings.abs().sum() > 0
        else:
            assert interp is None
    proc = hub_processor(d)
    assert type(proc).__name__ == "YolosImageProcessor" and proc.format == "coco_detection"
    assert (proc.size["shortest_edge"], proc.size["longest_edge"]) == (HUB_SHORTEST_EDGE[name], 1333)
    px = proc(images=np.zeros((60, 90, 3), np.uint8), return_tensors="pt")["pixel_values"]
    assert min(px.shape[-2:]) == HUB_SHORTEST_EDGE[name]


@pytest.mark.parametrize("name", HUB_NAMES)
def test_the_first_converted_processor_file_still_loads(name, tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    (d / "preprocessor_config.json").write_text(processor_text(name, "2022"))
    proc = hub_processor(d)
    assert (proc.size["shortest_edge"], proc.size["longest_edge"]) == (HUB_SHORTEST_EDGE[name], 1333)


@pytest.mark.parametrize("name", HUB_NAMES)
def test_bin_and_safetensors_hold_the_same_weights_under_the_hubs_names(hub_dirs, name):
    from safetensors.torch import load_file

    st, bn = hub_dirs[name, "safetensors"], hub_dirs[name, "bin"]
    file_st = load_file(str(st / "model.safetensors"))
    file_bin = torch.load(bn / "pytorch_model.bin", weights_only=True)
    assert sorted(file_st) == sorted(file_bin)
    assert ("vit.encoder.mid_position_embeddings" in file_bin) is HUB_ARCH[name]["use_mid_position_embeddings"]
    assert not any("interpolation" in k for k in file_bin)
    a, b = load_detector(str(st)).state_dict(), load_detector(str(bn)).state_dict()
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- damaged checkpoints
def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _truncate(f: Path):
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _with_weights_of(name, **kw):
    def damage(d: Path, tmp: Path):
        other = build_hub_yolos(name, tmp / "other", **kw)
        (d / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    return damage


def _vit_weights(d: Path, tmp: Path):
    from transformers import ViTConfig, ViTForImageClassification

    vit = ViTForImageClassification(ViTConfig(hidden_size=48, num_hidden_layers=1, num_attention_heads=3,
                                              intermediate_size=96, image_size=64))
    vit.save_pretrained(tmp / "vit")
    (d / "model.safetensors").write_bytes((tmp / "vit" / "model.safetensors").read_bytes())


def _st_sizes(f: Path):
    import struct

    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    end = max(v["data_offsets"][1] for k, v in json.loads(data[8:8 + n]).items() if k != "__metadata__")
    return len(data) // 2, 8 + n + end


# case: (fixture (name, fmt), damage(d, tmp), file named relative to d or "" for d, expected problem(d))
DAMAGED = {
    "truncated model.safetensors": (
        ("yolos-tiny", "safetensors"), lambda d, t: _truncate(d / "model.safetensors"), "model.safetensors",
        lambda d: "truncated: {} of {} bytes (the download or copy was cut short)".format(*_SIZES[d])),
    "empty model.safetensors": (
        ("yolos-tiny", "safetensors"), lambda d, t: (d / "model.safetensors").write_bytes(b""), "model.safetensors",
        lambda d: "empty weights file (0 bytes)"),
    "model.safetensors holding text": (
        ("yolos-tiny", "safetensors"), lambda d, t: (d / "model.safetensors").write_text("<html>404</html>" * 4),
        "model.safetensors", lambda d: "not a readable safetensors file (header too large)"),
    "damaged model.safetensors beside a good pytorch_model.bin": (
        ("yolos-small", "both"), lambda d, t: _truncate(d / "model.safetensors"), "model.safetensors",
        lambda d: "truncated: {} of {} bytes (the download or copy was cut short)".format(*_SIZES[d])),
    "pytorch_model.bin pickling a Python object": (
        ("yolos-tiny", "bin"),
        lambda d, t: (d / "pytorch_model.bin").write_bytes(_torch_bytes({"x": argparse.Namespace(a=1)})),
        "pytorch_model.bin",
        lambda d: "pickle refused: not a weights-only file (it would import argparse.Namespace); "
                  "torch.load(weights_only=True) reads tensors and plain containers only"),
    "pytorch_model.bin a plain pickle": (
        ("yolos-base", "bin"),
        lambda d, t: (d / "pytorch_model.bin").write_bytes(__import__("pickle").dumps({"a": 1}, protocol=4)),
        "pytorch_model.bin",
        lambda d: "pickle refused: not a weights-only file (unsupported pickle operand 149); "
                  "torch.load(weights_only=True) reads tensors and plain containers only"),
    "truncated pytorch_model.bin": (
        ("yolos-tiny", "bin"), lambda d, t: _truncate(d / "pytorch_model.bin"), "pytorch_model.bin",
        lambda d: "truncated or damaged PyTorch file (PytorchStreamReader failed reading zip archive: "
                  "failed finding central directory)"),
    "empty pytorch_model.bin": (
        ("yolos-tiny", "bin"), lambda d, t: (d / "pytorch_model.bin").write_bytes(b""), "pytorch_model.bin",
        lambda d: "empty weights file (0 bytes)"),
    "pytorch_model.bin holding a list": (
        ("yolos-tiny", "bin"), lambda d, t: (d / "pytorch_model.bin").write_bytes(_torch_bytes([1, 2])),
        "pytorch_model.bin", lambda d: "not a PyTorch state dict (it holds a list)"),
    "config.json of another model kind": (
        ("yolos-tiny", "safetensors"),
        lambda d, t: (d / "config.json").write_text(
            json.dumps({**json.loads((d / "config.json").read_text()), "model_type": "vit"})),
        "", lambda d: "not a YOLOS detector (model_type 'vit'); pass a YOLOS directory, e.g. one written by bavit "
                      "finetune"),
    "config.json not JSON": (
        ("yolos-tiny", "safetensors"), lambda d, t: (d / "config.json").write_text("{\"model_type\": \"yolos\","),
        "config.json", lambda d: "unreadable config (not JSON)"),
    "weights of another size (yolos-base width 96 for -base width 48)": (
        ("yolos-base", "safetensors"), _with_weights_of("yolos-base", layers=2, hidden=96), "",
        lambda d: "the weights do not fit a YOLOS detector: 50 mismatched keys (e.g. bbox_predictor.layers.0.bias: "
                  "(96,) in the weights, (48,) for its config.json)"),
    "weights of another model (yolos-tiny's for yolos-small)": (
        ("yolos-small", "safetensors"), _with_weights_of("yolos-tiny", layers=2, hidden=48), "",
        lambda d: "the weights do not fit a YOLOS detector: 1 missing keys "
                  "(e.g. vit.encoder.interpolation.mid_position_embeddings)"),
    "weights of another architecture (a ViT classifier)": (
        ("yolos-tiny", "safetensors"), _vit_weights, "",
        lambda d: "the weights do not fit a YOLOS detector: 29 missing keys (e.g. bbox_predictor.layers.0.bias)"),
}
_SIZES: dict = {}


@pytest.fixture(scope="module")
def damaged(hub_dirs, tmp_path_factory):
    """Each damaged case built once: case -> (directory, expected one-line error)."""
    root = tmp_path_factory.mktemp("damaged")
    out = {}
    for i, (case, (src, damage, named, problem)) in enumerate(DAMAGED.items()):
        d = root / f"c{i}"
        if src in hub_dirs:
            shutil.copytree(hub_dirs[src], d)
        else:
            build_hub_yolos(src[0], d, fmt=src[1], **SMALL)
        if (d / "model.safetensors").is_file():
            _SIZES[d] = _st_sizes(d / "model.safetensors")
        damage(d, root / f"t{i}")
        out[case] = d, f"{d / named if named else d}: {problem(d)}"
    return out


@pytest.mark.parametrize("case", list(DAMAGED), ids=list(DAMAGED))
def test_a_damaged_checkpoint_is_one_input_file_error(damaged, case):
    d, expected = damaged[case]
    with pytest.raises(InputFileError) as exc:
        load_detector(str(d))
    assert str(exc.value) == expected
    assert "\n" not in expected


@pytest.mark.parametrize("case", list(DAMAGED), ids=list(DAMAGED))
def test_a_damaged_checkpoint_is_one_error_line_from_the_cli(damaged, case, coco_synth, tmp_path):
    d, expected = damaged[case]
    code, out, err = run_cli("prune-eval", "--detector", d, "--root", coco_synth, "--split", "val2017",
                             "--out", tmp_path / "res")
    assert code == 1, (out, err)
    assert err.strip().splitlines() == [f"Error: {expected}"]
    assert not (tmp_path / "res").exists()


def test_a_cached_hub_snapshot_loads_by_name_and_a_damaged_one_names_its_file(hub_dirs, tmp_path, monkeypatch):
    """The hub name resolves in the local cache (no network); a truncated cached file is the
    same one-line error, naming the file in the snapshot."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub"
    sha = "0" * 40
    snap = cache / "models--hustvl--yolos-tiny" / "snapshots" / sha
    shutil.copytree(hub_dirs["yolos-tiny", "safetensors"], snap)
    (cache / "models--hustvl--yolos-tiny" / "refs").mkdir()
    (cache / "models--hustvl--yolos-tiny" / "refs" / "main").write_text(sha)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = load_detector("hustvl/yolos-tiny")
    assert list(m.config.image_size) == [800, 1333] and m.config.num_labels == 91
    half, full = _st_sizes(snap / "model.safetensors")
    _truncate(snap / "model.safetensors")
    with pytest.raises(InputFileError) as exc:
        load_detector("hustvl/yolos-tiny")
    assert str(exc.value) == (f"{snap / 'model.safetensors'}: truncated: {half} of {full} bytes "
                              "(the download or copy was cut short)")
