"""The whole pipeline on a generated dataset, in one call: synth → label → train BAViT →
predict + post-process → (shipped or retrained) detector → prune-eval (with the
detector's own attention beside BAViT) → YOLOS-F → a trained token gate → report."""
from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

from .data import open_dataset
from .data.grid import GridSpec
from .data.synthetic import synth_dataset
from .labels import LabelOptions, label_dataset
from .runtime.devices import check_device_available
from .runtime.errors import BavitError
from .runtime.fileio import check_output_writable

SCENES = "simple"  # the layout the shipped detector was trained on (bavit synth --scenes simple)
BAVIT_SIZE = 128  # BAViT's grid (8x8) is the detector's: no resampling between them
DETECTOR_SIZE = 128  # for --train-detector; the shipped detector's own size is in its preprocessor_config.json


def shipped_detector() -> Path:
    """The demo detector that ships with the package (HF layout)."""
    p = Path(str(resources.files("bavit_core") / "assets" / "demo_detector"))
    if not (p / "config.json").is_file():
        raise BavitError(f"{p}: the shipped demo detector is missing from this installation; "
                         "run `bavit demo --train-detector` to train one")
    return p


@dataclass
class DemoOptions:
    out: str = "demo"
    quick: bool = False
    train_detector: bool = False
    seed: int = 0
    device: str = "auto"

    @property
    def settings(self) -> dict:
        if self.quick:
            return dict(images=120, epochs=8, bavit_batch=8, sparsities=[0.1, 0.25, 0.4, 0.5, 0.7, 0.85],
                        timing_images=2, timing_repeats=3, det_epochs=3, f_epochs=2, f_lr=1e-4, g_epochs=8, batch=8,
                        examples=3)
        return dict(images=400, epochs=8, bavit_batch=16, sparsities=[0.1, 0.25, 0.35, 0.5, 0.7, 0.85],
                    timing_images=8, timing_repeats=4, det_epochs=40, f_epochs=2, f_lr=1e-4, g_epochs=8, batch=8,
                    examples=6)


OPERATING_POINT = 0.5  # the target sparsity YOLOS-F and the gate are trained and evaluated at
STAGES = ("synth", "label", "train", "predict", "detector", "prune-eval", "finetune", "gate", "report")
# the detector's own attention after this many of its 6 layers: the best attention@k on the demo
# (k = 1, 2, 4 compared in docs/results.md)
ATTENTION_LAYER = 4
GATE_LAYER = 2  # the trained gate's layer (docs/results.md: it beats BAViT alone at every target there)


# What the stages after synth import: about 12 s of module loading on a small CPU
WARM_IMPORTS = ("torch", "timm.models.vision_transformer", "pandas", "pycocotools.cocoeval",
                "transformers.models.yolos.modeling_yolos", "bavit_core.bavit.train", "bavit_core.bavit.predict",
                "bavit_core.evaluate.sweep", "bavit_core.finetune.loop", "bavit_core.report.build")


class _WarmImports:
    """Import the libraries the later stages load in a background thread while the synth
    workers generate the data, so the loading overlaps them instead of following them.
    Joined before the next stage: the main thread then imports nothing another thread is
    importing. (Going on importing during BAViT's training was tried and was slower: both
    threads need the interpreter lock.) A failed import is left to the stage that needs the
    module to report."""

    def __init__(self):
        import threading

        self._t = threading.Thread(target=self._load, name="bavit-warm-imports", daemon=True)
        self._t.start()

    @staticmethod
    def _load():
        import importlib

        for name in WARM_IMPORTS:
            try:
                importlib.import_module(name)
            except (ImportError, OSError):  # a warm-up only: the stage that needs it imports it again and says
                pass

    def join(self):
        self._t.join()


def _per_run(cb, epochs: int):
    """train/finetune report steps per epoch; the demo's progress counts the whole run."""
    return None if cb is None else (lambda advance, total: cb(advance, total * epochs))


