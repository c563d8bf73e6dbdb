"""bavit bench: speed.csv, break-even, latency budgets, the noisy flag, report --speed.

Timings here come from a scripted clock (the timing loop's ``time`` replaced), so every
latency, speedup and flag is known exactly and nothing depends on the machine's load."""
import csv
import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import YolosForObjectDetection

from bavit_core.bavit.model import create_bavit, save_weights
from bavit_core.detection.yolos import tiny_yolos_config
from bavit_core.evaluate import timing
from bavit_core.evaluate.bench import kept_masks, parse_kept
from bavit_core.evaluate.options import PruneEvalOptions, apply_latency_budget
from bavit_core.evaluate.results import CSV_COLUMNS
from bavit_core.evaluate.speedcurve import (SPEED_COLUMNS, crossing, curves, read_speed, sparsity_for_budget,
                                            write_speed_csv)
from bavit_core.report.latency import latency_table, pareto_front
from bavit_core.runtime.errors import InputFileError, OptionError

from .cli_helpers import run_cli


class ScriptedClock:
    """Stands in for the ``time`` module inside timing.py: each read advances by the next
    step, so a timed call lasts exactly one step."""

    def __init__(self, steps):
        self.steps, self.k, self.t, self.c = list(steps), 0, 0.0, 0.0

    def perf_counter(self):
        v = self.t
        self.t += self.steps[self.k % len(self.steps)]
        self.k += 1
        return v

    def process_time(self):
        v = self.c
        self.c += 0.002
        return v


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    YolosForObjectDetection(tiny_yolos_config("nano", num_labels=5, image_size=(64, 64))).save_pretrained(d / "det")
    b = create_bavit(1, input_size=(64, 64))
    (d / "run").mkdir()
    save_weights(b, d / "run" / "model.safetensors")
    (d / "run" / "config.json").write_text(json.dumps({"model": asdict(b.cfg)}))
    return d


def run_bench(tiny, out, *extra):
    return run_cli("bench", "--detector", tiny / "det", "--model", tiny / "run", "--detector-size", "64",
                   "--kept", "0.5,1.0", "--batch-sizes", "1,2", "--pruned-tokens", "drop,pool", "--device", "cpu",
                   "--out", out, *extra)


def test_bench_writes_speed_csv_with_exact_values_from_a_steady_clock(tiny, tmp_path, monkeypatch):
    # every timed call lasts 10 ms: per image 10 / batch ms for every workload
    monkeypatch.setattr(timing, "time", ScriptedClock([0.010]))
    code, out, err = run_bench(tiny, tmp_path / "sp", "--repeats", "3", "--max-repeats", "5")
    assert code == 0, err
    with open(tmp_path / "sp" / "speed.csv") as f:
        assert next(csv.reader(f)) == list(SPEED_COLUMNS)
    rows = read_speed(tmp_path / "sp")
    # per batch: dense, bavit, 2 treatments x 2 kept shares
    kept = lambda v: None if math.isnan(v) else v  # noqa: E731
    assert [(r["workload"], r["treatment"], kept(r["kept"])) for r in rows if r["batch_size"] == 1] == [
        ("dense", "", 1.0), ("bavit", "", None), ("pruned", "drop", 0.5), ("pruned", "drop", 1.0),
        ("pruned", "pool", 0.5), ("pruned", "pool", 1.0)]
    assert len(rows) == 12 and {r["workload"] for r in rows} == {"dense", "bavit", "pruned"}
    for r in rows:
        assert r["n_patches"] == 16 and r["repeats"] == 3  # spreads 0: stops at the least rounds
        assert r["latency_ms"] == pytest.approx(10.0 / r["batch_size"])
        assert r["latency_spread"] == pytest.approx(0, abs=1e-9) and r["noisy"] is False
        if r["workload"] == "pruned":
            assert r["end_to_end_ms"] == pytest.approx(20.0 / r["batch_size"])  # + BAViT's 10 / batch
            assert r["detector_speedup"] == pytest.approx(1.0) and r["speedup"] == pytest.approx(0.5)
            assert r["sparsity"] == pytest.approx(1 - r["kept_tokens"] / 16)
            assert r["kept_tokens"] == pytest.approx(16 * r["kept"])  # the batch's mean keeps the share
    full = [r for r in rows if r["workload"] == "pruned" and r["kept"] == 1.0 and r["treatment"] == "drop"]
    assert all(r["flop_speedup"] == pytest.approx(1.0) for r in full)
    meta = json.loads((tmp_path / "sp" / "meta.json").read_text())
    assert meta["machine"]["torch"] == torch.__version__ and meta["machine"]["cores"] >= 1
    assert meta["noisy"] is False and len(meta["break_even"]) == 4
    assert all(b["how"] == "never" for b in meta["break_even"])  # end to end is never faster here
    assert (tmp_path / "sp" / "speed.png").stat().st_size > 0
    assert "Break-even sparsity (end to end, torch fp32 batch 1 drop): none" in out
    assert "noisy" not in err


