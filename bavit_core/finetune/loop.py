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
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import __version__
from ..bavit.model import load_bavit
from ..data import open_dataset
from ..data.images import resolve_paths, to_input
from ..detection.cocoeval import coco_ground_truth, detections_from_outputs, evaluate_detections
from ..detection.pruned import pruned_forward
from ..detection.protocol import InputProtocol, square_protocol, write_processor
from ..detection.yolos import (detector_grid, init_encoder_from_bavit, init_new_yolos,
                               load_detector, tiny_yolos_config)
from ..runtime.devices import resolve_device
from ..runtime.distributed import Dist, epoch_order
from ..runtime.errors import InputFileError, OptionError, TrainingDiverged
from ..runtime.fileio import (atomic_path, atomic_write_text, check_new_run_dir, read_training_state,
                               refuse_output_over_inputs, resolve_input_paths)
from .data import FinetuneData, keep_selector, label_map_for, make_batch, prepare
from .dense_aux import dense_aux_loss
from .options import SELECTORS, FinetuneOptions

__all__ = ["SELECTORS", "FinetuneOptions", "finetune", "evaluate_map"]

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"
OPTIONS_FILE = "finetune.json"


def _build_model(opts: FinetuneOptions, aset, device, resume_dir: Path | None, size=None):
    from transformers import YolosForObjectDetection

    if resume_dir is not None:  # the architecture; state.pt then sets the weights
        for d in (resume_dir / "last", resume_dir):
            if (d / "config.json").is_file():
                try:
                    return YolosForObjectDetection.from_pretrained(str(d), attn_implementation="sdpa").to(device)
                except Exception:  # a kill while saving: try the other copy, or rebuild
                    continue
    if opts.from_scratch:
        lm = label_map_for(aset)
        n_labels = max(lm.values()) + 1
        names = {lab: aset.categories.get(cid, str(cid)) for cid, lab in lm.items()}
        if aset.kind == "voc":
            names = {lab: n for lab, n in zip(range(1, n_labels), sorted(set(aset.categories.values())))}
        id2label = {i: names.get(i, "N/A") for i in range(n_labels)}
        over = {}
        if opts.num_detection_tokens:
            over["num_detection_tokens"] = opts.num_detection_tokens
        cfg = tiny_yolos_config(opts.detector_config, num_labels=n_labels, image_size=tuple(size),
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


@torch.no_grad()
def evaluate_map(model, data: FinetuneData, gt, batch_size, device, dist: Dist, treatment: str = "drop") -> dict:
    model.eval()
    dets = []
    idx = np.arange(len(data.ids))[dist.rank::dist.world]
    for s in range(0, len(idx), batch_size):
        b = idx[s:s + batch_size]
        x = to_input(data.images[b], data.mean, data.std, device, data.rescale)
        keep = None if data.keep is None else torch.as_tensor(data.keep[b], device=device)
        out = pruned_forward(model, x, keep, treatment=treatment)
        dets += detections_from_outputs(out.logits, out.pred_boxes, data.ids[b], data.widths[b], data.heights[b])
    if dist.enabled:
        gathered = [None] * dist.world
        torch.distributed.all_gather_object(gathered, dets)
        dets = [d for part in gathered for d in part]
    model.train()
    return evaluate_detections(gt, dets, data.ids)


def _save_hf(model, dest: Path, proto: InputProtocol):
    """save_pretrained plus the ``preprocessor_config.json`` of the trained input protocol
    (a complete Hugging Face detector: ``transformers.pipeline`` loads it and resizes as we
    trained) into a temp dir beside ``dest``, then swap files in atomically."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".save-", dir=dest.parent if dest.parent.exists() else None))
    try:
        model.save_pretrained(tmp)
        write_processor(tmp, proto.size, proto.mean, proto.std)
        for f in tmp.iterdir():
            os.replace(f, dest / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_state(path: Path) -> dict:
    return read_training_state(path, ("epoch", "best", "best_epoch", "optimizer", "model", "rows", "torch_rng"))


class _FinetuneFiles:
    """The run directory, written so a kill anywhere leaves a resumable run: ``state.pt``
    (weights, optimizer, RNG, rows, best epoch) is the commit point, written first and
    atomically; the HF files of the best (run dir) and last (``last/``) detector and
    ``metrics.jsonl`` are derived from it and rewritten from it on resume. A fresh run
    creates its files at its first commit, so a failed start leaves nothing behind."""

    def __init__(self, out: Path, proto: InputProtocol):
        self.proto = proto
        self.out, self.options = out, None

    def commit(self, model, optim, epoch, best, best_epoch, rows):
        if self.options is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / STATE_FILE).unlink(missing_ok=True)  # --overwrite: the old run stops being resumable
            self.options()
            self.options = None
        sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        with atomic_path(self.out / STATE_FILE) as tmp:
            torch.save({"epoch": epoch, "best": best, "best_epoch": best_epoch, "optimizer": optim.state_dict(),
                        "model": sd, "rows": rows, "torch_rng": torch.get_rng_state()}, tmp)
        self.derive(model, rows, epoch, best_epoch)

    def derive(self, model, rows, epoch, best_epoch):
        if best_epoch == epoch:
            _save_hf(model, self.out, self.proto)
        _save_hf(model, self.out / "last", self.proto)
        atomic_write_text(self.out / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows))


def finetune(opts: FinetuneOptions, resume: bool = False, on_step: Callable[[int, int], None] | None = None,
             on_epoch: Callable[[dict], None] | None = None, overwrite: bool = False,
             on_resume: Callable[[int, int], None] | None = None) -> dict:
    out = Path(opts.out)
    if resume and overwrite:
        raise OptionError("--resume and --overwrite contradict each other; choose one")
    if resume:
        f = out / OPTIONS_FILE
        if not f.is_file() or not (out / STATE_FILE).is_file():
            raise InputFileError(out, "cannot resume: not an interrupted bavit finetune run (no completed epoch)")
        try:
            saved = json.loads(f.read_text())["options"]
            saved["detector_size"] = tuple(saved["detector_size"]) if saved.get("detector_size") else None
            given = opts
            opts = FinetuneOptions(**saved)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise InputFileError(f, f"unreadable run options ({type(exc).__name__})") from None
        if given.epochs is not None and given.epochs != opts.epochs:  # a resumed run may be extended
            if opts.schedule == "cosine":
                raise OptionError(
                    f"cannot resume with --epochs {given.epochs}: the run's cosine schedule spans its own "
                    f"{opts.epochs} epochs, so every learning rate so far would differ from a {given.epochs}-epoch "
                    "run; start a new run, or use --schedule step, whose rates do not depend on the length")
            opts.epochs = given.epochs
        opts.device, opts.out = given.device, str(out)
    opts.validate()
    if not resume:
        resolve_input_paths(opts, ("root", "ann", "images", "labels", "val_labels", "model", "init_encoder"),
                            hub_or_path=("detector",))
        refuse_output_over_inputs(out, [opts.root, opts.ann, opts.images, opts.labels, opts.val_labels, opts.model,
                                        opts.init_encoder, opts.detector if opts.detector and Path(opts.detector).exists()
                                        else None], is_dir=True)
        check_new_run_dir(out, overwrite)
    device = Dist.local_device(resolve_device(opts.device))
    dist = Dist(device)
    try:
        return _finetune(opts, resume, device, dist, on_step, on_epoch, on_resume)
    finally:
        dist.close()


def _finetune(opts, resume, device, dist, on_step, on_epoch, on_resume=None):
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
    if resume:  # the protocol the run trained at, from the processor file it wrote
        proto = square_protocol(str(out), tuple(opts.detector_size))
    elif opts.from_scratch:
        proto = square_protocol(None, opts.detector_size)
    model = _build_model(opts, aset, device, out if resume else None, None if resume or not opts.from_scratch
                         else proto.size)
    if not resume and not opts.from_scratch:
        proto = square_protocol(opts.detector, opts.detector_size, model.config.patch_size)
    opts.detector_size = size = proto.size  # recorded resolved: a resumed run trains at the same size
    label_map = label_map_for(aset, None if opts.from_scratch or aset.kind == "coco" else model.config)
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

    keep_fn = keep_selector(opts, aset, grid, device, opts.labels)
    train = prepare(aset, train_idx, proto, label_map, keep_fn, all_paths)
    val = gt = None
    if val_aset is not None:
        vkeep = keep_selector(opts, val_aset, grid, device, opts.val_labels or opts.labels)
        vmap = label_map_for(val_aset, None if opts.from_scratch or val_aset.kind == "coco" else model.config)
        val = prepare(val_aset, val_idx, proto, vmap, vkeep, val_paths)
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
    start_epoch, best, best_epoch, rows = 0, float("-inf"), -1, []  # score may be -loss (no val split)
    run = _FinetuneFiles(out, proto)
    if resume:
        state = _load_state(out / STATE_FILE)
        try:
            model.load_state_dict(state["model"])
            optim.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise InputFileError(out / STATE_FILE, f"state does not fit this run ({type(exc).__name__})") from None
        torch.set_rng_state(state["torch_rng"])
        start_epoch, best, best_epoch = int(state["epoch"]) + 1, float(state["best"]), int(state["best_epoch"])
        rows = list(state["rows"])
        if dist.main:
            run.derive(model, rows, start_epoch - 1, best_epoch)
        if on_resume:
            on_resume(start_epoch + 1, opts.epochs)
    else:
        doc = {"bavit_version": __version__, "options": asdict(opts), "train_images": n,
               "val_images": 0 if val is None else len(val.ids), "missing_images": len(missing),
               "train_sparsity": None if train.keep is None else float(1 - train.keep.mean()),
               "input_protocol": proto.as_dict(),
               "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        run.options = lambda: atomic_write_text(out / OPTIONS_FILE, json.dumps(doc, indent=2, default=str))
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
            x, keep, targets = make_batch(train, b, flips, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                o = pruned_forward(model, x, keep, return_hidden=opts.dense_aux > 0, treatment=opts.pruned_tokens)
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
            row.update({f"val_{k}": v for k, v in evaluate_map(model, val, gt, opts.batch_size, device, dist, opts.pruned_tokens).items()})
        row["seconds"] = time.perf_counter() - t0
        row["images_per_s"] = n / row["seconds"]
        score = row.get("val_map", -row["train_loss"])
        if dist.main:
            improved = score > best
            if improved:
                best, best_epoch = score, epoch
            row["best"] = improved
            rows.append(row)
            run.commit(model, optim, epoch, best, best_epoch, rows)
        dist.barrier()
        if on_epoch:
            on_epoch(row)
    return {"out": str(out), "epochs": opts.epochs, "best": best, "rows": rows, "train_images": n,
            "val_images": 0 if val is None else len(val.ids), "world_size": dist.world,
            "train_sparsity": None if train.keep is None else float(1 - train.keep.mean())}