def run_demo(opts: DemoOptions, on_stage: Callable[[str, str], None] | None = None,
             progress_for: Callable[[str], Callable[[int, int], None] | None] | None = None) -> dict:
    """Run every stage under ``opts.out``; ``on_stage(name, message)`` reports each stage's
    result, ``progress_for(name)`` is called as each stage starts and may return a progress
    callback for it (with a ``substage(name)`` method to follow prune-eval's own stages)."""
    check_device_available(opts.device)  # before any file is generated
    check_output_writable(opts.out, in_place=True)
    say = on_stage or (lambda s, m: None)
    prog = progress_for or (lambda s: None)
    st = opts.settings
    out = Path(opts.out)
    data = out / "data"
    t0 = time.perf_counter()
    times = {}

    def done(stage, msg, t):
        times[stage] = time.perf_counter() - t
        say(stage, f"{msg} ({times[stage]:.0f} s)")

    warm = _WarmImports()
    t = time.perf_counter()
    s = synth_dataset(data, st["images"], "coco", opts.seed, (240, 320), 0.25, prog("synth"), scenes=SCENES)
    done("synth", f"{sum(s.splits.values())} images, {s.objects} objects", t)

    warm.join()
    t = time.perf_counter()
    prog("label")
    lo = LabelOptions(source="masks", grid=GridSpec(BAVIT_SIZE, BAVIT_SIZE, 16))
    fg = []
    for split in ("train2017", "val2017"):
        aset = open_dataset("coco", root=data, split=split, need_masks=True)
        r = label_dataset(aset, lo, out / f"labels_{split}.parquet")
        fg.append(r.fg_fraction_mean)
    gh = BAVIT_SIZE // 16
    done("label", f"mask labels on a {gh}x{gh} grid, FG fraction {fg[0]:.2f} (train) / {fg[1]:.2f} (val)", t)

    from .bavit.predict import postprocess_predictions, predict
    from .bavit.train import TrainOptions, read_metrics, train_bavit

    t = time.perf_counter()
    run = out / "bavit-small"
    train_bavit(TrainOptions(labels=str(out / "labels_train2017.parquet"), val_labels=str(out / "labels_val2017.parquet"),
                             depth=2, epochs=st["epochs"], batch_size=st["bavit_batch"], lr=1e-3, step_size=max(2, int(st["epochs"] * 0.7)),
                             seed=opts.seed, device=opts.device, out=str(run)),
                on_step=_per_run(prog("train"), st["epochs"]), overwrite=True)  # the demo owns its folder
    last = read_metrics(run)[-1]  # the run's model is its last epoch (no selection on the split scored)
    done("train", f"BAViT-small val token accuracy {last['val_accuracy']:.3f}, FG recall {last['val_recall']:.3f} "
         f"(last epoch)", t)

    t = time.perf_counter()
    prog("predict")
    p = predict(run, out / "preds.parquet", labels=out / "labels_val2017.parquet", device=opts.device)
    pp = postprocess_predictions(out / "preds.parquet", out / "refined.parquet", steps=3)
    done("predict", f"val accuracy {p['metrics']['accuracy']:.3f}, sparsity {p['sparsity']:.2f}; "
                    f"3 clean-up steps: FG recall {pp['history'][0]['fg_recall']:.3f} → {pp['history'][-1]['fg_recall']:.3f}", t)

    from .evaluate.sweep import PruneEvalOptions, prune_eval
    from .report.build import ReportInputs, build_report

    t = time.perf_counter()
    if opts.train_detector:
        from .finetune.loop import FinetuneOptions, finetune

        det = out / "detector"
        finetune(FinetuneOptions(root=str(data), split="train2017", val_split="val2017", from_scratch=True,
                                 detector_config="micro", num_detection_tokens=10, dense_aux=1.0,
                                 detector_size=(DETECTOR_SIZE, DETECTOR_SIZE), epochs=st["det_epochs"], batch_size=8,
                                 lr=4e-4, seed=opts.seed, device=opts.device, out=str(det)), on_step=prog("detector"),
                 overwrite=True)
        done("detector", f"trained from scratch in {det}", t)
    else:
        prog("detector")
        det = shipped_detector()
        done("detector", f"shipped demo detector ({det.name}, trained by bavit finetune --from-scratch)", t)

    t = time.perf_counter()
    pe_prog = prog("prune-eval")
    sub = getattr(pe_prog, "substage", None)
    common = dict(root=str(data), split="val2017", model=str(run), labels=str(out / "labels_val2017.parquet"),
                  batch_size=st["batch"], device=opts.device, seed=opts.seed)
    # BAViT's rows twice: pruned tokens dropped (the paper) and preserved as frozen keys/values
    # (the best treatment at equal sparsity, docs/results.md); the baselines drop only
    # the detector's own attention (training-free) beside them: issue 24's comparison
    res = prune_eval(PruneEvalOptions(detector=str(det), sparsities=st["sparsities"], timing_images=st["timing_images"],
                                      timing_repeats=st["timing_repeats"], out=str(out / "results"),
                                      selectors=["dense", "bavit", "oracle", "random", "attention"],
                                      prune_at_layer=ATTENTION_LAYER,
                                      pruned_tokens=["drop", "preserve"], treatments_for=["bavit"], **common),
                     pe_prog, on_stage=sub)
    rows = res["rows"]
    dense = next(r for r in rows if r["selector"] == "dense")
    at = {r["selector"]: r for r in rows if r["target"] == OPERATING_POINT and r["treatment"] == "drop"}
    kv = next(r for r in rows if r["target"] == OPERATING_POINT and r["treatment"] == "preserve")
    done("prune-eval", f"dense mAP {dense['map']:.3f}; at sparsity {OPERATING_POINT:.2f}: BAViT {at['bavit']['map']:.3f} "
                       f"(preserving pruned tokens {kv['map']:.3f}), oracle {at['oracle']['map']:.3f}, random "
                       f"{at['random']['map']:.3f}; BAViT detector speedup {at['bavit']['detector_speedup']:.2f}x", t)

    # YOLOS-F: the detector sparsely fine-tuned at one operating point, evaluated there
    t = time.perf_counter()
    from .finetune.loop import FinetuneOptions, finetune

    f_det = out / "yolos-f"
    thr = at["bavit"]["threshold"]  # the BG threshold that reached the operating point on val
    finetune(FinetuneOptions(detector=str(det), root=str(data), split="train2017", val_split="val2017",
                             selector="bavit", model=str(run), threshold=float(thr),
                             epochs=st["f_epochs"], batch_size=8, lr=st["f_lr"],
                             warmup_epochs=0.5, seed=opts.seed, device=opts.device, out=str(f_det)),
             on_step=_per_run(prog("finetune"), st["f_epochs"]), overwrite=True)
    fres = prune_eval(PruneEvalOptions(detector=str(f_det), sparsities=[OPERATING_POINT], selectors=["bavit"],
                                       timing_images=0, out=str(out / "results_yolos_f"), **common))
    frow = fres["rows"][0]
    done("finetune", f"YOLOS-F ({st['f_epochs']} epoch{'s' if st['f_epochs'] > 1 else ''} sparse at {OPERATING_POINT:.2f}): mAP {frow['map']:.3f} "
                     f"vs {at['bavit']['map']:.3f} before", t)

    # the detector's own trained token gate (SViT-style, the detector frozen) at the same point
    t = time.perf_counter()
    g_det = out / "gate"
    finetune(FinetuneOptions(detector=str(det), root=str(data), split="train2017", val_split="val2017",
                             train_gate=True, target_sparsity=OPERATING_POINT, prune_at_layer=GATE_LAYER,
                             epochs=st["g_epochs"], batch_size=8, lr=1e-3, seed=opts.seed, device=opts.device,
                             out=str(g_det)), on_step=_per_run(prog("gate"), st["g_epochs"]), overwrite=True)
    gres = prune_eval(PruneEvalOptions(detector=str(g_det), sparsities=[OPERATING_POINT], selectors=["gate"],
                                       timing_images=st["timing_images"], timing_repeats=st["timing_repeats"],
                                       out=str(out / "results_gate"),
                                       **{k: v for k, v in common.items() if k not in ("model", "labels")}))
    grow = gres["rows"][0]
    star = lambda r: "*" if r.get("timing_noisy") else ""  # noqa: E731
    done("gate", f"gate@{GATE_LAYER} ({st['g_epochs']} epochs, detector frozen) at {OPERATING_POINT:.2f}: mAP "
                 f"{grow['map']:.3f} vs BAViT {at['bavit']['map']:.3f}, end to end {grow['speedup']:.2f}x{star(grow)} vs "
                 f"{at['bavit']['speedup']:.2f}x{star(at['bavit'])}", t)

    t = time.perf_counter()
    prog("report")
    rep = build_report(ReportInputs(results=str(out / "results"), finetuned_results=str(out / "results_yolos_f"),
                                    train_runs=[str(run)], pred=str(out / "preds.parquet"),
                                    refined=str(out / "refined.parquet"),
                                    finetune_run=str(det) if opts.train_detector else None,
                                    n_examples=st["examples"], out=str(out / "report")))
    done("report", f"{len(rep['figures'])} figures", t)
    return {"out": str(out), "report": str(out / "report" / "index.html"), "rows": rows, "yolos_f": frow, "gate": grow,
            "bavit_last": last, "seconds": time.perf_counter() - t0, "times": times}