def test_noisy_timings_are_flagged_and_warned(tiny, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    monkeypatch.setattr(timing, "time", ScriptedClock(rng.uniform(0.005, 0.02, 97)))
    code, out, err = run_bench(tiny, tmp_path / "sp", "--repeats", "3", "--max-repeats", "4", "--batch-sizes", "1")
    assert code == 0, err
    rows = read_speed(tmp_path / "sp")
    assert all(r["repeats"] == 4 for r in rows)  # spreads stayed large: rounds up to the most
    assert any(r["noisy"] for r in rows)
    assert "Warning: timing is noisy" in err
    assert json.loads((tmp_path / "sp" / "meta.json").read_text())["noisy"] is True


def test_measure_stops_early_only_when_every_spread_is_small(monkeypatch):
    monkeypatch.setattr(timing, "time", ScriptedClock([0.01]))
    s = timing.measure({"a": lambda: None, "b": lambda: None}, torch.device("cpu"), repeats=3, max_repeats=9)
    assert [len(v.wall) for v in s.values()] == [3, 3] and s["a"].median == pytest.approx(0.01)
    # a call lasts the step of its start read: calls alternate 10 and 30 ms, so spreads stay large
    monkeypatch.setattr(timing, "time", ScriptedClock([0.01, 0.01, 0.03, 0.01]))
    s = timing.measure({"a": lambda: None, "b": lambda: None}, torch.device("cpu"), repeats=3, max_repeats=9)
    assert [len(v.wall) for v in s.values()] == [9, 9]
    assert timing.is_noisy(0.05, float("nan"), 0.02) is False and timing.is_noisy(0.02, 0.11) is True


def test_mixed_kept_counts_within_a_batch_keep_the_mean():
    m = kept_masks(0.5, 8, 1024, np.random.default_rng(0))
    counts = m.sum(1)
    assert len(set(counts)) == 8 and counts.min() >= 460 and counts.max() <= 564
    assert abs(counts.mean() - 512) <= 1
    assert kept_masks(1.0, 4, 16, np.random.default_rng(0)).all()  # nothing to spread above 1
    with pytest.raises(OptionError, match=r"--kept must lie in \(0, 1\]"):
        parse_kept("0:1:0.5")


def constructed(tmp_path, bavit=True) -> Path:
    """dense 100 ms; BAViT 10 ms; pruned drop at sparsity 0, .2, .4, .6: 110, 95, 80, 60 ms."""
    base = dict(runtime="torch", device="cpu", dtype="fp32", batch_size=1, n_patches=100, repeats=3,
                latency_spread=0.0, cpu_ms=1.0, cpu_spread=0.0, noisy=False)
    b = 10.0 if bavit else float("nan")
    rows = [dict(base, workload="dense", treatment="", kept=1.0, kept_tokens=100, sparsity=0.0, latency_ms=100.0,
                 end_to_end_ms=100.0, bavit_latency_ms=b)]
    if bavit:
        rows.append(dict(base, workload="bavit", treatment="", latency_ms=10.0, bavit_latency_ms=b))
    for s, ms in ((0.0, 110.0), (0.2, 95.0), (0.4, 80.0), (0.6, 60.0)):
        rows.append(dict(base, workload="pruned", treatment="drop", kept=1 - s, kept_tokens=100 * (1 - s), sparsity=s,
                         latency_ms=ms, end_to_end_ms=ms + (b if bavit else float("nan")), bavit_latency_ms=b,
                         flop_speedup=1 / (1 - s + 1e-9), flop_speedup_end_to_end=1.0))
    d = tmp_path / ("speed" if bavit else "speed_nob")
    d.mkdir()
    (d / "speed.csv").write_text(write_speed_csv(d / "speed.csv", rows))
    return d


def test_break_even_interpolates_exactly_on_a_constructed_curve(tmp_path):
    (c,) = curves(read_speed(constructed(tmp_path)))
    # end to end 120, 105, 90, 70 ms: speedups 0.833, 0.952, 1.111, 1.429; 1.0 is 0.3 of the way 0.2 → 0.4
    s, how = c.break_even()
    assert how == "crossed" and s == pytest.approx(0.26, abs=1e-12)
    (d,) = curves(read_speed(constructed(tmp_path, bavit=False)))
    # detector alone 110, 95, ...: speedups 0.9091, 1.0526 → (1 - 10/11) / (100/95 - 10/11) · 0.2
    assert d.break_even()[0] == pytest.approx(0.2 * (1 - 10 / 11) / (100 / 95 - 10 / 11), abs=1e-12)
    # the sparsity from which it *stays* faster: a dip after a first crossing counts
    assert crossing([0, 0.2, 0.4, 0.6, 0.8], [0.9, 1.1, 0.9, 1.3, 1.5], 1.0) == (pytest.approx(0.45), "crossed")
    assert crossing([0.1, 0.5], [1.2, 1.5], 1.0) == (0.1, "from_start")
    assert math.isnan(crossing([0.1, 0.5], [0.5, 0.9], 1.0)[0])


def test_latency_budget_picks_the_lowest_sparsity_that_meets_it(tmp_path):
    d = constructed(tmp_path)
    (c,) = curves(read_speed(d))
    # end to end 105 ms at 0.2, 90 at 0.4: 100 ms is reached at 0.2 + 5/15 · 0.2 = 0.2667 → target 0.27
    pick = sparsity_for_budget(c, 100.0, str(d))
    assert pick.sparsity == 0.27 and pick.latency_ms == pytest.approx(105 - 0.35 * 15)
    assert sparsity_for_budget(c, 500.0).sparsity == 0.0  # the lowest measured already meets it
    with pytest.raises(OptionError, match=r"no operating point meets --latency-budget 50 ms: the fastest measured "
                                          r"\(torch fp32 batch 1 drop, sparsity 0.60\) takes 70.0 ms/image end to end"):
        sparsity_for_budget(c, 50.0)
    opts = PruneEvalOptions(detector="x", sparsities=[0.5], latency_budget_ms=100.0, speed=str(d))
    assert apply_latency_budget(opts)["sparsity"] == 0.27 and opts.sparsities == [0.27, 0.5]
    apply_latency_budget(opts)  # resolved once
    assert opts.sparsities == [0.27, 0.5]
    alone = PruneEvalOptions(detector="x", latency_budget_ms=100.0, speed=str(d))
    apply_latency_budget(alone)
    assert alone.sparsities == [0.27]  # without --sparsities the budget's target is the sweep
    with pytest.raises(OptionError, match=r"measured no curve for runtime torch, dtype fp32, batch size 8, treatment drop \(it has: "
                                          r"torch fp32 batch 1 drop\)"):
        apply_latency_budget(PruneEvalOptions(detector="x", batch_size=8, latency_budget_ms=100.0, speed=str(d)))


def test_prune_eval_budget_errors_are_one_line(tmp_path):
    d = constructed(tmp_path)
    code, out, err = run_cli("prune-eval", "--detector", tmp_path / "nodet", "--latency-budget", "50", "--speed", d,
                             "--out", tmp_path / "res")
    assert code == 1 and err.startswith("Error: no operating point meets --latency-budget 50 ms") and "Traceback" not in err
    code, out, err = run_cli("prune-eval", "--detector", tmp_path / "nodet", "--latency-budget", "50",
                             "--out", tmp_path / "res")
    assert code == 1 and "--latency-budget and --speed go together" in err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "speed.csv").write_text("a,b\n1,2\n")
    code, out, err = run_cli("prune-eval", "--detector", tmp_path / "nodet", "--latency-budget", "50", "--speed",
                             tmp_path / "bad", "--out", tmp_path / "res")
    assert code == 1 and "speed.csv without column(s) runtime" in err
    assert not (tmp_path / "res").exists()


