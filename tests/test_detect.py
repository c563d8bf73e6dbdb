"""bavit detect and PrunedDetector: the same numbers as prune-eval's row (pycocotools on
detections.json), as transformers' own pipeline (dense), as ONNX Runtime; bad images
skipped and counted (or, --strict, one error line and nothing written); an interrupted run
resumed."""
import csv
import json

import numpy as np
import pytest
import torch

from bavit_core.demo import shipped_detector
from bavit_core.detect.outputs import read_detections, read_summary
from bavit_core.detect.run import DetectOptions, detect_images

from .cli_helpers import run_cli
from .random_models import make_bavit_run, spread


def make_run(path, size=(128, 128), seed=3):
    """A random-weight BAViT run directory on the shipped detector's 8x8 grid (no nearest-
    resampling duplicates, so the calibrated threshold has no ties)."""
    return make_bavit_run(path, seed, size)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Scenes of the layout the shipped demo detector was trained on (its mAP is far from 0)."""
    from bavit_core.data.synthetic import synth_dataset

    root = tmp_path_factory.mktemp("detect_scenes")
    synth_dataset(root, n_images=16, fmt="coco", seed=11, size=(120, 160), val_fraction=0.5, scenes="simple")
    make_run(root / "run")
    return root


def _coco_map(ann, dets) -> float:
    """pycocotools' AP of ``dets`` against the annotation file (all its images)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


POINTS = {  # detect's options → prune-eval's options and the row they give
    "dense": ((), ("--selectors", "dense", "--thresholds", "0.5"), "dense"),
    "threshold": (("--threshold", "0.4"), ("--selectors", "bavit", "--thresholds", "0.4"), "bavit"),
    "topk": (("--sparsity", "0.5"), ("--selectors", "bavit", "--sparsities", "0.5", "--policy", "topk"), "bavit"),
    "calibrated": (("--sparsity", "0.6", "--policy", "threshold", "--calibrate-on", "VAL"),
                   ("--selectors", "bavit", "--sparsities", "0.6", "--policy", "threshold"), "bavit"),
}


@pytest.mark.parametrize("point", list(POINTS))
def test_detect_then_cocoeval_gives_prune_evals_row(point, scenes, tmp_path):
    """detect at one operating point, its detections.json scored by pycocotools against the
    annotation file = prune-eval's row at that point (mAP, sparsity, per-image kept tokens).
    Catches: a different token selection, resampling or calibration in detect, another
    input protocol or box scaling, image ids not matching the annotation's by file name."""
    ours, theirs, selector = POINTS[point]
    det = shipped_detector()
    val = scenes / "val2017"
    ann = scenes / "annotations" / "instances_val2017.json"
    model = () if point == "dense" else ("--model", scenes / "run")
    ours = tuple(str(val) if a == "VAL" else a for a in ours)
    code, out, err = run_cli("detect", val, "--detector", det, *model, *ours, "--score-threshold", "0",
                             "--no-overlays", "--batch-size", "3", "--device", "cpu", "--out", tmp_path / "d")
    assert code == 0, err
    code, _, err = run_cli("prune-eval", "--detector", det, *model, "--root", scenes, "--split", "val2017", *theirs,
                           "--timing-images", "0", "--batch-size", "4", "--device", "cpu", "--out", tmp_path / "pe")
    assert code == 0, err
    row = next(r for r in csv.DictReader(open(tmp_path / "pe" / "results.csv")) if r["selector"] == selector)
    dets = read_detections(tmp_path / "d", ann=ann)
    assert len(dets) == 8 * 10  # every detection token of the 8 images (score threshold 0)
    assert _coco_map(ann, dets) == pytest.approx(float(row["map"]), abs=1e-6)
    assert float(row["map"]) > 0.2  # a real detector: equality of zeros would prove nothing
    summary = read_summary(tmp_path / "d")
    assert np.mean([r["sparsity"] for r in summary]) == pytest.approx(float(row["sparsity"]), abs=1e-6)
    meta = json.loads((tmp_path / "pe" / "meta.json").read_text())
    pe_sparsity = dict(zip(meta["image_ids"], next(iter(meta["per_image_sparsity"].values()))))
    for r in summary:  # image ids from the COCO file names
        assert r["sparsity"] == pytest.approx(pe_sparsity[r["image_id"]], abs=1e-4)
    if point == "calibrated":  # the threshold placed on the same images is prune-eval's reached one
        cal = json.loads((tmp_path / "d" / "detect.json").read_text())["calibration"]
        assert cal["images"] == 8 and cal["threshold"] == pytest.approx(float(row["threshold"]), abs=1e-5)
        assert 0.55 < cal["sparsity_reached"] < 0.65


