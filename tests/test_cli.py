import subprocess
import sys

from bavit_cli.main import COMMANDS
from bavit_core import __version__

from .cli_helpers import run_cli


def test_version():
    code, out, _ = run_cli("--version")
    assert (code, out) == (0, f"bavit {__version__}\n")


def test_help_lists_every_command_and_each_has_an_example():
    code, out, _ = run_cli("--help")
    assert code == 0
    for name in COMMANDS:
        assert name in out
        code, sub, _ = run_cli(name, "--help")
        assert code == 0
        assert "Example:" in sub and f"bavit {name}" in sub.split("Example:")[1]


def test_python_dash_m_works():
    res = subprocess.run([sys.executable, "-m", "bavit_cli", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == f"bavit {__version__}"


def test_synth_is_deterministic(tmp_path):
    for d in ("a", "b"):
        code, _, err = run_cli("synth", "--out", tmp_path / d, "--images", "6", "--format", "coco", "--seed", "7",
                               "--size", "64x80")
        assert code == 0, err
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 8  # 5 train + 1 val images + 2 annotation files
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_synth_simple_scenes_keep_shapes_apart_and_inside(tmp_path):
    import json

    import numpy as np
    from pycocotools import mask as mask_utils

    code, _, err = run_cli("synth", "--out", tmp_path, "--images", "30", "--scenes", "simple", "--size", "96",
                           "--val-fraction", "0")
    assert code == 0, err
    doc = json.loads((tmp_path / "annotations/instances_train2017.json").read_text())
    assert doc["info"]["scenes"] == "simple"
    per_image = {}
    for a in doc["annotations"]:
        assert a["iscrowd"] == 0
        x, y, w, h = a["bbox"]
        assert 0 < x and 0 < y and x + w <= 96 and y + h <= 96  # inside, not cut by the border
        assert w >= 0.12 * 96 * 0.5 or h >= 0.12 * 96 * 0.5
        per_image.setdefault(a["image_id"], []).append(a)
    assert len(per_image) == 30 and {len(v) for v in per_image.values()} <= {1, 2, 3}
    assert max(len(v) for v in per_image.values()) > 1
    for anns in per_image.values():  # masks never overlap
        masks = [mask_utils.decode(mask_utils.frPyObjects(a["segmentation"], 96, 96)).max(axis=2) for a in anns]
        assert np.sum(masks, axis=0).max() <= 1
    code, _, err = run_cli("synth", "--out", tmp_path / "x", "--scenes", "busy")
    assert code != 0 and "unknown --scenes 'busy'; choose one of mixed, simple" in err


def test_synth_voc_layout(tmp_path):
    code, _, err = run_cli("synth", "--out", tmp_path, "--images", "5", "--format", "voc", "--size", "64x80")
    assert code == 0, err
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "SegmentationObject"):
        assert len(list((tmp_path / sub).iterdir())) == 5
    assert (tmp_path / "ImageSets/Main/train.txt").read_text().split() == [f"2026_{i:06d}" for i in range(1, 5)]
    assert (tmp_path / "ImageSets/Segmentation/val.txt").read_text().split() == ["2026_000005"]
    import numpy as np
    from PIL import Image
    pngs = [np.asarray(Image.open(p)) for p in (tmp_path / "SegmentationObject").iterdir()]
    assert any((a == 255).any() for a in pngs)
    assert Image.open(next((tmp_path / "SegmentationClass").iterdir())).mode == "P"


def test_cli_reference_is_current():
    from pathlib import Path

    from bavit_cli.docgen import render

    page = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
    assert page.read_text() == render(), "docs/cli.md is stale: run python -m bavit_cli.docgen > docs/cli.md"
    for name in COMMANDS:
        assert f"## bavit {name}\n" in page.read_text()
