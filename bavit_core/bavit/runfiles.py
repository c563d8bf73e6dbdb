"""A BAViT run directory's own files: the config, the selected and last weights and
metrics.jsonl, derived from the engine's state.pt (:mod:`bavit_core.engine.rundir`)."""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from .. import __version__
from ..engine.rundir import METRICS_FILE, STATE_FILE
from ..runtime.errors import InputFileError
from ..runtime.fileio import atomic_write_text

# A run directory's files (this module imports no torch: reading a run's config and
# metrics, as `bavit report` does, needs none)
MODEL_FILE = "model.safetensors"
LAST_FILE = "last.safetensors"
CONFIG_FILE = "config.json"


def read_run_config(run: str | Path) -> dict:
    p = Path(run) / CONFIG_FILE
    if not p.is_file():
        raise InputFileError(p, "not a bavit run directory (config.json missing)")
    return json.loads(p.read_text())


RUN_FILES = (STATE_FILE, MODEL_FILE, LAST_FILE, METRICS_FILE, CONFIG_FILE)  # what --overwrite replaces


def derive_files(out: Path, model, rows: list[dict], epoch: int, selected: bool) -> None:
    """The run's user-facing files from the state of ``epoch`` (see :mod:`bavit_core.engine.rundir`):
    ``model.safetensors`` when that epoch is the selected model, ``last.safetensors`` and
    ``metrics.jsonl`` always."""
    from .model import save_weights

    row = rows[-1] if rows else {}
    if selected:
        save_weights(model, out / MODEL_FILE, {"epoch": epoch, "score": row.get(
            "val_accuracy", row.get("train_accuracy"))})
    save_weights(model, out / LAST_FILE, {"epoch": epoch})
    write_rows(out, rows)


def write_config(out, opts, cfg, lab_meta, info, n_train, n_val, world, hashes=None):
    import torch

    doc = {
        "bavit_version": __version__,
        "torch_version": torch.__version__,
        "model": asdict(cfg),
        "init": (f"pretrained from {cfg.pretrained}, input mean/std from {cfg.normalisation}" if cfg.pretrained
                 else "random init (no --pretrained given)"),
        "train": asdict(opts),
        "labels_meta": {k: lab_meta.get(k) for k in ("format", "dataset", "options", "threshold", "comparison",
                                                    "source_sha256", "images_dir")},
        "data": {"train_images": n_train, "val_images": n_val, "missing_images": info["missing_images"],
                 "world_size": world},
        "inputs_sha256": hashes or {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic_write_text(out / CONFIG_FILE, json.dumps(doc, indent=2, default=str))


def read_rows(out: Path) -> list[dict]:
    p = out / METRICS_FILE
    if not p.is_file():
        return []
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]


def write_rows(out: Path, rows: list[dict]) -> None:
    atomic_write_text(out / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows))


def read_metrics(run: str | Path) -> list[dict]:
    """The per-epoch rows of a run's metrics.jsonl."""
    return read_rows(Path(run))
