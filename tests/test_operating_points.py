"""Operating points (target sparsities, policies, oracle ranking, random counts), timing
statistics, CPU peak memory and known-answer mAP."""
import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch

from bavit_core.data.grid import resample_grid
from bavit_core.detection.selection import (fg_distance, kept_per_image, oracle_keep, oracle_priority, random_keep,
                                            select_target, sparsity_stats)
from bavit_core.evaluate.timing import drift, peak_memory_mb, spread, time_round_robin
from bavit_core.runtime.errors import OptionError


def _probs(n=9, g=(8, 8), seed=0):
    rng = np.random.default_rng(seed)
    p = rng.random((n,) + g)
    p[:, :3] = 1.0  # saturated probabilities: large ties, as a confident BAViT gives
    p[:, -2:] = 0.0
    return p


@pytest.mark.parametrize("target", [0.0, 0.1, 0.2, 0.35, 0.5, 0.6, 0.85, 0.9])
def test_threshold_policy_reaches_the_target_within_one_token_per_image(target):
    p = _probs()
    keep, thr = select_target(p, target, "threshold")
    n, tokens = len(p), p[0].size
    assert abs(sparsity_stats(keep)["sparsity"] - target) <= 1 / tokens
    # a global threshold: every kept token ranks at least as high as every pruned one
    assert p[keep].min() >= p[~keep].max() if (~keep).any() else True
    assert thr == p[keep].min()
    # per-image sparsity varies (dynamic rate) unless nothing or everything is pruned
    s = 1 - keep.reshape(n, -1).mean(1)
    if 0.2 <= target <= 0.6:
        assert s.max() > s.min()


@pytest.mark.parametrize("target", [0.0, 0.1, 0.33, 0.5, 0.85, 0.99])
def test_topk_policy_keeps_the_same_count_in_every_image(target):
    p = _probs()
    keep, thr = select_target(p, target, "topk")
    counts = keep.reshape(len(p), -1).sum(1)
    assert (counts == kept_per_image(target, 64)).all() and math.isnan(thr)
    assert counts[0] == max(1, math.ceil((1 - target) * 64 - 1e-9))
    st = sparsity_stats(keep)
    assert abs(st["sparsity"] - target) <= 1 / 64 and st["sparsity_p10"] == st["sparsity_p90"]
    for i in range(len(p)):  # the kept tokens are the image's highest-probability ones
        assert p[i][keep[i]].min() >= p[i][~keep[i]].max() if (~keep[i]).any() else True


def test_selection_is_deterministic_and_checks_its_inputs():
    p = np.random.default_rng(5).random((9, 8, 8))
    # against a brute-force ranking: the round(0.5 · all tokens) highest priorities overall
    a, thr = select_target(p, 0.5, "threshold", seed=3)
    flat = p.reshape(-1)
    assert len(np.unique(flat)) == flat.size  # no ties: the selection is the ranking's
    n_keep = int(round(0.5 * flat.size))
    ranked = sorted(range(flat.size), key=lambda i: -flat[i])
    ref = np.zeros(flat.size, bool)
    ref[ranked[:n_keep]] = True
    assert np.array_equal(a.reshape(-1), ref) and thr == flat[ranked[n_keep - 1]]
    # ties are broken by the seed alone, not by numpy's global random state
    tied = np.full_like(p, 0.5)
    np.random.seed(1)
    b, _ = select_target(tied, 0.5, "threshold", seed=3)
    np.random.seed(2)
    c, _ = select_target(tied, 0.5, "threshold", seed=3)
    d, _ = select_target(tied, 0.5, "threshold", seed=4)
    assert np.array_equal(b, c) and b.sum() == d.sum() == n_keep and not np.array_equal(b, d)
    with pytest.raises(OptionError, match="unknown policy 'fixed'"):
        select_target(p, 0.5, "fixed")
    with pytest.raises(OptionError, match=r"target sparsity must lie in \[0, 1\); got 1.0"):
        select_target(p, 1.0)


