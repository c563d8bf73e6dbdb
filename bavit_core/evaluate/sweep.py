"""prune-eval: sweep token selectors × operating points over a dataset with the pruned YOLOS.

An operating point is a BG-probability threshold (``thresholds``) or a target mean
sparsity reached by a policy (``sparsities`` + ``policy``: ``threshold`` or ``topk``, see
detection/selection.py). Per row: COCO mAP (pycocotools), the reached sparsity and its
per-image spread, Table-2 token columns, analytic GFLOPs, and measured speed: dense YOLOS,
BAViT and every row's pruned YOLOS timed round robin in this process (dense once per run,
the common reference), each with its spread. Images are decoded once; BAViT runs once per
image and its probabilities serve every operating point.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..bavit.model import load_bavit
from ..data import open_dataset
from ..data.images import decode_for_detector, resolve_paths
from ..data.ragged import Grids
from ..detection.accounting import bavit_gflops, detector_gflops, token_columns
from ..detection.gate import load_gate
from ..detection.cocoeval import category_map_for, coco_ground_truth, evaluate_many, read_category_map
from ..detection.selection import oracle_keep, oracle_priority, sparsity_stats
from ..detection.protocol import input_protocol
from ..detection.yolos import load_detector
from ..detect.point import OperatingPoint
from ..detect.predictor import PrunedDetector
from ..labels import read_labels
from ..runtime.devices import resolve_device
from ..runtime.distributed import Dist
from ..runtime.errors import InputFileError, OptionError
from ..detection.batches import take
from .results import CSV_COLUMNS, read_results, row_name, write_results
from .options import PruneEvalOptions, check_options, parse_sparsities, parse_thresholds, selectors_for
from .selectors import PRUNING_SELECTORS, REGISTRY, RowInputs, build_rows
from .speed import device_name, time_rows
from .timing import machine_load

__all__ = ["CSV_COLUMNS", "PruneEvalOptions", "STAGES", "parse_sparsities", "parse_thresholds", "prune_eval",
           "read_results"]

STAGES = ("loading", "decoding", "BAViT", "detecting", "timing", "COCOeval")


@dataclass
class Row:
    selector: str
    threshold: float
    keep: np.ndarray | Grids  # (N, dh, dw) bool on the detector grid, or Grids (one grid per image)
    detections: list = field(default_factory=list)
    policy: str = "threshold"
    target: float = float("nan")  # target mean sparsity (NaN: a threshold row or dense/oracle as labelled)
    treatment: str = "drop"  # what happens to the pruned tokens (detection/pruned.py)
    prune_layer: int | None = None  # the detector chooses after this many layers (keep set by its forward)

    @property
    def name(self) -> str:
        return row_name(self.selector, self.threshold, self.target, self.policy, self.treatment,
                        float("nan") if self.prune_layer is None else self.prune_layer)


def _per_treatment(rows: list[Row], treatments: list[str], only: list[str] | None = None) -> list[Row]:
    """Every row that prunes, once per treatment of the pruned tokens (the dense row once:
    with nothing pruned every treatment is the dense model); with ``only``, rows of other
    selectors get the first treatment alone."""
    def of(sel):
        if sel == "dense":
            return ["drop"]
        return treatments if only is None or sel in only else treatments[:1]

    return [Row(r.selector, r.threshold, r.keep, policy=r.policy, target=r.target, treatment=t,
                prune_layer=r.prune_layer) for r in rows for t in of(r.selector)]


def prune_eval(opts: PruneEvalOptions, progress: Callable[[int, int], None] | None = None,
               on_stage: Callable[[str], None] | None = None) -> dict:
    """Run the sweep and write the results directory. ``on_stage(name)`` announces each of
    :data:`STAGES` as it starts (BAViT only with a model); ``progress(advance, total)``
    counts the current stage's work."""
    t_start = time.perf_counter()
    load_start = machine_load()
    check_options(opts)
    selectors = selectors_for(opts)
    if opts.sparsities is not None and not any(s in PRUNING_SELECTORS for s in selectors):
        raise OptionError("--sparsities needs a selector that prunes: give --model (BAViT, random) or --labels "
                          "(oracle); with neither, only the dense row is evaluated")
    device = Dist.local_device(resolve_device(opts.device))
    layout = opts.layout or ("pad" if device.type == "cuda" else "pack")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[opts.dtype]
    if dtype != torch.float32 and device.type != "cuda" and opts.dtype == "fp16":
        raise OptionError("--dtype fp16 needs CUDA")

    stage_t: dict[str, float] = {}
    current = {"name": None, "t": time.perf_counter()}

    def stage(name):
        now = time.perf_counter()
        if current["name"]:
            stage_t[current["name"]] = now - current["t"]
        current.update(name=name, t=now)
        if on_stage and name:
            on_stage(name)

    tick = progress or (lambda a, t: None)
    dist = Dist(device)  # under torchrun: images sharded, results gathered to rank 0
    try:
        return _prune_eval(opts, selectors, device, layout, dtype, dist, stage, stage_t, tick, t_start, load_start)
    finally:
        dist.close()


