import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bavit_core.bavit.model import load_bavit, read_state_dict
from bavit_core.data import open_dataset
from bavit_core.data.grid import GridSpec
from bavit_core.detection.yolos import load_detector
from bavit_core.finetune.loop import FinetuneOptions, finetune
from bavit_core.labels import LabelOptions, label_dataset
from bavit_core.runtime.errors import OptionError

from .cli_helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]


def base(coco_synth, out, **kw):
    d = dict(root=str(coco_synth), split="train2017", from_scratch=True, detector_config="nano",
             detector_size=(64, 64), epochs=2, batch_size=8, lr=2e-4, out=str(out))
    d.update(kw)
    return FinetuneOptions(**d)


def test_from_scratch_writes_an_hf_detector_that_prune_eval_loads(coco_synth, tmp_path):
    r = finetune(base(coco_synth, tmp_path / "det"))
    det = load_detector(str(tmp_path / "det"))
    assert det.config.num_labels == 6 and det.config.id2label[1] == "triangle"
    assert (tmp_path / "det" / "last" / "model.safetensors").is_file()
    rows = [json.loads(line) for line in (tmp_path / "det" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1]
    for k in ("train_loss", "train_loss_ce", "train_loss_bbox", "train_loss_giou", "val_map", "val_map50"):
        assert k in rows[0]
    assert "train_loss_dense_aux" not in rows[0]
    assert r["train_images"] == 27 and r["val_images"] == 3


def test_new_yolos_gets_random_tokens_and_positions():
    from transformers import YolosForObjectDetection

    from bavit_core.detection.yolos import init_new_yolos, tiny_yolos_config

    m = YolosForObjectDetection(tiny_yolos_config("nano", num_labels=3, image_size=(64, 64)))
    emb = m.vit.embeddings
    assert emb.position_embeddings.abs().max() == 0  # what transformers leaves
    init_new_yolos(m, seed=1)
    for p in (emb.cls_token, emb.detection_tokens, emb.position_embeddings):
        assert 0.01 < p.std().item() < 0.03 and p.abs().max().item() <= 0.04
    d = emb.detection_tokens[0]
    assert torch.cdist(d, d).fill_diagonal_(1).min() > 0  # no two detection tokens alike


def test_sparse_finetune_with_oracle_tokens_and_exact_resume(coco_synth, tmp_path):
    aset = open_dataset("coco", root=coco_synth, split="train2017", need_masks=True)
    label_dataset(aset, LabelOptions(source="masks", grid=GridSpec(96, 96, 16)), tmp_path / "l.parquet")
    opts = dict(selector="oracle", labels=str(tmp_path / "l.parquet"), epochs=3, dense_aux=0.5)
    r = finetune(base(coco_synth, tmp_path / "full", **opts))
    assert 0 < r["train_sparsity"] < 1
    assert all(row["train_loss_dense_aux"] > 0 for row in r["rows"])

    def stop(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(base(coco_synth, tmp_path / "cut", **opts), on_epoch=stop)
    code, _, err = run_cli("finetune", "--resume", "--out", tmp_path / "cut")
    assert code == 0, err
    a = read_state_dict(tmp_path / "full" / "last" / "model.safetensors")
    b = read_state_dict(tmp_path / "cut" / "last" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_finetune_bad_options(coco_synth, tmp_path):
    with pytest.raises(OptionError, match="--selector oracle needs --labels PARQUET"):
        finetune(base(coco_synth, tmp_path / "x", selector="oracle"))
    code, _, err = run_cli("finetune", "--root", coco_synth, "--out", tmp_path / "y")
    assert (code, err.strip()) == (1, "Error: give --detector NAME|DIR to fine-tune, or --from-scratch --detector-config NAME")
    code, _, err = run_cli("finetune", "--resume", "--out", tmp_path / "nothing")
    assert code == 1 and "cannot resume" in err


def test_sparse_finetune_trains_and_validates_with_the_pruned_token_treatment(coco_synth, tmp_path):
    """--pruned-tokens reaches the training forward (weights differ from drop's after the
    same steps) and is stored for resume; a bad value is one clean error before any work."""
    aset = open_dataset("coco", root=coco_synth, split="train2017", need_masks=True)
    label_dataset(aset, LabelOptions(source="masks", grid=GridSpec(96, 96, 16)), tmp_path / "l.parquet")
    opts = dict(selector="oracle", labels=str(tmp_path / "l.parquet"), epochs=1, max_images=12, batch_size=6)
    weights = {}
    for t in ("drop", "pool", "preserve"):
        r = finetune(base(coco_synth, tmp_path / t, pruned_tokens=t, **opts))
        assert 0 < r["train_sparsity"] < 1 and "val_map" in r["rows"][0]
        saved = json.loads((tmp_path / t / "finetune.json").read_text())["options"]
        assert saved["pruned_tokens"] == t
        weights[t] = read_state_dict(tmp_path / t / "last" / "model.safetensors")
    k = "vit.encoder.layer.0.attention.attention.query.weight"
    assert (weights["drop"][k] - weights["pool"][k]).abs().max() > 1e-6
    assert (weights["drop"][k] - weights["preserve"][k]).abs().max() > 1e-6
    code, _, err = run_cli("finetune", "--from-scratch", "--root", coco_synth, "--pruned-tokens", "merge",
                           "--out", tmp_path / "bad")
    assert (code, err.strip()) == (1, "Error: unknown --pruned-tokens 'merge'; choose one of drop, pool, preserve")
    assert not (tmp_path / "bad").exists()


def test_finetune_on_two_processes_equals_one_process_with_twice_the_batch(coco_synth, tmp_path):
    """The engine's DDP: two processes with batch 4 take the same steps as one with batch 8.
    The set loss is normalised by the *global* box count and class-weight sum (the images
    of the two halves hold different numbers of objects, so averaging per-process means, as
    transformers' loss alone would, gives other gradients). Equal up to float noise: torchrun
    ranks run with one thread and sum in another order."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # 27 images: 3 validation, 24 training (3 steps of 8; no ragged last step to split unevenly)
    common = ["finetune", "--from-scratch", "--detector-config", "nano", "--root", str(coco_synth), "--split",
              "train2017", "--detector-size", "64", "--epochs", "2", "--max-images", "27", "--lr", "1e-3"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "bavit_cli", *common, "--batch-size", "4", "--out", str(tmp_path / "ddp")]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("epoch   1") == 1  # only rank 0 reports
    code, _, err = run_cli(*common, "--batch-size", "8", "--out", tmp_path / "one")
    assert code == 0, err
    a = read_state_dict(tmp_path / "ddp" / "last" / "model.safetensors")
    b = read_state_dict(tmp_path / "one" / "last" / "model.safetensors")
    gap = max((b[k] - a[k]).abs().max().item() for k in a)
    assert gap < 1e-4, gap  # per-process means instead of the global normalisation: 7e-3
    ra = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in ra] == pytest.approx([r["train_loss"] for r in rb], rel=1e-4)
    assert json.loads((tmp_path / "ddp" / "finetune.json").read_text())["train_images"] == 24


def test_sparse_finetune_with_bavit_tokens(coco_synth, tmp_path):
    from bavit_core.bavit.train import TrainOptions, train_bavit

    aset = open_dataset("coco", root=coco_synth, split="train2017", need_masks=True)
    label_dataset(aset, LabelOptions(source="masks", grid=GridSpec(64, 64, 16)), tmp_path / "l.parquet")
    train_bavit(TrainOptions(labels=str(tmp_path / "l.parquet"), epochs=1, batch_size=8, out=str(tmp_path / "bavit")))
    lo = finetune(base(coco_synth, tmp_path / "lo", selector="bavit", model=str(tmp_path / "bavit"),
                       threshold=0.05, epochs=1))
    hi = finetune(base(coco_synth, tmp_path / "hi", selector="bavit", model=str(tmp_path / "bavit"),
                       threshold=1.0, epochs=1))
    # threshold 1.0 prunes nothing (BG probability < 1); a tiny threshold prunes more
    assert hi["train_sparsity"] == 0.0
    assert lo["train_sparsity"] > 0.0

    # --init-encoder: the new micro YOLOS (192 wide, 3 heads, like BAViT-small) starts from BAViT's 2 layers
    finetune(base(coco_synth, tmp_path / "init", detector_config="micro", init_encoder=str(tmp_path / "bavit"),
                  epochs=1, lr=1e-5))
    bav = load_bavit(tmp_path / "bavit")
    det = load_detector(str(tmp_path / "init"))
    q_bavit = bav.vit.blocks[1].attn.qkv.weight.chunk(3)[0]
    assert (det.vit.encoder.layer[1].attention.attention.query.weight - q_bavit).abs().max() < 1e-3
    assert (det.vit.encoder.layer[2].attention.attention.query.weight - q_bavit).abs().max() > 0.03
    with pytest.raises(OptionError, match="--init-encoder starts a new detector's encoder: it needs --from-scratch"):
        finetune(base(coco_synth, tmp_path / "x", from_scratch=False, detector=str(tmp_path / "init"),
                      init_encoder=str(tmp_path / "bavit")))
