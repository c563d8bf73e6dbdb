"""``bavit detect``: a PrunedDetector over a stream of image files into an output directory
that a rerun resumes (images already written are skipped). The tokens come from BAViT
(``model``), from the trained gate beside the detector (``gate``) or from nowhere (dense);
the outputs are the same in each case."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .. import __version__
from ..runtime.errors import BavitError, InputFileError, OptionError
from ..runtime.devices import check_device_available
from ..runtime.fileio import check_output_writable, check_replaceable_dir, refuse_output_over_inputs, sha256_file
from ..runtime.options import check_option_values
from .outputs import FORMAT, META, finish, read_meta, read_parts, record, write_meta, write_overlay, write_part
from .predictor import DEFAULT_DETECTOR, PrunedDetector
from .sources import as_pil, check_header, find_images, to_inputs

STAGES = ("loading", "detecting", "writing")  # loading counts the calibration images, if any
# what must be the same for a rerun to add to an output directory
SETTINGS = ("detector", "model", "model_sha256", "operating_point", "input_protocol", "runtime", "exported",
            "score_threshold", "resample", "gate")


@dataclass
class DetectOptions:
    images: list[str]
    out: str = "detections"
    model: str | None = None  # BAViT run directory; None: the dense detector (or, with gate, the gated one)
    detector: str = DEFAULT_DETECTOR
    threshold: float | None = None
    sparsity: float | None = None
    policy: str | None = None  # None: topk for --sparsity, threshold with --calibrate-on
    calibrate_on: list[str] | None = None
    pruned_tokens: str = "drop"
    detector_size: tuple[int, int] | None = None
    runtime: str = "torch"
    exported: str | None = None
    device: str = "auto"
    batch_size: int = 8
    score_threshold: float = 0.5
    overlays: bool = True
    strict: bool = False
    gate: bool = False  # the trained token gate beside ``detector`` chooses the tokens (no BAViT)


def _check(opts: DetectOptions) -> Path:
    check_option_values(opts.device, {"runtime": (opts.runtime, ("torch", "onnx"))}, batch_size=(opts.batch_size, 1))
    out = Path(opts.out)
    refuse_output_over_inputs(out, [opts.model, opts.exported, *opts.images, *(opts.calibrate_on or [])], is_dir=True)
    check_replaceable_dir(out, (META,))
    check_output_writable(out, in_place=True)  # a resumed run adds files inside it
    check_device_available(opts.device)
    return out


def _settings(opts: DetectOptions, det: PrunedDetector) -> dict:
    d = det.describe()
    model_sha = sha256_file(Path(opts.model) / "model.safetensors") if opts.model and \
        (Path(opts.model) / "model.safetensors").is_file() else None
    return {"detector": opts.detector, "model": opts.model, "model_sha256": model_sha,
            "operating_point": d["operating_point"], "input_protocol": d["input_protocol"], "runtime": d["runtime"],
            "exported": opts.exported, "score_threshold": opts.score_threshold, "resample": d["resample"],
            "gate": d["gate"]}


def _same(old: dict, new: dict) -> str | None:
    """The first setting that differs between an output directory's run and this one."""
    import json

    for k in SETTINGS:
        if json.dumps(old.get(k), sort_keys=True, default=str) != json.dumps(new.get(k), sort_keys=True, default=str):
            return k
    return None


