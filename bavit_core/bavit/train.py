"""Training BAViT: Accumulative Cross Entropy (paper eq. 3), Adam + step LR, on the one
training engine (:mod:`bavit_core.engine`: resumable run directory, epoch loop, DDP).

This module holds what is BAViT's own: its options, loading the label grids and images of
each split, the loss, the token metrics of an epoch and of validation.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..data.images import load_images, resolve_paths, to_input
from ..engine.loop import LoopOptions, global_share, run_training
from ..engine.rundir import RunDir, check_inputs_unchanged, check_select, input_hashes
from ..labels import Labels, read_labels
from ..runtime.devices import check_device_name, resolve_device
from ..runtime.distributed import Dist
from ..runtime.errors import InputFileError, OptionError
from ..runtime.fileio import check_new_run_dir, check_output_writable, refuse_output_over_inputs, resolve_input_paths
from ..runtime.typed import load_typed, read_json_object
from .metrics import token_metrics
from .model import CONFIG_FILE, BAViT, ModelConfig, create_bavit
from .runfiles import METRICS_FILE, RUN_FILES, STATE_FILE, derive_files, read_metrics, write_config

__all__ = ["METRICS_FILE", "STATE_FILE", "TrainOptions", "acc_loss", "evaluate", "load_split", "read_metrics",
           "train_bavit"]


def _inputs(opts) -> dict:
    """The input files a resume checks for changes."""
    return {"labels": opts.labels, "val_labels": opts.val_labels}


@dataclass
class TrainOptions:
    labels: str
    images: str | None = None
    val_labels: str | None = None
    val_images: str | None = None
    val_fraction: float = 0.1
    label_threshold: float | None = None
    depth: int = 2
    pretrained: str | None = None
    epochs: int | None = 100  # None on resume: keep the run's own
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    step_size: int = 30
    gamma: float = 0.1
    fg_weight: float = 1.0
    clip_grad: float = 1.0
    flip: bool = True
    seed: int = 0
    workers: int = 0
    amp: bool = True
    device: str = "auto"
    select: str = "last"
    out: str = "runs/bavit"

    def validate(self) -> None:
        """Check every option before any work (no file is read or written here)."""
        if self.epochs is None or self.epochs < 1:
            raise OptionError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise OptionError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise OptionError(f"--lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise OptionError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if not (self.fg_weight > 0 and math.isfinite(self.fg_weight)):
            raise OptionError(f"--fg-weight must be a positive number, got {self.fg_weight}")
        if self.step_size < 1:
            raise OptionError(f"--step-size must be at least 1, got {self.step_size}")
        if not (self.gamma > 0 and math.isfinite(self.gamma)):
            raise OptionError(f"--gamma must be a positive number, got {self.gamma}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise OptionError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not (self.clip_grad >= 0 and math.isfinite(self.clip_grad)):
            raise OptionError(f"--clip-grad must be >= 0 (0 = off), got {self.clip_grad}")
        if self.label_threshold is not None and not 0.0 <= self.label_threshold <= 1.0:
            raise OptionError(f"--label-threshold must be in [0, 1], got {self.label_threshold}")
        if not 1 <= self.depth <= 64:
            raise OptionError(f"--depth must be in [1, 64], got {self.depth}")
        if self.workers < 0:
            raise OptionError(f"--workers must be >= 0 (0 = automatic), got {self.workers}")
        check_select(self.select)
        check_device_name(self.device)


@dataclass
class Split:
    images: np.ndarray  # (N, h, w, 3) uint8, resized
    grids: np.ndarray  # (N, gh, gw) bool
    image_ids: np.ndarray


def _images_dir(labels: Labels, given: str | None, labels_path: str) -> Path:
    if given:
        return Path(given)
    d = labels.meta.get("images_dir")
    if not d:
        raise OptionError(f"{labels_path} does not record its image directory: pass --images DIR")
    return Path(d)


def load_split(labels_path: str, images: str | None, cfg: ModelConfig, threshold: float | None,
               workers: int = 0, progress=None) -> tuple[Split, dict]:
    labels = read_labels(labels_path, threshold=threshold)
    if labels.grid_shape != cfg.grid_shape:
        raise OptionError(
            f"{labels_path}: label grid {labels.grid_shape} does not match the model grid {cfg.grid_shape} "
            f"(input {cfg.input_h}x{cfg.input_w}, patch {cfg.patch})")
    img_dir = _images_dir(labels, images, labels_path)
    if not img_dir.is_dir():
        raise InputFileError(img_dir, "image directory not found")
    paths, missing = resolve_paths(img_dir, labels.file_names)
    if missing:
        keep = np.setdiff1d(np.arange(len(labels)), missing)
        labels = labels.subset(keep)
    if len(labels) == 0:
        raise InputFileError(img_dir, f"none of the {len(missing)} images listed in {labels_path} is there")
    arr = load_images(paths, (cfg.input_h, cfg.input_w), workers, progress)
    return Split(arr, labels.grids, labels.image_ids), {"missing_images": len(missing), "meta": labels.meta}


def acc_loss(logits: torch.Tensor, target: torch.Tensor, fg_weight: float) -> torch.Tensor:
    """Accumulative Cross Entropy (paper eq. 3): mean per-token CE over all tokens of the batch.
    ``fg_weight`` != 1 weights FG tokens' CE (normalised by the weight sum)."""
    flat = logits.reshape(-1, 2).float()
    t = target.reshape(-1).long()
    if fg_weight == 1.0:
        return F.cross_entropy(flat, t)
    w = torch.tensor([1.0, fg_weight], device=flat.device)
    return F.cross_entropy(flat, t, weight=w)


