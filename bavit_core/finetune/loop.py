"""Sparse fine-tuning of YOLOS (the paper's "YOLOS-F") and small YOLOS from scratch.

Training runs the same pruned forward as prune-eval: each image's BG tokens (from the
GT labels or from a BAViT run at a threshold) are left out of every layer. The loss is
the DETR set loss that transformers ships for YOLOS (Hungarian matching, CE, L1, GIoU),
called through ``model.loss_function``. Output: HF layout (``save_pretrained``), best in
the run directory itself (so ``prune-eval --detector RUN`` loads it), last in ``last/``.
"""
from __future__ import annotations

import json
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
from ..data.images import resolve_paths
from ..detection.cocoeval import coco_ground_truth
from ..detection.pruned import pruned_forward
from ..detection.protocol import InputProtocol, square_protocol, write_processor
from ..detection.yolos import (detector_grid, init_encoder_from_bavit, init_new_yolos,
                               load_detector, tiny_yolos_config)
from ..runtime.devices import resolve_device
from ..engine.loop import LoopOptions, run_training
from ..engine.rundir import METRICS_FILE, STATE_FILE, RunDir, check_inputs_unchanged, input_hashes
from ..engine.schedule import lr_factor
from ..runtime.distributed import Dist
from ..runtime.errors import InputFileError, OptionError
from ..runtime.fileio import (atomic_write_text, check_new_run_dir, check_output_writable, refuse_output_over_inputs,
                              resolve_input_paths)
from ..runtime.typed import load_typed, read_json_object
from ..detection.gate import GATE_CONFIG, GATE_WEIGHTS, default_hidden
from .validation import evaluate_map
from .data import FinetuneData, keep_selector, label_map_for, make_batch, prepare, token_labels_for
from .selective import (BAVIT_DIR, GatedDetector, GateTrainer, JointPair, JointTrainer, new_gate,
                        save_selective)
from .dense_aux import dense_aux_loss
from .options import SELECTORS, FinetuneOptions

__all__ = ["SELECTORS", "FinetuneOptions", "finetune", "evaluate_map"]

OPTIONS_FILE = "finetune.json"


def _build_model(opts: FinetuneOptions, aset, device, resume_dir: Path | None, size=None):
    from transformers import YolosForObjectDetection

    if resume_dir is not None:  # the architecture; state.pt then sets every weight
        return _architecture_of(resume_dir).to(device)
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


def _architecture_of(run: Path):
    """An interrupted run's detector, built from the config.json it saved (in ``last/`` or
    the run directory; each is written whole by an atomic replace)."""
    from transformers import YolosConfig, YolosForObjectDetection

    problems = []
    for d in (run / "last", run):
        p = d / "config.json"
        if not p.is_file():
            continue
        try:
            cfg = YolosConfig.from_json_file(str(p))
        except (OSError, ValueError, TypeError) as exc:
            problems.append(f"{p}: {type(exc).__name__}")
            continue
        return YolosForObjectDetection._from_config(cfg, attn_implementation="sdpa")
    raise InputFileError(run / "last" / "config.json", "cannot resume: no readable detector config.json in the run "
                         + (f"({'; '.join(problems)})" if problems else "or its last/") + "; start again with --overwrite")


_PATH_OPTIONS = ("root", "ann", "images", "labels", "val_labels", "model", "init_encoder", "detector")
_FLAGS = {"num_detection_tokens": "--det-tokens"}


