"""bavit_core: the library behind the ``bavit`` command line.

Every capability is a plain function that returns data or writes files, prints nothing,
and reports progress through an optional callback. Bad input raises a BavitError.

Laid out by pipeline stage (see docs/pipeline.md, "Where things live"):
``data`` → ``labels`` → ``bavit`` → ``detection`` → ``evaluate`` / ``finetune`` → ``report``,
with ``runtime`` underneath. The user-facing functions are re-exported here and imported
on first use, so ``import bavit_core`` stays light (no torch).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

from .runtime.errors import BavitError, InputFileError, OptionError  # noqa: E402

# name -> module that defines it (imported lazily, PEP 562)
_EXPORTS = {
    "open_dataset": "data",
    "synth_dataset": "data.synthetic",
    "Labels": "labels",
    "LabelOptions": "labels",
    "label_dataset": "labels",
    "read_labels": "labels",
    "TrainOptions": "bavit.train",
    "train_bavit": "bavit.train",
    "read_metrics": "bavit.runfiles",
    "load_bavit": "bavit.model",
    "predict": "bavit.predict",
    "read_predictions": "bavit.predfile",
    "postprocess_predictions": "bavit.predfile",
    "load_detector": "detection.yolos",
    "pruned_forward": "detection.pruned",
    "PruneEvalOptions": "evaluate.sweep",
    "prune_eval": "evaluate.sweep",
    "read_results": "evaluate.results",
    "FinetuneOptions": "finetune.options",
    "finetune_detector": "finetune.loop:finetune",
    "ExportOptions": "export.onnx_export",
    "export_onnx": "export.onnx_export",
    "ReportInputs": "report.build",
    "build_report": "report.build",
    "PrunedDetector": "detect.predictor",
    "DetectOptions": "detect.run",
    "detect_images": "detect.run",
    "read_detections": "detect.outputs",
    "DemoOptions": "demo",
    "run_demo": "demo",
}


def __getattr__(name: str):
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'bavit_core' has no attribute {name!r}")
    module, _, attr = target.partition(":")
    value = getattr(importlib.import_module(f".{module}", __name__), attr or name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = ["__version__", "BavitError", "InputFileError", "OptionError", *_EXPORTS]