def _prune_eval(opts, selectors, device, layout, dtype, dist, stage, stage_t, tick, t_start, load_start) -> dict:
    stage("loading")
    det = load_detector(opts.detector, device)
    size = opts.detector_size
    if size is None and opts.runtime == "onnx" and opts.exported:  # the graphs are fixed to one size
        from ..export.ort import read_manifest

        size = tuple(read_manifest(opts.exported)["detector"]["input_size"])
    proto = input_protocol(opts.detector, tuple(size) if size else None, det.config.patch_size)
    n_layers = det.config.num_hidden_layers
    if "attention" in selectors and opts.prune_at_layer >= n_layers:
        raise OptionError(f"--prune-at-layer {opts.prune_at_layer}: the detector has {n_layers} layers; "
                          f"give 0 to {n_layers - 1}")
    gate = load_gate(opts.detector, det.config, device) if "gate" in selectors else None
    layer_of = {"attention": opts.prune_at_layer, "gate": None if gate is None else gate.layer}
    ps = det.config.patch_size
    bavit = load_bavit(opts.model, device=device) if opts.model else None
    onnx_rt = _onnx_runtime(opts, det, proto.size, bavit, device)
    # every row runs through the PrunedDetector ``bavit detect`` runs: BAViT, the operating
    # point's token selection and the pruned forward are one piece of code
    engine = PrunedDetector(det, bavit, proto, OperatingPoint(dense=True), device=device, dtype=dtype, layout=layout,
                            batch_size=opts.batch_size, resample=opts.resample,
                            postprocess_steps=opts.postprocess_steps, seed=opts.seed, onnx=onnx_rt)

    aset = open_dataset(opts.dataset, root=opts.root, split=opts.split, ann=opts.ann, images=opts.images)
    cat_map = category_map_for(aset, det.config.id2label,
                               read_category_map(opts.category_map) if opts.category_map else None)
    img_dir = aset.images_dir
    if img_dir is None or not img_dir.is_dir():
        raise OptionError("prune-eval needs the images: give --root (with --split) or --ann with --images")
    _, missing = resolve_paths(img_dir, aset.file_names)
    present = np.setdiff1d(np.arange(aset.n_images), missing)
    if opts.max_images:
        present = present[: opts.max_images]
    if len(present) == 0:
        raise InputFileError(img_dir, "none of the dataset's images is there")
    ids = aset.image_ids[present]
    widths, heights = aset.widths[present], aset.heights[present]
    files = [img_dir / aset.file_names[i] for i in present]
    gt = coco_ground_truth(aset, ids, cat_map)
    n = len(files)
    oracle_prio = None
    if "oracle" in selectors:  # a bad labels file fails before any decoding
        read_labels(opts.labels).grids_for(ids, opts.labels)

    # ---- decode once (this process's block of the images under torchrun) -------------------
    mine = dist.shard(n)
    sizes = [(bavit.cfg.input_h, bavit.cfg.input_w)] if bavit is not None else []
    stores: list = []

    def decode_and_bavit():
        stage("decoding")
        stores.extend(decode_for_detector([files[i] for i in mine], proto.prepare, proto.size, sizes,
                                          Path(opts.out), tick))
        shapes = [tuple(a.shape[:2]) for a in stores[0]] if proto.size is None else []
        if bavit is None:
            return None, shapes
        stage("BAViT")  # probabilities once per image; every rank needs all of them (calibration)
        return engine.bavit_probs(stores[1], tick), shapes

    parts = dist.run_shard(decode_and_bavit)
    probs = None if bavit is None else np.concatenate([q[0] for q in parts])
    if proto.size is not None:  # square: one grid for every image
        dgrid = (proto.size[0] // ps, proto.size[1] // ps)
    else:  # the checkpoint's protocol: each image its own grid
        dgrid = np.array([(h // ps, w // ps) for q in parts for h, w in q[1]], dtype=np.int64).reshape(-1, 2)
    if "oracle" in selectors:
        oracle_prio = (oracle_priority(opts.labels, ids, dgrid, opts.resample) if opts.sparsities is not None
                       else oracle_keep(opts.labels, ids, dgrid, opts.resample))
    det_u8 = stores[0]
    n_timed = min(opts.timing_images, len(mine))  # timing runs on rank 0's first images
    if onnx_rt is not None:
        n_timed = 0  # ORT timing: examples/benchmarks/bench_onnx.py
    bav_timed = None if bavit is None else stores[1][:n_timed]  # the BAViT inputs evaluation saw
    det_timed = det_u8[:n_timed]

    rows = _per_treatment(_build_rows(opts, selectors, n, dgrid, probs, oracle_prio, engine, layer_of),
                          list(dict.fromkeys(opts.pruned_tokens)), opts.treatments_for)

    # ---- detections per row (per shard, gathered in image order) ----------------------------
    stage("detecting")
    det.to(dtype)

    def detect_row(row):  # (detections, kept tokens per image when the detector chose them, else None)
        step = lambda a: tick(a, len(mine) * len(rows))  # noqa: E731
        if row.prune_layer is not None:  # an in-detector selector: its forward chooses the tokens
            return engine.detect_decoded_layered(det_u8, row.prune_layer, row.target, ids[mine], widths[mine],
                                                 heights[mine], step, treatment=row.treatment,
                                                 **_scorer(row, gate))
        return engine.detect_decoded(det_u8, take(row.keep, mine) if row.selector != "dense" else None, ids[mine],
                                     widths[mine], heights[mine], step, treatment=row.treatment), None

    per_rank = dist.run_shard(lambda: [detect_row(row) for row in rows])
    for k, row in enumerate(rows):
        row.detections = [d for part in per_rank for d in part[k][0]]
        if row.prune_layer is not None:
            row.keep = _grids_of([g for part in per_rank for g in part[k][1]], dgrid)
    if not dist.main:  # rank 0 times, evaluates and writes
        return {"out": str(opts.out), "rows": [], "n_images": n, "missing_images": len(missing), "rank": dist.rank}

    # ---- timing: dense, BAViT and every row, round robin -----------------------------------
    stage("timing")
    timing, run_timing = time_rows(det, bavit, rows, det_timed, bav_timed, opts, device, dtype, layout, tick, proto,
                                   scorer=lambda row: _scorer(row, gate))

    # ---- COCOeval, tokens, FLOPs ---------------------------------------------------------
    stage("COCOeval")
    n_patches = Grids.of(rows[0].keep).sizes.astype(np.float64)  # per image: its detector grid's tokens
    dense_g = detector_gflops(det.config, n_patches, n_patches)
    stats = evaluate_many(gt, [row.detections for row in rows], ids, lambda: tick(1, len(rows)))
    results = []
    for k, row in enumerate(rows):
        kept_i = Grids.of(row.keep).sums()
        sparsity_i = 1.0 - kept_i / n_patches
        with_bavit = row.selector == "bavit"
        r = {"selector": row.selector, "threshold": row.threshold, "policy": row.policy, "target": row.target,
             "prune_layer": float("nan") if row.prune_layer is None else float(row.prune_layer)}
        r.update(sparsity_stats(row.keep))
        r.update(stats[k])
        r.update(token_columns(sparsity_i, n_patches, det.config.num_hidden_layers,
                               bavit.cfg.n_tokens if bavit else 0, bavit.cfg.depth if bavit else 0, with_bavit,
                               row.treatment, dense_layers=row.prune_layer or 0))
        g = detector_gflops(det.config, kept_i, n_patches, row.treatment, dense_layers=row.prune_layer,
                            score_macs=n_patches * gate.macs_per_token() if row.selector == "gate" else None)
        if with_bavit:
            g += bavit_gflops(bavit.cfg)
        r["gflops"] = g
        r["flop_speedup"] = dense_g / g
        r.update(timing[k])
        r.update(device=device_name(device), dtype=opts.dtype, batch_size=opts.batch_size, n_images=n)
        results.append(r)
    stage(None)

    out = Path(opts.out)
    run_info = {"load_start": load_start, "load_end": machine_load(), "stage_seconds": stage_t,
                "detector_size": list(proto.size) if proto.size else None, "input_protocol": proto.as_dict(),
                "detector_tokens": {"mean": float(n_patches.mean()), "min": int(n_patches.min()),
                                    "max": int(n_patches.max())}, **run_timing}
    run_info["world_size"] = dist.world
    if bavit is not None:  # a BAViT run trained jointly with a detector (finetune --joint): with this one?
        joint = _joint_record(opts.model, opts.detector)
        if joint is not None:
            run_info["bavit_joint"] = joint
    if gate is not None:  # what the gate rows ran: the gate beside the detector, as trained
        from ..detection.gate import gate_info

        run_info["gate"] = gate_info(opts.detector)
    write_results(out, results, rows, opts, aset, ids, missing, det, bavit, layout, time.perf_counter() - t_start,
                  run_info)
    return {"out": str(out), "rows": results, "n_images": n, "missing_images": len(missing),
            "skipped": aset.skipped_summary(), "seconds": time.perf_counter() - t_start, "timing_noisy": any(r["timing_noisy"] for r in results),
            **run_info}


def _joint_record(model: str, detector: str) -> dict | None:
    """The BAViT run's joint-training record (``finetune --joint``) and whether
    ``detector`` is the detector it was trained with (``pair``); None for a BAViT trained alone."""
    from ..bavit.runfiles import read_run_config

    joint = read_run_config(model).get("joint")
    if not isinstance(joint, dict):
        return None
    d = Path(detector)
    return {**joint, "pair": d.exists() and str(joint.get("detector")) == str(d.resolve())}


def _scorer(row, gate) -> dict:
    """How an in-detector row's forward ranks or decides: the gate (its probabilities at
    the row's threshold or target) or the layer's attention (at the target)."""
    if row.selector != "gate":
        return {}
    if math.isnan(row.target):
        return {"gate": gate, "threshold": row.threshold}
    return {"gate": gate}


def _build_rows(opts, selectors, n, dgrid, probs, oracle, engine, layer_of) -> list[Row]:
    """Every operating point's kept tokens, from the selector registry (selectors.py):
    thresholds, or target sparsities (BAViT's rows selected by ``engine`` at each point, as
    ``bavit detect`` selects)."""
    x = RowInputs(n=n, grid=dgrid, seed=opts.seed, policy=opts.policy if opts.sparsities is not None else "threshold",
                  oracle=oracle)
    if probs is not None:
        if opts.sparsities is None:
            x.bavit_at_threshold = {t: engine.with_point(OperatingPoint(threshold=t)).select(probs, dgrid)[0]
                                    for t in opts.thresholds}
        else:  # (keep, the BG-probability threshold reached over these images)
            x.bavit_at_target = {s: engine.with_point(OperatingPoint(sparsity=s, policy=opts.policy)).select(probs, dgrid)
                                 for s in opts.sparsities}
    specs = build_rows(selectors, x, opts.thresholds, opts.sparsities)
    return [Row(sel, thr, keep, policy=pol, target=tgt,
                prune_layer=layer_of[sel] if REGISTRY[sel].in_detector else None)
            for sel, thr, keep, pol, tgt in specs]


def _grids_of(keeps: list, dgrid):
    """Per-image kept tokens ((P_i,) bool, row-major) as the rows hold them: (N, gh, gw)
    under a square protocol, else Grids on each image's own grid."""
    if isinstance(dgrid, tuple):
        return np.stack(keeps).reshape(len(keeps), *dgrid)
    return Grids(np.concatenate(keeps), dgrid)


def _onnx_runtime(opts: PruneEvalOptions, det, det_hw, bavit, device):
    """(``det_hw``: the square protocol's size; None under the checkpoint's protocol, which
    the fixed-size graphs cannot run.)"""
    """``--runtime onnx``: the exported graphs, checked against the loaded models (None for torch)."""
    if opts.runtime not in ("torch", "onnx"):
        raise OptionError(f"--runtime must be torch or onnx, got {opts.runtime!r}")
    if opts.runtime == "torch":
        if opts.exported:
            raise OptionError("--exported goes with --runtime onnx")
        return None
    if not opts.exported:
        raise OptionError("--runtime onnx needs --exported DIR (from bavit export)")
    if opts.dtype != "fp32":
        raise OptionError("--runtime onnx runs the exported fp32 graphs: leave --dtype at fp32")
    from ..export.ort import ExportedModels

    return ExportedModels(opts.exported, det, det_hw, bavit, str(device))


