"""The one training engine: model selection, --overwrite and --force behave the same in
both trainers (BAViT's train and the detector's finetune)."""
import json
import shutil

import pytest
import torch

from bavit_core.bavit.model import read_state_dict
from bavit_core.bavit.train import TrainOptions, read_metrics, train_bavit
from bavit_core.data import open_dataset
from bavit_core.data.grid import GridSpec
from bavit_core.engine.rundir import RunDir, Selection
from bavit_core.finetune.loop import FinetuneOptions, finetune
from bavit_core.labels import LabelOptions, label_dataset
from bavit_core.runtime.errors import InputFileError, OptionError

from .cli_helpers import run_cli


def test_selection_keeps_the_last_epoch_or_the_best_score():
    scores = [0.5, 0.9, 0.7]
    last, best = Selection("last"), Selection("best")
    got = [(last.update(e, s), last.selected_epoch, best.update(e, s), best.selected_epoch)
           for e, s in enumerate(scores)]
    # improved?, selected epoch: "last" follows the epochs, "best" stays at epoch 1 (0.9)
    assert got == [(True, 0, True, 0), (True, 1, True, 1), (False, 2, False, 1)]
    assert (last.best, last.best_epoch) == (best.best, best.best_epoch) == (0.9, 1)


def test_the_first_commit_replaces_exactly_the_files_a_run_owns(tmp_path):
    out = tmp_path / "run"
    (out / "last").mkdir(parents=True)
    for name in ("state.pt", "metrics.jsonl", "model.safetensors", "last/model.safetensors", "notes.txt"):
        (out / name).write_text("old")
    derived = []
    run = RunDir(out, lambda m, rows, epoch, selected: derived.append((epoch, selected)),
                 owned=("model.safetensors", "last"), first_commit=lambda: (out / "options.json").write_text("{}"))
    model = torch.nn.Linear(2, 1)
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    assert (out / "state.pt").read_text() == "old"  # nothing removed before the first commit
    sel = Selection("last")
    sel.update(0, 1.0)
    run.commit(model, optim, 0, sel, [{"epoch": 0}])
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "options.json", "state.pt"]  # not the user's file
    assert derived == [(0, True)]
    state = torch.load(out / "state.pt", weights_only=True)
    assert (state["epoch"], state["select"], state["selected_epoch"]) == (0, "last", 0)


@pytest.fixture(scope="module")
def labels(coco_synth, tmp_path_factory):
    d = tmp_path_factory.mktemp("engine_lab")
    for split in ("train2017", "val2017"):
        aset = open_dataset("coco", root=coco_synth, split=split)
        label_dataset(aset, LabelOptions(grid=GridSpec(32, 32, 16)), d / f"{split}.parquet")
    return d


def _bavit(labels, out, **kw):
    d = dict(labels=str(labels / "train2017.parquet"), val_labels=str(labels / "val2017.parquet"), epochs=3,
             batch_size=8, lr=3e-3, depth=1, out=str(out))
    d.update(kw)
    return TrainOptions(**d)


def test_train_selects_the_last_epoch_by_default_and_the_best_only_when_asked(labels, tmp_path):
    r = train_bavit(_bavit(labels, tmp_path / "last"))
    a, b = read_state_dict(tmp_path / "last" / "model.safetensors"), read_state_dict(tmp_path / "last" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = read_metrics(tmp_path / "last")
    assert (r["select"], r["selected_epoch"], r["score"]) == ("last", 2, rows[-1]["val_accuracy"])
    assert [row["selected"] for row in rows] == [True, True, True]  # each epoch's weights replaced the model
    assert json.loads((tmp_path / "last" / "config.json").read_text())["train"]["select"] == "last"

    r = train_bavit(_bavit(labels, tmp_path / "best", select="best"))
    rows = read_metrics(tmp_path / "best")
    want = max(range(3), key=lambda e: (rows[e]["val_accuracy"], -e))  # first epoch reaching the maximum
    assert (r["selected_epoch"], r["score"]) == (want, rows[want]["val_accuracy"])
    assert [row["selected"] for row in rows] == [row["best"] for row in rows]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "best" / "model.safetensors"), "pt") as f:
        assert f.metadata()["epoch"] == str(want)


