"""Sharded evaluation under torchrun (2 CPU processes, gloo): results equal one process."""
import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import YolosForObjectDetection

from bavit_core.bavit.predict import read_predictions
from bavit_core.bavit.train import TrainOptions, train_bavit
from bavit_core.data import open_dataset
from bavit_core.data.grid import GridSpec
from bavit_core.data.synthetic import CLASS_NAMES
from bavit_core.detection.protocol import write_processor
from bavit_core.detection.yolos import init_new_yolos, tiny_yolos_config
from bavit_core.labels import LabelOptions, label_dataset
from bavit_core.runtime.distributed import Dist, shard_block

from .cli_helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n,world", [(0, 2), (1, 2), (7, 2), (10, 3), (5, 8)])
def test_shards_are_contiguous_blocks_that_restore_the_order(n, world):
    blocks = [shard_block(n, r, world) for r in range(world)]
    assert np.array_equal(np.concatenate(blocks), np.arange(n))
    sizes = [len(b) for b in blocks]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_single_process_run_shard_reraises_and_gathers_one_part():
    from bavit_core.runtime.errors import InputFileError

    d = Dist.__new__(Dist)
    d.world, d.rank, d.enabled = 1, 0, False
    assert d.run_shard(lambda: 41) == [41]
    with pytest.raises(InputFileError, match="x.jpg: broken"):
        d.run_shard(lambda: (_ for _ in ()).throw(InputFileError("x.jpg", "broken")))


def torchrun(*args, timeout=300):
    with socket.socket() as sock:  # a free port, so reruns never meet a socket in TIME_WAIT
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "bavit_cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def bavit_run(coco_synth, tmp_path_factory):
    d = tmp_path_factory.mktemp("shard")
    aset = open_dataset("coco", root=coco_synth, split="val2017", need_masks=True)
    label_dataset(aset, LabelOptions(source="masks", grid=GridSpec(64, 64, 16)), d / "val.parquet")
    aset = open_dataset("coco", root=coco_synth, split="train2017", need_masks=True)
    label_dataset(aset, LabelOptions(source="masks", grid=GridSpec(64, 64, 16)), d / "train.parquet")
    train_bavit(TrainOptions(labels=str(d / "train.parquet"), epochs=1, batch_size=8, out=str(d / "run")))
    torch.manual_seed(0)
    cfg = tiny_yolos_config("nano", num_labels=len(CLASS_NAMES) + 1, image_size=(64, 64),
                            id2label={0: "N/A", **{i + 1: n for i, n in enumerate(CLASS_NAMES)}})
    det = YolosForObjectDetection(cfg)
    init_new_yolos(det, 0)
    det.save_pretrained(d / "det")
    write_processor(d / "det", (64, 64))  # its input protocol: square 64
    return d


def test_predict_on_two_processes_equals_one_process(bavit_run, tmp_path):
    args = ["predict", "--model", bavit_run / "run", "--labels", bavit_run / "val.parquet", "--batch-size", "1"]
    res = torchrun(*args, "--out", tmp_path / "two.parquet")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("Wrote ") == 1  # only rank 0 reports
    code, _, err = run_cli(*args, "--out", tmp_path / "one.parquet")
    assert code == 0, err
    a, b = read_predictions(tmp_path / "two.parquet"), read_predictions(tmp_path / "one.parquet")
    assert a.meta["world_size"] == 2 and b.meta["world_size"] == 1
    assert np.array_equal(a.image_ids, b.image_ids) and a.file_names == b.file_names
    assert np.array_equal(a.widths, b.widths) and np.array_equal(a.heights, b.heights)
    assert np.array_equal(a.gt, b.gt)
    # Equal up to float noise, by definition (as for prune-eval below): a torchrun rank runs with
    # its own thread count, so sums round differently; a token's FG decision may then differ
    # only where its probability sits on the threshold.
    np.testing.assert_allclose(a.probs, b.probs, rtol=0, atol=1e-4)
    near = np.abs(np.asarray(b.probs, dtype=np.float64) - 0.5) <= 1e-4
    assert np.array_equal(np.asarray(a.grids)[~near], np.asarray(b.grids)[~near])