def detect_images(opts: DetectOptions, progress: Callable[[int, int], None] | None = None,
                  on_stage: Callable[[str], None] | None = None) -> dict:
    """Run the detector on every image ``opts.images`` names and write ``opts.out``:
    detections.json, summary.csv, overlays/ (unless ``overlays`` is off) and detect.json.
    Finished batches go to a journal first, so an interrupted run's rerun (same settings)
    continues where it stopped and a rerun over more images adds only the new ones. An
    unreadable image is skipped and counted (``strict``: an InputFileError, with nothing of
    this run's batch written)."""
    t_start = time.perf_counter()
    out = _check(opts)
    stage = on_stage or (lambda s: None)
    tick = progress or (lambda a, t: None)
    sources = find_images(opts.images, exclude=out)
    if opts.strict:  # a file that is no image fails before any work
        for s in sources:
            check_header(s.path)
    old_meta = read_meta(out)
    stage("loading")
    det = PrunedDetector.load(opts.model, opts.detector, threshold=opts.threshold, sparsity=opts.sparsity,
                              policy=opts.policy, calibrate_on=opts.calibrate_on or None,
                              pruned_tokens=opts.pruned_tokens, detector_size=opts.detector_size,
                              runtime=opts.runtime, exported=opts.exported, device=opts.device,
                              batch_size=opts.batch_size, score_threshold=opts.score_threshold, progress=tick,
                              gate=opts.gate)
    settings = _settings(opts, det)
    if old_meta is not None:
        diff = _same(old_meta.get("settings", {}), settings)
        if diff:
            raise OptionError(f"--out {out} holds detections made with another {diff.replace('_', ' ')}; "
                              "name a new --out directory (or remove it) to run with these settings")
    done = read_parts(out) if old_meta is not None else []
    done_paths = {r["path"] for r in done}
    todo = [s for s in sources if str(s.path) not in done_paths]
    import torch
    import transformers

    meta = {"format": FORMAT, "bavit_version": __version__, "torch_version": torch.__version__,
            "transformers_version": transformers.__version__, "settings": settings,
            "options": {k: v for k, v in asdict(opts).items() if k != "extra"}, "calibration": det.calibration,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "complete": False}

    stage("detecting")
    skipped: list[dict] = []
    records = list(done)
    new = 0
    total = len(todo)
    tick(0, total)
    started = {"meta": False}

    def decode(batch):  # (source, (inputs, the original image for its overlay) or the error)
        got = []
        for s in batch:
            try:
                im, _ = as_pil(s.path)
                got.append((s, (to_inputs(im, det.protocol.prepare, det.bavit_size), im if opts.overlays else None)))
            except InputFileError as exc:
                if opts.strict:
                    raise
                got.append((s, exc))
        return got

    batches = [todo[i:i + opts.batch_size] for i in range(0, total, opts.batch_size)]
    with ThreadPoolExecutor(max_workers=1) as pool:  # the next batch decodes while this one runs
        pending = pool.submit(decode, batches[0]) if batches else None
        for k in range(len(batches)):
            got = pending.result()
            pending = pool.submit(decode, batches[k + 1]) if k + 1 < len(batches) else None
            ok = [(s, d) for s, d in got if not isinstance(d, Exception)]
            skipped += [{"file": str(s.path), "problem": d.problem} for s, d in got if isinstance(d, Exception)]
            results = det.detect_batch([d[0] for _, d in ok]) if ok else []
            if not started["meta"] and ok:  # the directory becomes ours before its first part
                write_meta(out, meta)
                started["meta"] = True
            recs = []
            for (s, d), r in zip(ok, results):
                overlay = None
                if opts.overlays:
                    overlay = write_overlay(out, s.name, d[1], r)
                recs.append(record(s, r, overlay))
            if recs:
                write_part(out, recs)
            records += recs
            new += len(recs)
            tick(len(got), total)
    if not records:
        first = f" (first: {skipped[0]['file']}: {skipped[0]['problem']})" if skipped else ""
        raise BavitError(f"none of the {len(sources)} images could be read{first}")
    stage("writing")
    meta.update(n_images=len(records), new_images=new, resumed_images=len(done), skipped=skipped,
                seconds=time.perf_counter() - t_start, finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    info = finish(out, records, meta)
    return {"out": str(out), "n_images": len(records), "new_images": new, "resumed_images": len(done),
            "skipped": skipped, "found": len(sources), "seconds": meta["seconds"], **info,
            "operating_point": det.point.describe(), "input_protocol": det.protocol.describe(),
            "calibration": det.calibration, "runtime": settings["runtime"], "gate": settings["gate"],
            "mean_sparsity": sum(r["sparsity"] for r in records) / len(records)}

