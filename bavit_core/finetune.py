"""Sparse fine-tuning of YOLOS (the paper's "YOLOS-F") and small YOLOS from scratch.

Training runs the same pruned forward as prune-eval: each image's BG tokens (from the
GT labels or from a BAViT run at a threshold) are left out of every layer. The loss is
the DETR set loss that transformers ships for YOLOS (Hungarian matching, CE, L1, GIoU),
called through ``model.loss_function``. Output: HF layout (``save_pretrained``), best in
the run directory itself (so ``prune-eval --detector RUN`` loads it), last in ``last/``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import __version__
from .cocoeval import coco_ground_truth, detections_from_outputs, evaluate_detections, voc_category_map
from .datasets import AnnotationSet, open_dataset
from .dense_aux import dense_aux_loss
from .detector import (IMAGE_MEAN, IMAGE_STD, detector_grid, init_encoder_from_bavit, init_new_yolos, load_detector,
                       pruned_forward, tiny_yolos_config)
from .distributed import Dist
from .errors import InputFileError, OptionError
from .fileio import atomic_path, atomic_write_text
from .grid import resample_grid
from .images import load_image_sizes, resolve_paths, to_input
from .labels import read_labels
from .model import load_bavit
from .predict import fg_from_probs, infer_probs
from .train import TrainingDiverged, epoch_order, resolve_device

SELECTORS = ("none", "oracle", "bavit")
STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"
OPTIONS_FILE = "finetune.json"


@dataclass
class FinetuneOptions:
    dataset: str = "coco"
    root: str | None = None
    split: str | None = None
    ann: str | None = None
    images: str | None = None
    val_split: str | None = None
    val_labels: str | None = None
    val_fraction: float = 0.1
    detector: str | None = None
    from_scratch: bool = False
    detector_config: str = "micro"
    num_detection_tokens: int | None = None
    init_encoder: str | None = None  # with from_scratch: a BAViT run whose layers start the encoder
    dense_aux: float = 0.0  # weight of the per-token auxiliary loss (dense_aux.py); 0 = off
    detector_size: tuple = (512, 512)
    selector: str = "none"
    labels: str | None = None
    model: str | None = None
    threshold: float = 0.5
    resample: str = "nearest"
    epochs: int | None = 30  # None on resume: keep the run's own
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    schedule: str = "cosine"
    step_size: int = 20
    gamma: float = 0.1
    clip_grad: float = 0.1
    flip: bool = True
    seed: int = 0
    amp: bool = True
    device: str = "auto"
    max_images: int | None = None
    out: str = "detectors/yolos-F"

    def validate(self):
        if self.selector not in SELECTORS:
            raise OptionError(f"unknown --selector {self.selector!r}; choose one of {', '.join(SELECTORS)}")
        if self.selector == "oracle" and not self.labels:
            raise OptionError("--selector oracle needs --labels PARQUET")
        if self.selector == "bavit" and not self.model:
            raise OptionError("--selector bavit needs --model RUN")
        if not self.from_scratch and not self.detector:
            raise OptionError("give --detector NAME|DIR to fine-tune, or --from-scratch --detector-config NAME")
        if self.from_scratch and self.detector:
            raise OptionError("--from-scratch builds a new detector: drop --detector")
        if self.init_encoder and not self.from_scratch:
            raise OptionError("--init-encoder starts a new detector's encoder: it needs --from-scratch")
        if self.dense_aux < 0:
            raise OptionError(f"--dense-aux must be >= 0, got {self.dense_aux}")
        if self.epochs is None or self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise OptionError("--epochs, --batch-size and --lr must be positive")
        if self.schedule not in ("cosine", "step"):
            raise OptionError("--schedule must be cosine or step")
        if not 0.0 <= self.threshold <= 1.0:
            raise OptionError(f"--threshold must be in [0, 1], got {self.threshold}")


@dataclass
class _Data:
    images: np.ndarray  # (N, h, w, 3) uint8 at the detector size
    targets: list  # per image: (labels (n,), boxes (n, 4) normalised cx, cy, w, h)
    keep: np.ndarray | None  # (N, gh, gw) bool or None
    ids: np.ndarray
    widths: np.ndarray
    heights: np.ndarray


def _label_map(aset: AnnotationSet, model_cfg=None) -> dict[int, int]:
    """Dataset category id → detector label id. COCO: identical ids. VOC: by class name."""
    if aset.kind == "coco":
        return {c: c for c in set(aset.box_category.tolist()) | set(aset.categories)}
    if model_cfg is not None:
        return voc_category_map(aset, model_cfg.id2label)
    names = sorted(set(aset.categories.values()))
    return {cid: names.index(n) + 1 for cid, n in aset.categories.items()}


def _prepare(aset: AnnotationSet, idx: np.ndarray, size, label_map, keep_sel, paths) -> _Data:
    """Decode each image once: detector-size pixels, box targets, and the kept-token grid
    (the BAViT selector gets BAViT-size copies from the same decode)."""
    keep_fn, keep_size = keep_sel if keep_sel else (None, None)
    sizes = [size] + ([keep_size] if keep_size else [])
    n = len(idx)
    imgs = np.empty((n, size[0], size[1], 3), dtype=np.uint8)
    small = np.empty((n, keep_size[0], keep_size[1], 3), dtype=np.uint8) if keep_size else None
    for k, i in enumerate(idx):
        resized = load_image_sizes(paths[i], sizes)
        imgs[k] = resized[0]
        if small is not None:
            small[k] = resized[1]
    targets = []
    use = ~aset.box_crowd & ~aset.box_difficult
    for i in idx:
        sel = np.flatnonzero((aset.box_image == i) & use)
        b = aset.boxes[sel]
        w, h = float(aset.widths[i]), float(aset.heights[i])
        cxcywh = np.stack([(b[:, 0] + b[:, 2]) / 2 / w, (b[:, 1] + b[:, 3]) / 2 / h,
                           (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h], axis=1) if len(b) else np.zeros((0, 4))
        labels = np.array([label_map.get(int(c), -1) for c in aset.box_category[sel]], dtype=np.int64)
        ok = labels >= 0
        targets.append((labels[ok], cxcywh[ok].astype(np.float32)))
    keep = keep_fn(idx, small) if keep_fn else None
    return _Data(imgs, targets, keep, aset.image_ids[idx], aset.widths[idx], aset.heights[idx])


def _keep_fn(opts: FinetuneOptions, aset, grid, device, labels_path):
    """(function(idx, bavit_inputs) → kept grids, BAViT input size or None), or None for dense."""
    if opts.selector == "none":
        return None
    if opts.selector == "oracle":
        lab = read_labels(labels_path)

        def oracle(idx, _inputs):
            return resample_grid(lab.grids_for(aset.image_ids[idx], labels_path), grid, opts.resample)

        return oracle, None
    bavit = load_bavit(opts.model, device=device)

    def from_bavit(idx, inputs):
        probs = infer_probs(bavit, inputs, 32, device)
        return resample_grid(fg_from_probs(probs, opts.threshold), grid, opts.resample)

    return from_bavit, (bavit.cfg.input_h, bavit.cfg.input_w)


def _build_model(opts: FinetuneOptions, aset, device, resume_dir: Path | None):
    from transformers import YolosForObjectDetection

    if resume_dir is not None:
        return YolosForObjectDetection.from_pretrained(str(resume_dir / "last"), attn_implementation="sdpa").to(device)
    if opts.from_scratch:
        lm = _label_map(aset)
        n_labels = max(lm.values()) + 1
        names = {lab: aset.categories.get(cid, str(cid)) for cid, lab in lm.items()}
        if aset.kind == "voc":
            names = {lab: n for lab, n in zip(range(1, n_labels), sorted(set(aset.categories.values())))}
        id2label = {i: names.get(i, "N/A") for i in range(n_labels)}
        over = {}
        if opts.num_detection_tokens:
            over["num_detection_tokens"] = opts.num_detection_tokens
        cfg = tiny_yolos_config(opts.detector_config, num_labels=n_labels, image_size=tuple(opts.detector_size),
                                id2label=id2label, label2id={v: k for k, v in id2label.items()}, **over)
        torch.manual_seed(opts.seed)
        model = YolosForObjectDetection(cfg)
        init_new_yolos(model, opts.seed)
        if opts.init_encoder:
            init_encoder_from_bavit(model, load_bavit(opts.init_encoder))
        return model.to(device)
    model = load_detector(opts.detector, device)
    model.train()
    return model


def _lr_factor(opts: FinetuneOptions, step: int, steps_per_epoch: int) -> float:
    warm = opts.warmup_epochs * steps_per_epoch
    if warm > 0 and step < warm:
        return (step + 1) / warm
    if opts.schedule == "step":
        return opts.gamma ** ((step // steps_per_epoch) // opts.step_size)
    total = opts.epochs * steps_per_epoch
    t = (step - warm) / max(total - warm, 1)
    return 0.5 * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0)))


def _batch(data: _Data, b, flips, device):
    x = to_input(data.images[b], IMAGE_MEAN, IMAGE_STD, device)
    keep = None if data.keep is None else torch.as_tensor(data.keep[b], device=device)
    targets = []
    for k, i in enumerate(b):
        labels, boxes = data.targets[i]
        boxes = torch.as_tensor(boxes, device=device)
        if flips is not None and flips[i]:
            boxes = boxes.clone()
            boxes[:, 0] = 1.0 - boxes[:, 0]
        targets.append({"class_labels": torch.as_tensor(labels, device=device), "boxes": boxes})
    if flips is not None:
        f = torch.as_tensor(flips[b], device=device)
        if f.any():
            x[f] = x[f].flip(-1)
            if keep is not None:
                keep[f] = keep[f].flip(-1)
    return x, keep, targets


@torch.no_grad()
def evaluate_map(model, data: _Data, gt, batch_size, device, dist: Dist) -> dict:
    model.eval()
    dets = []
    idx = np.arange(len(data.ids))[dist.rank::dist.world]
    for s in range(0, len(idx), batch_size):
        b = idx[s:s + batch_size]
        x = to_input(data.images[b], IMAGE_MEAN, IMAGE_STD, device)
        keep = None if data.keep is None else torch.as_tensor(data.keep[b], device=device)
        out = pruned_forward(model, x, keep)
        dets += detections_from_outputs(out.logits, out.pred_boxes, data.ids[b], data.widths[b], data.heights[b])
    if dist.enabled:
        gathered = [None] * dist.world
        torch.distributed.all_gather_object(gathered, dets)
        dets = [d for part in gathered for d in part]
    model.train()
    return evaluate_detections(gt, dets, data.ids)


def _save_hf(model, dest: Path):
    """save_pretrained into a temp dir beside ``dest``, then swap files in atomically."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".save-", dir=dest.parent if dest.parent.exists() else None))
    try:
        model.save_pretrained(tmp)
        for f in tmp.iterdir():
            os.replace(f, dest / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def finetune(opts: FinetuneOptions, resume: bool = False, on_step: Callable[[int, int], None] | None = None,
             on_epoch: Callable[[dict], None] | None = None) -> dict:
    out = Path(opts.out)
    if resume:
        f = out / OPTIONS_FILE
        if not f.is_file() or not (out / STATE_FILE).is_file():
            raise InputFileError(out, "cannot resume: not an interrupted bavit finetune run")
        saved = json.loads(f.read_text())["options"]
        saved["detector_size"] = tuple(saved["detector_size"])
        given = opts
        opts = FinetuneOptions(**saved)
        if given.epochs is not None:  # a resumed run may be extended
            opts.epochs = given.epochs
        opts.device, opts.out = given.device, str(out)
    opts.validate()
    device = Dist.local_device(resolve_device(opts.device))
    dist = Dist(device)
    try:
        return _finetune(opts, resume, device, dist, on_step, on_epoch)
    finally:
        dist.close()


def _finetune(opts, resume, device, dist, on_step, on_epoch):
    out = Path(opts.out)
    aset = open_dataset(opts.dataset, root=opts.root, split=opts.split, ann=opts.ann, images=opts.images)
    img_dir = aset.images_dir
    _, missing = resolve_paths(img_dir, aset.file_names)
    all_paths = [img_dir / n for n in aset.file_names]
    present = np.setdiff1d(np.arange(aset.n_images), missing)
    if opts.max_images:
        present = present[: opts.max_images]
    if len(present) == 0:
        raise InputFileError(img_dir, "none of the dataset's images is there")
    model = _build_model(opts, aset, device, out if resume else None)
    label_map = _label_map(aset, None if opts.from_scratch or aset.kind == "coco" else model.config)
    size = tuple(opts.detector_size)
    grid = detector_grid(model, size)
    bad = [c for c in label_map.values() if c >= model.config.num_labels]
    if bad:
        raise OptionError(f"category id {bad[0]} is outside the detector's {model.config.num_labels} labels")

    # splits
    val_aset, val_idx, val_paths = None, None, None
    if opts.val_split:
        val_aset = open_dataset(opts.dataset, root=opts.root, split=opts.val_split)
        _, vmiss = resolve_paths(val_aset.images_dir, val_aset.file_names)
        val_idx = np.setdiff1d(np.arange(val_aset.n_images), vmiss)
        val_paths = [val_aset.images_dir / n for n in val_aset.file_names]
        train_idx = present
    elif opts.val_fraction > 0 and len(present) >= 4:
        perm = np.random.default_rng([opts.seed, 777]).permutation(present)
        n_val = max(1, int(round(len(perm) * opts.val_fraction)))
        val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        val_aset, val_paths = aset, all_paths
    else:
        train_idx = present

    keep_fn = _keep_fn(opts, aset, grid, device, opts.labels)
    train = _prepare(aset, train_idx, size, label_map, keep_fn, all_paths)
    val = gt = None
    if val_aset is not None:
        vkeep = _keep_fn(opts, val_aset, grid, device, opts.val_labels or opts.labels)
        vmap = _label_map(val_aset, None if opts.from_scratch or val_aset.kind == "coco" else model.config)
        val = _prepare(val_aset, val_idx, size, vmap, vkeep, val_paths)
        gt = coco_ground_truth(val_aset, val.ids, vmap if val_aset.kind == "voc" else None)

    n = len(train.ids)
    per_rank = n // dist.world
    if per_rank == 0:
        raise OptionError(f"{n} training images cannot be shared by {dist.world} processes")
    steps_per_epoch = math.ceil(per_rank / opts.batch_size)
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    optim = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    amp = opts.amp and device.type == "cuda" and torch.cuda.is_bf16_supported()
    start_epoch, best, rows = 0, -1.0, []
    if resume:
        state = torch.load(out / STATE_FILE, map_location="cpu", weights_only=True)
        optim.load_state_dict(state["optimizer"])
        start_epoch, best = int(state["epoch"]) + 1, float(state["best"])
        rows = [json.loads(ln) for ln in (out / METRICS_FILE).read_text().splitlines() if ln.strip()]
        rows = [r for r in rows if r["epoch"] < start_epoch]
    elif dist.main:
        out.mkdir(parents=True, exist_ok=True)
        doc = {"bavit_version": __version__, "options": asdict(opts), "train_images": n,
               "val_images": 0 if val is None else len(val.ids), "missing_images": len(missing),
               "train_sparsity": None if train.keep is None else float(1 - train.keep.mean()),
               "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_text(out / OPTIONS_FILE, json.dumps(doc, indent=2, default=str))
    if dist.enabled:  # same starting weights everywhere
        for q in model.state_dict().values():
            torch.distributed.broadcast(q, 0)
    dist.barrier()

    for epoch in range(start_epoch, opts.epochs):
        t0 = time.perf_counter()
        perm, flips = epoch_order(opts.seed, epoch, n)
        if not opts.flip:
            flips = None
        mine = perm[: per_rank * dist.world][dist.rank::dist.world] if dist.enabled else perm
        sums = np.zeros(6)
        for k, s in enumerate(range(0, len(mine), opts.batch_size)):
            step = epoch * steps_per_epoch + k
            for gparam in optim.param_groups:
                gparam["lr"] = opts.lr * _lr_factor(opts, step, steps_per_epoch)
            b = mine[s:s + opts.batch_size]
            x, keep, targets = _batch(train, b, flips, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                o = pruned_forward(model, x, keep, return_hidden=opts.dense_aux > 0)
            loss, parts, _ = model.loss_function(o.logits.float(), targets, device, o.pred_boxes.float(),
                                                 model.config, None, None)
            aux = torch.zeros((), device=device)
            if opts.dense_aux > 0:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    aux = dense_aux_loss(model, o.last_hidden_state, targets, grid, keep)
                loss = loss + opts.dense_aux * aux
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"training stopped: the loss became {loss.item()} at epoch {epoch + 1}, "
                                       f"step {k + 1}; try a lower --lr")
            optim.zero_grad(set_to_none=True)
            loss.backward()
            dist.average_gradients(params)
            if opts.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(params, opts.clip_grad)
            optim.step()
            sums += [loss.item() * len(b), parts["loss_ce"].item() * len(b), parts["loss_bbox"].item() * len(b),
                     parts["loss_giou"].item() * len(b), aux.item() * len(b), len(b)]
            if on_step:
                on_step(1, steps_per_epoch)
        tot = dist.sum(sums.tolist())
        row = {"epoch": epoch, "lr": optim.param_groups[0]["lr"], "train_loss": tot[0] / tot[5],
               "train_loss_ce": tot[1] / tot[5], "train_loss_bbox": tot[2] / tot[5], "train_loss_giou": tot[3] / tot[5]}
        if opts.dense_aux > 0:
            row["train_loss_dense_aux"] = tot[4] / tot[5]
        if val is not None:
            row.update({f"val_{k}": v for k, v in evaluate_map(model, val, gt, opts.batch_size, device, dist).items()})
        row["seconds"] = time.perf_counter() - t0
        row["images_per_s"] = n / row["seconds"]
        score = row.get("val_map", -row["train_loss"])
        if dist.main:
            improved = score > best
            if improved:
                best = score
                _save_hf(model, out)
            row["best"] = improved
            _save_hf(model, out / "last")
            rows.append(row)
            atomic_write_text(out / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows))
            with atomic_path(out / STATE_FILE) as tmp:
                torch.save({"epoch": epoch, "best": best, "optimizer": optim.state_dict()}, tmp)
        dist.barrier()
        if on_epoch:
            on_epoch(row)
    return {"out": str(out), "epochs": opts.epochs, "best": best, "rows": rows, "train_images": n,
            "val_images": 0 if val is None else len(val.ids), "world_size": dist.world,
            "train_sparsity": None if train.keep is None else float(1 - train.keep.mean())}
