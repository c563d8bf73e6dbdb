import csv
import re
import shutil
import subprocess

import pytest

from .cli_helpers import run_cli


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    code, stdout, err = run_cli("demo", "--quick", "--out", out)
    assert code == 0, err
    return out, stdout


def test_demo_quick_runs_every_stage_and_points_at_the_report(demo_dir):
    out, stdout = demo_dir
    for stage in ("synth", "label", "train", "predict", "detector", "prune-eval", "report"):
        assert re.search(rf"✓ {re.escape(stage)}\s", stdout), stage
    assert f"Open {out}/report/index.html" in stdout.replace("\n", "")
    for f in ("data/annotations/instances_val2017.json", "labels_train2017.parquet", "bavit-small/model.safetensors",
              "preds.parquet", "refined.parquet", "results/results.csv", "results/meta.json", "report/index.html"):
        assert (out / f).is_file(), f
    rows = list(csv.DictReader(open(out / "results" / "results.csv")))
    assert [r["selector"] for r in rows] == ["dense", "bavit", "bavit", "oracle", "random", "random"]


def test_demo_results_are_meaningful(demo_dir):
    """The shipped detector detects, and pruning behaves as the paper says: mAP falls as
    sparsity rises, and BAViT's tokens beat random ones at the same sparsity."""
    out, _ = demo_dir
    rows = list(csv.DictReader(open(out / "results" / "results.csv")))
    dense = float(rows[0]["map"])
    assert dense >= 0.5
    bavit = sorted((float(r["sparsity"]), float(r["map"])) for r in rows if r["selector"] == "bavit")
    random = {r["threshold"]: float(r["map"]) for r in rows if r["selector"] == "random"}
    assert [m for _, m in bavit] == sorted((m for _, m in bavit), reverse=True)
    assert all(m <= dense for _, m in bavit)
    for r in rows:
        if r["selector"] == "bavit":
            assert float(r["map"]) >= random[r["threshold"]]


def test_report_tables_figures_and_index(demo_dir):
    out, _ = demo_dir
    rep = out / "report"
    t2 = list(csv.DictReader(open(rep / "table2.csv")))
    assert list(t2[0])[:10] == ["model", "selector", "threshold", "sparsity %", "mAP", "BAViT", "YOLOS", "YOLOS pruned",
                                "YOLOS+BAViT", "% reduction"]
    assert t2[0]["model"] == "YOLOS" and t2[1]["model"] == "BAViT+YOLOS"
    assert (rep / "table2.md").read_text().startswith("| model | selector |")
    t1 = list(csv.DictReader(open(rep / "table1.csv")))
    assert t1[0]["model"] == "BAViT-small" and t1[0]["depth"] == "2"
    html = (rep / "index.html").read_text()
    pngs = sorted(p.name for p in rep.glob("*.png"))
    for name in ("map_vs_sparsity.png", "speedup_vs_sparsity.png", "reduction_vs_map.png", "sparsity_hist.png",
                 "overlay_gt.png", "overlay_pred.png", "sparse_images.png", "postprocess.png", "detections.png"):
        assert name in pngs
    for name in pngs:
        assert f"src='{name}'" in html
        assert (rep / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http://" not in html and "https://" not in html  # static, no network


def test_report_needs_something(tmp_path):
    code, _, err = run_cli("report", "--out", tmp_path)
    assert (code, err.strip()) == (1, "Error: nothing to report: give --results, --train-run or --pred")
    code, _, err = run_cli("report", "--results", tmp_path / "none", "--out", tmp_path / "r")
    assert (code, err.strip()) == (1, f"Error: {tmp_path / 'none' / 'results.csv'}: results file not found "
                                      "(run bavit prune-eval first)")


def test_index_renders_in_a_headless_browser(demo_dir, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not browser:
        pytest.skip("no headless browser installed (apt-get install chromium)")
    out, _ = demo_dir
    shot = tmp_path / "shot.png"
    res = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2000",
                          f"--screenshot={shot}", (out / "report" / "index.html").as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 20_000, res.stderr[-1000:]


def test_report_adds_the_treatment_figure_when_results_hold_several(demo_dir, tmp_path):
    out, _ = demo_dir
    rows = list(csv.DictReader(open(out / "results" / "results.csv")))
    extra = []
    for t, scale in (("pool", 1.1), ("preserve", 1.2)):
        for r in rows:
            if r["selector"] == "bavit":
                extra.append(dict(r, treatment=t, map=str(float(r["map"]) * scale)))
    (tmp_path / "res").mkdir()
    with open(tmp_path / "res" / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows + extra)
    code, _, err = run_cli("report", "--results", tmp_path / "res", "--out", tmp_path / "rep")
    assert code == 0, err
    assert (tmp_path / "rep" / "treatments.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "src='treatments.png'" in (tmp_path / "rep" / "index.html").read_text()
    t2 = list(csv.DictReader(open(tmp_path / "rep" / "table2.csv")))
    assert [r["treatment"] for r in t2 if r["selector"] == "bavit"] == ["drop"] * 2 + ["pool"] * 2 + ["preserve"] * 2
    code, _, err = run_cli("report", "--results", out / "results", "--out", tmp_path / "rep1")
    assert code == 0 and not (tmp_path / "rep1" / "treatments.png").exists()