def test_pareto_front_and_rows_at_their_measured_latency(tmp_path):
    assert pareto_front([10, 20, 15, 30, float("nan")], [0.5, 0.6, 0.4, 0.6, 0.9]).tolist() == [
        True, True, False, False, False]
    d = constructed(tmp_path)
    rows = [dict(selector="dense", treatment="drop", sparsity=0.0, map=0.50, dtype="fp32", batch_size=1),
            dict(selector="bavit", treatment="drop", sparsity=0.3, map=0.45, dtype="fp32", batch_size=1),
            dict(selector="random", treatment="drop", sparsity=0.3, map=0.30, dtype="fp32", batch_size=1),
            dict(selector="bavit", treatment="drop", sparsity=0.5, map=0.40, dtype="fp32", batch_size=1)]
    t = latency_table(rows, str(d))
    # dense 100; bavit at 0.3: (95 + 80) / 2 + 10; random: the detector alone, 87.5; bavit at 0.5: 70 + 10
    assert [o["latency_ms"] for o in t] == pytest.approx([100.0, 97.5, 87.5, 80.0])
    assert [o["pareto"] for o in t] == [True, True, False, True]


def write_results(d: Path, rows: list[dict]) -> Path:
    d.mkdir()
    with open(d / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, 1.0) for c in CSV_COLUMNS})
    return d


