"""torchrun / PyTorch DDP context shared by the trainers."""
from __future__ import annotations

import os

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

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def close(self):
        if self.owns_group:
            torch.distributed.destroy_process_group()