def _refuse_changed_options(given: FinetuneOptions, saved: FinetuneOptions) -> None:
    """A resumed run continues with the options it started with: an option given on resume
    (anything but its default) that differs from the run's own is refused, never ignored.
    (--epochs, --device and --out are the resume's own.)"""
    from dataclasses import fields

    def same(name, a, b) -> bool:
        if name in _PATH_OPTIONS and a is not None and b is not None and Path(str(a)).exists():
            return Path(str(a)).resolve() == Path(str(b)).resolve()
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return list(a) == list(b)
        return a == b

    for f in fields(FinetuneOptions):
        if f.name in ("epochs", "device", "out"):
            continue
        g, s = getattr(given, f.name), getattr(saved, f.name)
        if same(f.name, g, f.default) or same(f.name, g, s):
            continue
        flag = _FLAGS.get(f.name, "--" + f.name.replace("_", "-"))
        raise OptionError(f"cannot resume with {flag} {g}: the run started with {s}, and a resumed run continues "
                          "with its own options; leave it out, or start a new run (--overwrite)")


def _lr_factor(opts: FinetuneOptions, step: int, steps_per_epoch: int) -> float:
    return lr_factor(opts.schedule, step, steps_per_epoch, opts.epochs, opts.step_size, opts.gamma,
                     opts.warmup_epochs)


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


# what --overwrite replaces: the engine's files, the options, the detectors (HF layout), a gate, a joint BAViT run
RUN_FILES = (STATE_FILE, METRICS_FILE, OPTIONS_FILE, "config.json", "model.safetensors", "pytorch_model.bin",
             "preprocessor_config.json", "generation_config.json", "last", GATE_WEIGHTS, GATE_CONFIG, BAVIT_DIR)


def _trainer(model, train, val, gt, grid, opts: FinetuneOptions, device):
    """The trainer for this run: the detector's own (sparse fine-tuning, from scratch), or
    one that trains what selects the tokens (a gate, BAViT jointly)."""
    if opts.train_gate:
        if opts.prune_at_layer >= model.config.num_hidden_layers:
            raise OptionError(f"--prune-at-layer {opts.prune_at_layer}: the detector has "
                              f"{model.config.num_hidden_layers} layers; give 0 to {model.config.num_hidden_layers - 1}")
        opts.gate_hidden = opts.gate_hidden or default_hidden(model.config.hidden_size)  # recorded resolved
        return GateTrainer(GatedDetector(model, new_gate(model, opts, device)), train, val, gt, opts, device)
    if opts.joint:
        bavit = load_bavit(opts.model, device=device).train()
        if opts.token_loss_weight > 0:
            train.token_labels = token_labels_for(opts.labels, train.ids, bavit.cfg.grid_shape)
        return JointTrainer(JointPair(model, bavit), train, val, gt, grid, opts, device)
    return _DetectorTrainer(model, train, val, gt, grid, opts, device)


def _derive(out: Path, proto: InputProtocol, model, rows, epoch, selected, opts=None) -> None:
    """The detectors of the run from the state of ``epoch``: the selected one in the run
    directory itself (so ``--detector RUN`` loads it), the last in ``last/``; with a gate
    or a jointly trained BAViT, those beside it (finetune/selective.py)."""
    if isinstance(model, (GatedDetector, JointPair)):
        save_selective(model, out, opts, rows, epoch, selected)
        model = model.detector
    if selected:
        _save_hf(model, out, proto)
    _save_hf(model, out / "last", proto)
    atomic_write_text(out / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows))


def _inputs(opts: FinetuneOptions, aset) -> dict:
    """The input files a resume checks for changes."""
    return {"dataset": [str(f) for f in aset.source_files], "labels": opts.labels, "val_labels": opts.val_labels}


