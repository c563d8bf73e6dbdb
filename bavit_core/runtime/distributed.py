"""torchrun / PyTorch distributed context: ranks, reductions, image shards and gathers for
sharded evaluation, and the seeded epoch order every rank shares.

Sharded evaluation (predict, prune-eval) gives each process a contiguous block of the
images (:meth:`Dist.shard`), so concatenating the blocks in rank order restores the
single-process order exactly; :meth:`Dist.gather` collects every rank's part, and an
error raised on any rank is turned into the same error on every rank
(:meth:`Dist.run_shard`) instead of leaving the others waiting in a collective."""
from __future__ import annotations

import os
from typing import Callable, TypeVar

import numpy as np
import torch


T = TypeVar("T")


def shard_block(n: int, rank: int, world: int) -> np.ndarray:
    """Indices of ``rank``'s contiguous block when ``range(n)`` is split over ``world``
    processes; the first ``n % world`` blocks hold one item more."""
    return np.array_split(np.arange(n), world)[rank]


class Dist:
    """torchrun / DDP context: rank, world size, reductions, shards and gathers."""

    @staticmethod
    def local_device(device: torch.device) -> torch.device:
        """Under torchrun on CUDA, each process uses the GPU of its LOCAL_RANK."""
        if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        return device

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        self.owns_group = False
        if self.enabled and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend)
            self.owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """Average the gradients of ``params`` over the processes in one all-reduce (for
        training loops that do not go through DDP's forward, such as the pruned YOLOS)."""
        if not self.enabled:
            return
        grads = [q.grad if q.grad is not None else torch.zeros_like(q) for q in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        off = 0
        for q, g in zip(params, grads):
            q.grad = flat[off:off + g.numel()].view_as(g).clone()
            off += g.numel()

    def shard(self, n: int) -> np.ndarray:
        """This rank's contiguous block of ``range(n)`` (blocks differ by at most one item;
        concatenated in rank order they are ``range(n)``)."""
        return shard_block(n, self.rank, self.world)

    def gather(self, part: T) -> list[T]:
        """Every rank's ``part`` (any picklable object), in rank order, on every rank."""
        if not self.enabled:
            return [part]
        parts: list = [None] * self.world
        torch.distributed.all_gather_object(parts, part)
        return parts

    def run_shard(self, fn: Callable[[], T]) -> list[T]:
        """Run ``fn`` on this rank's shard and gather its results from all ranks. A BavitError
        on any rank is re-raised on every rank (lowest rank's message), so no process is
        left waiting for one that failed."""
        from .errors import BavitError

        try:
            mine = ("ok", fn())
        except BavitError as exc:
            if not self.enabled:
                raise
            mine = ("error", (type(exc), str(exc)))
        parts = self.gather(mine)
        for status, payload in parts:
            if status == "error":
                kind, message = payload
                raise BavitError(message) if not issubclass(kind, BavitError) else _rebuild(kind, message)
        return [payload for _, payload in parts]

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def close(self):
        """Leave the group together: a process that finished its share early (prune-eval's
        ranks > 0, while rank 0 times and scores) waits here for the others before the group
        is destroyed; destroying it under a peer still using it aborted the process
        ("terminate called without an active exception") on a loaded machine."""
        if self.owns_group:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def epoch_order(seed: int, epoch: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle and flips of ``epoch``, drawn for the whole dataset before sharding: a resumed
    run sees the same order as an uninterrupted one, and N processes with batch b the same
    samples per step as one process with batch N·b."""
    g = np.random.default_rng([seed, epoch])
    return g.permutation(n), g.random(n) < 0.5


def _rebuild(kind, message: str):
    """An exception of ``kind`` carrying exactly ``message`` (InputFileError takes a path)."""
    from .errors import BavitError

    exc = BavitError.__new__(kind)
    Exception.__init__(exc, message)
    return exc