def test_dense_detect_equals_transformers_pipeline(coco_named, tmp_path):
    """Dense detect on a hub-faithful yolos-tiny (its processor: shortest edge 512, aspect
    kept) = transformers' processor + model + post-processing (boxes 0.01 px, scores 1e-5)
    and transformers.pipeline("object-detection") (which truncates boxes to whole pixels).
    The library call on PIL images and arrays gives what the CLI wrote for the files.
    Catches: our own resize or normalisation, boxes scaled to the input instead of the
    original image, an off-by-one label (the "no object" class), a score threshold of >=."""
    from PIL import Image
    from transformers import AutoImageProcessor, YolosForObjectDetection, pipeline

    from bavit_core import PrunedDetector

    from .hub_fixtures import build_hub_yolos

    det = build_hub_yolos("yolos-tiny", tmp_path / "tiny", layers=2, hidden=48)
    spread_model = spread(YolosForObjectDetection.from_pretrained(str(det)), 5)  # tokens that differ: no score ties
    spread_model.save_pretrained(tmp_path / "spread")
    (det / "model.safetensors").write_bytes((tmp_path / "spread" / "model.safetensors").read_bytes())
    files = sorted((coco_named / "val2017").iterdir())[:2]
    code, _, err = run_cli("detect", *files, "--detector", det, "--score-threshold", "0.001", "--no-overlays",
                           "--device", "cpu", "--out", tmp_path / "d")
    assert code == 0, err
    ours = json.loads((tmp_path / "d" / "detections.json").read_text())
    proc = AutoImageProcessor.from_pretrained(str(det))
    model = YolosForObjectDetection.from_pretrained(str(det)).eval()
    pipe = pipeline("object-detection", model=str(det), device="cpu")
    lib = PrunedDetector.load(detector=str(det), device="cpu", score_threshold=0.001)
    from_pil = lib([Image.open(f) for f in files])
    from_array = lib([np.asarray(Image.open(f).convert("RGB")) for f in files])
    for k, f in enumerate(files):
        image = Image.open(f).convert("RGB")
        mine = [d for d in ours if d["file_name"] == f.name]
        with torch.no_grad():
            outputs = model(**proc(images=image, return_tensors="pt"))
        ref = proc.post_process_object_detection(outputs, threshold=0.001, target_sizes=[image.size[::-1]])[0]
        order = torch.argsort(-ref["scores"])
        assert len(mine) == len(order) > 0
        got = np.array([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in mine)])
        np.testing.assert_allclose(got, ref["boxes"][order].numpy(), atol=0.01, rtol=0)
        np.testing.assert_allclose([d["score"] for d in mine], ref["scores"][order].numpy(), atol=1e-5, rtol=0)
        assert [d["category_id"] for d in mine] == ref["labels"][order].tolist()
        assert [d["label"] for d in mine] == [model.config.id2label[int(c)] for c in ref["labels"][order]]
        theirs = sorted(pipe(image, threshold=0.001), key=lambda d: -d["score"])
        assert [d["label"] for d in mine] == [d["label"] for d in theirs]
        want = np.array([[b["box"][c] for c in ("xmin", "ymin", "xmax", "ymax")] for b in theirs])
        near = np.abs(got - np.round(got)) < 0.01  # within our tolerance of a pixel edge: either side
        assert np.all((np.trunc(got) == want) | (near & (np.abs(got - want) <= 1)))
        for r in (from_pil[k], from_array[k]):
            np.testing.assert_allclose(r.boxes, got, atol=1e-4, rtol=0)
            assert r.keep.all() and r.sparsity == 0 and r.size == (image.size[1], image.size[0])


