import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bavit_core.bavit.model import create_bavit, load_bavit, read_state_dict
from bavit_core.bavit.predict import read_predictions
from bavit_core.bavit.train import TrainOptions, read_metrics, train_bavit
from bavit_core.data import open_dataset
from bavit_core.data.grid import GridSpec
from bavit_core.labels import LabelOptions, label_dataset
from bavit_core.runtime.errors import BavitError, InputFileError, OptionError, TrainingDiverged

from .cli_helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_labels(coco_synth, tmp_path_factory):
    d = tmp_path_factory.mktemp("lab")
    for split in ("train2017", "val2017"):
        aset = open_dataset("coco", root=coco_synth, split=split, need_masks=True)
        label_dataset(aset, LabelOptions(source="masks", grid=GridSpec(64, 64, 16)), d / f"{split}.parquet")
    return d


def opts(small_labels, out, **kw):
    base = dict(labels=str(small_labels / "train2017.parquet"), val_labels=str(small_labels / "val2017.parquet"),
                epochs=3, batch_size=8, lr=1e-3, step_size=2, out=str(out))
    base.update(kw)
    return TrainOptions(**base)


def test_model_has_a_two_class_head_on_every_token_and_no_cls():
    m = create_bavit(depth=2, input_size=(64, 96), patch=16)
    assert m.vit.cls_token is None
    assert len(m.vit.blocks) == 2 and m.vit.embed_dim == 192 and m.vit.blocks[0].attn.num_heads == 3
    out = m(torch.randn(2, 3, 64, 96))
    assert out.shape == (2, 24, 2)
    assert m.fg_prob(torch.randn(1, 3, 64, 96)).shape == (1, 4, 6)


def test_pretrained_weights_from_a_local_file_keep_first_blocks_and_resample_positions(tmp_path):
    import timm
    from safetensors.torch import save_file

    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(sd, str(tmp_path / "vit.safetensors"))
    m = create_bavit(depth=2, input_size=(64, 64), pretrained=str(tmp_path / "vit.safetensors"))
    assert torch.equal(m.vit.blocks[1].mlp.fc1.weight, sd["blocks.1.mlp.fc1.weight"])
    assert torch.equal(m.vit.patch_embed.proj.weight, sd["patch_embed.proj.weight"])
    assert m.vit.pos_embed.shape == (1, 16, 192)
    with pytest.raises(InputFileError, match="pretrained weights file not found"):
        create_bavit(pretrained=str(tmp_path / "nope.safetensors"))
    with pytest.raises(OptionError, match="unknown timm model 'no_such_vit'"):
        create_bavit(pretrained="no_such_vit")


def test_local_pretrained_weights_use_their_own_normalisation(tmp_path):
    """augreg ViT-tiny is trained with mean = std = 0.5: using ImageNet's would shift every
    input. The normalisation comes from a config.json beside the file, the safetensors
    metadata, or a timm tag in the file name; ImageNet's only when none says otherwise."""
    import timm
    from safetensors.torch import save_file

    from bavit_core.bavit.model import IMAGENET_MEAN, IMAGENET_STD

    sd = {k: v.contiguous() for k, v in timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict().items()}
    tagged = tmp_path / "tag" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"
    tagged.parent.mkdir()
    save_file(sd, str(tagged))
    m = create_bavit(depth=1, input_size=(32, 32), pretrained=str(tagged))
    assert (m.cfg.mean, m.cfg.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    side = tmp_path / "side" / "weights.safetensors"
    side.parent.mkdir()
    save_file(sd, str(side))
    (side.parent / "config.json").write_text(json.dumps({"pretrained_cfg": {"mean": [0.1, 0.2, 0.3], "std": [1, 1, 1]}}))
    m = create_bavit(depth=1, input_size=(32, 32), pretrained=str(side))
    assert (m.cfg.mean, m.cfg.std) == ((0.1, 0.2, 0.3), (1.0, 1.0, 1.0))
    meta = tmp_path / "meta.safetensors"
    save_file(sd, str(meta), metadata={"mean": "[0.4, 0.4, 0.4]", "std": "[0.2, 0.2, 0.2]"})
    assert create_bavit(depth=1, input_size=(32, 32), pretrained=str(meta)).cfg.mean == (0.4, 0.4, 0.4)
    plain = tmp_path / "plain.safetensors"
    save_file(sd, str(plain))
    m = create_bavit(depth=1, input_size=(32, 32), pretrained=str(plain))
    assert (m.cfg.mean, m.cfg.std) == (IMAGENET_MEAN, IMAGENET_STD)


def test_timm_name_without_network_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BavitError, match="cannot (download|load) timm weights 'vit_tiny_patch16_384"):
        create_bavit(pretrained="vit_tiny_patch16_384.augreg_in21k_ft_in1k")


