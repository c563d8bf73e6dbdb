"""``--pretrained`` takes a timm name, a weights file or a timm hub directory, and the same
weights give the same model (and the same run) however they arrive; damaged or foreign
weights are one error naming the file.

The weights are a random-weight replica of vit_tiny_patch16_384 built with timm's own
classes and saved with timm's own ``save_for_hf``, so the directory layout is exactly what
``push_to_hf_hub`` uploads. Nothing here touches the network."""
import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

from bavit_core.bavit import model as model_mod
from bavit_core.bavit.model import IMAGENET_MEAN, create_bavit, read_state_dict
from bavit_core.data import open_dataset
from bavit_core.data.grid import GridSpec
from bavit_core.labels import LabelOptions, label_dataset
from bavit_core.runtime.errors import InputFileError

from .cli_helpers import run_cli

ARCH = "vit_tiny_patch16_384"
SIZE = (64, 64)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """timm's save_for_hf layout: config.json, model.safetensors and pytorch_model.bin."""
    import timm
    from timm.models._hub import save_for_hf

    d = tmp_path_factory.mktemp("hub") / ARCH
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)  # weights unlike anything BAViT's own init draws
        save_for_hf(timm.create_model(ARCH, pretrained=False), str(d), safe_serialization="both")
    return d


