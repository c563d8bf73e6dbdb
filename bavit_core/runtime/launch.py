"""The torchrun launch environment (RANK, WORLD_SIZE, LOCAL_RANK), read without importing torch."""
from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True on rank 0 of a torchrun launch, and in a plain single process."""
    return rank() == 0