def finetune(opts: FinetuneOptions, resume: bool = False, on_step: Callable[[int, int], None] | None = None,
             on_epoch: Callable[[dict], None] | None = None, overwrite: bool = False,
             on_resume: Callable[[int, int], None] | None = None, force: bool = False) -> dict:
    """Fine-tune (or resume) a detector run in ``opts.out``; returns the final summary.

    A fresh run refuses an ``out`` that already holds files unless ``overwrite``; a resumed
    run refuses a dataset or labels file whose hash changed unless ``force``."""
    out = Path(opts.out)
    saved_hashes: dict = {}
    if resume and overwrite:
        raise OptionError("--resume and --overwrite contradict each other; choose one")
    if resume:
        f = out / OPTIONS_FILE
        if not f.is_file() or not (out / STATE_FILE).is_file():
            raise InputFileError(out, "cannot resume: not an interrupted bavit finetune run (no completed epoch)")
        run_doc = read_json_object(f, "run options")
        if not isinstance(run_doc.get("options"), dict):
            raise InputFileError(f, "unreadable run options: no 'options' object")
        saved_hashes = run_doc.get("inputs_sha256") or {}
        given = opts
        opts = load_typed(FinetuneOptions, run_doc["options"], f, "options")
        check_output_writable(out, in_place=True)
        _refuse_changed_options(given, opts)
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
        return _finetune(opts, resume, device, dist, on_step, on_epoch, on_resume, force, saved_hashes)
    finally:
        dist.close()


def _finetune(opts, resume, device, dist, on_step, on_epoch, on_resume=None, force=False, saved_hashes=None):
    out = Path(opts.out)
    aset = open_dataset(opts.dataset, root=opts.root, split=opts.split, ann=opts.ann, images=opts.images)
    if resume:  # before any image is decoded
        check_inputs_unchanged(out, saved_hashes, _inputs(opts, aset), force)
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
    train = prepare(aset, train_idx, proto, label_map, keep_fn, all_paths, keep_bavit_images=opts.joint)
    val = gt = None
    if val_aset is not None:
        vkeep = keep_selector(opts, val_aset, grid, device, opts.val_labels or opts.labels)
        # by name through the detector's labels (from scratch: the training split's classes), so a validation
        # split that lacks a class maps every other class as training does
        vmap = label_map_for(val_aset, None if val_aset.kind == "coco" else model.config)
        val = prepare(val_aset, val_idx, proto, vmap, vkeep, val_paths, keep_bavit_images=opts.joint)
        gt = coco_ground_truth(val_aset, val.ids, vmap if val_aset.kind == "voc" else None)

    trainer = _trainer(model, train, val, gt, grid, opts, device)
    run = RunDir(out, lambda m, rows, epoch, selected: _derive(out, proto, m, rows, epoch, selected, opts), RUN_FILES)
    if not resume:
        doc = {"bavit_version": __version__, "options": asdict(opts), "train_images": trainer.n_train,
               "val_images": 0 if val is None else len(val.ids), "missing_images": len(missing),
               "train_sparsity": None if train.keep is None else float(1 - train.keep.mean()),
               "input_protocol": proto.as_dict(), "inputs_sha256": input_hashes(_inputs(opts, aset)),
               "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        run.first_commit = lambda: atomic_write_text(out / OPTIONS_FILE, json.dumps(doc, indent=2, default=str))
    loop = LoopOptions(epochs=opts.epochs, batch_size=opts.batch_size, lr=opts.lr, seed=opts.seed, flip=opts.flip,
                       schedule=opts.schedule, step_size=opts.step_size, gamma=opts.gamma,
                       warmup_epochs=opts.warmup_epochs, clip_grad=opts.clip_grad, select=opts.select,
                       diverged_hint="try a lower --lr")
    sel, rows, chosen = run_training(trainer, run, loop, dist, resume, on_step, on_epoch, on_resume)
    return {"out": str(out), "epochs": opts.epochs, "select": sel.mode, "selected_epoch": sel.selected_epoch,
            "score": trainer.score(chosen) if chosen else float("nan"), "best": sel.best, "rows": rows,
            "train_images": trainer.n_train, "val_images": 0 if val is None else len(val.ids),
            "world_size": dist.world, "train_sparsity": None if train.keep is None else float(1 - train.keep.mean()),
            "trains": "gate" if opts.train_gate else "joint" if opts.joint else "detector", "chosen": chosen,
            "target_sparsity": opts.target_sparsity, "prune_at_layer": opts.prune_at_layer, "threshold": opts.threshold,
            "skipped": "; ".join(x for x in (aset.skipped_summary(), val_aset.skipped_summary()
                                             if val_aset is not None and val_aset is not aset else "") if x)}


class _DetectorTrainer:
    """The detector on the engine: the pruned forward of prune-eval, the DETR set loss that
    transformers ships for YOLOS (+ the optional dense auxiliary loss), AdamW."""

    def __init__(self, model, train: FinetuneData, val: FinetuneData | None, gt, grid, opts: FinetuneOptions, device):
        self.model, self.train, self.val, self.gt, self.grid, self.opts, self.device = (
            model, train, val, gt, grid, opts, device)
        model.train()
        self.params = [q for q in model.parameters() if q.requires_grad]
        self.optim = torch.optim.AdamW(self.params, lr=opts.lr, weight_decay=opts.weight_decay)
        self.amp = opts.amp and device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.n_train = len(train.ids)

    def step(self, idx, flips, dist):
        opts, model, device = self.opts, self.model, self.device
        x, keep, targets = make_batch(self.train, idx, flips, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.amp):
            o = pruned_forward(model, x, keep, return_hidden=opts.dense_aux > 0, treatment=opts.pruned_tokens)
        loss, parts = set_loss(model, o.logits.float(), o.pred_boxes.float(), targets, device, dist)
        aux = torch.zeros((), device=device)
        if opts.dense_aux > 0:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.amp):
                aux = dense_aux_loss(model, o.last_hidden_state, targets, self.grid, keep)
            loss = loss + opts.dense_aux * aux
        n = len(idx)
        return loss, [loss.item() * n, parts["loss_ce"].item() * n, parts["loss_bbox"].item() * n,
                      parts["loss_giou"].item() * n, aux.item() * n, n]

    def train_row(self, tot):
        row = {"train_loss": tot[0] / tot[5], "train_loss_ce": tot[1] / tot[5], "train_loss_bbox": tot[2] / tot[5],
               "train_loss_giou": tot[3] / tot[5]}
        if self.opts.dense_aux > 0:
            row["train_loss_dense_aux"] = tot[4] / tot[5]
        return row

    def validate(self, dist):
        if self.val is None:
            return {}
        m = evaluate_map(self.model, self.val, self.gt, self.opts.batch_size, self.device, dist, self.opts.pruned_tokens)
        return {f"val_{k}": v for k, v in m.items()}

    def score(self, row):
        return row.get("val_map", -row["train_loss"])