def test_train_writes_a_self_describing_run_and_learns(small_labels, tmp_path):
    s = train_bavit(opts(small_labels, tmp_path / "run", epochs=6))
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} == {"config.json", "model.safetensors", "last.safetensors", "state.pt",
                                               "metrics.jsonl"}
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["init"] == "random init (no --pretrained given)"
    assert cfg["model"]["depth"] == 2 and cfg["labels_meta"]["options"]["source"] == "masks"
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == list(range(6))
    for k in ("train_loss", "val_accuracy", "val_precision", "val_recall", "val_f1", "val_iou", "val_fg_missed"):
        assert k in rows[0]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert s["val_images"] == 10 and s["train_images"] == 30
    assert rows[2]["lr"] == pytest.approx(1e-4)  # step LR: x0.1 after 2 epochs


def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(small_labels, tmp_path):
    train_bavit(opts(small_labels, tmp_path / "full", epochs=4))

    def stop(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_bavit(opts(small_labels, tmp_path / "cut", epochs=4), on_epoch=stop)
    assert len(read_metrics(tmp_path / "cut")) == 2
    code, _, err = run_cli("train", "--resume", "--out", tmp_path / "cut", "--epochs", "4")
    assert code == 0, err
    a = read_state_dict(tmp_path / "full" / "last.safetensors")
    b = read_state_dict(tmp_path / "cut" / "last.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["epoch"] for r in read_metrics(tmp_path / "cut")] == [0, 1, 2, 3]


def test_nan_loss_stops_with_a_message(small_labels, tmp_path, monkeypatch):
    import bavit_core.bavit.train as T

    monkeypatch.setattr(T, "acc_loss", lambda logits, y, w: (logits * float("nan")).mean())
    with pytest.raises(TrainingDiverged, match=r"the loss became nan at epoch 1, step 1; try a lower --lr"):
        train_bavit(opts(small_labels, tmp_path / "nan"))


def test_train_cli_errors(small_labels, tmp_path):
    code, _, err = run_cli("train", "--resume", "--out", tmp_path / "none")
    assert (code, err.strip()) == (1, f"Error: {tmp_path / 'none'}: cannot resume: run directory not found")
    (tmp_path / "none").mkdir()
    code, _, err = run_cli("train", "--resume", "--out", tmp_path / "none")
    assert (code, err.strip()) == (1, f"Error: {tmp_path / 'none'}: cannot resume: not a bavit run directory (config.json missing)")
    code, _, err = run_cli("train", "--labels", small_labels / "train2017.parquet", "--epochs", "0", "--out", tmp_path / "r")
    assert (code, err.strip()) == (1, "Error: --epochs must be at least 1, got 0")
    assert not (tmp_path / "r").exists()


def test_ddp_two_processes_match_one_process_with_twice_the_batch(small_labels, tmp_path):
    common = ["--labels", small_labels / "train2017.parquet", "--val-labels", small_labels / "val2017.parquet",
              "--epochs", "2", "--lr", "1e-3", "--seed", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    import socket

    with socket.socket() as sock:  # a free port, so reruns never meet a socket in TIME_WAIT
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port),
           "-m", "bavit_cli", "train", *map(str, common), "--batch-size", "4", "--out", str(tmp_path / "ddp")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("epoch   2") == 1  # only rank 0 reports
    code, _, err = run_cli("train", *common, "--batch-size", "8", "--out", tmp_path / "one")
    assert code == 0, err
    a = read_state_dict(tmp_path / "ddp" / "last.safetensors")
    b = read_state_dict(tmp_path / "one" / "last.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)
    ra, rb = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "one")
    assert ra[-1]["val_accuracy"] == pytest.approx(rb[-1]["val_accuracy"], abs=1e-3)
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["data"]["world_size"] == 2


def test_predict_and_postprocess_round_trip(small_labels, coco_synth, tmp_path):
    train_bavit(opts(small_labels, tmp_path / "run", epochs=2))
    code, out, err = run_cli("predict", "--model", tmp_path / "run", "--labels", small_labels / "val2017.parquet",
                             "--out", tmp_path / "p.parquet")
    assert code == 0, err
    assert "token accuracy" in out
    p = read_predictions(tmp_path / "p.parquet")
    from bavit_core import read_labels
    lab = read_labels(small_labels / "val2017.parquet")
    assert p.probs.shape == (10, 4, 4) and p.probs.dtype == np.float32
    assert np.array_equal(p.gt, lab.grids) and np.array_equal(p.image_ids, lab.image_ids)
    assert np.array_equal(p.grids, (1 - p.probs.astype(np.float64)) < 0.5)
    model = load_bavit(tmp_path / "run")
    from bavit_core.data.images import load_image, to_input
    x = to_input(load_image(coco_synth / "val2017" / p.file_names[0], (64, 64))[None], model.cfg.mean, model.cfg.std)
    np.testing.assert_allclose(model.fg_prob(x)[0].detach().numpy(), p.probs[0], atol=1e-6)
    # plain folder: every image, no GT
    code, _, err = run_cli("predict", "--model", tmp_path / "run", "--images", coco_synth / "val2017",
                           "--out", tmp_path / "f.parquet")
    assert code == 0, err
    f = read_predictions(tmp_path / "f.parquet")
    assert f.gt is None and len(f) == 10 and f.widths[0] == 160 and f.heights[0] == 120
    code, out, err = run_cli("postprocess", "--pred", tmp_path / "p.parquet", "--postprocess-steps", "2", "--out", tmp_path / "r.parquet")
    assert code == 0, err
    r = read_predictions(tmp_path / "r.parquet")
    assert (r.grids >= p.grids).all()
    hist = r.meta["postprocess"]["history"]
    assert [h["step"] for h in hist] == [0, 1, 2]
    assert hist[0]["accuracy"] == pytest.approx(p.meta["metrics"]["accuracy"])
    assert all(hist[i + 1]["fg_recall"] >= hist[i]["fg_recall"] for i in range(2))


def test_predict_bad_inputs(tmp_path):
    code, _, err = run_cli("predict", "--model", tmp_path / "nope", "--images", tmp_path)
    assert (code, err.strip()) == (1, f"Error: {tmp_path / 'nope'}: model run directory not found")


def test_validation_reads_its_own_split_even_when_training_images_share_its_file_names(small_labels, coco_synth,
                                                                                        tmp_path):
    """--images names the training folder only: the validation labels' images come from the
    folder recorded in them. Here the training folder also holds files named like every
    validation image (with training pixels), as two splits of many user datasets do; reading
    validation from --images would score those against the validation labels."""
    import shutil

    train_dir = tmp_path / "train_imgs"
    shutil.copytree(coco_synth / "train2017", train_dir)
    donors = sorted(train_dir.iterdir())
    for k, v in enumerate(sorted((coco_synth / "val2017").iterdir())):
        shutil.copyfile(donors[k], train_dir / v.name)
    common = dict(epochs=1, images=str(train_dir))
    own = read_metrics(Path(train_bavit(opts(small_labels, tmp_path / "a", **common))["out"]))
    named = read_metrics(Path(train_bavit(opts(small_labels, tmp_path / "b", val_images=str(coco_synth / "val2017"),
                                               **common))["out"]))
    wrong = read_metrics(Path(train_bavit(opts(small_labels, tmp_path / "c", val_images=str(train_dir),
                                               **common))["out"]))
    assert own[0]["val_loss"] == named[0]["val_loss"] and own[0]["val_sparsity"] == named[0]["val_sparsity"]
    assert own[0]["val_loss"] != wrong[0]["val_loss"]  # the folders' pixels do differ