def test_train_select_is_checked_before_any_work(labels, tmp_path):
    code, _, err = run_cli("train", "--labels", labels / "train2017.parquet", "--select", "first", "--out", tmp_path / "r")
    assert (code, err.strip()) == (1, "Error: --select must be one of last, best, got 'first'")
    assert not (tmp_path / "r").exists()


def _det(root, out, **kw):
    d = dict(root=str(root), split="train2017", from_scratch=True, detector_config="nano", detector_size=(64, 64),
             epochs=1, batch_size=8, lr=2e-4, max_images=12, schedule="step", out=str(out))
    d.update(kw)
    return FinetuneOptions(**d)


def test_finetune_resume_refuses_a_changed_dataset_unless_forced_like_train(coco_synth, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(coco_synth, root)
    out = tmp_path / "det"
    finetune(_det(root, out))
    ann = root / "annotations" / "instances_train2017.json"
    doc = json.loads(ann.read_text())
    doc["annotations"] = doc["annotations"][1:]  # one object fewer: another dataset
    ann.write_text(json.dumps(doc))
    with pytest.raises(InputFileError, match=r"instances_train2017.json: changed since .* started .*--force"):
        finetune(FinetuneOptions(epochs=2, out=str(out)), resume=True)
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0]
    r = finetune(FinetuneOptions(epochs=2, out=str(out)), resume=True, force=True)
    assert [row["epoch"] for row in r["rows"]] == [0, 1]


def test_finetune_overwrite_replaces_the_whole_previous_run_like_train(coco_synth, tmp_path):
    out = tmp_path / "det"
    finetune(_det(coco_synth, out, epochs=2))
    with pytest.raises(OptionError, match="already holds files .*--resume.*--overwrite"):
        finetune(_det(coco_synth, out))
    (out / "mine.txt").write_text("kept")
    finetune(_det(coco_synth, out, epochs=1), overwrite=True)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0]
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["epoch"] == 0 and (out / "mine.txt").read_text() == "kept"
    a = read_state_dict(out / "model.safetensors")
    b = read_state_dict(out / "last" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # select=last: the run's detector is the last epoch's


def test_finetune_says_which_annotations_it_trained_without(coco_synth, tmp_path):
    """A category_id the reader cannot use (a string, 10^12) is left out and counted; the
    run says so instead of training on the rest without a word."""
    root = tmp_path / "data"
    shutil.copytree(coco_synth, root)
    ann = root / "annotations" / "instances_train2017.json"
    doc = json.loads(ann.read_text())
    doc["annotations"][0]["category_id"] = str(doc["annotations"][0]["category_id"])
    doc["annotations"][1]["category_id"] = 10 ** 12
    ann.write_text(json.dumps(doc))
    code, _, err = run_cli("finetune", "--from-scratch", "--detector-config", "nano", "--root", root, "--split",
                           "train2017", "--detector-size", "64", "--epochs", "1", "--max-images", "8",
                           "--out", tmp_path / "det")
    assert code == 0, err
    notes = [x for x in err.splitlines() if x.startswith("Note: ")]
    assert notes == ["Note: skipped in instances_train2017.json: 1 annotation with category_id outside [0, 100000], "
                     "1 annotation with non-integer category_id (trained and validated without them)"], err


def test_train_refuses_its_training_labels_as_validation_labels(labels, tmp_path):
    code, _, err = run_cli("train", "--labels", labels / "train2017.parquet", "--val-labels",
                           labels / "train2017.parquet", "--out", tmp_path / "r")
    assert (code, err.strip()) == (1, "Error: --val-labels is the --labels file itself: validation would score the "
                                      "training images; give the validation split's labels, or leave it out "
                                      "(--val-fraction holds out a share)")
    assert not (tmp_path / "r").exists()
