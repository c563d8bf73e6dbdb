"""torchrun / PyTorch DDP context, and the seeded epoch order every rank shares."""
from __future__ import annotations

import os

import numpy as np
import torch


class Dist:
    """torchrun / DDP context: rank, world size, reductions."""

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

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def close(self):
        if self.owns_group:
            torch.distributed.destroy_process_group()


def epoch_order(seed: int, epoch: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle and flips of ``epoch``, drawn for the whole dataset before sharding: a resumed
    run sees the same order as an uninterrupted one, and N processes with batch b the same
    samples per step as one process with batch N·b."""
    g = np.random.default_rng([seed, epoch])
    return g.permutation(n), g.random(n) < 0.5
