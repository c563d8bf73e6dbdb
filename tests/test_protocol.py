"""The input protocol: our dense row is transformers' own processor + model +
post-processing, image by image, under the checkpoint's protocol (each image on its own
grid) and under the square one; images of different sizes batch without artefacts."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from bavit_core.data.ragged import Grids, resample_to
from bavit_core.detection.protocol import input_protocol, write_processor
from bavit_core.detection.pruned import pruned_forward
from bavit_core.detection.selection import select_target, sparsity_stats
from bavit_core.detection.yolos import tiny_yolos_config
from bavit_core.data.grid import resample_grid
from tests.cli_helpers import run_cli

# (h, w) of generated images, and what YOLOS's processor makes of them at shortest edge 64,
# longest 128 (aspect kept, then each side rounded down to a multiple of 16)
SIZES = [(120, 160), (160, 120), (100, 250), (97, 131), (64, 64)]
PROCESSED = [(64, 80), (80, 64), (48, 128), (64, 80), (64, 64)]
NAMES = ("triangle", "rectangle", "ellipse")


def _detector(path, mid=False, processor=True):
    from transformers import YolosForObjectDetection, YolosImageProcessor

    torch.manual_seed(0)
    cfg = tiny_yolos_config("nano", num_labels=len(NAMES) + 1, image_size=(64, 96), use_mid_position_embeddings=mid,
                            id2label={0: "N/A", **{i + 1: n for i, n in enumerate(NAMES)}})
    m = YolosForObjectDetection(cfg).eval()
    with torch.no_grad():  # distinct position embeddings, so a wrong interpolation shows
        m.vit.embeddings.position_embeddings.normal_(0, 0.5)
        for lin in m.class_labels_classifier.layers:  # scores spread over (0, 1), not all ~1/classes
            lin.weight.mul_(8)
        if mid:
            m.vit.encoder.interpolation.mid_position_embeddings.normal_(0, 0.5)
    m.save_pretrained(path)
    if processor:
        YolosImageProcessor(size={"shortest_edge": 64, "longest_edge": 128},
                            image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3]).save_pretrained(path)
    return m


@pytest.fixture(scope="module")
def mixed_coco(tmp_path_factory):
    """A COCO set whose images have different sizes and aspect ratios."""
    root = tmp_path_factory.mktemp("mixed")
    (root / "val2017").mkdir()
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    images, anns = [], []
    for k, (h, w) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "val2017" / f"{k}.png")
        images.append({"id": k + 1, "file_name": f"{k}.png", "height": h, "width": w})
        anns.append({"id": k + 1, "image_id": k + 1, "category_id": 1 + k % 3, "bbox": [2, 3, w / 2, h / 3],
                     "area": w * h / 6, "iscrowd": 0})
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(NAMES)]
    (root / "annotations" / "instances_val2017.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


def hf_detections(det_dir, files, size=None):
    """transformers' own pipeline pieces, one image at a time: the checkpoint's processor
    (``size`` replacing its size rule), the model, post_process_object_detection at
    threshold 0 (every detection token)."""
    from transformers import AutoImageProcessor, YolosForObjectDetection

    proc = AutoImageProcessor.from_pretrained(det_dir)
    model = YolosForObjectDetection.from_pretrained(det_dir).eval()
    out = []
    for f in files:
        im = Image.open(f).convert("RGB")
        kw = {} if size is None else {"size": {"height": size[0], "width": size[1]}}
        inputs = proc(images=im, return_tensors="pt", **kw)
        with torch.no_grad():
            o = model(pixel_values=inputs["pixel_values"])
        r = proc.post_process_object_detection(o, threshold=0.0, target_sizes=[(im.height, im.width)])[0]
        out.append((inputs["pixel_values"].shape[-2:], r))
    return out


def _compare(ours: list[dict], theirs, n_det):
    """Max |box| difference (px) and |score| difference; labels must be equal."""
    box_d = score_d = 0.0
    for i, (_, r) in enumerate(theirs):
        mine = [d for d in ours if d["image_id"] == i + 1]
        assert len(mine) == n_det == len(r["scores"])  # threshold 0 keeps every token
        xyxy = np.array([[b[0], b[1], b[0] + b[2], b[1] + b[3]] for b in (d["bbox"] for d in mine)])
        assert [d["category_id"] for d in mine] == r["labels"].tolist()
        box_d = max(box_d, float(np.abs(xyxy - r["boxes"].numpy()).max()))
        score_d = max(score_d, float(np.abs(np.array([d["score"] for d in mine]) - r["scores"].numpy()).max()))
    return box_d, score_d


@pytest.mark.parametrize("mid", [False, True])
@pytest.mark.parametrize("batch", ["1", "3"])
def test_dense_row_is_transformers_pipeline_under_the_checkpoint_protocol(mixed_coco, tmp_path, mid, batch):
    det = tmp_path / "det"
    _detector(det, mid=mid)
    code, _, err = run_cli("prune-eval", "--detector", det, "--root", mixed_coco, "--split", "val2017",
                           "--selectors", "dense", "--timing-images", "2", "--timing-repeats", "1",
                           "--batch-size", batch, "--out", tmp_path / "r")
    assert code == 0, err
    ours = json.loads((tmp_path / "r" / "detections" / "dense.json").read_text())
    theirs = hf_detections(det, [mixed_coco / "val2017" / f"{k}.png" for k in range(len(SIZES))])
    assert [tuple(s) for s, _ in theirs] == PROCESSED  # HF's rounding, which ours follows by construction
    box_d, score_d = _compare(ours, theirs, 10)
    assert box_d < 0.01 and score_d < 1e-5, (box_d, score_d)
    meta = json.loads((tmp_path / "r" / "meta.json").read_text())
    assert meta["input_protocol"]["protocol"] == "checkpoint"
    assert meta["input_protocol"]["description"] == "checkpoint (shortest edge 64, longest 128)"
    assert meta["detector_size"] is None
    tokens = [(h // 16) * (w // 16) for h, w in PROCESSED]
    assert meta["detector_tokens"] == {"mean": float(np.mean(tokens)), "min": min(tokens), "max": max(tokens)}
    row = next(r for r in _csv(tmp_path / "r") if r["selector"] == "dense")
    assert float(row["yolos_tokens"]) == pytest.approx(2 * np.mean(tokens))  # nano: 2 layers × each image's own


def test_square_protocol_is_transformers_model_on_the_same_squared_pixels(mixed_coco, tmp_path):
    det = tmp_path / "det"
    _detector(det)
    code, _, err = run_cli("prune-eval", "--detector", det, "--root", mixed_coco, "--split", "val2017",
                           "--selectors", "dense", "--timing-images", "0", "--detector-size", "48x64",
                           "--out", tmp_path / "r")
    assert code == 0, err
    ours = json.loads((tmp_path / "r" / "detections" / "dense.json").read_text())
    theirs = hf_detections(det, [mixed_coco / "val2017" / f"{k}.png" for k in range(len(SIZES))], size=(48, 64))
    assert {tuple(s) for s, _ in theirs} == {(48, 64)}
    box_d, score_d = _compare(ours, theirs, 10)
    assert box_d < 0.01 and score_d < 1e-5, (box_d, score_d)
    meta = json.loads((tmp_path / "r" / "meta.json").read_text())
    assert meta["input_protocol"]["description"] == "square 48x64" and meta["detector_size"] == [48, 64]
    assert meta["input_protocol"]["mean"] == [0.5, 0.4, 0.3]  # the normalisation is the processor's


def _csv(d):
    import csv

    with open(d / "results.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("treatment", ["drop", "pool", "preserve"])
@pytest.mark.parametrize("layout", ["pack", "pad"])
def test_images_of_different_sizes_in_one_batch_equal_each_image_alone(tmp_path, treatment, layout):
    m = _detector(tmp_path / "d", mid=True, processor=False)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, h, w, generator=g) for h, w in PROCESSED]
    keeps = [torch.rand((h // 16) * (w // 16), generator=g) < 0.6 for h, w in PROCESSED]
    keeps[-1][:] = True  # one image keeps everything (no pool token for it)
    with torch.no_grad():
        batch = pruned_forward(m, xs, keeps, layout=layout, treatment=treatment)
        for i, (x, k) in enumerate(zip(xs, keeps)):
            one = pruned_forward(m, x[None], k[None], treatment=treatment)
            assert torch.allclose(batch.logits[i], one.logits[0], atol=2e-5)
            assert torch.allclose(batch.pred_boxes[i], one.pred_boxes[0], atol=2e-5)
            assert int(batch.kept[i]) == int(k.sum())
        with pytest.raises(ValueError, match="the detector grid of a 48x128 image has 24"):
            pruned_forward(m, xs, [k[:-1] if i == 2 else k for i, k in enumerate(keeps)])


def test_grids_hold_one_grid_per_image_and_select_like_stacked_arrays():
    rng = np.random.default_rng(0)
    probs = rng.random((5, 4, 4))
    shapes = np.array([(4, 5), (5, 4), (3, 8), (4, 5), (4, 4)])
    g = resample_to(probs, shapes, lambda a, s: resample_grid(a, tuple(s), "nearest"))
    assert [tuple(x.shape) for x in g] == [tuple(s) for s in shapes]
    for i in range(5):  # each image resampled on its own, as a single-image call would
        assert np.array_equal(g[i], resample_grid(probs[i][None], tuple(shapes[i]), "nearest")[0])
    keep, thr = select_target(g, 0.5, "topk")
    assert keep.sums().tolist() == [10, 10, 12, 10, 8]  # ceil((1 - 0.5) · each image's own tokens)
    keep, thr = select_target(g, 0.25, "threshold")
    assert keep.flat.sum() == round(0.75 * g.flat.size)  # one global threshold over every token
    assert keep.flat[g.flat > thr].all() and not keep.flat[g.flat < thr].any()
    st = sparsity_stats(keep)
    assert st["sparsity"] == pytest.approx(float(np.mean([1 - k.mean() for k in keep])))
    # one shape for all: Grids and the stacked array select the same tokens
    same = resample_grid(probs, (4, 5), "nearest")
    a, _ = select_target(same, 0.4, "threshold", seed=2)
    b, _ = select_target(Grids.of(same), 0.4, "threshold", seed=2)
    assert np.array_equal(a, b.stacked())


def test_protocol_from_processor_files(tmp_path):
    det = tmp_path / "det"
    _detector(det)
    p = input_protocol(str(det))
    assert (p.kind, p.size, p.mean, p.std) == ("checkpoint", None, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    assert p.prepare(Image.new("RGB", (250, 100))).shape == (48, 128, 3)
    assert input_protocol(str(det), (32, 48)).describe() == "square 32x48"
    write_processor(det, (32, 64))
    p = input_protocol(str(det))
    assert (p.kind, p.size, p.source) == ("square", (32, 64), str(det / "preprocessor_config.json"))
    (det / "preprocessor_config.json").write_text("{not json")
    from bavit_core.runtime.errors import InputFileError

    with pytest.raises(InputFileError, match="preprocessor_config.json: unreadable image processor config"):
        input_protocol(str(det))
    from bavit_core.runtime.errors import OptionError

    with pytest.raises(OptionError, match="--detector-size 50x64 is not divisible by the detector patch 16"):
        input_protocol(str(tmp_path / "nowhere"), (50, 64))


def test_checkpoint_protocol_on_two_processes_equals_one_process(mixed_coco, tmp_path):
    """Under torchrun each rank decodes its block; the images' own grids are gathered so the
    global (threshold-policy) calibration and the token columns see every image."""
    from bavit_core.data import open_dataset
    from bavit_core.data.grid import GridSpec
    from bavit_core.labels import LabelOptions, label_dataset
    from tests.test_sharded import TIMING, torchrun

    det = tmp_path / "det"
    _detector(det)
    labels = tmp_path / "val.parquet"
    label_dataset(open_dataset("coco", root=mixed_coco, split="val2017"),
                  LabelOptions(source="boxes", grid=GridSpec(64, 64, 16)), labels)
    args = ["prune-eval", "--detector", det, "--root", mixed_coco, "--split", "val2017", "--labels", labels,
            "--sparsities", "0.3,0.6", "--batch-size", "2", "--timing-images", "0"]
    res = torchrun(*args, "--out", tmp_path / "two")
    assert res.returncode == 0, res.stderr[-3000:]
    code, _, err = run_cli(*args, "--out", tmp_path / "one")
    assert code == 0, err
    a, b = _csv(tmp_path / "two"), _csv(tmp_path / "one")
    assert len(a) == len(b) == 3  # dense + oracle at two targets
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k not in TIMING} == {k: v for k, v in rb.items() if k not in TIMING}
    ma, mb = (json.loads((tmp_path / d / "meta.json").read_text()) for d in ("two", "one"))
    assert ma["per_image_sparsity"] == mb["per_image_sparsity"] and ma["detector_tokens"] == mb["detector_tokens"]
    # the oracle at 0.6 keeps 40 % of all tokens; each image its own grid's share
    tokens = np.array([(h // 16) * (w // 16) for h, w in PROCESSED])
    kept = np.round((1 - np.array(mb["per_image_sparsity"]["oracle_s0.60"])) * tokens)
    assert kept.sum() == round(0.4 * tokens.sum())