def test_random_keeps_the_reference_count_per_image():
    ref, _ = select_target(_probs(), 0.4, "threshold")
    r = random_keep(ref, [0, 1])
    assert (r.reshape(9, -1).sum(1) == ref.reshape(9, -1).sum(1)).all() and not np.array_equal(r, ref)


def test_fg_distance_and_score_resampling():
    fg = np.zeros((2, 5, 5), bool)
    fg[0, 2, 2] = True
    d = fg_distance(fg)
    assert d[0, 2, 2] == 0 and d[0, 0, 0] == 2 and d[0, 2, 4] == 2 and d[0, 1, 3] == 1
    assert (d[1] == 10).all()  # no FG: the grid's size
    s = np.arange(4, dtype=float).reshape(1, 2, 2)
    assert resample_grid(s, (4, 4), "nearest")[0, 3, 3] == 3
    assert resample_grid(s, (1, 1), "any")[0, 0, 0] == 3


@pytest.fixture(scope="module")
def labels_file(coco_synth, tmp_path_factory):
    from bavit_core.data import open_dataset
    from bavit_core.data.grid import GridSpec
    from bavit_core.labels import LabelOptions, label_dataset

    p = tmp_path_factory.mktemp("op") / "val.parquet"
    aset = open_dataset("coco", root=coco_synth, split="val2017", need_masks=True)
    label_dataset(aset, LabelOptions(source="masks", grid=GridSpec(64, 64, 16)), p)
    return p, aset.image_ids


def test_oracle_ranking_equals_todays_oracle_at_the_gt_share_and_reaches_any_target(labels_file):
    path, ids = labels_file
    grid = (8, 8)  # the 4x4 label grid, upsampled
    ref = oracle_keep(path, ids, grid)
    prio = oracle_priority(path, ids, grid)
    share = 1 - ref.mean()
    keep, _ = select_target(prio, share, "threshold")
    assert np.array_equal(keep, ref)
    for t in (0.1, 0.5, 0.9):
        k, _ = select_target(prio, t, "threshold")
        assert abs(1 - k.mean() - t) <= 1 / 64
        if t < share:  # keeping more than the GT: every FG token stays
            assert k[ref].all()
        else:
            assert not k[~ref].any()


def test_spread_and_drift_known_values():
    assert spread([1.0, 1.0, 1.0]) == 0
    assert spread([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx((4 - 2) / 3)
    assert math.isnan(spread([1.0]))
    assert drift([1.0, 1.0, 2.0, 2.0]) == pytest.approx(1.0)
    assert drift([1.0, 1.1, 1.0, 1.1]) == pytest.approx(0.0)


def test_round_robin_rotates_the_order_and_counts_samples():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    t = time_round_robin(fns, torch.device("cpu"), repeats=3, warmup=1)
    assert {k: len(v) for k, v in t.items()} == {"a": 3, "b": 3, "c": 3}
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")


def test_cpu_peak_memory_counts_the_calls_own_allocations():
    w = torch.ones(2048, 2048)  # exists before the call: not counted

    def f():
        a = torch.ones(1024, 1024)  # 4 MiB
        del a
        b = torch.ones(512, 1024) @ torch.ones(1024, 1024)  # 2 MiB input + 4 MiB ones + 2 MiB output
        return b.sum() + w[0, 0]

    assert peak_memory_mb(f, torch.device("cpu")) == pytest.approx(8.0, abs=0.01)
    seq = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    small = peak_memory_mb(lambda: seq(torch.ones(100, 64)), torch.device("cpu"))
    big = peak_memory_mb(lambda: seq(torch.ones(400, 64)), torch.device("cpu"))
    assert 0 < small < big and big == pytest.approx(4 * small, rel=0.05)


# --------------------------------------------------------------------------- known-answer mAP
def _gt():
    from pycocotools.coco import COCO

    images = [{"id": i, "width": 100, "height": 80} for i in (1, 2, 3)]
    anns = []
    rng = np.random.default_rng(0)
    for i in (1, 2, 3):
        for c in (1, 2):
            x, y = rng.uniform(0, 50), rng.uniform(0, 40)
            w, h = rng.uniform(10, 45), rng.uniform(10, 35)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c, "bbox": [x, y, w, h], "area": w * h,
                         "iscrowd": 0})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt, anns