def test_an_error_on_one_rank_is_one_line_from_rank_0_and_no_output(bavit_run, coco_synth, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    names = sorted(p.name for p in (coco_synth / "val2017").iterdir())
    for n in names:
        (images / n).write_bytes((coco_synth / "val2017" / n).read_bytes())
    (images / names[-1]).write_bytes(b"not a jpeg")  # in the last block: rank 1's shard only
    res = torchrun("predict", "--model", bavit_run / "run", "--images", images, "--out", tmp_path / "p.parquet")
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("Error:")]
    assert lines == [f"Error: {images / names[-1]}: unreadable image (UnidentifiedImageError)"], res.stderr[-2000:]
    # torchrun's launcher adds its own failure summary; nothing of ours is a traceback
    assert "bavit_core" not in res.stderr and "bavit_cli/" not in res.stderr
    assert not (tmp_path / "p.parquet").exists()


TIMING = {"latency_ms", "latency_spread", "throughput_ips", "dense_latency_ms", "dense_spread", "speedup",
          "detector_speedup", "peak_mem_mb", "timing_noisy", "device"}  # device: threads differ under torchrun


def test_prune_eval_on_two_processes_equals_one_process(bavit_run, coco_synth, tmp_path):
    args = ["prune-eval", "--detector", bavit_run / "det", "--model", bavit_run / "run", "--root", coco_synth,
            "--split", "val2017", "--labels", bavit_run / "val.parquet", "--sparsities", "0.25,0.5",
            "--timing-images", "2", "--timing-repeats", "1"]
    res = torchrun(*args, "--out", tmp_path / "two")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("Wrote ") == 1 and res.stderr.count("stage 1/6") == 1  # rank 0 alone reports
    code, _, err = run_cli(*args, "--out", tmp_path / "one")
    assert code == 0, err
    a = list(csv.DictReader(open(tmp_path / "two" / "results.csv")))
    b = list(csv.DictReader(open(tmp_path / "one" / "results.csv")))
    assert len(a) == len(b) == 7  # dense + (bavit, oracle, random) x 2 targets
    def close(x, y):  # numbers within float noise (see below), everything else exactly
        try:
            fx, fy = float(x), float(y)
        except ValueError:
            return x == y
        return (np.isnan(fx) and np.isnan(fy)) or bool(np.isclose(fx, fy, rtol=1e-4, atol=1e-4))

    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        diff = {k: (ra[k], rb[k]) for k in ra if k not in TIMING and not close(ra[k], rb[k])}
        assert not diff, diff
        assert ra["latency_ms"] != "nan"  # rank 0 timed
    files = sorted(p.name for p in (tmp_path / "one" / "detections").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two" / "detections").iterdir()) and len(files) == 7
    # Equal up to float noise, by definition (results.csv's numbers above too, within 1e-4:
    # mAP from detections that agree to 1e-4 moves only if an IoU or score sits that close to
    # a threshold or a tie): a torchrun rank runs with its own thread count
    # (torchrun sets OMP_NUM_THREADS=1), which picks another attention route on CPU
    # (detection/pruned.py), and the same sums round differently. The same detections, in the
    # same order, with boxes and scores within 1e-4 (a shard's images or order mixed up moves
    # them by whole pixels or tenths).
    for f in files:
        two = json.loads((tmp_path / "two" / "detections" / f).read_text())
        one = json.loads((tmp_path / "one" / "detections" / f).read_text())
        assert [(d["image_id"], d["category_id"]) for d in two] == [(d["image_id"], d["category_id"]) for d in one]
        assert np.allclose([d["bbox"] + [d["score"]] for d in two], [d["bbox"] + [d["score"]] for d in one],
                           rtol=1e-4, atol=1e-4)
    ma, mb = (json.loads((tmp_path / d / "meta.json").read_text()) for d in ("two", "one"))
    assert ma["image_ids"] == mb["image_ids"] and ma["per_image_sparsity"].keys() == mb["per_image_sparsity"].keys()
    for row, sp in ma["per_image_sparsity"].items():  # at most one token per image on a threshold (float noise)
        np.testing.assert_allclose(sp, mb["per_image_sparsity"][row], rtol=0, atol=1 / 16 + 1e-9, err_msg=row)
    assert ma["world_size"] == 2 and mb["world_size"] == 1
