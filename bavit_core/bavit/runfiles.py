"""A BAViT run directory's files: state.pt (the commit point a resume starts from), the
config, metrics.jsonl, input paths and hashes checked on resume."""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from ..runtime.errors import InputFileError
from ..runtime.fileio import atomic_path, atomic_write_text, read_training_state, sha256_file

if TYPE_CHECKING:
    from .train import TrainOptions

# A run directory's files (this module imports no torch: reading a run's config and
# metrics, as `bavit report` does, needs none)
MODEL_FILE = "model.safetensors"
LAST_FILE = "last.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"


def read_run_config(run: str | Path) -> dict:
    p = Path(run) / CONFIG_FILE
    if not p.is_file():
        raise InputFileError(p, "not a bavit run directory (config.json missing)")
    return json.loads(p.read_text())


def load_state(path: Path) -> dict:
    return read_training_state(path, ("epoch", "best", "optimizer", "scheduler", "model", "rows"))


def input_hashes(opts: TrainOptions) -> dict:
    return {k: sha256_file(getattr(opts, k)) for k in ("labels", "val_labels")
            if getattr(opts, k) and Path(getattr(opts, k)).is_file()}


def check_inputs_unchanged(out: Path, doc: dict, opts: TrainOptions, force: bool) -> None:
    saved = doc.get("inputs_sha256") or {}
    for k, h in saved.items():
        path = getattr(opts, k, None)
        if not path:
            continue
        if not Path(path).is_file():
            raise InputFileError(path, f"cannot resume {out}: its --{k.replace('_', '-')} file is gone")
        if sha256_file(path) != h and not force:
            raise InputFileError(path, f"changed since {out} started (sha256 differs); resuming would mix two "
                                 "datasets: pass --force to resume anyway, or --overwrite to start again")


class RunFiles:
    """The run directory's files, written so that a kill anywhere leaves a resumable run.

    ``state.pt`` is the commit point: it holds everything resume needs (last weights,
    optimizer, scheduler, RNG, metric rows, best epoch) and is written first, atomically.
    ``last.safetensors``, ``model.safetensors`` (best) and ``metrics.jsonl`` are derived
    from it afterwards; a resume rewrites them from the state, so whether a kill lands
    before, inside or after any of these writes, the resumed run equals the uninterrupted
    one bitwise. A fresh run creates its directory (and config.json) at its first commit:
    a run that fails before its first epoch leaves nothing behind.
    """

    def __init__(self, out: Path, main: bool):
        self.out, self.main, self.config = out, main, None

    def commit(self, model, optim, sched, epoch, best, best_epoch, rows):
        import torch

        out = self.out
        if self.config is not None:
            out.mkdir(parents=True, exist_ok=True)
            for f in (STATE_FILE, MODEL_FILE, LAST_FILE, METRICS_FILE, CONFIG_FILE):  # --overwrite
                (out / f).unlink(missing_ok=True)
            self.config()
            self.config = None
        sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        with atomic_path(out / STATE_FILE) as tmp:
            torch.save({"epoch": epoch, "best": best, "best_epoch": best_epoch, "optimizer": optim.state_dict(),
                        "scheduler": sched.state_dict(), "model": sd, "rows": rows,
                        "torch_rng": torch.get_rng_state()}, tmp)
        self.restore(model, rows, epoch, best_epoch)

    def restore(self, model, rows, epoch, best_epoch):
        """(Re)write the files derived from the state of ``epoch``."""
        from .model import save_weights

        if best_epoch == epoch:
            save_weights(model, self.out / MODEL_FILE, {"epoch": epoch, "score": rows[-1].get(
                "val_accuracy", rows[-1].get("train_accuracy"))})
        save_weights(model, self.out / LAST_FILE, {"epoch": epoch})
        write_rows(self.out, rows)


def write_config(out, opts, cfg, lab_meta, info, n_train, n_val, world, hashes=None):
    import torch

    doc = {
        "bavit_version": __version__,
        "torch_version": torch.__version__,
        "model": asdict(cfg),
        "init": f"pretrained from {cfg.pretrained}" if cfg.pretrained else "random init (no --pretrained given)",
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