def test_ground_truth_as_detections_scores_map_one():
    from bavit_core.detection.cocoeval import evaluate_detections

    gt, anns = _gt()
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9} for a in anns]
    stats = evaluate_detections(gt, dets, [1, 2, 3])
    assert stats["map"] == pytest.approx(1.0) and stats["map50"] == pytest.approx(1.0)


def test_perturbed_detections_score_what_pycocotools_itself_gives(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from bavit_core.detection.cocoeval import evaluate_detections

    gt, anns = _gt()
    rng = np.random.default_rng(1)
    dets = []
    for a in anns:
        x, y, w, h = a["bbox"]
        dets.append({"image_id": a["image_id"], "category_id": a["category_id"],
                     "bbox": [x + rng.normal(0, 3), y + rng.normal(0, 3), w * rng.uniform(0.8, 1.2), h], "score": rng.random()})
    dets.append({"image_id": 1, "category_id": 2, "bbox": [0, 0, 20, 20], "score": 0.95})  # a false positive
    ours = evaluate_detections(gt, dets, [1, 2, 3])
    # pycocotools used the documented way, from files
    (tmp_path / "gt.json").write_text(json.dumps(gt.dataset))
    (tmp_path / "dt.json").write_text(json.dumps(dets))
    with contextlib.redirect_stdout(io.StringIO()):
        g = COCO(str(tmp_path / "gt.json"))
        ev = COCOeval(g, g.loadRes(str(tmp_path / "dt.json")), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert 0.2 < ours["map"] < 0.95
    assert [ours[k] for k in ("map", "map50", "map75")] == pytest.approx(list(ev.stats[:3]), abs=1e-12)


def test_rows_evaluated_by_worker_processes_score_what_this_process_does(monkeypatch):
    """prune-eval evaluates its rows in worker processes: each row's stats must be the
    in-process COCOeval's, in row order (catches rows returned out of order or a worker
    indexing a different ground truth)."""
    import bavit_core.detection.cocoeval as C

    gt, anns = _gt()
    rng = np.random.default_rng(2)
    rows = []
    for k in range(4):  # four rows, progressively worse boxes, one empty
        rows.append([] if k == 3 else [
            {"image_id": a["image_id"], "category_id": a["category_id"], "score": float(rng.random()),
             "bbox": [a["bbox"][0] + rng.normal(0, 1 + 4 * k), a["bbox"][1], a["bbox"][2], a["bbox"][3]]}
            for a in anns])
    serial = [C.evaluate_detections(gt, d, [1, 2, 3]) for d in rows]
    assert len({round(s["map"], 6) for s in serial}) == 4
    monkeypatch.setattr("bavit_core.runtime.workers.usable_cores", lambda: 2)
    done = []
    with monkeypatch.context() as mp:  # evaluated here it would raise: the workers did it
        mp.setattr(C, "evaluate_detections", lambda *a: 1 / 0)
        pooled = C.evaluate_many(gt, rows, [1, 2, 3], lambda: done.append(1))
    assert len(done) == 4

    def same(x, y):  # equal, NaN (an area range without objects) included
        return x.keys() == y.keys() and all(x[k] == y[k] or (x[k] != x[k] and y[k] != y[k]) for k in x)

    assert all(same(a, b) for a, b in zip(pooled, serial, strict=True))
    monkeypatch.setattr(C, "PARALLEL_FROM", 10 ** 6)
    assert all(same(a, b) for a, b in zip(C.evaluate_many(gt, rows[:2], [1, 2, 3]), serial[:2], strict=True))
