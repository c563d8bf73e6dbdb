"""Resume is bitwise exact wherever a kill lands, including in the middle of saving.

A kill is simulated at every file rename the run makes (before or after the rename):
whatever the run directory holds then, ``--resume`` must finish with exactly the weights
and metric rows of the uninterrupted run. The mistake this catches: weights or metrics
written before the training state, so a kill between them leaves the run one epoch
ahead of its state and resume trains that epoch twice."""
import os
from pathlib import Path

import pytest
import torch

from bavit_core.bavit.model import read_state_dict
from bavit_core.bavit.train import TrainOptions, read_metrics, train_bavit
from bavit_core.data import open_dataset
from bavit_core.data.grid import GridSpec
from bavit_core.labels import LabelOptions, label_dataset
from bavit_core.runtime import fileio
from bavit_core.runtime.errors import InputFileError, OptionError

from .cli_helpers import run_cli

TIMING = ("seconds", "images_per_s")


class Kill(BaseException):
    """Stands in for SIGKILL: nothing after it runs in the process."""


@pytest.fixture(scope="module")
def labels(coco_synth, tmp_path_factory):
    d = tmp_path_factory.mktemp("lab_resume")
    for split in ("train2017", "val2017"):
        aset = open_dataset("coco", root=coco_synth, split=split)
        label_dataset(aset, LabelOptions(grid=GridSpec(32, 32, 16)), d / f"{split}.parquet")
    return d


def _opts(labels, out, epochs=2):
    return TrainOptions(labels=str(labels / "train2017.parquet"), val_labels=str(labels / "val2017.parquet"),
                        epochs=epochs, batch_size=8, lr=1e-3, step_size=1, gamma=0.5, out=str(out), depth=1)


@pytest.fixture(scope="module")
def full(labels, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    train_bavit(_opts(labels, out))
    return out


def _same_run(a, b):
    for f in ("last.safetensors", "model.safetensors"):
        x, y = read_state_dict(a / f), read_state_dict(b / f)
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), (f, k)
    ra = [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(a)]
    rb = [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(b)]
    assert ra == rb


# 2 epochs: config + (state, best?, last, metrics) per epoch: kill at each of the 8-9 renames
@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("at", range(9))
def test_resume_after_a_kill_at_any_save_equals_the_uninterrupted_run(labels, full, tmp_path, monkeypatch, at, when):
    out = tmp_path / "run"
    real = os.replace
    calls = []

    def replace(src, dst):
        if str(dst).startswith(str(out)):
            calls.append(dst)
            if len(calls) == at + 1:
                if when == "after":
                    real(src, dst)
                raise Kill()
        return real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)
    try:
        train_bavit(_opts(labels, out))
        killed = False
    except Kill:
        killed = True
    monkeypatch.setattr(fileio.os, "replace", real)
    if not killed:
        pytest.skip(f"the run makes fewer than {at + 1} renames")
    try:
        train_bavit(TrainOptions(labels="", epochs=None, out=str(out)), resume=True)
    except InputFileError as exc:  # killed before the first epoch was committed: start again
        assert "no completed epoch yet" in str(exc) or "not a bavit run" in str(exc) or "not found" in str(exc)
        train_bavit(_opts(labels, out), overwrite=True)
    _same_run(full, out)
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_extending_a_finished_run_equals_a_longer_run(labels, full, tmp_path):
    longer = tmp_path / "longer"
    train_bavit(_opts(labels, longer, epochs=3))
    ext = tmp_path / "ext"
    train_bavit(_opts(labels, ext, epochs=2))
    seen = []
    train_bavit(TrainOptions(labels="", epochs=3, out=str(ext)), resume=True, on_resume=lambda e, n: seen.append((e, n)))
    assert seen == [(3, 3)]
    _same_run(longer, ext)


def test_existing_run_is_refused_without_overwrite_and_a_changed_labels_file_without_force(labels, full, tmp_path):
    import shutil

    with pytest.raises(OptionError, match="already holds files .*--resume.*--overwrite"):
        train_bavit(_opts(labels, full))
    lab = tmp_path / "train.parquet"
    shutil.copy(labels / "train2017.parquet", lab)
    run = tmp_path / "run"
    o = _opts(labels, run, epochs=1)
    o.labels = str(lab)
    train_bavit(o)
    lab.write_bytes(lab.read_bytes())  # same bytes: fine
    train_bavit(TrainOptions(labels="", epochs=2, out=str(run)), resume=True)
    shutil.copy(labels / "val2017.parquet", lab)  # other content
    with pytest.raises(InputFileError, match="changed since .* started .*--force"):
        train_bavit(TrainOptions(labels="", epochs=3, out=str(run)), resume=True)


