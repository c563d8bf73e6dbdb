import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bavit_core import read_labels
from bavit_core.runtime.errors import InputFileError

from .cli_helpers import run_cli


def write_coco(path: Path, images, annotations):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "thing"}]}))
    return path


def test_missing_annotation_file_is_one_clean_line(tmp_path):
    code, out, err = run_cli("label", "--root", tmp_path, "--out", tmp_path / "l.parquet")
    assert code == 1
    assert err.strip() == f"Error: {tmp_path}/annotations/instances_val2017.json: annotation file not found"
    assert "Traceback" not in err
    assert not (tmp_path / "l.parquet").exists()


def test_malformed_json_says_where(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text('{"images": [\n  {"id": 1,, "file_name": "a.jpg"}\n]}')
    code, _, err = run_cli("label", "--ann", f, "--out", tmp_path / "l.parquet")
    assert code == 1
    assert err.startswith(f"Error: {f}: malformed JSON at line 2, column 12")
    assert len(err.strip().splitlines()) == 1


def test_not_a_coco_file(tmp_path):
    f = tmp_path / "x.json"
    f.write_text("[1, 2]")
    code, _, err = run_cli("label", "--ann", f, "--out", tmp_path / "l.parquet")
    assert code == 1 and "not a COCO instances file" in err


def test_problems_are_skipped_counted_and_reported(tmp_path):
    imgdir = tmp_path / "imgs"
    imgdir.mkdir()
    (imgdir / "a.jpg").write_bytes(b"x")
    (imgdir / "c.jpg").write_bytes(b"x")
    ann = write_coco(
        tmp_path / "ann.json",
        images=[
            {"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
            {"id": 2, "file_name": "b.jpg", "width": 64, "height": 48},  # file missing
            {"id": 3, "file_name": "c.jpg", "width": 0, "height": 48},  # bad size
        ],
        annotations=[
            {"id": 1, "image_id": 1, "bbox": [-10, -10, 40, 30], "category_id": 1,
             "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10], [1, 1, 2, 2]]},  # clamped; one short polygon
            {"id": 2, "image_id": 1, "bbox": [5, 5, 0, 10], "category_id": 1, "segmentation": []},  # zero width
            {"id": 3, "image_id": 99, "bbox": [0, 0, 5, 5], "category_id": 1},  # unknown image
            {"id": 4, "image_id": 1, "bbox": [100, 100, 5, 5], "category_id": 1},  # outside
        ],
    )
    out = tmp_path / "l.parquet"
    code, stdout, err = run_cli("label", "--ann", ann, "--images", imgdir, "--input-size", "48x64",
                                "--out", out)
    assert code == 0, err
    for line in ["images listed      │     3", "images labelled    │     1",
                 "skipped: annotation for unknown image │     1",
                 "skipped: box outside image            │     1",
                 "skipped: box with zero or negative size │     1",
                 "skipped: image file missing", "skipped: image with non-positive size",
                 "note: box clamped to image"]:
        assert line.split("│")[0].strip() in stdout
    lab = read_labels(out)
    assert lab.image_ids.tolist() == [1]
    # the clamped box [0,0,30,20] covers the top-left 30x20 px of a 64x48 image: cells of 16 px
    assert lab.grids[0].astype(int).tolist()[:2] == [[1, 1, 0, 0], [0, 0, 0, 0]]
    code, stdout, err = run_cli("label", "--ann", ann, "--images", imgdir, "--input-size", "48x64",
                                "--source", "masks", "--out", out)
    assert code == 0, err
    assert "polygon with fewer than 3 points" in stdout


def test_nothing_usable_is_an_error_and_writes_nothing(tmp_path):
    ann = write_coco(tmp_path / "ann.json", images=[{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10}],
                     annotations=[])
    (tmp_path / "imgs").mkdir()
    code, _, err = run_cli("label", "--ann", ann, "--images", tmp_path / "imgs", "--out", tmp_path / "l.parquet")
    assert code == 1
    assert err.strip() == f"Error: {ann}: no usable images (image file missing: 1)"
    assert not (tmp_path / "l.parquet").exists()


def test_bad_options_are_clean_errors(coco_synth, tmp_path):
    code, _, err = run_cli("label", "--root", coco_synth, "--tau", "1.5", "--out", tmp_path / "l.parquet")
    assert (code, err.strip()) == (1, "Error: --tau must be in [0, 1], got 1.5")
    code, _, err = run_cli("label", "--root", coco_synth, "--input-size", "390", "--out", tmp_path / "l.parquet")
    assert (code, err.strip()) == (1, "Error: input size 390x390 is not divisible by patch size 16")
    code, _, err = run_cli("label", "--dataset", "kitti", "--root", coco_synth)
    assert (code, err.strip()) == (1, "Error: unknown dataset 'kitti'; choose one of coco, voc")


def test_interrupted_write_leaves_no_partial_output(coco_synth, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    out = tmp_path / "l.parquet"
    out.write_bytes(b"previous")

    def boom(table, where, **kw):
        Path(where).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(pq, "write_table", boom)
    code, _, err = run_cli("label", "--root", coco_synth, "--out", out)
    assert code == 130
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["l.parquet"]


def test_voc_bad_xml_and_mismatched_png_are_skipped(voc_synth, tmp_path):
    root = tmp_path / "voc"
    shutil.copytree(voc_synth, root)
    stems = (root / "ImageSets/Segmentation/val.txt").read_text().split()
    (root / "Annotations" / f"{stems[0]}.xml").write_text("<annotation><size>")
    from PIL import Image
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8), mode="P").save(root / "SegmentationObject" / f"{stems[1]}.png")
    code, stdout, err = run_cli("label", "--dataset", "voc", "--root", root, "--source", "masks",
                                "--out", tmp_path / "l.parquet")
    assert code == 0, err
    assert "skipped: unreadable annotation XML" in stdout
    assert "skipped: segmentation PNG size differs from XML" in stdout
    assert len(read_labels(tmp_path / "l.parquet")) == len(stems) - 2


def test_reader_rejects_non_bavit_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"a": [1]}), tmp_path / "x.parquet")
    with pytest.raises(InputFileError, match="not a bavit labels file"):
        read_labels(tmp_path / "x.parquet")
    (tmp_path / "y.parquet").write_text("hello")
    with pytest.raises(InputFileError, match="not a readable parquet file"):
        read_labels(tmp_path / "y.parquet")