def test_onnx_runtime_gives_the_torch_detections(tmp_path, coco_synth):
    """--runtime onnx (bavit.onnx + detector.onnx from bavit export) = the PyTorch forward
    within 1e-4 (scores; boxes 1e-4 of the image width), the same kept tokens. Catches: the
    exported graphs fed other inputs (normalisation, size), keep masks misrouted."""
    pytest.importorskip("onnxruntime")
    from .test_export import make_bavit_run, make_detector

    det = make_detector(tmp_path / "det", True, (48, 48), 1)
    run = make_bavit_run(tmp_path / "run", 3)
    code, _, err = run_cli("export", "--detector", det, "--model", run, "--detector-size", "64", "--threshold", "0.5",
                           "--out", tmp_path / "onnx")
    assert code == 0, err
    common = ("detect", coco_synth / "val2017", "--detector", det, "--model", run, "--detector-size", "64",
              "--threshold", "0.5", "--score-threshold", "0", "--no-overlays", "--device", "cpu")
    code, _, err = run_cli(*common, "--out", tmp_path / "t")
    assert code == 0, err
    code, out, err = run_cli(*common, "--runtime", "onnx", "--exported", tmp_path / "onnx", "--out", tmp_path / "o")
    assert code == 0, err
    assert "onnx" in out
    a, b = (json.loads((tmp_path / k / "detections.json").read_text()) for k in ("t", "o"))
    assert len(a) == len(b) == 10 * 10
    assert [(x["file_name"], x["category_id"]) for x in a] == [(y["file_name"], y["category_id"]) for y in b]
    np.testing.assert_allclose([x["score"] for x in a], [y["score"] for y in b], atol=1e-4, rtol=0)
    np.testing.assert_allclose([x["bbox"] for x in a], [y["bbox"] for y in b], atol=1e-4 * 160, rtol=0)
    sa, sb = read_summary(tmp_path / "t"), read_summary(tmp_path / "o")
    assert [r["kept_tokens"] for r in sa] == [r["kept_tokens"] for r in sb]
    assert 0 < np.mean([r["sparsity"] for r in sa]) < 1


@pytest.fixture()
def mixed(scenes, tmp_path):
    """Four good images, a text file named .jpg and a truncated PNG (its header reads)."""
    from PIL import Image

    d = tmp_path / "mixed"
    d.mkdir()
    for f in sorted((scenes / "val2017").iterdir())[:4]:
        (d / f.name).symlink_to(f)
    (d / "notes.jpg").write_text("not an image")
    buf = tmp_path / "full.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(buf)
    (d / "cut.png").write_bytes(buf.read_bytes()[:2000])
    return d


def test_unreadable_images_are_skipped_and_counted(mixed, tmp_path):
    code, out, err = run_cli("detect", mixed, "--detector", shipped_detector(), "--device", "cpu", "--batch-size", "4",
                             "--out", tmp_path / "d")
    assert code == 0, err
    assert "Skipped 2 unreadable image(s) (listed in detect.json); first: " in err
    names = {d["file_name"] for d in json.loads((tmp_path / "d" / "detections.json").read_text())}
    assert len(read_summary(tmp_path / "d")) == 4 and names <= {f.name for f in mixed.iterdir() if f.suffix == ".jpg"}
    skipped = json.loads((tmp_path / "d" / "detect.json").read_text())["skipped"]
    assert sorted(s["file"].rsplit("/", 1)[1] for s in skipped) == ["cut.png", "notes.jpg"]
    assert len(list((tmp_path / "d" / "overlays").iterdir())) == 4


def test_strict_makes_an_unreadable_image_one_error_and_writes_nothing(mixed, tmp_path):
    code, out, err = run_cli("detect", mixed, "--detector", shipped_detector(), "--device", "cpu", "--strict",
                             "--out", tmp_path / "d")
    assert code == 1 and err == f"Error: {mixed / 'notes.jpg'}: unreadable image (UnidentifiedImageError)\n"
    assert not (tmp_path / "d").exists()
    (mixed / "notes.jpg").unlink()  # the truncated PNG passes the header check, fails on decoding
    code, out, err = run_cli("detect", mixed, "--detector", shipped_detector(), "--device", "cpu", "--strict",
                             "--batch-size", "8", "--out", tmp_path / "d")
    # (off a terminal, progress lines of the stages that finished come first)
    assert code == 1 and err.count("Error:") == 1 and "Traceback" not in err
    assert err.splitlines()[-1] == f"Error: {mixed / 'cut.png'}: unreadable image (OSError)"
    assert not (tmp_path / "d" / "detections.json").exists() and not (tmp_path / "d" / "summary.csv").exists()