def test_report_speed_draws_map_against_measured_latency(tmp_path):
    base = dict(policy="threshold", target="nan", treatment="drop", device="cpu", dtype="fp32", batch_size=1,
                timing_noisy="False", threshold="nan", n_images=4)
    res = write_results(tmp_path / "res", [dict(base, selector="dense", sparsity=0.0, map=0.5),
                                           dict(base, selector="bavit", threshold=0.5, sparsity=0.3, map=0.45)])
    code, out, err = run_cli("report", "--results", res, "--speed", constructed(tmp_path), "--out", tmp_path / "rep")
    assert code == 0, err
    with open(tmp_path / "rep" / "map_vs_latency.csv") as f:
        got = list(csv.DictReader(f))
    assert [(g["selector"], float(g["latency_ms"]), g["pareto"]) for g in got] == [
        ("dense", 100.0, "True"), ("bavit", 97.5, "True")]
    assert (tmp_path / "rep" / "map_vs_latency.png").is_file()
    code, out, err = run_cli("report", "--pred", tmp_path / "p.parquet", "--speed", constructed(tmp_path, bavit=False),
                             "--out", tmp_path / "rep2")
    assert code == 1 and "--speed goes with --results" in err
    code, out, err = run_cli("report", "--results", res, "--speed", tmp_path / "nothing", "--out", tmp_path / "rep3")
    assert code == 1 and "nothing: not found (give the --out directory of bavit bench)" in err and not (tmp_path / "rep3").exists()


def test_read_speed_refuses_a_damaged_file(tmp_path):
    d = constructed(tmp_path)
    text = (d / "speed.csv").read_text().replace("pruned", "prunned", 1)
    (d / "speed.csv").write_text(text)
    with pytest.raises(InputFileError, match="unknown workload 'prunned'"):
        read_speed(d)


def test_prune_eval_times_rows_of_the_same_work_once():
    from bavit_core.detection.selection import random_keep
    from bavit_core.evaluate.speed import _workload_key
    from bavit_core.evaluate.sweep import Row

    rng = np.random.default_rng(0)
    bav = rng.random((3, 4, 4)) < 0.5
    rnd = random_keep(bav, 7)
    assert not np.array_equal(rnd, bav)  # other tokens, the same counts: the same work
    assert _workload_key(Row("bavit", 0.5, bav), 3) == _workload_key(Row("random", 0.5, rnd), 3)
    assert _workload_key(Row("bavit", 0.5, bav), 3) != _workload_key(Row("random", 0.5, rnd, treatment="pool"), 3)
    fewer = bav.copy()
    fewer[0] = False
    fewer[0, 0, 0] = True
    assert _workload_key(Row("bavit", 0.5, bav), 3) != _workload_key(Row("oracle", 0.5, fewer), 3)
    # only the timed images count: images after the first two differ, the key over two does not
    other = bav.copy()
    other[2] = ~other[2]
    assert _workload_key(Row("bavit", 0.5, bav), 2) == _workload_key(Row("oracle", 0.5, other), 2)


@pytest.mark.parametrize("args, message", [
    (("--runtime", "onnx"), "Error: --runtime onnx needs --exported DIR (from bavit export)"),
    (("--batch-sizes", "1,0"), "Error: --batch-sizes must be at least 1, got 0"),
    (("--kept", "0.5,1.5"), "Error: --kept must lie in (0, 1]; got 1.5"),
    (("--dtype", "fp8"), "Error: unknown --dtype 'fp8'; choose one of fp32, bf16, fp16"),
    (("--pruned-tokens", "merge"), "Error: unknown --pruned-tokens 'merge'; choose one of drop, pool, preserve"),
])
def test_bench_bad_options_are_one_line_and_write_nothing(tiny, tmp_path, args, message):
    code, out, err = run_cli("bench", "--detector", tiny / "det", "--out", tmp_path / "sp", *args)
    assert code == 1 and err.strip() == message and not (tmp_path / "sp").exists()