def test_cli_says_how_to_resume_after_ctrl_c_and_from_which_epoch(labels, tmp_path, monkeypatch):
    from bavit_core.engine.rundir import RunDir

    out = tmp_path / "run"
    real = RunDir.commit
    n = []

    def commit(self, *a, **k):
        real(self, *a, **k)
        n.append(1)
        if len(n) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "commit", commit)
    code, _, err = run_cli("train", "--labels", labels / "train2017.parquet", "--depth", "1", "--epochs", "3",
                           "--batch-size", "8", "--out", out)
    assert code == 130
    assert err.strip().endswith(f"Interrupted; no output was left half-written. Resume with: bavit train --out {out} --resume")
    monkeypatch.setattr(RunDir, "commit", real)
    code, _, err = run_cli("train", "--resume", "--out", out)
    assert code == 0, err
    assert f"Resuming {out} from epoch 3 of 3." in err


# --------------------------------------------------------------------------- finetune
def _ft(coco_synth, out, epochs=2):
    from bavit_core.finetune.loop import FinetuneOptions

    return FinetuneOptions(root=str(coco_synth), split="train2017", from_scratch=True, detector_config="nano",
                           detector_size=(32, 32), epochs=epochs, batch_size=8, lr=2e-4, max_images=12,
                           val_fraction=0.0, schedule="step", out=str(out))


@pytest.fixture(scope="module")
def ft_full(coco_synth, tmp_path_factory):
    from bavit_core.finetune.loop import finetune

    out = tmp_path_factory.mktemp("ft_full") / "det"
    finetune(_ft(coco_synth, out))
    return out


def _same_detector(a, b):
    for f in ("last/model.safetensors", "model.safetensors"):
        x, y = read_state_dict(a / f), read_state_dict(b / f)
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), (f, k)
    import json

    rows = [[{k: v for k, v in json.loads(ln).items() if k not in TIMING} for ln in (d / "metrics.jsonl").read_text().splitlines()]
            for d in (a, b)]
    assert rows[0] == rows[1]


@pytest.mark.parametrize("target,nth,when", [("state.pt", 2, "after"), ("state.pt", 2, "before"),
                                              ("model.safetensors", 3, "after"), ("metrics.jsonl", 1, "before")])
def test_finetune_resume_after_a_kill_at_the_save_equals_the_uninterrupted_run(coco_synth, ft_full, tmp_path,
                                                                                monkeypatch, target, nth, when):
    from bavit_core.finetune.loop import FinetuneOptions, finetune

    out = tmp_path / "det"
    real = os.replace
    seen = []

    def replace(src, dst):
        if Path(dst).name == target and str(dst).startswith(str(out)):
            seen.append(dst)
            if len(seen) == nth:
                if when == "after":
                    real(src, dst)
                raise Kill()
        return real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)
    with pytest.raises(Kill):
        finetune(_ft(coco_synth, out))
    monkeypatch.setattr(fileio.os, "replace", real)
    finetune(FinetuneOptions(epochs=None, out=str(out)), resume=True)
    _same_detector(ft_full, out)


def test_finetune_resume_longer_with_a_cosine_schedule_is_refused_and_says_why(coco_synth, tmp_path):
    from bavit_core.finetune.loop import FinetuneOptions, finetune

    o = _ft(coco_synth, tmp_path / "det", epochs=1)
    o.schedule = "cosine"
    finetune(o)
    with pytest.raises(OptionError, match="cosine schedule spans its own 1 epochs"):
        finetune(FinetuneOptions(epochs=2, out=str(tmp_path / "det")), resume=True)


def test_ctrl_c_before_the_first_epoch_offers_no_resume_and_leaves_no_run(labels, tmp_path, monkeypatch):
    import bavit_core.bavit.train as T

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "acc_loss", interrupt)
    code, _, err = run_cli("train", "--labels", labels / "train2017.parquet", "--depth", "1", "--out", tmp_path / "run")
    assert (code, err.strip()) == (130, "Interrupted; no output was left half-written.")
    assert list(tmp_path.iterdir()) == []