def _batch(split: Split, idx: np.ndarray, flips: np.ndarray | None, cfg: ModelConfig, device):
    x = to_input(split.images[idx], cfg.mean, cfg.std, device)
    y = torch.as_tensor(split.grids[idx], device=device)
    if flips is not None:
        f = torch.as_tensor(flips[idx], device=device)
        if f.any():
            x[f] = x[f].flip(-1)
            y[f] = y[f].flip(-1)
    return x, y


def _counts(logits, y, loss_sum):
    pred = logits.argmax(-1).reshape(y.shape).bool()
    yb = y.bool()
    return [
        float((pred & yb).sum()), float((pred & ~yb).sum()),
        float((~pred & yb).sum()), float((~pred & ~yb).sum()), float(loss_sum),
    ]


def _summarise(c: list[float]) -> dict:
    tp, fp, fn, tn, loss_sum = c
    m = token_metrics(tp, fp, fn, tn)
    m["loss"] = loss_sum / max(tp + fp + fn + tn, 1)
    return m


@torch.no_grad()
def evaluate(model, split: Split, cfg: ModelConfig, batch_size: int, device, dist: Dist, fg_weight=1.0, amp=False):
    model.eval()
    idx = np.arange(len(split.grids))[dist.rank::dist.world]
    c = [0.0] * 5
    for s in range(0, len(idx), batch_size):
        b = idx[s:s + batch_size]
        x, y = _batch(split, b, None, cfg, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        loss = acc_loss(logits, y, fg_weight) * y.numel()
        c = [a + b_ for a, b_ in zip(c, _counts(logits, y, loss.item()))]
    return _summarise(dist.sum(c))


def _resume_state(out: Path):
    cfg_path = out / CONFIG_FILE
    if not out.is_dir():
        raise InputFileError(out, "cannot resume: run directory not found")
    if not cfg_path.is_file():
        raise InputFileError(out, "cannot resume: not a bavit run directory (config.json missing)")
    if not (out / STATE_FILE).is_file():
        raise InputFileError(out, "cannot resume: the run has no completed epoch yet (start again with --overwrite)")
    doc = read_json_object(cfg_path, "run config")
    for key in ("train", "model"):
        if key not in doc:
            raise InputFileError(cfg_path, f"unreadable run config: no {key!r} section")
    try:
        ModelConfig.from_dict(doc["model"])
    except (ValueError, TypeError) as exc:
        raise InputFileError(cfg_path, f"unreadable run config: {exc}") from None
    return doc


def train_bavit(
    opts: TrainOptions,
    resume: bool = False,
    on_step: Callable[[int, int], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
    overwrite: bool = False,
    force: bool = False,
    on_resume: Callable[[int, int], None] | None = None,
) -> dict:
    """Train (or resume) a BAViT run in ``opts.out``; returns the final summary.

    A fresh run refuses an ``out`` that already holds files unless ``overwrite``; a resumed
    run refuses labels whose hash changed unless ``force``. ``on_resume(epoch, epochs)``
    is told the (1-based) epoch training continues from."""
    out = Path(opts.out)
    if resume and overwrite:
        raise OptionError("--resume and --overwrite contradict each other; choose one")
    if resume:
        opts.validate() if opts.epochs is not None else check_device_name(opts.device)
        doc = _resume_state(out)
        check_output_writable(out, in_place=True)
        saved = load_typed(TrainOptions, doc["train"], out / CONFIG_FILE, "train")
        if opts.epochs is not None:  # a resumed run may be extended
            saved.epochs = opts.epochs
        saved.out, saved.device, saved.workers = str(out), opts.device, opts.workers
        opts = saved
        opts.validate()
        check_inputs_unchanged(out, doc.get("inputs_sha256") or {}, _inputs(opts), force)
    else:
        opts.validate()
        resolve_input_paths(opts, ("labels", "images", "val_labels", "val_images"), hub_or_path=("pretrained",))
        if opts.val_labels and Path(opts.val_labels).resolve() == Path(opts.labels).resolve():
            raise OptionError("--val-labels is the --labels file itself: validation would score the training images; "
                              "give the validation split's labels, or leave it out (--val-fraction holds out a share)")
        refuse_output_over_inputs(out, [opts.labels, opts.val_labels, opts.images, opts.val_images,
                                        opts.pretrained], is_dir=True)
        check_new_run_dir(out, overwrite)
    device = Dist.local_device(resolve_device(opts.device))
    dist = Dist(device)
    try:
        return _train(opts, resume, device, dist, on_step, on_epoch, on_stage, on_resume)
    finally:
        dist.close()


class _BavitTrainer:
    """BAViT on the engine: Accumulative Cross Entropy on token grids, Adam."""

    def __init__(self, model: BAViT, cfg: ModelConfig, train: Split, val: Split | None, opts: TrainOptions,
                 device, amp: bool):
        self.model, self.cfg, self.train, self.val, self.opts, self.device, self.amp = (
            model, cfg, train, val, opts, device, amp)
        self.params = list(model.parameters())
        self.optim = torch.optim.Adam(self.params, lr=opts.lr, weight_decay=opts.weight_decay)
        self.n_train = len(train.grids)

    def step(self, idx, flips, dist):
        x, y = _batch(self.train, idx, flips, self.cfg, self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.model(x)
        loss = acc_loss(logits, y, self.opts.fg_weight)
        stats = _counts(logits.detach(), y, loss.item() * y.numel())
        if dist.enabled:  # the weighted mean over the global batch, as one process computes it
            w = float(y.numel()) + (self.opts.fg_weight - 1.0) * float(y.sum())
            loss = loss * global_share(w, dist)
        return loss, stats

    def train_row(self, sums):
        return {f"train_{k}": v for k, v in _summarise(sums).items()}

    def validate(self, dist):
        if self.val is None:
            return {}
        m = evaluate(self.model, self.val, self.cfg, self.opts.batch_size, self.device, dist, self.opts.fg_weight,
                     self.amp)
        return {f"val_{k}": v for k, v in m.items()}

    def score(self, row):
        return row.get("val_accuracy", row["train_accuracy"])


def _loop_options(opts: TrainOptions) -> LoopOptions:
    return LoopOptions(epochs=opts.epochs, batch_size=opts.batch_size, lr=opts.lr, seed=opts.seed, flip=opts.flip,
                       schedule="step", step_size=opts.step_size, gamma=opts.gamma, clip_grad=opts.clip_grad,
                       select=opts.select)


def _train(opts, resume, device, dist, on_step, on_epoch, on_stage, on_resume=None):
    out = Path(opts.out)
    lab_meta = read_labels(opts.labels).meta
    g = lab_meta["options"]["grid"]
    torch.manual_seed(opts.seed)
    if resume:
        cfg = ModelConfig.from_dict(json.loads((out / CONFIG_FILE).read_text())["model"])
        model = BAViT(cfg)
    else:
        model = create_bavit(opts.depth, (g["input_h"], g["input_w"]), g["patch"], opts.pretrained)
        cfg = model.cfg
    model.to(device)
    if on_stage:
        on_stage("loading images")
    train_split, info = load_split(opts.labels, opts.images, cfg, opts.label_threshold, opts.workers)
    if opts.val_labels:
        # each split's images come from its own labels file unless --val-images says otherwise (never
        # from --images: two splits may share file names, and validation would score training images)
        val_split, vinfo = load_split(opts.val_labels, opts.val_images, cfg,
                                      opts.label_threshold, opts.workers)
    elif opts.val_fraction > 0 and len(train_split.grids) >= 2:
        perm = np.random.default_rng([opts.seed, 12345]).permutation(len(train_split.grids))
        n_val = max(1, int(round(len(perm) * opts.val_fraction)))
        vi, ti = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        val_split = Split(train_split.images[vi], train_split.grids[vi], train_split.image_ids[vi])
        train_split = Split(train_split.images[ti], train_split.grids[ti], train_split.image_ids[ti])
    else:
        val_split = None
    amp = opts.amp and device.type == "cuda" and torch.cuda.is_bf16_supported()
    trainer = _BavitTrainer(model, cfg, train_split, val_split, opts, device, amp)
    run = RunDir(out, lambda m, rows, epoch, selected: derive_files(out, m, rows, epoch, selected),
                 owned=RUN_FILES)
    if not resume:
        run.first_commit = lambda: write_config(out, opts, cfg, lab_meta, info, trainer.n_train,
                                                0 if val_split is None else len(val_split.grids), dist.world,
                                                input_hashes(_inputs(opts)))
    sel, rows, chosen = run_training(trainer, run, _loop_options(opts), dist, resume, on_step, on_epoch, on_resume)
    return {"out": str(out), "epochs": opts.epochs, "select": sel.mode, "selected_epoch": sel.selected_epoch,
            "score": trainer.score(chosen) if chosen else float("nan"), "best_score": sel.best, "rows": rows,
            "train_images": trainer.n_train, "val_images": 0 if val_split is None else len(val_split.grids),
            "pretrained": cfg.pretrained, "normalisation": cfg.normalisation, "world_size": dist.world}
