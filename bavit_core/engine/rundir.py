"""A training run's directory, the same for every trainer.

``state.pt`` is the commit point: everything a resume needs (weights, optimizer, RNG,
metric rows, the selected epoch) written first and atomically at the end of each epoch.
The files users read (the selected and last weights, ``metrics.jsonl``) are *derived*
from it afterwards by the trainer's ``derive`` callback and rewritten from it on resume,
so a kill before, inside or after any write leaves a run whose resume equals the
uninterrupted run bitwise. A fresh run creates its directory and its options file at its
first commit: a run that fails before its first epoch leaves nothing behind, and
``--overwrite`` removes the previous run's files only then.

Model selection: ``select="last"`` (default) keeps the last epoch's weights as the run's
model; ``select="best"`` keeps the epoch with the best validation score, a choice made on
the very split that score is read from (optimistic; the run's files say so).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..runtime.errors import InputFileError, OptionError
from ..runtime.fileio import atomic_path, read_training_state, sha256_file

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"
SELECT_CHOICES = ("last", "best")
_STATE_KEYS = ("epoch", "best", "optimizer", "model", "rows")


@dataclass
class Selection:
    """Which epoch's weights are the run's model, and the best score seen so far."""

    mode: str = "last"
    best: float = float("-inf")
    best_epoch: int = -1
    selected_epoch: int = -1

    def update(self, epoch: int, score: float) -> bool:
        """Record ``epoch``'s score; True when it is the best so far."""
        improved = score > self.best
        if improved:
            self.best, self.best_epoch = score, epoch
        self.selected_epoch = epoch if self.mode == "last" else self.best_epoch
        return improved


def check_select(select: str) -> None:
    if select not in SELECT_CHOICES:
        raise OptionError(f"--select must be one of {', '.join(SELECT_CHOICES)}, got {select!r}")


def input_hashes(paths: dict[str, str | Path | list | None]) -> dict[str, str]:
    """sha256 of each named input: a file, or a list of files hashed together in order
    (a VOC split's XML files); missing or empty entries are left out."""
    import hashlib

    out = {}
    for key, p in paths.items():
        if not p:
            continue
        files = [Path(x) for x in p] if isinstance(p, (list, tuple)) else [Path(p)]
        if not all(f.is_file() for f in files):
            continue
        if len(files) == 1:
            out[key] = sha256_file(files[0])
        else:
            h = hashlib.sha256()
            for f in files:
                h.update(f.name.encode() + b"\0" + sha256_file(f).encode())
            out[key] = h.hexdigest()
    return out


def check_inputs_unchanged(out: Path, saved: dict[str, str], current: dict[str, str | Path | list | None],
                           force: bool) -> None:
    """Refuse to resume ``out`` when an input it recorded has changed or gone, unless ``force``."""
    now = input_hashes(current)
    for key, h in (saved or {}).items():
        if key not in current:
            continue
        where = current[key]
        shown = where[0] if isinstance(where, (list, tuple)) and where else where
        if key not in now:
            raise InputFileError(shown or out, f"cannot resume {out}: its --{key.replace('_', '-')} input is gone")
        if now[key] != h and not force:
            raise InputFileError(shown, f"changed since {out} started (sha256 differs); resuming would mix two "
                                 "datasets: pass --force to resume anyway, or --overwrite to start again")


class RunDir:
    """The run directory of one trainer.

    ``derive(model, rows, epoch, selected)`` writes the trainer's user-facing files from
    the state of ``epoch`` (``selected``: whether that epoch is the run's selected model);
    ``owned`` names the files and folders a previous run left that ``--overwrite``
    replaces; ``first_commit`` (set for a fresh run) writes the run's options file."""

    def __init__(self, out: str | Path, derive: Callable, owned: tuple[str, ...],
                 first_commit: Callable[[], None] | None = None):
        self.out = Path(out)
        self.derive = derive
        self.owned = tuple(dict.fromkeys((STATE_FILE, METRICS_FILE) + tuple(owned)))
        self.first_commit = first_commit

    def commit(self, model, optim, epoch: int, sel: Selection, rows: list[dict]) -> None:
        import torch

        if self.first_commit is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            for name in self.owned:  # --overwrite: the previous run's files go at the first commit
                p = self.out / name
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink(missing_ok=True)
            self.first_commit()
            self.first_commit = None
        sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        with atomic_path(self.out / STATE_FILE) as tmp:
            torch.save({"epoch": epoch, "best": sel.best, "best_epoch": sel.best_epoch, "select": sel.mode,
                        "selected_epoch": sel.selected_epoch, "optimizer": optim.state_dict(), "model": sd,
                        "rows": rows, "torch_rng": torch.get_rng_state()}, tmp)
        self.derive(model, rows, epoch, sel.selected_epoch == epoch)

    def resume(self, model, optim, select: str, rederive: bool = True) -> tuple[int, Selection, list[dict]]:
        """Load ``state.pt`` into ``model`` and ``optim`` and restore the RNG; returns the
        0-based epoch to continue from, the selection so far and the metric rows. With
        ``rederive`` (the main process) the user-facing files are rewritten from the state,
        whatever a kill left of them."""
        import torch

        path = self.out / STATE_FILE
        state = read_training_state(path, _STATE_KEYS)
        try:
            model.load_state_dict(state["model"])
            optim.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise InputFileError(path, f"training state does not fit this run ({type(exc).__name__})") from None
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])
        epoch = int(state["epoch"])
        sel = Selection(str(state.get("select", select)), float(state["best"]), int(state.get("best_epoch", -1)))
        sel.selected_epoch = int(state.get("selected_epoch", epoch if sel.mode == "last" else sel.best_epoch))
        rows = list(state["rows"])
        if rederive:
            self.derive(model, rows, epoch, sel.selected_epoch == epoch)
        return epoch + 1, sel, rows