@pytest.fixture(scope="module")
def labels(coco_synth, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pt_labels")
    aset = open_dataset("coco", root=coco_synth, split="val2017", need_masks=True)
    label_dataset(aset, LabelOptions(source="masks", grid=GridSpec(*SIZE, 16)), d / "val.parquet")
    return d / "val.parquet"


def build(pretrained, seed=0):
    """create_bavit under a seed, and the next random draw after it (what training draws next)."""
    torch.manual_seed(seed)
    m = create_bavit(depth=2, input_size=SIZE, pretrained=str(pretrained) if pretrained else None)
    return m, torch.rand(8)


def fake_timm_cache(monkeypatch, hf_dir):
    """``timm.create_model(ARCH, pretrained=True)`` as a cache hit would run it: build the
    architecture (random init draws included), then load the cached weights."""
    import timm
    from safetensors.torch import load_file

    real = timm.create_model

    def create_model(name, pretrained=False, **kw):
        assert name == ARCH and pretrained, (name, pretrained)
        m = real(name, pretrained=False, **kw)
        sd = load_file(str(hf_dir / "model.safetensors"))
        m.load_state_dict({k: v for k, v in sd.items() if not k.startswith("head.")}, strict=True)
        return m

    monkeypatch.setattr(timm, "create_model", create_model)
    monkeypatch.setattr(model_mod, "_require_hub_reachable", lambda name: None)
    return create_model


# --------------------------------------------------------------------------- the directory layout
def test_timm_hub_directory_loads_its_weights_and_its_config_normalisation(hf_dir):
    sd = read_state_dict(hf_dir / "model.safetensors")
    pc = json.loads((hf_dir / "config.json").read_text())["pretrained_cfg"]
    assert tuple(pc["mean"]) != IMAGENET_MEAN  # augreg: 0.5, so ImageNet's would be a visible mistake
    m, _ = build(hf_dir)
    assert (m.cfg.mean, m.cfg.std) == (tuple(pc["mean"]), tuple(pc["std"]))
    assert m.cfg.pretrained == str(hf_dir)
    assert torch.equal(m.vit.patch_embed.proj.weight, sd["patch_embed.proj.weight"])
    assert torch.equal(m.vit.blocks[1].mlp.fc1.weight, sd["blocks.1.mlp.fc1.weight"])
    assert torch.equal(m.vit.norm.weight, sd["norm.weight"])
    assert m.vit.pos_embed.shape == (1, 16, 192)


def test_model_safetensors_is_preferred_and_pytorch_model_bin_alone_is_read(hf_dir, tmp_path):
    sd = read_state_dict(hf_dir / "model.safetensors")
    both = shutil.copytree(hf_dir, tmp_path / "both")
    torch.save({k: v + 1 for k, v in sd.items()}, both / "pytorch_model.bin")  # a different .bin beside
    m, _ = build(both)
    assert torch.equal(m.vit.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])
    (both / "model.safetensors").unlink()
    m, _ = build(both)
    assert torch.equal(m.vit.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"] + 1)


# --------------------------------------------------------------------------- same weights, same model
def test_same_seed_same_model_by_file_by_directory_and_by_timm_name(hf_dir, monkeypatch):
    """Issue 20 item 9: timm.create_model(pretrained=True) draws random numbers (it builds a
    whole ViT) before BAViT's head is initialised; a file does not. Both must give the same
    head, the same weights and the same next draw."""
    create_model = fake_timm_cache(monkeypatch, hf_dir)
    torch.manual_seed(0)
    create_model(ARCH, pretrained=True, num_classes=0)
    after_fake = torch.rand(8)
    torch.manual_seed(0)
    assert not torch.equal(after_fake, torch.rand(8)), "the fake cache hit must draw, as timm's build does"

    by_file, after_file = build(hf_dir / "model.safetensors")
    by_dir, after_dir = build(hf_dir)
    by_name, after_name = build(ARCH)
    scratch, after_scratch = build(None)
    a, b, c = by_file.state_dict(), by_dir.state_dict(), by_name.state_dict()
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"file vs directory differ at {k}"
        assert torch.equal(a[k], c[k]), f"file vs timm name differ at {k}"
    # the head is BAViT's own init: the same as a run without --pretrained at this seed
    for k in ("vit.head.weight", "vit.head.bias"):
        assert torch.equal(c[k], scratch.state_dict()[k])
    assert not torch.equal(a["vit.blocks.0.attn.qkv.weight"], scratch.state_dict()["vit.blocks.0.attn.qkv.weight"])
    assert torch.equal(after_file, after_dir) and torch.equal(after_file, after_name)
    assert torch.equal(after_file, after_scratch)
    assert (by_name.cfg.mean, by_name.cfg.std) == (by_dir.cfg.mean, by_dir.cfg.std) == (by_file.cfg.mean, by_file.cfg.std)


def test_cli_train_from_a_directory_a_file_or_a_timm_name_is_the_same_run(hf_dir, labels, tmp_path, monkeypatch):
    fake_timm_cache(monkeypatch, hf_dir)
    runs = {}
    for how, src in (("dir", hf_dir), ("file", hf_dir / "model.safetensors"), ("name", ARCH)):
        out = tmp_path / how
        code, stdout, err = run_cli("train", "--labels", labels, "--pretrained", src, "--epochs", "1",
                                    "--batch-size", "4", "--val-fraction", "0.25", "--seed", "5", "--out", out)
        assert code == 0, (stdout, err)
        assert f"pretrained from {src if how == 'name' else Path(src).resolve()}" in " ".join(stdout.split())
        runs[how] = read_state_dict(out / "last.safetensors")
        assert json.loads((out / "config.json").read_text())["model"]["mean"] == [0.5, 0.5, 0.5]
    for how in ("file", "name"):
        assert runs[how].keys() == runs["dir"].keys()
        for k in runs["dir"]:
            assert torch.equal(runs[how][k], runs["dir"][k]), f"{how} vs dir differ at {k}"


# --------------------------------------------------------------------------- damaged and foreign inputs
def _truncate(p: Path) -> Path:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return p


def _damage(hf_dir: Path, tmp: Path, how: str) -> tuple[Path, Path]:
    """(what --pretrained gets, the file the error must name)."""
    d = shutil.copytree(hf_dir, tmp / "hub")
    if how == "truncated model.safetensors":
        return d, _truncate(d / "model.safetensors")
    if how == "truncated pytorch_model.bin":
        (d / "model.safetensors").unlink()
        return d, _truncate(d / "pytorch_model.bin")
    if how == "pickled pytorch_model.bin":
        (d / "model.safetensors").unlink()
        sd = torch.load(d / "pytorch_model.bin", weights_only=True)
        torch.save({"model": sd, "args": argparse.Namespace(lr=0.1)}, d / "pytorch_model.bin")
        return d, d / "pytorch_model.bin"
    if how == "empty model.safetensors":
        (d / "model.safetensors").write_bytes(b"")
        return d, d / "model.safetensors"
    if how == "empty .pth file":
        (tmp / "w.pth").write_bytes(b"")
        return tmp / "w.pth", tmp / "w.pth"
    if how == "a ResNet state dict":
        import timm
        from safetensors.torch import save_file

        save_file(timm.create_model("resnet18", pretrained=False).state_dict(), str(tmp / "resnet.safetensors"))
        return tmp / "resnet.safetensors", tmp / "resnet.safetensors"
    if how == "a ViT-small state dict":
        import timm

        torch.save(timm.create_model("vit_small_patch16_224", pretrained=False, depth=1).state_dict(), tmp / "s.pth")
        return tmp / "s.pth", tmp / "s.pth"
    if how == "a ViT-tiny of another MLP width":
        import timm

        torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, mlp_ratio=2).state_dict(),
                   tmp / "m.pth")
        return tmp / "m.pth", tmp / "m.pth"
    if how == "a ResNet hub directory":
        cfg = json.loads((d / "config.json").read_text())
        cfg["architecture"] = "resnet18"
        (d / "config.json").write_text(json.dumps(cfg))
        return d, d / "config.json"
    if how == "config.json not JSON":
        (d / "config.json").write_text("{not json")
        return d, d / "config.json"
    if how == "config.json without architecture":
        (d / "config.json").write_text(json.dumps({"pretrained_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}))
        return d, d / "config.json"
    if how == "no weights file":
        (d / "model.safetensors").unlink()
        (d / "pytorch_model.bin").unlink()
        return d, d
    raise AssertionError(how)


DAMAGE = {
    "truncated model.safetensors": "cannot read weights: not a valid safetensors file (truncated or damaged?)",
    "truncated pytorch_model.bin": "cannot read weights: the PyTorch file is truncated or damaged",
    "pickled pytorch_model.bin": "cannot read weights: it is a pickle holding Python objects besides tensors "
                                 "(it refers to argparse.Namespace); bavit loads weights with "
                                 "torch.load(weights_only=True), which refuses to unpickle those",
    "empty model.safetensors": "cannot read weights: the file is empty (0 bytes)",
    "empty .pth file": "cannot read weights: the file is empty (0 bytes)",
    "a ResNet state dict": "not ViT weights: no patch embedding ('patch_embed.proj.weight') among its 122 "
                           "tensors ('bn1.weight', 'conv1.weight', 'fc.weight', ...)",
    "a ViT-small state dict": "weights of a ViT with embed dim 384 and patch 16; BAViT needs embed dim 192 and patch 16",
    "a ViT-tiny of another MLP width": "weights do not fit BAViT's ViT-tiny: blocks.0.mlp.fc1.weight is (384, 192), "
                                       "BAViT needs (768, 192) (and 5 more)",
    "a ResNet hub directory": "architecture 'resnet18' is not a timm ViT (vision_transformer)",
    "config.json not JSON": "not valid JSON (Expecting property name",
    "config.json without architecture": "not a timm model config: no 'architecture'",
    "no weights file": "not a timm model directory (no model.safetensors or pytorch_model.bin)",
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_or_foreign_pretrained_weights_are_one_error_naming_the_file(hf_dir, tmp_path, how):
    arg, named = _damage(hf_dir, tmp_path, how)
    torch.manual_seed(0)
    with pytest.raises(InputFileError) as info:
        create_bavit(depth=2, input_size=SIZE, pretrained=str(arg))
    assert info.value.path == str(named)
    assert info.value.problem.startswith(DAMAGE[how]), info.value.problem
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("how", ["pickled pytorch_model.bin", "a ResNet hub directory", "no weights file"])
def test_cli_train_reports_bad_pretrained_input_as_one_line(hf_dir, labels, tmp_path, how):
    arg, named = _damage(hf_dir, tmp_path, how)
    code, out, err = run_cli("train", "--labels", labels, "--pretrained", arg, "--epochs", "1",
                             "--out", tmp_path / "run")
    lines = err.strip().splitlines()
    assert code == 1, (out, err)
    assert lines == [lines[0]] and lines[0].startswith(f"Error: {named.resolve()}: {DAMAGE[how]}"), err
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_where_the_input_normalisation_came_from_is_recorded_and_said_never_silently_imagenet(hf_dir, labels, tmp_path):
    """A weights file that says nothing of its mean/std trains with ImageNet's: a wrong
    normalisation raises no error, so the run says it assumed them (config and stdout)."""
    import shutil

    bare = tmp_path / "w" / "weights.safetensors"  # no config.json beside it, no metadata, no timm tag
    bare.parent.mkdir()
    shutil.copy(hf_dir / "model.safetensors", bare)
    tagged = tmp_path / "t" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"
    tagged.parent.mkdir()
    shutil.copy(hf_dir / "model.safetensors", tagged)
    for src, mean, said in ((bare, list(IMAGENET_MEAN), "ImageNet's (assumed: nothing beside or in the weights says)"),
                            (tagged, [0.5] * 3, "timm's pretrained config vit_tiny_patch16_224.augreg_in21k_ft_in1k"),
                            (hf_dir, [0.5] * 3, str(hf_dir.resolve() / "config.json"))):
        out = tmp_path / f"run_{src.name}"
        code, stdout, err = run_cli("train", "--labels", labels, "--pretrained", src, "--epochs", "1",
                                    "--batch-size", "4", "--val-fraction", "0.25", "--out", out)
        assert code == 0, err
        doc = json.loads((out / "config.json").read_text())
        assert (doc["model"]["mean"], doc["model"]["normalisation"]) == (mean, said)
        assert f"(input mean/std: {said})" in " ".join(stdout.split())