def test_an_interrupted_run_resumes_and_a_rerun_adds_only_new_images(scenes, tmp_path):
    """Stopped after its first batch, the rerun detects only the rest and writes what one
    uninterrupted run writes; with other settings the directory is refused."""
    common = dict(model=str(scenes / "run"), detector=str(shipped_detector()), sparsity=0.5, device="cpu",
                  batch_size=3, score_threshold=0.0, overlays=False)
    val = str(scenes / "val2017")
    whole = detect_images(DetectOptions(images=[val], out=str(tmp_path / "whole"), **common))
    assert whole["new_images"] == 8

    def stop_after_first_batch(advance, total):
        if advance:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        detect_images(DetectOptions(images=[val], out=str(tmp_path / "d"), **common), stop_after_first_batch)
    assert not (tmp_path / "d" / "detections.json").exists()
    again = detect_images(DetectOptions(images=[val], out=str(tmp_path / "d"), **common))
    assert (again["resumed_images"], again["new_images"], again["n_images"]) == (3, 5, 8)
    strip = lambda p: [{k: v for k, v in r.items() if not k.endswith("_ms")} for r in read_summary(p)]  # noqa: E731
    assert strip(tmp_path / "d") == strip(tmp_path / "whole")
    assert (tmp_path / "d" / "detections.json").read_text() == (tmp_path / "whole" / "detections.json").read_text()
    third = detect_images(DetectOptions(images=[val], out=str(tmp_path / "d"), **common))
    assert (third["resumed_images"], third["new_images"]) == (8, 0)
    code, _, err = run_cli("detect", val, "--model", scenes / "run", "--detector", shipped_detector(), "--sparsity",
                           "0.3", "--device", "cpu", "--out", tmp_path / "d")
    assert code == 1 and err == (f"Error: --out {tmp_path / 'd'} holds detections made with another operating point; "
                                 "name a new --out directory (or remove it) to run with these settings\n")


def test_overlay_dims_exactly_the_pruned_patches(scenes, tmp_path):
    """On an image of the detector's own input size every grid cell is one 16-px patch:
    pruned cells come out at DIM brightness, kept ones untouched (no boxes drawn)."""
    from PIL import Image

    from bavit_core import PrunedDetector
    from bavit_core.detect.outputs import DIM, draw_overlay

    det = PrunedDetector.load(model=scenes / "run", detector=str(shipped_detector()), sparsity=0.5, device="cpu")
    image = Image.open(sorted((scenes / "val2017").iterdir())[0]).convert("RGB").resize((128, 128))
    [r] = det([image], score_threshold=1.0)
    assert r.keep.shape == (8, 8) and r.kept == 32 and len(r.boxes) == 0
    got = np.asarray(draw_overlay(image, r), dtype=np.float64)
    src = np.asarray(image, dtype=np.float64)
    want = src * np.where(np.kron(r.keep, np.ones((16, 16))).astype(bool)[..., None], 1.0, DIM)
    assert np.abs(got - want).max() <= 1.0  # uint8 truncation


@pytest.mark.parametrize("args, message", [
    (("--threshold", "0.4"), "Error: --threshold and --sparsity choose BAViT's tokens: they need --model RUN"),
    (("--model", "RUN", "--sparsity", "0.5", "--policy", "threshold"),
     "Error: --sparsity with --policy threshold needs a calibration set (--calibrate-on IMAGES) to place its "
     "threshold; or use --policy topk"),
    (("--model", "RUN", "--sparsity", "1.5"), "Error: --sparsity must lie in [0, 1); got 1.5"),
    (("--runtime", "onnx"), "Error: --runtime onnx needs --exported DIR (from bavit export)"),
    (("--batch-size", "0"), "Error: --batch-size must be at least 1, got 0"),
])
def test_bad_options_are_one_line_before_any_work(args, message, scenes, tmp_path):
    args = tuple(str(scenes / "run") if a == "RUN" else a for a in args)
    code, _, err = run_cli("detect", scenes / "val2017", "--detector", shipped_detector(), *args, "--device", "cpu",
                           "--out", tmp_path / "d")
    assert (code, err) == (1, message + "\n")
    assert not (tmp_path / "d").exists()


def test_bad_image_arguments(scenes, tmp_path):
    def err_of(*images, out=tmp_path / "d"):
        code, _, err = run_cli("detect", *images, "--detector", shipped_detector(), "--device", "cpu", "--out", out)
        assert code == 1 and err.count("\n") == 1, err
        return err.strip()

    assert err_of(tmp_path / "nope.jpg") == \
        f"Error: {tmp_path / 'nope.jpg'}: not found (expected an image, a folder or a glob pattern)"
    (tmp_path / "empty").mkdir()
    assert err_of(tmp_path / "empty") == \
        f"Error: {tmp_path / 'empty'}: no images (.jpg, .jpeg, .png, .bmp, .webp) in this folder"
    assert err_of(f"{tmp_path}/*.png") == f"Error: {tmp_path}/*.png: the pattern matches no image files"
    img = sorted((scenes / "val2017").iterdir())[0]
    assert err_of(img, out=img) == f"Error: --out {img} would overwrite the input {img}; choose another output path"
    assert not (tmp_path / "d").exists()
