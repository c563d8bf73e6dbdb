"""The epoch loop both trainers call (DETR's ``train_one_epoch`` habit): the trainer brings
its model, its loss on a batch and its validation; the engine brings the order of the
samples, the learning rate at each step, the NaN guard, gradient averaging over processes,
clipping, model selection and the commit of each epoch to the run directory.

Determinism: the shuffle and flips of epoch e come from a generator seeded with (seed, e),
drawn for the whole training set before sharding, so a resumed run equals an uninterrupted
one, and N processes with batch b see, step by step, the same samples as one process with
batch N·b. Gradients are averaged over the processes in one all-reduce; a trainer whose
loss is normalised per batch (a weighted mean, the set loss's box count) normalises by the
global count (:meth:`Trainer.step` gets the :class:`~bavit_core.runtime.distributed.Dist`),
so two processes take the same steps as one, up to float summation order.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch

from ..runtime.distributed import Dist, epoch_order
from ..runtime.errors import OptionError, TrainingDiverged
from .rundir import RunDir, Selection
from .schedule import lr_factor


@dataclass
class LoopOptions:
    """What the engine needs of a trainer's options."""

    epochs: int
    batch_size: int
    lr: float
    seed: int = 0
    flip: bool = True
    schedule: str = "step"
    step_size: int = 30
    gamma: float = 0.1
    warmup_epochs: int = 0
    clip_grad: float = 1.0
    select: str = "last"
    diverged_hint: str = "try a lower --lr or --clip-grad"


class Trainer(Protocol):
    """What a trainer gives the engine."""

    model: torch.nn.Module
    params: list[torch.Tensor]
    optim: torch.optim.Optimizer
    n_train: int

    def step(self, idx: np.ndarray, flips: np.ndarray | None, dist: Dist) -> tuple[torch.Tensor, list[float]]:
        """The loss on training samples ``idx`` (flipped where ``flips[idx]``) and a list of
        sums for the epoch's statistics (added over steps and processes)."""

    def train_row(self, sums: list[float]) -> dict:
        """The epoch's ``train_*`` entries from the summed statistics."""

    def validate(self, dist: Dist) -> dict:
        """The epoch's ``val_*`` entries ({} without a validation split)."""

    def score(self, row: dict) -> float:
        """The number model selection compares (higher is better)."""


def steps_per_epoch(n: int, batch_size: int, dist: Dist) -> tuple[int, int]:
    """(samples per process, optimizer steps per epoch); every process gets as many."""
    per_rank = n // dist.world
    if per_rank == 0:
        raise OptionError(f"{n} training images cannot be shared by {dist.world} processes")
    return per_rank, math.ceil(per_rank / batch_size)


def train_one_epoch(trainer: Trainer, opts: LoopOptions, epoch: int, dist: Dist,
                    on_step: Callable[[int, int], None] | None = None) -> tuple[list[float], float]:
    """One pass over the training set; returns the summed statistics (over processes) and
    the learning rate of the epoch's last step."""
    per_rank, spe = steps_per_epoch(trainer.n_train, opts.batch_size, dist)
    perm, flips = epoch_order(opts.seed, epoch, trainer.n_train)
    if not opts.flip:
        flips = None
    mine = perm[: per_rank * dist.world][dist.rank::dist.world] if dist.enabled else perm
    sums: list[float] | None = None
    lr = opts.lr
    for k, s in enumerate(range(0, len(mine), opts.batch_size)):
        lr = opts.lr * lr_factor(opts.schedule, epoch * spe + k, spe, opts.epochs, opts.step_size, opts.gamma,
                                 opts.warmup_epochs)
        for group in trainer.optim.param_groups:
            group["lr"] = lr
        loss, stats = trainer.step(mine[s:s + opts.batch_size], flips, dist)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"training stopped: the loss became {loss.item()} at epoch {epoch + 1}, "
                                   f"step {k + 1}; {opts.diverged_hint}")
        trainer.optim.zero_grad(set_to_none=True)
        loss.backward()
        dist.average_gradients(trainer.params)
        if opts.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(trainer.params, opts.clip_grad)
        trainer.optim.step()
        sums = stats if sums is None else [a + b for a, b in zip(sums, stats)]
        if on_step:
            on_step(1, spe)
    return dist.sum(sums or []), lr


def fit(trainer: Trainer, run: RunDir, opts: LoopOptions, dist: Dist, start_epoch: int = 0,
        sel: Selection | None = None, rows: list[dict] | None = None,
        on_step: Callable[[int, int], None] | None = None,
        on_epoch: Callable[[dict], None] | None = None) -> tuple[Selection, list[dict]]:
    """Epochs ``start_epoch``…``opts.epochs - 1``: train, validate, select, commit. Each
    row gets ``best`` (best validation score so far) and ``selected`` (this epoch's weights
    are now the run's model)."""
    sel = sel or Selection(opts.select)
    rows = list(rows or [])
    if dist.enabled:  # every process starts from rank 0's weights
        with torch.no_grad():
            for q in trainer.model.state_dict().values():
                torch.distributed.broadcast(q, 0)
    for epoch in range(start_epoch, opts.epochs):
        t0 = time.perf_counter()
        trainer.model.train()
        sums, lr = train_one_epoch(trainer, opts, epoch, dist, on_step)
        row = {"epoch": epoch, "lr": lr}
        row.update(trainer.train_row(sums))
        row.update(trainer.validate(dist))
        trainer.model.train()
        row["seconds"] = time.perf_counter() - t0
        row["images_per_s"] = trainer.n_train / row["seconds"]
        row["best"] = sel.update(epoch, trainer.score(row))
        row["selected"] = sel.selected_epoch == epoch
        rows.append(row)
        if dist.main:
            run.commit(trainer.model, trainer.optim, epoch, sel, rows)
        dist.barrier()
        if on_epoch:
            on_epoch(row)
    return sel, rows


def run_training(trainer: Trainer, run: RunDir, opts: LoopOptions, dist: Dist, resume: bool,
                 on_step: Callable[[int, int], None] | None = None,
                 on_epoch: Callable[[dict], None] | None = None,
                 on_resume: Callable[[int, int], None] | None = None) -> tuple[Selection, list[dict], dict]:
    """A trainer's whole run: continue from ``run``'s state.pt (its files re-derived by the
    main process; ``on_resume(epoch, epochs)`` told the 1-based epoch it continues from) or
    start fresh, then :func:`fit`. Returns the selection, the metric rows and the row of the
    selected epoch."""
    steps_per_epoch(trainer.n_train, opts.batch_size, dist)  # refuses a split too small for the processes
    start, sel, rows = 0, None, []
    if resume:
        start, sel, rows = run.resume(trainer.model, trainer.optim, opts.select, rederive=dist.main)
        if on_resume:
            on_resume(start + 1, opts.epochs)
    dist.barrier()
    sel, rows = fit(trainer, run, opts, dist, start, sel, rows, on_step, on_epoch)
    chosen = next((r for r in rows if r["epoch"] == sel.selected_epoch), rows[-1] if rows else {})
    return sel, rows, chosen


def global_share(local: float, dist: Dist) -> float:
    """``world · local / Σ local`` over the processes: multiply a loss normalised by this
    process's count (``local``) by it, and the average over processes of the scaled losses
    is the loss normalised by the global count, as one process with the whole batch computes."""
    if not dist.enabled:
        return 1.0
    total = dist.sum([float(local)])[0]
    return dist.world * float(local) / total if total > 0 else 1.0