def set_loss(model, logits, boxes, targets, device, dist: Dist):
    """The DETR set loss transformers ships for YOLOS (Hungarian matching, CE, L1, GIoU),
    and its parts. Under several processes each part is rescaled from this process's
    normaliser (its box count; for CE the class-weight sum of its queries) to the global
    one, so averaging the gradients over processes gives exactly the loss one process
    computes on the whole batch (transformers alone would average per-process means)."""
    loss, parts, _ = model.loss_function(logits, targets, device, boxes, model.config, None, None)
    if not dist.enabled:
        return loss, parts
    cfg = model.config
    nb = float(sum(len(t["class_labels"]) for t in targets))
    eos = float(cfg.eos_coefficient)
    w_ce = (logits.shape[0] * logits.shape[1] - nb) * eos + nb  # Σ class weights over this process's queries
    tot_nb, tot_w = dist.sum([nb, w_ce])
    s_box = dist.world * max(nb, 1.0) / max(tot_nb, 1.0)  # transformers divides by max(count, 1)
    s_ce = dist.world * w_ce / tot_w
    coef = {"loss_ce": 1.0, "loss_bbox": float(cfg.bbox_loss_coefficient), "loss_giou": float(cfg.giou_loss_coefficient)}
    total = torch.zeros((), device=logits.device)
    for k, v in parts.items():
        base = next((c for c in coef if k == c or k.startswith(c + "_")), None)
        if base is None:
            continue
        total = total + v * coef[base] * (s_ce if base == "loss_ce" else s_box)
    return total, parts
